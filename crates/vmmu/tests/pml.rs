//! PML dirty tracking (`DirtyTracking::Pml`): harvests clear Dirty bits of
//! 4 KiB leaves and leave them writable, huge leaves are write-protected, the
//! processor's logged writes reach the bitmap or ring when the vCPU exits, a
//! full log asks for an exit, and the configuration is refused without A/D
//! bits.

use vmmu::dirty_log::MANUAL_PROTECT_ENABLE;
use vmmu::testing::hardware_set_dirty;
use vmmu::{DirtyTracking, ErrorCode, Level, MemFlags, VmConfig, VmError};

mod common;
use common::*;

const LOG: u32 = MemFlags::LOG_DIRTY_PAGES.bits();

fn pml() -> VmConfig {
    VmConfig {
        dirty_tracking: DirtyTracking::Pml,
        ..VmConfig::default()
    }
}

fn set_bits(log: &[u64]) -> Vec<u64> {
    (0..log.len() as u64 * 64)
        .filter(|p| log[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

/// The processor writing `page` through its mapping: D set on the leaf, and
/// the write logged if that set it.
fn processor_write(vm: &vmmu::Vm, vcpu: &vmmu::VcpuMmu, page: u64) -> bool {
    let was_dirty = leaf(vm, page).unwrap().1.is_dirty();
    if was_dirty {
        return false;
    }
    assert!(hardware_set_dirty(vm, gpa(page)), "page {page} writable");
    vcpu.pml_log(gpa(page))
}

#[test]
fn test_pml_needs_ad_bits() {
    let host = vmmu::testing::TestHost::new();
    let err = vmmu::Vm::new(
        VmConfig {
            ad_enabled: false,
            ..pml()
        },
        host.ops(),
    )
    .unwrap_err();
    assert!(matches!(err, VmError::InvalidConfig(m) if m.contains("A/D")));
    assert_eq!(err.errno(), vmmu::errno::EINVAL);
}

#[test]
fn test_pml_harvest_clears_dirty_keeps_pages_writable_and_logs_at_exit() {
    let (host, vm, mut vcpu) = setup(pml());
    for p in [3, 64] {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    let before = vm.stats();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    let st = vm.stats().since(&before);
    assert_eq!(st.dirty_bits_harvested, 2, "enable clears D of both");
    assert_eq!(st.entries_write_protected, 0, "and protects nothing");
    assert_eq!(st.tlb_flush_remote, 1, "one flush: no TLB may keep D set");
    for p in [3, 64] {
        let (_, s) = leaf(&vm, p).unwrap();
        assert!(s.is_writable() && !s.is_dirty(), "page {p}: {s:?}");
    }
    // The guest writes page 3 without an exit: the processor logs it.
    vcpu.prepare_entry().unwrap();
    assert!(vcpu.enter_guest_mode());
    assert!(!processor_write(&vm, &vcpu, 3), "one entry: not full");
    assert_eq!(vcpu.pml_pending(), 1);
    // Still in the log: a harvest now does not see it (KVM's sync only
    // kicks), and leaves the page's D set.
    assert!(set_bits(&vm.get_dirty_log(0).unwrap()).is_empty());
    assert!(leaf(&vm, 3).unwrap().1.is_dirty());
    assert!(vcpu.exit_requested(), "the harvest kicked the running vCPU");
    vcpu.exit_guest_mode();
    assert_eq!(vcpu.pml_pending(), 0, "the exit drains the log");
    let before = vm.stats();
    assert_eq!(set_bits(&vm.get_dirty_log(0).unwrap()), [3]);
    let st = vm.stats().since(&before);
    assert_eq!(st.dirty_bits_harvested, 1);
    assert_eq!(st.entries_write_protected, 0);
    assert_eq!(st.tlb_flush_remote, 1);
    let (_, s) = leaf(&vm, 3).unwrap();
    assert!(
        s.is_writable() && !s.is_dirty(),
        "harvested, still writable"
    );
    // No fault was needed for any of it.
    assert_eq!(vcpu.stats().fast_path_fixed, 0);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_pml_log_full_after_512_entries_and_ring_gets_them() {
    let host = vmmu::testing::TestHost::new();
    let vm = vmmu::Vm::new(pml(), host.ops()).unwrap();
    vm.enable_dirty_ring(4096).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    for p in 0..600 {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    let mut fetch = 0;
    vm.collect_dirty_ring(0, &mut fetch, |_, _| {});
    vm.reset_dirty_rings();
    vcpu.prepare_entry().unwrap();
    assert!(vcpu.enter_guest_mode());
    let mut full = Vec::new();
    for p in 0..600 {
        if processor_write(&vm, &vcpu, p) {
            // The PML-full exit, then back in.
            full.push(p);
            assert_eq!(vcpu.pml_pending(), 512);
            vcpu.exit_guest_mode();
            assert_eq!(vcpu.pml_pending(), 0);
            vcpu.prepare_entry().unwrap();
            assert!(vcpu.enter_guest_mode());
        }
    }
    assert_eq!(full, [511], "the 512th entry fills the log");
    assert_eq!(vcpu.stats().pml_full_exits, 1);
    vcpu.exit_guest_mode();
    let mut got = Vec::new();
    vm.collect_dirty_ring(0, &mut fetch, |slot, off| got.push((slot, off)));
    assert_eq!(got.len(), 600, "every logged write reached the ring");
    assert!(got.iter().all(|&(s, _)| s == 0));
    assert_eq!(vm.stats().pml_entries_flushed, 600);
    // Reset clears D again, leaving the pages writable.
    assert_eq!(vm.reset_dirty_rings(), 600);
    for p in [0, 511, 599] {
        let (_, s) = leaf(&vm, p).unwrap();
        assert!(s.is_writable() && !s.is_dirty(), "page {p}: {s:?}");
    }
    drop(vcpu);
    drop(vm);
}

#[test]
fn test_pml_write_protects_huge_leaves_and_clear_log_clears_exactly_what_was_asked() {
    let host = vmmu::testing::TestHost::new();
    host.set_host_level(Level::M2);
    let vm = vmmu::Vm::new(
        VmConfig {
            eager_page_split: false,
            ..pml()
        },
        host.ops(),
    )
    .unwrap();
    vm.enable_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE)
        .unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap();
    assert_eq!(leaf(&vm, 0).unwrap().0, Level::M2);
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    // One Dirty bit cannot tell which of 512 pages were written.
    let (level, s) = leaf(&vm, 0).unwrap();
    assert_eq!(level, Level::M2);
    assert!(!s.is_writable(), "huge leaf must be write-protected: {s:?}");
    // The write that follows faults and is mapped at 4 KiB, dirty.
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(5), ErrorCode::WRITE | ErrorCode::PRESENT)
        .unwrap();
    vcpu.page_fault(gpa(7), ErrorCode::WRITE).unwrap();
    assert_eq!(leaf(&vm, 5).unwrap().0, Level::K4);
    let log = vm.get_dirty_log(0).unwrap();
    assert_eq!(set_bits(&log), [5, 7]);
    // Clear only page 5: its D goes, page 7 keeps its D and its bit.
    let want = [1u64 << 5];
    assert_eq!(vm.clear_dirty_log(0, 0, 64, &want).unwrap(), 1);
    assert!(!leaf(&vm, 5).unwrap().1.is_dirty());
    assert!(leaf(&vm, 7).unwrap().1.is_dirty());
    assert!(leaf(&vm, 5).unwrap().1.is_writable());
    assert_eq!(set_bits(&vm.get_dirty_log(0).unwrap()), [7]);
    teardown(host, vm, vec![vcpu]);
}

/// Without PML the log is never written, whatever the processor does.
#[test]
fn test_write_protect_tracking_has_no_log() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.prepare_entry().unwrap();
    for _ in 0..600 {
        assert!(!vcpu.pml_log(gpa(1)));
    }
    assert_eq!(vcpu.pml_pending(), 0);
    teardown(host, vm, vec![vcpu]);
}
