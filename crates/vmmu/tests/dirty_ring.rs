//! The dirty ring: enabling it (sizes, only before vCPUs), pushes on logged
//! writes, the VMM's collect and reset (which re-protects), the soft-full
//! exit, and bitmap calls refused while rings are in use.

use std::sync::Arc;

use vmmu::testing::TestHost;
use vmmu::{errno, DirtyLogError, ErrorCode, MemFlags, RetPf, VcpuMmu, Vm, VmConfig, VmError};

mod common;
use common::*;

const LOG: u32 = MemFlags::LOG_DIRTY_PAGES.bits();

fn ring_vm(entries: u32) -> (Arc<TestHost>, Vm, VcpuMmu) {
    let host = TestHost::new();
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    vm.enable_dirty_ring(entries).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}

fn collect(vm: &Vm, fetch: &mut u32) -> Vec<(u32, u64)> {
    let mut v = Vec::new();
    vm.collect_dirty_ring(0, fetch, |s, o| v.push((s, o)));
    v
}

#[test]
fn test_enable_dirty_ring_is_refused_as_kvm_refuses_it() {
    let host = TestHost::new();
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    for (n, want) in [
        (0, errno::EINVAL),
        (300, errno::EINVAL),
        (128, errno::EINVAL),
        (1 << 17, errno::E2BIG),
    ] {
        let e = vm.enable_dirty_ring(n).unwrap_err();
        assert_eq!(e.errno(), want, "{n}: {e:?}");
    }
    // A slot already logging into a bitmap: refused, nothing changed.
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    assert_eq!(vm.enable_dirty_ring(4096), Err(DirtyLogError::RingTooLate));
    assert!(vm.get_dirty_log(0).is_ok(), "the bitmap still works");
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    vm.enable_dirty_ring(4096).unwrap();
    assert_eq!(
        vm.enable_dirty_ring(4096),
        Err(DirtyLogError::RingTooLate),
        "twice"
    );
    teardown(host, vm, vec![]);
    // After a vCPU exists: refused.
    let (host, vm, vcpu) = setup(VmConfig::default());
    assert_eq!(vm.enable_dirty_ring(4096), Err(DirtyLogError::RingTooLate));
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_ring_logs_writes_and_reset_reprotects_exactly_the_collected_pages() {
    let (host, vm, mut vcpu) = ring_vm(256);
    for p in [3, 4, 70] {
        assert_eq!(
            vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap(),
            RetPf::Fixed
        );
    }
    // Rings and bitmaps are exclusive.
    assert_eq!(vm.get_dirty_log(0).unwrap_err().errno(), errno::ENXIO);
    let mut fetch = 0;
    assert_eq!(collect(&vm, &mut fetch), [(0, 3), (0, 4), (0, 70)]);
    assert!(collect(&vm, &mut fetch).is_empty(), "collected once");
    assert_eq!(vcpu.dirty_ring_used(), 3);
    // A write after the collect is pushed but not reset by this reset.
    vcpu.page_fault(gpa(9), ErrorCode::WRITE).unwrap();
    let flushes = vm.stats().tlb_flush_remote;
    assert_eq!(vm.reset_dirty_rings(), 3, "as many as were collected");
    assert_eq!(vm.stats().tlb_flush_remote, flushes + 1);
    for p in [3, 4, 70] {
        assert!(
            !leaf(&vm, p).unwrap().1.is_writable(),
            "page {p} not protected"
        );
    }
    assert!(
        leaf(&vm, 9).unwrap().1.is_writable(),
        "not collected: left alone"
    );
    assert_eq!(vcpu.dirty_ring_used(), 1);
    // The next write to a reset page is pushed again (the fast path).
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(4), ErrorCode::WRITE | ErrorCode::PRESENT)
        .unwrap();
    assert_eq!(collect(&vm, &mut fetch), [(0, 9), (0, 4)]);
    assert_eq!(vm.reset_dirty_rings(), 2);
    assert_eq!(vm.dirty_ring_overflows(), 0);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_a_full_ring_exits_until_the_vmm_resets_it() {
    let (host, vm, mut vcpu) = ring_vm(256);
    // 256 entries, 64 in reserve: the 192nd push fills it.
    for p in 0..192 {
        vcpu.prepare_entry().unwrap();
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    assert!(vcpu.dirty_ring_soft_full());
    let e = vcpu.prepare_entry().unwrap_err();
    assert!(matches!(e, VmError::DirtyRingFull { vcpu: 0 }), "{e:?}");
    assert_eq!(e.errno(), errno::EAGAIN);
    // Collected but not reset: still full.
    let mut fetch = 0;
    assert_eq!(collect(&vm, &mut fetch).len(), 192);
    assert!(vcpu.prepare_entry().is_err());
    assert_eq!(vm.reset_dirty_rings(), 192);
    vcpu.prepare_entry().unwrap();
    // The ring wraps: more writes are logged in order.
    vcpu.page_fault(gpa(500), ErrorCode::WRITE).unwrap();
    assert_eq!(collect(&vm, &mut fetch), [(0, 500)]);
    assert_eq!(vm.dirty_ring_overflows(), 0);
    teardown(host, vm, vec![vcpu]);
}
