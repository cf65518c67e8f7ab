//! guest_memfd files the host may map (6.18's `MMAP` and `INIT_SHARED`): the
//! host's view through `mmap`, and gmem-only slots, whose shared faults take
//! their frames from the file instead of the slot's host address.

use std::sync::Arc;

use vmmu::gmem::{
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
};
use vmmu::testing::TestHost;
use vmmu::{errno, ErrorCode, GmemError, Level, RetPf, VcpuMmu, Vm, VmConfig};

mod common;
use common::*;

const GMEM: u32 = 1 << 2;
const PUNCH: u32 = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
const SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// A default-type VM whose slot 0 (8 MiB at 1 GiB) is bound to a file with `flags`.
fn gmem_vm(flags: u64) -> (Arc<TestHost>, Vm, vmmu::GuestMemfd, VcpuMmu) {
    let host = TestHost::new();
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    let file = vm.create_guest_memfd(SIZE, flags).unwrap();
    vm.set_user_memory_region2(region(0, GPA, SIZE, HVA, GMEM), Some(&file), 0)
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, file, vcpu)
}

fn finish(host: Arc<TestHost>, vm: Vm, file: vmmu::GuestMemfd, vcpus: Vec<VcpuMmu>) {
    drop(file);
    teardown(host.clone(), vm, vcpus);
    assert_eq!(host.private_pages(), 0, "guest_memfd pages leaked");
}

#[test]
fn test_mmap_is_refused_without_the_mmap_flag_and_sigbus_without_shared_memory() {
    let (host, vm, file, vcpu) = gmem_vm(0);
    assert_eq!(file.mmap(true), Err(GmemError::MmapNotSupported));
    assert_eq!(file.mmap(true).unwrap_err().errno(), errno::ENODEV);
    assert_eq!(file.mmap_fault(0), Err(GmemError::MmapNotSupported));
    finish(host, vm, file, vec![vcpu]);

    // MMAP alone maps, but the memory is not shared: a touch is SIGBUS.
    let (host, vm, file, vcpu) = gmem_vm(GUEST_MEMFD_FLAG_MMAP);
    file.mmap(true).unwrap();
    assert_eq!(file.mmap(false), Err(GmemError::PrivateMapping));
    assert_eq!(file.mmap(false).unwrap_err().errno(), errno::EINVAL);
    let e = file.mmap_fault(0).unwrap_err();
    assert!(matches!(e, GmemError::SigBus { offset: 0, .. }), "{e:?}");
    assert_eq!(e.errno(), errno::EFAULT);
    assert_eq!(
        file.allocated_pages(),
        0,
        "a refused touch allocates nothing"
    );
    finish(host, vm, file, vec![vcpu]);

    // Shared memory: in bounds it maps, past the end it is SIGBUS, a poisoned
    // page is SIGBUS.
    let (host, vm, file, vcpu) = gmem_vm(SHARED);
    let pfn = file.mmap_fault(4096).unwrap();
    assert_eq!(file.mmap_fault(4096), Ok(pfn), "the same page each time");
    assert_eq!(file.allocated_pages(), 1);
    assert!(matches!(
        file.mmap_fault(SIZE),
        Err(GmemError::SigBus { .. })
    ));
    file.memory_failure(4096).unwrap();
    assert!(matches!(
        file.mmap_fault(4096),
        Err(GmemError::SigBus { .. })
    ));
    finish(host, vm, file, vec![vcpu]);
}

#[test]
fn test_shared_faults_on_a_gmem_only_slot_map_the_files_page_not_the_host_address() {
    let (host, vm, file, mut vcpu) = gmem_vm(SHARED);
    // The host writes page 3 through its mapping first; the guest's fault must
    // map that very page.
    let host_view = file.mmap_fault(3 * 4096).unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    let (level, s) = leaf(&vm, 3).unwrap();
    assert_eq!(level, Level::K4, "guest_memfd pages are order 0");
    assert_eq!(s.pfn(), host_view);
    assert!(s.is_writable());
    assert_eq!(host.lookup(hva(3)), None, "the slot's hva was never used");
    // A page the guest touches first is the one the host then sees.
    vcpu.page_fault(gpa(5), ErrorCode::empty()).unwrap();
    let (_, s5) = leaf(&vm, 5).unwrap();
    assert_eq!(file.mmap_fault(5 * 4096), Ok(s5.pfn()));
    let st = vm.stats();
    assert_eq!((st.gmem_shared_faults, st.private_faults), (2, 0));
    assert_eq!(host.outstanding_refs(), 0, "no host frame was referenced");

    // A punch-hole zaps the guest's leaf and frees the page; both sides then
    // get a fresh one.
    let inv = st.gmem_invalidations;
    file.fallocate(PUNCH, 3 * 4096, 4096).unwrap();
    assert_eq!(vm.stats().gmem_invalidations, inv + 1);
    assert!(leaf(&vm, 3).is_none(), "punched page still mapped");
    assert!(leaf(&vm, 5).is_some(), "outside the hole nothing is zapped");
    let fresh = file.mmap_fault(3 * 4096).unwrap();
    vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap();
    assert_eq!(leaf(&vm, 3).unwrap().1.pfn(), fresh);
    finish(host, vm, file, vec![vcpu]);
}

#[test]
fn test_a_slot_of_a_file_without_mmap_keeps_shared_faults_on_the_host_address() {
    let (host, vm, file, mut vcpu) = gmem_vm(0);
    vcpu.page_fault(gpa(2), ErrorCode::WRITE).unwrap();
    let (_, s) = leaf(&vm, 2).unwrap();
    assert_eq!(Some(s.pfn()), host.lookup(hva(2)).map(|m| m.0));
    assert_eq!(vm.stats().gmem_shared_faults, 0);
    assert_eq!(file.allocated_pages(), 0);
    finish(host, vm, file, vec![vcpu]);
}

#[test]
fn test_a_poisoned_page_of_a_gmem_only_slot_is_a_hardware_poison_fault() {
    let (host, vm, file, mut vcpu) = gmem_vm(SHARED);
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    file.memory_failure(4096).unwrap();
    assert!(leaf(&vm, 1).is_none(), "the failed page is zapped");
    let e = vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap_err();
    assert_eq!(e.errno(), errno::EHWPOISON, "{e:?}");
    finish(host, vm, file, vec![vcpu]);
}
