//! End-to-end behaviour of the fault pipeline, invalidations, memslots and roots
//! on the tracking test host.

use std::sync::Arc;

use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, FaultError, Gfn, GfnRange, Gpa, HostFaultError, Hva, HvaRange, Level, MemFlags,
    RetPf, RootFilter, UserMemoryRegion, VcpuMmu, Vm, VmConfig,
};

const GPA: u64 = 1 << 30;
const HVA: u64 = 64 << 30;
const SIZE: u64 = 8 << 20;

fn setup(config: VmConfig) -> (Arc<TestHost>, Vm, VcpuMmu) {
    let host = TestHost::new();
    let vm = Vm::new(config, host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}

fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: u32) -> UserMemoryRegion {
    UserMemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    }
}

fn gpa(page: u64) -> Gpa {
    Gpa(GPA + page * 4096)
}

fn hva(page: u64) -> Hva {
    Hva(HVA + page * 4096)
}

fn leaf(vm: &Vm, page: u64) -> Option<(Level, vmmu::Spte)> {
    let gfn = gpa(page).gfn();
    vm.mappings(0)
        .into_iter()
        .find(|(g, l, s)| s.is_shadow_present() && gfn.0 >= g.0 && gfn.0 < g.0 + l.pages())
        .map(|(_, l, s)| (l, s))
}

fn teardown(host: Arc<TestHost>, vm: Vm, vcpus: Vec<VcpuMmu>) {
    drop(vcpus);
    drop(vm);
    assert_eq!(host.memory.allocated(), 0, "table pages leaked");
    assert_eq!(host.memory.double_frees(), 0);
    assert_eq!(host.outstanding_refs(), 0, "frame references leaked");
}

#[test]
fn test_fault_write_maps_writable_4k_then_read_is_spurious() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    let (level, spte) = leaf(&vm, 3).unwrap();
    assert_eq!(level, Level::K4);
    assert!(spte.is_writable() && spte.is_dirty());
    assert_eq!(Some(spte.pfn()), host.lookup(hva(3)).map(|m| m.0));
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::empty()).unwrap(),
        RetPf::Spurious
    );
    let s = vm.stats();
    assert_eq!(s.faults_fixed, 1);
    assert_eq!(s.present(Level::K4), 1);
    assert!(s.tables_allocated >= 3);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fault_huge_host_page_maps_2m_and_respects_slot_alignment() {
    let host = TestHost::new();
    host.set_host_level(Level::M2);
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    // A slot whose hva is misaligned with its gpa at 2M can never be mapped huge.
    vm.set_user_memory_region(region(1, 2 * GPA, SIZE, 2 * HVA + 4096, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(513), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(leaf(&vm, 513).unwrap().0, Level::M2);
    assert_eq!(
        vcpu.page_fault(Gpa(2 * GPA + 4096), ErrorCode::WRITE)
            .unwrap(),
        RetPf::Fixed
    );
    let st = vm.stats();
    assert_eq!(st.leaves_mapped_2m, 1);
    assert_eq!(st.leaves_mapped_4k, 1);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_invalidation_zaps_and_precheck_retries_without_mmu_lock() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    let range = HvaRange::new(hva(0), hva(16));
    let inv = vm.invalidate_range_start(range);
    assert!(leaf(&vm, 1).is_none(), "start must zap");
    let before = vcpu.stats();
    assert_eq!(
        vcpu.page_fault(gpa(2), ErrorCode::WRITE).unwrap(),
        RetPf::Retry
    );
    let d = vcpu.stats().since(&before);
    assert_eq!(d.precheck_retries, 1);
    assert_eq!(
        d.mmu_lock_read, 0,
        "a fault inside an in-progress invalidation must not take mmu_lock"
    );
    // Outside the range: maps normally while the invalidation is in progress.
    assert_eq!(
        vcpu.page_fault(gpa(100), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    inv.end();
    assert_eq!(
        vcpu.page_fault(gpa(2), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(vm.invalidations_in_progress(), 0);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_invalidation_without_precheck_retries_under_the_lock() {
    let config = VmConfig {
        precheck: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    let range = HvaRange::new(hva(0), hva(16));
    let inv = vm.invalidate_range_start(range);
    let before = vcpu.stats();
    assert_eq!(
        vcpu.page_fault(gpa(2), ErrorCode::WRITE).unwrap(),
        RetPf::Retry
    );
    let d = vcpu.stats().since(&before);
    assert_eq!(d.precheck_retries, 0);
    assert_eq!(d.postcheck_retries + d.locked_retries, 1);
    inv.end();
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fault_racing_invalidation_retries_on_sequence_change() {
    // Host changes the mapping between the fault's frame lookup and its locked
    // check: simulated by an invalidation that starts and ends while no mapping
    // exists yet, then checking a stale snapshot via the seq. The public path: a
    // fault after `end` maps the new frame.
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.page_fault(gpa(5), ErrorCode::WRITE).unwrap();
    let old = host.lookup(hva(5)).unwrap().0;
    let range = HvaRange::new(hva(5), hva(6));
    let inv = vm.invalidate_range_start(range);
    let new = host.fresh_pfn();
    host.set(hva(5), new, true);
    inv.end();
    assert_eq!(
        vcpu.page_fault(gpa(5), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    let (_, spte) = leaf(&vm, 5).unwrap();
    assert_eq!(spte.pfn(), new);
    assert_ne!(spte.pfn(), old);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_memslot_delete_makes_accesses_mmio_and_frees_obsolete_roots() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.page_fault(gpa(7), ErrorCode::WRITE).unwrap();
    let root_before = vcpu.root_id();
    vm.set_user_memory_region(region(0, GPA, 0, HVA, 0))
        .unwrap();
    assert!(vm
        .mappings(0)
        .iter()
        .all(|(_, _, s)| !s.is_shadow_present()));
    assert!(vcpu.has_requests());
    let e = vcpu.prepare_entry().unwrap();
    assert!(e.flush_tlb);
    assert_ne!(vcpu.root_id(), root_before, "obsolete root replaced");
    assert_eq!(
        vcpu.page_fault(gpa(7), ErrorCode::empty()).unwrap(),
        RetPf::Emulate
    );
    let s = vm.stats();
    assert_eq!(s.roots_invalidated, 1);
    assert_eq!(s.roots_freed, 1);
    assert_eq!(s.fast_zaps, 1);
    assert!(vm.roots().iter().all(|r| r.valid));
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_memslot_move_old_gpa_is_mmio_new_gpa_maps() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    let pfn = leaf(&vm, 1).unwrap().1.pfn();
    vm.set_user_memory_region(region(0, 4 * GPA, SIZE, HVA, 0))
        .unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(1), ErrorCode::empty()).unwrap(),
        RetPf::Emulate
    );
    assert_eq!(
        vcpu.page_fault(Gpa(4 * GPA + 4096), ErrorCode::empty())
            .unwrap(),
        RetPf::Fixed
    );
    let m = vm.mappings(0);
    let moved = m
        .iter()
        .find(|(g, _, s)| *g == Gfn(((4 * GPA) >> 12) + 1) && s.is_shadow_present())
        .unwrap();
    assert_eq!(moved.2.pfn(), pfn, "same host memory, new guest address");
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_readonly_slot_write_emulates_read_maps_readonly() {
    let host = TestHost::new();
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, MemFlags::READONLY.bits()))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap(),
        RetPf::Emulate
    );
    assert_eq!(
        vcpu.page_fault(gpa(0), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    let (_, s) = leaf(&vm, 0).unwrap();
    assert!(!s.is_writable() && !s.is_host_writable() && !s.is_mmu_writable());
    assert_eq!(
        vcpu.page_fault(gpa(0), ErrorCode::WRITE | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Emulate
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_host_readonly_write_is_efault_and_read_maps_readonly() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let pfn = host.fresh_pfn();
    host.set(hva(9), pfn, false);
    let err = vcpu.page_fault(gpa(9), ErrorCode::WRITE).unwrap_err();
    assert!(
        matches!(
            err,
            FaultError::Host {
                cause: HostFaultError::ReadOnly,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        vcpu.page_fault(gpa(9), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    assert!(!leaf(&vm, 9).unwrap().1.is_writable());
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_private_fault_without_private_memory_is_memory_fault_exit() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let err = vcpu
        .page_fault(gpa(1), ErrorCode::PRIVATE | ErrorCode::WRITE)
        .unwrap_err();
    assert_eq!(
        err,
        FaultError::MemoryFault {
            gpa: gpa(1),
            size: 4096,
            private: true
        }
    );
    // Also without any memslot: the mismatch wins over MMIO emulation.
    let err = vcpu
        .page_fault(Gpa(0x1000), ErrorCode::PRIVATE)
        .unwrap_err();
    assert!(matches!(err, FaultError::MemoryFault { .. }));
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fast_path_restores_write_protected_entry_and_logs_dirty() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, MemFlags::LOG_DIRTY_PAGES.bits()))
        .unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(4), ErrorCode::empty()).unwrap();
    vm.write_protect_gfn_range(0, GfnRange::new(gpa(0).gfn(), gpa(512).gfn()))
        .unwrap();
    let (_, s) = leaf(&vm, 4).unwrap();
    assert!(!s.is_writable() && s.is_mmu_writable());
    let slots = vm.memslots(0).unwrap();
    let bitmap = slots.by_id(0).unwrap().dirty_bitmap().unwrap();
    let dirty_before = bitmap.test(4);
    let before = vcpu.stats();
    assert_eq!(
        vcpu.page_fault(gpa(4), ErrorCode::WRITE | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Fixed
    );
    let d = vcpu.stats().since(&before);
    assert_eq!(d.fast_path_fixed, 1);
    assert_eq!(d.mmu_lock_read, 0, "fast path is lockless");
    assert!(leaf(&vm, 4).unwrap().1.is_writable());
    let _ = dirty_before;
    assert!(bitmap.test(4), "the fast path logs the write");
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_access_tracking_without_ad_bits_restored_by_fast_path() {
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    vcpu.page_fault(gpa(2), ErrorCode::WRITE).unwrap();
    assert!(vm.test_young(hva(2)));
    assert!(vm.clear_young(HvaRange::new(hva(0), hva(8))));
    let (_, s) = leaf(&vm, 2).unwrap();
    assert!(s.is_access_tracked());
    assert!(!vm.test_young(hva(2)));
    let before = vcpu.stats();
    // The hardware sees a not-present entry and reports a read violation.
    assert_eq!(
        vcpu.page_fault(gpa(2), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(vcpu.stats().since(&before).fast_path_fixed, 1);
    let (_, s) = leaf(&vm, 2).unwrap();
    assert!(s.is_accessed() && !s.is_writable() && s.is_mmu_writable());
    // A write then sets W through the fast path too.
    assert_eq!(
        vcpu.page_fault(gpa(2), ErrorCode::WRITE | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Fixed
    );
    assert!(leaf(&vm, 2).unwrap().1.is_writable());
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_aging_with_ad_bits_clears_accessed() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.page_fault(gpa(2), ErrorCode::empty()).unwrap();
    assert!(vm.clear_flush_young(HvaRange::new(hva(2), hva(3))));
    assert!(!vm.clear_young(HvaRange::new(hva(2), hva(3))));
    assert!(!leaf(&vm, 2).unwrap().1.is_accessed());
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_mmio_entry_answers_from_cache_and_goes_stale_with_generation() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let hole = Gpa(3 * GPA);
    assert_eq!(
        vcpu.page_fault(hole, ErrorCode::empty()).unwrap(),
        RetPf::Emulate
    );
    let before = vcpu.stats();
    assert_eq!(
        vcpu.page_fault(hole, ErrorCode::RSVD).unwrap(),
        RetPf::Emulate
    );
    assert_eq!(vcpu.stats().since(&before).mmio_fast_hits, 1);
    // A slot appears there: the generation moved, so the cached entry is stale.
    vm.set_user_memory_region(region(1, 3 * GPA, 1 << 20, 2 * HVA, 0))
        .unwrap();
    assert_eq!(
        vcpu.page_fault(hole, ErrorCode::RSVD).unwrap(),
        RetPf::Fixed
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_roots_shared_by_vcpus_and_previous_root_survives_other_space_invalidation() {
    let (host, vm, mut v0) = setup(VmConfig::default());
    let mut v1 = vm.create_vcpu(1).unwrap();
    v1.prepare_entry().unwrap();
    assert_eq!(v0.root_id(), v1.root_id(), "same role, same root");
    let normal = v0.root_id();
    v0.set_smm(true).unwrap();
    v0.prepare_entry().unwrap();
    let smm = v0.root_id();
    assert_ne!(smm, normal);
    assert_eq!(v0.prev_root_ids()[0], normal);
    // Leave SMM: the cached root is reused, nothing is created.
    let created = vm.stats().roots_created;
    v0.set_smm(false).unwrap();
    v0.prepare_entry().unwrap();
    assert_eq!(v0.root_id(), normal);
    assert_eq!(vm.stats().roots_created, created);
    v0.set_smm(true).unwrap();
    v0.prepare_entry().unwrap();
    // Invalidate only SMM roots: the current (SMM) root is obsolete, the cached
    // normal root survives.
    vm.invalidate_roots(RootFilter::AddressSpace(1)).unwrap();
    v0.prepare_entry().unwrap();
    assert_eq!(v0.prev_root_ids()[0], normal, "valid previous root kept");
    assert_ne!(v0.root_id(), smm, "obsolete current root replaced");
    let s = vm.stats();
    assert!(s.prev_roots_kept >= 1);
    assert!(s.obsolete_roots_dropped >= 1);
    assert_eq!(s.roots_freed, 1);
    teardown(host, vm, vec![v0, v1]);
}

#[test]
fn test_unloaded_root_is_kept_by_the_mmu_reference() {
    let (host, vm, vcpu) = setup(VmConfig::default());
    let id = vcpu.root_id();
    drop(vcpu);
    let mut v = vm.create_vcpu(5).unwrap();
    v.prepare_entry().unwrap();
    assert_eq!(
        v.root_id(),
        id,
        "root preserved until explicitly invalidated"
    );
    teardown(host, vm, vec![v]);
}

#[test]
fn test_table_collapses_into_huge_leaf_after_host_collapse() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    for p in 512..520 {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    // The host collapses the range into one 2M page (a THP collapse).
    let range = HvaRange::new(hva(512), hva(1024));
    let inv = vm.invalidate_range_start(range);
    for p in 512..1024 {
        host.unmap(hva(p));
    }
    host.set_host_level(Level::M2);
    inv.end();
    let freed = vm.stats().tables_freed;
    assert_eq!(
        vcpu.page_fault(gpa(600), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(leaf(&vm, 600).unwrap().0, Level::M2);
    assert_eq!(
        vm.stats().tables_freed,
        freed + 1,
        "the 4K table was replaced and freed"
    );
    assert!(vm.stats().tlb_flush_remote >= 1);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_huge_leaf_split_when_smaller_mapping_needed() {
    let host = TestHost::new();
    host.set_host_level(Level::M2);
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(512), ErrorCode::empty()).unwrap();
    assert_eq!(leaf(&vm, 512).unwrap().0, Level::M2);
    // Dirty logging forces 4K: a write fault splits the huge leaf.
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, MemFlags::LOG_DIRTY_PAGES.bits()))
        .unwrap();
    let (_, s) = leaf(&vm, 512).unwrap();
    assert!(!s.is_writable(), "enabling dirty logging write-protects");
    assert_eq!(
        vcpu.page_fault(gpa(513), ErrorCode::WRITE | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Fixed
    );
    let st = vm.stats();
    assert_eq!(st.huge_splits, 1);
    assert_eq!(leaf(&vm, 513).unwrap().0, Level::K4);
    assert!(leaf(&vm, 513).unwrap().1.is_writable());
    assert!(
        !leaf(&vm, 514).unwrap().1.is_writable(),
        "siblings keep the huge leaf's protection"
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_out_of_table_memory_is_an_error_not_a_panic() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    host.memory.set_limit(host.memory.allocated());
    let err = vcpu.page_fault(gpa(1), ErrorCode::WRITE);
    // The root and its cache were topped up; a fault needing new tables may
    // still succeed from the cache, or report the shortage.
    match err {
        Ok(RetPf::Fixed) | Err(FaultError::NoMemory(_)) => {}
        other => panic!("unexpected {other:?}"),
    }
    host.memory.set_limit(u64::MAX);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_vm_config_and_vcpu_validation() {
    let host = TestHost::new();
    let bad = VmConfig {
        maxphyaddr: 60,
        ..VmConfig::default()
    };
    assert!(Vm::new(bad, host.ops()).is_err());
    let bad = VmConfig {
        root_level: Level::M2,
        ..VmConfig::default()
    };
    assert!(Vm::new(bad, host.ops()).is_err());
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    let _v = vm.create_vcpu(1).unwrap();
    assert!(vm.create_vcpu(1).is_err());
}

#[test]
fn test_five_level_tables_map_high_gpa() {
    let config = VmConfig {
        root_level: Level::L5,
        maxphyaddr: 52,
        ..VmConfig::default()
    };
    let host = TestHost::new();
    let vm = Vm::new(config, host.ops()).unwrap();
    let high = 1u64 << 50;
    vm.set_user_memory_region(region(0, high, 1 << 20, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    assert_eq!(vcpu.prepare_entry().unwrap().root_level, Level::L5);
    assert_eq!(
        vcpu.page_fault(Gpa(high + 4096), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(vm.mappings(0).len(), 1);
    teardown(host, vm, vec![vcpu]);
}

fn huge_host_vm(config: VmConfig) -> (Arc<TestHost>, Vm, VcpuMmu) {
    let host = TestHost::new();
    host.set_host_level(Level::M2);
    let vm = Vm::new(config, host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}

fn executable(s: vmmu::Spte) -> bool {
    s.raw() & vmmu::spte::ept::X != 0
}

#[test]
fn test_nx_huge_pages_read_and_write_faults_map_non_executable_huge_leaves() {
    let config = VmConfig {
        nx_huge_pages: true,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = huge_host_vm(config);
    for (page, ec) in [(512, ErrorCode::empty()), (1024, ErrorCode::WRITE)] {
        assert_eq!(vcpu.page_fault(gpa(page), ec).unwrap(), RetPf::Fixed);
        let (level, s) = leaf(&vm, page).unwrap();
        assert_eq!(level, Level::M2);
        assert!(!executable(s), "huge leaf {s:?} is executable");
    }
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_nx_huge_pages_fetch_splits_and_maps_executed_page_at_4k() {
    let config = VmConfig {
        nx_huge_pages: true,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = huge_host_vm(config);
    vcpu.page_fault(gpa(512), ErrorCode::empty()).unwrap();
    assert_eq!(leaf(&vm, 512).unwrap().0, Level::M2);
    // The guest executes from the huge page: the hardware reports an exec
    // violation on the non-executable leaf. Splitting it makes the 4 KiB children
    // executable again, so the target entry already allows the fetch (KVM
    // answers spurious there too).
    let r = vcpu
        .page_fault(gpa(513), ErrorCode::FETCH | ErrorCode::PRESENT)
        .unwrap();
    assert!(matches!(r, RetPf::Fixed | RetPf::Spurious), "{r:?}");
    let (level, s) = leaf(&vm, 513).unwrap();
    assert_eq!(level, Level::K4);
    assert!(executable(s));
    assert_eq!(vm.stats().huge_splits, 1);
    // A fetch in a region never mapped maps 4 KiB straight away.
    assert_eq!(
        vcpu.page_fault(gpa(1024 + 7), ErrorCode::FETCH).unwrap(),
        RetPf::Fixed
    );
    let (level, s) = leaf(&vm, 1024 + 7).unwrap();
    assert_eq!(level, Level::K4);
    assert!(executable(s));
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_without_nx_huge_pages_huge_leaves_are_executable() {
    let (host, vm, mut vcpu) = huge_host_vm(VmConfig::default());
    vcpu.page_fault(gpa(512), ErrorCode::FETCH).unwrap();
    let (level, s) = leaf(&vm, 512).unwrap();
    assert_eq!(level, Level::M2);
    assert!(executable(s));
    teardown(host, vm, vec![vcpu]);
}

/// A host that claims 1 GiB mappings over frames aligned only for 2 MiB.
struct MisalignedHost {
    inner: Arc<TestHost>,
}

const SHIFT_PFN: u64 = 512;

impl vmmu::PrimaryMmu for MisalignedHost {
    fn faultin(
        &self,
        hva: Hva,
        req: vmmu::FaultinRequest,
    ) -> Result<vmmu::HostPfn, HostFaultError> {
        let mut r = self.inner.faultin(hva, req)?;
        r.pfn = vmmu::Pfn(r.pfn.0 + SHIFT_PFN);
        Ok(r)
    }
    fn release(&self, pfn: vmmu::Pfn, w: bool) {
        self.inner.release(vmmu::Pfn(pfn.0 - SHIFT_PFN), w)
    }
    fn mapping_level(&self, _hva: Hva) -> Level {
        Level::G1
    }
}

#[test]
fn test_huge_level_falls_back_one_level_when_frame_is_misaligned() {
    let host = TestHost::new();
    host.set_host_level(Level::G1);
    let mut ops = host.ops();
    ops.primary = Arc::new(MisalignedHost {
        inner: host.clone(),
    });
    let vm = Vm::new(VmConfig::default(), ops).unwrap();
    vm.set_user_memory_region(region(0, GPA, 1 << 30, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(leaf(&vm, 3).unwrap().0, Level::M2, "2M, not 4K");
    assert_eq!(vm.stats().leaves_mapped_2m, 1);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_smm_on_a_vm_without_smm_address_space_is_refused_and_changes_nothing() {
    let config = VmConfig {
        address_spaces: 1,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    let root = vcpu.root_id();
    let err = vcpu.set_smm(true).unwrap_err();
    assert_eq!(err, vmmu::VmError::SmmUnsupported { spaces: 1 });
    assert_eq!(err.errno(), vmmu::errno::EINVAL);
    assert!(!vcpu.role().smm);
    assert!(!vcpu.has_requests(), "a refused call makes no request");
    vcpu.prepare_entry().unwrap();
    assert_eq!(vcpu.root_id(), root);
    // Faults keep working in address space 0.
    assert_eq!(
        vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    // Leaving SMM when not in it is a no-op, not an error.
    vcpu.set_smm(false).unwrap();
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_calls_naming_a_missing_address_space_or_an_inverted_range_are_refused() {
    let config = VmConfig {
        address_spaces: 1,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    let before = (vm.mappings(0), vm.roots(), vm.stats().tlb_flush_remote);
    let all = GfnRange::new(gpa(0).gfn(), gpa(64).gfn());
    let inverted = GfnRange::new(gpa(64).gfn(), gpa(0).gfn());
    let bad_as = vmmu::VmError::InvalidAddressSpace {
        as_id: 1,
        spaces: 1,
    };
    assert_eq!(vm.zap_gfn_range(1, all), Err(bad_as.clone()));
    assert_eq!(vm.write_protect_gfn_range(1, all), Err(bad_as.clone()));
    assert_eq!(vm.clear_dirty_gfn_range(1, all), Err(bad_as.clone()));
    assert_eq!(
        vm.invalidate_roots(RootFilter::AddressSpace(1)),
        Err(bad_as)
    );
    for r in [
        vm.zap_gfn_range(0, inverted),
        vm.write_protect_gfn_range(0, inverted),
        vm.clear_dirty_gfn_range(0, inverted).map(|_| ()),
    ] {
        let e = r.unwrap_err();
        assert!(matches!(e, vmmu::VmError::InvalidRange { .. }), "{e:?}");
        assert_eq!(e.errno(), vmmu::errno::EINVAL);
    }
    assert_eq!(
        (vm.mappings(0), vm.roots(), vm.stats().tlb_flush_remote),
        before,
        "refused calls changed the VM"
    );
    assert!(matches!(
        vm.create_vcpu(vmmu::vm::MAX_VCPU_IDS),
        Err(vmmu::VmError::InvalidVcpuId { .. })
    ));
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_smm_round_trip_before_entry_never_reloads_the_valid_root() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let normal = vcpu.root_id();
    let loads = vcpu.stats().root_loads;
    // Enter and leave SMM before the next entry: the normal root comes straight
    // back from the previous-roots cache.
    vcpu.set_smm(true).unwrap();
    vcpu.set_smm(false).unwrap();
    let e = vcpu.prepare_entry().unwrap();
    assert_eq!(vcpu.root_id(), normal);
    assert_eq!(
        vcpu.stats().root_loads,
        loads,
        "a valid current root was reloaded"
    );
    assert!(e.flush_tlb, "a role switch still flushes the TLB");
    // And a real switch does load one.
    vcpu.set_smm(true).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(vcpu.stats().root_loads, loads + 1);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_invalidation_token_pairs_start_and_end_even_when_dropped() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let range = HvaRange::new(hva(0), hva(4));
    let a = vm.invalidate_range_start(range);
    let b = vm.invalidate_range_start(range);
    assert_eq!(a.range(), range);
    assert_eq!(vm.invalidations_in_progress(), 2);
    a.end();
    assert_eq!(vm.invalidations_in_progress(), 1);
    // A host that forgets to call end still ends the invalidation (an unwinding
    // host thread, an early return).
    drop(b);
    assert_eq!(vm.invalidations_in_progress(), 0);
    assert_eq!(
        vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed,
        "faults stop retrying once every invalidation ended"
    );
    // A range that overlaps no slot pairs up too, without touching the count.
    let c = vm.invalidate_range_start(HvaRange::new(Hva(1 << 40), Hva(1 << 39)));
    assert_eq!(vm.invalidations_in_progress(), 0);
    c.end();
    assert_eq!(vm.empty_invalidation_pairs(), 0);
    teardown(host, vm, vec![vcpu]);
}

/// A fault that runs right after a memslot update stored a generation whose
/// MMIO slice wrapped (a 3-bit slice: address space 0 wraps every 4 updates).
/// Returns what a misconfiguration fault on a gfn that now has a slot answered.
fn fault_at_generation_wrap(knobs: vmmu::GuardKnobs) -> RetPf {
    use std::sync::mpsc;
    use std::sync::Mutex;
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<RetPf>();
    let answer: Arc<Mutex<Option<RetPf>>> = Arc::default();
    let chan = Mutex::new((go_tx, done_rx));
    let seen = answer.clone();
    let hook = move |p: vmmu::HookPoint| {
        if let vmmu::HookPoint::MemslotGenerationPublished { generation, .. } = p {
            if generation & 7 == 0 {
                // Let the vCPU fault inside the window, and wait for it.
                let c = chan.lock().unwrap();
                c.0.send(()).unwrap();
                *seen.lock().unwrap() = c.1.recv().ok();
            }
        }
    };
    let host = TestHost::new();
    let config = VmConfig {
        knobs: vmmu::GuardKnobs {
            mmio_gen_bits: 3,
            ..knobs
        },
        hooks: vmmu::TestHooks {
            on: Some(Arc::new(hook)),
        },
        ..VmConfig::default()
    };
    let vm = Vm::new(config, host.ops()).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    let hole = Gpa(3 * GPA);
    // Generation 0: the hole is cached as MMIO.
    assert_eq!(
        vcpu.page_fault(hole, ErrorCode::empty()).unwrap(),
        RetPf::Emulate
    );
    assert_eq!(vm.stats().mmio_sptes_created, 1);
    // Three creates elsewhere (generations 2, 4, 6) zap nothing; the entry stays
    // (a fault on it now would refresh it with the current generation).
    for i in 0..3u32 {
        let gpa = GPA + i as u64 * SIZE;
        vm.set_user_memory_region(region(10 + i, gpa, SIZE, HVA + i as u64 * SIZE, 0))
            .unwrap();
    }
    let t = std::thread::spawn(move || {
        go_rx.recv().unwrap();
        let r = vcpu.page_fault(hole, ErrorCode::RSVD).unwrap();
        done_tx.send(r).unwrap();
        vcpu
    });
    // The fourth update (generation 8, slice 0) gives the hole a slot.
    vm.set_user_memory_region(region(1, 3 * GPA, 1 << 20, 2 * HVA, 0))
        .unwrap();
    let mut vcpu = t.join().unwrap();
    let r = answer
        .lock()
        .unwrap()
        .expect("the hook ran at the wrapping update");
    // Afterwards the gfn maps memory.
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(hole, ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    teardown(host, vm, vec![vcpu]);
    r
}

#[test]
fn test_mmio_generation_wrap_is_zapped_before_the_generation_is_visible() {
    let r = fault_at_generation_wrap(vmmu::GuardKnobs::default());
    assert_ne!(
        r,
        RetPf::Emulate,
        "emulated MMIO for a gfn that has a memslot"
    );
}

#[test]
fn test_mmio_generation_wrap_zapped_after_publish_emulates_a_memory_gfn() {
    // The order before the fix: the check above must be able to fail.
    let knobs = vmmu::GuardKnobs {
        zap_after_publish: true,
        ..vmmu::GuardKnobs::default()
    };
    assert_eq!(fault_at_generation_wrap(knobs), RetPf::Emulate);
}

/// Map 1 GiB at 4 KiB, then delete its slot with the zap yielding `mmu_lock` at
/// every step (as if a writer always waited). Returns the peak number of table
/// pages retired but not yet freed during the delete, and how many tables the
/// delete retired.
fn pending_free_peak_during_1g_zap(knobs: vmmu::GuardKnobs) -> (u64, u64) {
    let host = TestHost::new();
    let vm = Vm::new(
        VmConfig {
            knobs: vmmu::GuardKnobs {
                yield_every_step: true,
                ..knobs
            },
            max_level: Level::K4,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    vm.set_user_memory_region(region(0, GPA, 1 << 30, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    for p in 0..(1u64 << 18) {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    assert_eq!(vm.stats().present(Level::K4), 1 << 18);
    let freed_before = vm.stats().tables_freed;
    vm.reset_pending_free_peak();
    vm.set_user_memory_region(region(0, GPA, 0, HVA, 0))
        .unwrap();
    let peak = vm.tables_pending_free().1;
    let retired = vm.stats().tables_freed - freed_before;
    vcpu.prepare_entry().unwrap();
    teardown(host, vm, vec![vcpu]);
    (peak, retired)
}

#[test]
fn test_long_zap_lets_retired_tables_be_freed_while_it_runs() {
    let (peak, retired) = pending_free_peak_during_1g_zap(vmmu::GuardKnobs::default());
    eprintln!("1 GiB zap: {retired} tables retired, peak {peak} unfreed at once");
    assert!(retired >= 512);
    assert!(
        peak <= 8,
        "{peak} of {retired} retired tables were unfreed at once"
    );
}

#[test]
fn test_long_zap_pinned_across_yields_holds_back_every_free() {
    // The behaviour before the fix: the check above must be able to fail.
    let knobs = vmmu::GuardKnobs {
        rcu_pinned_across_yields: true,
        ..vmmu::GuardKnobs::default()
    };
    let (peak, retired) = pending_free_peak_during_1g_zap(knobs);
    eprintln!("1 GiB zap, pinned: {retired} tables retired, peak {peak} unfreed at once");
    assert!(peak >= retired, "peak {peak}, retired {retired}");
}

/// A host whose fault-in handler changes memslots: `slots_lock` (whose holder
/// waits for SRCU readers) taken inside a vCPU fault, which holds the SRCU read
/// side. A real deadlock when two vCPUs race a memslot update; the lock-order
/// checker reports it the first time it happens.
struct MemslotUpdatingHost {
    inner: Arc<TestHost>,
    vm: std::sync::OnceLock<Vm>,
}

impl vmmu::PrimaryMmu for MemslotUpdatingHost {
    fn faultin(
        &self,
        hva: Hva,
        req: vmmu::FaultinRequest,
    ) -> Result<vmmu::HostPfn, HostFaultError> {
        if let Some(vm) = self.vm.get() {
            let _ = vm.set_user_memory_region(region(9, 16 * GPA, 4096, 16 * HVA, 0));
        }
        self.inner.faultin(hva, req)
    }
    fn release(&self, pfn: vmmu::Pfn, w: bool) {
        self.inner.release(pfn, w)
    }
    fn mapping_level(&self, hva: Hva) -> Level {
        self.inner.mapping_level(hva)
    }
}

#[cfg(debug_assertions)]
#[test]
fn test_lock_order_checker_reports_a_host_callback_that_takes_slots_lock_in_a_fault() {
    let host = TestHost::new();
    let bad = Arc::new(MemslotUpdatingHost {
        inner: host.clone(),
        vm: std::sync::OnceLock::new(),
    });
    let mut ops = host.ops();
    ops.primary = bad.clone();
    let vm = Vm::new(VmConfig::default(), ops).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let _ = bad.vm.set(vm.clone());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = vcpu.page_fault(gpa(1), ErrorCode::WRITE);
    }));
    let err = r.expect_err("the checker did not report slots_lock inside a fault");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("acquiring kvm->slots_lock") && msg.contains("while holding kvm->srcu (read)"),
        "{msg}"
    );
}

#[test]
fn test_refusals_and_exits_map_to_kvm_errnos() {
    use vmmu::errno::*;
    use vmmu::{FaultError, MemslotError, TableMemoryError, VmError};
    let gpa = Gpa(0x1000);
    let host = |cause| FaultError::Host {
        gpa,
        hva: Hva(0),
        cause,
    };
    for (e, want) in [
        (
            FaultError::MemoryFault {
                gpa,
                size: 4096,
                private: true,
            },
            EFAULT,
        ),
        (host(HostFaultError::ReadOnly), EFAULT),
        (host(HostFaultError::NotMapped), EFAULT),
        (host(HostFaultError::OutOfMemory), EFAULT),
        (host(HostFaultError::HwPoison), EHWPOISON),
        (FaultError::NoMemory(TableMemoryError::OutOfMemory), ENOMEM),
    ] {
        assert_eq!(e.errno(), want, "{e:?}");
    }
    assert_eq!(VmError::VcpuExists(1).errno(), EEXIST);
    assert_eq!(
        VmError::Memory(TableMemoryError::OutOfMemory).errno(),
        ENOMEM
    );
    assert_eq!(VmError::InvalidConfig("x").errno(), EINVAL);
    let overlap = MemslotError::Overlap {
        slot: 1,
        start: 0,
        end: 1,
        other: 2,
    };
    assert_eq!(overlap.errno(), EEXIST);
    assert_eq!(MemslotError::NoSuchSlot { slot: 3 }.errno(), EINVAL);
}

#[test]
fn test_fetch_and_write_together_need_both_permissions() {
    // A fault that is both an instruction fetch and a write (the error code a
    // guest gets for neither being allowed) is not satisfied by an executable
    // read-only leaf.
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let pfn = host.fresh_pfn();
    host.set(hva(6), pfn, false);
    assert_eq!(
        vcpu.page_fault(gpa(6), ErrorCode::FETCH).unwrap(),
        RetPf::Fixed
    );
    let r = vcpu.page_fault(
        gpa(6),
        ErrorCode::FETCH | ErrorCode::WRITE | ErrorCode::PRESENT,
    );
    assert!(
        matches!(
            r,
            Err(FaultError::Host {
                cause: HostFaultError::ReadOnly,
                ..
            })
        ),
        "a write+fetch on a read-only page was answered {r:?}"
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_frames_are_released_dirty_only_when_mapped_writable() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    // A read of a read-only host page: mapped, but not writable.
    let pfn = host.fresh_pfn();
    host.set(hva(8), pfn, false);
    vcpu.page_fault(gpa(8), ErrorCode::empty()).unwrap();
    assert_eq!(
        host.released_writable(),
        0,
        "read-only mapping released dirty"
    );
    // A fault that retries maps nothing: released clean too.
    let range = HvaRange::new(hva(9), hva(10));
    let inv = vm.invalidate_range_start(range);
    assert_eq!(
        vcpu.page_fault(gpa(9), ErrorCode::WRITE).unwrap(),
        RetPf::Retry
    );
    inv.end();
    assert_eq!(
        host.released_writable(),
        0,
        "a retried fault released dirty"
    );
    // A write fault maps writable: released dirty.
    vcpu.page_fault(gpa(10), ErrorCode::WRITE).unwrap();
    assert_eq!(host.released_writable(), 1);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fast_path_is_tried_only_where_it_can_help() {
    // KVM's page_fault_can_be_fast: a write to a present entry (maybe
    // write-protected), or with A/D disabled a fault on a not-present entry
    // (maybe access-tracked); never a first touch with A/D on, a read of a
    // present entry, an MMIO misconfiguration or a private fault.
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let attempts = |v: &VcpuMmu| v.stats().fast_path_attempts;
    let a0 = attempts(&vcpu);
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    vcpu.page_fault(gpa(2), ErrorCode::empty()).unwrap();
    vcpu.page_fault(gpa(2), ErrorCode::PRESENT).unwrap();
    let _ = vcpu.page_fault(
        gpa(3),
        ErrorCode::PRESENT | ErrorCode::WRITE | ErrorCode::PRIVATE,
    );
    vcpu.page_fault(Gpa(3 * GPA), ErrorCode::RSVD).unwrap();
    assert_eq!(
        attempts(&vcpu),
        a0,
        "the fast path was tried where it cannot help"
    );
    vcpu.page_fault(gpa(2), ErrorCode::PRESENT | ErrorCode::WRITE)
        .unwrap();
    assert_eq!(
        attempts(&vcpu),
        a0 + 1,
        "a present write tries the fast path"
    );
    teardown(host, vm, vec![vcpu]);
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    let a0 = attempts(&vcpu);
    vcpu.page_fault(gpa(1), ErrorCode::empty()).unwrap();
    assert_eq!(
        attempts(&vcpu),
        a0 + 1,
        "without A/D a not-present fault tries it"
    );
    vcpu.page_fault(gpa(1), ErrorCode::PRESENT).unwrap();
    assert_eq!(attempts(&vcpu), a0 + 1, "a present read never does");
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fast_path_leaves_a_write_it_cannot_allow_to_the_slow_path() {
    // A/D off: a page the host maps read-only is access-tracked; a write to it
    // must not be "fixed" by restoring read access: the slow path answers
    // (EFAULT, the host refuses the write).
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    let pfn = host.fresh_pfn();
    host.set(hva(4), pfn, false);
    vcpu.page_fault(gpa(4), ErrorCode::empty()).unwrap();
    assert!(vm.clear_young(HvaRange::new(hva(4), hva(5))));
    assert!(leaf(&vm, 4).unwrap().1.is_access_tracked());
    let r = vcpu.page_fault(gpa(4), ErrorCode::WRITE);
    assert!(
        matches!(
            r,
            Err(FaultError::Host {
                cause: HostFaultError::ReadOnly,
                ..
            })
        ),
        "{r:?}"
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fast_path_logs_only_writes() {
    // Dirty logging with A/D off: restoring an access-tracked, write-protected
    // entry for a read must not mark the page dirty.
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    vcpu.page_fault(gpa(5), ErrorCode::empty()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, MemFlags::LOG_DIRTY_PAGES.bits()))
        .unwrap();
    assert!(vm.clear_young(HvaRange::new(hva(5), hva(6))));
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(5), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    let slots = vm.memslots(0).unwrap();
    let bitmap = slots.by_id(0).unwrap().dirty_bitmap().unwrap();
    assert!(!bitmap.test(5), "a read marked the page dirty");
    // The write that follows is logged.
    vcpu.page_fault(gpa(5), ErrorCode::WRITE | ErrorCode::PRESENT)
        .unwrap();
    assert!(bitmap.test(5));
    teardown(host, vm, vec![vcpu]);
}

fn vm_of(vm_type: vmmu::VmType, host_level: Level) -> (Arc<TestHost>, Vm, VcpuMmu) {
    let host = TestHost::new();
    host.set_host_level(host_level);
    let vm = Vm::new(
        VmConfig {
            vm_type,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}

const PRIVATE: u64 = vmmu::MEMORY_ATTRIBUTE_PRIVATE;

#[test]
fn test_memory_attributes_are_refused_as_kvm_refuses_them() {
    use vmmu::AttributeError as E;
    // The default type has no attributes: PRIVATE is refused, nothing (0) is a
    // no-op, as KVM's supported-attributes check answers.
    let (host, vm, vcpu) = vm_of(vmmu::VmType::Default, Level::K4);
    let e = vm.set_memory_attributes(GPA, 4096, PRIVATE, 0).unwrap_err();
    assert!(
        matches!(e, E::InvalidAttributes { supported: 0, .. }),
        "{e:?}"
    );
    assert_eq!(e.errno(), vmmu::errno::EINVAL);
    vm.set_memory_attributes(GPA, 4096, 0, 0).unwrap();
    teardown(host, vm, vec![vcpu]);

    let (host, vm, mut vcpu) = vm_of(vmmu::VmType::SwProtected, Level::K4);
    vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap();
    let before = (
        vm.mappings(0),
        vm.stats().invalidations,
        vm.stats().leaves_zapped,
    );
    for (args, what) in [
        ((GPA, 4096, PRIVATE, 1), "flags"),
        ((GPA, 4096, PRIVATE | 1, 0), "attributes"),
        ((GPA, 0, PRIVATE, 0), "empty"),
        ((u64::MAX - 4095, 8192, PRIVATE, 0), "wraps"),
        ((GPA + 1, 4096, PRIVATE, 0), "unaligned address"),
        ((GPA, 4095, PRIVATE, 0), "unaligned size"),
    ] {
        let e = vm
            .set_memory_attributes(args.0, args.1, args.2, args.3)
            .unwrap_err();
        assert_eq!(e.errno(), vmmu::errno::EINVAL, "{what}: {e:?}");
        assert_eq!(
            vm.memory_attributes(gpa(3).gfn()),
            0,
            "{what} changed attributes"
        );
    }
    assert_eq!(
        (
            vm.mappings(0),
            vm.stats().invalidations,
            vm.stats().leaves_zapped
        ),
        before,
        "a refused call changed the VM"
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_conversion_zaps_only_its_range_and_private_faults_exit_without_guest_memfd() {
    let (host, vm, mut vcpu) = vm_of(vmmu::VmType::SwProtected, Level::K4);
    for p in 0..8 {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    vm.set_memory_attributes(gpa(2).0, 2 * 4096, PRIVATE, 0)
        .unwrap();
    assert_eq!(vm.memory_attributes(gpa(2).gfn()), PRIVATE);
    assert_eq!(vm.memory_attributes(gpa(4).gfn()), 0);
    for p in 0..8 {
        let mapped = leaf(&vm, p).is_some();
        assert_eq!(mapped, !(2..4).contains(&p), "page {p} mapped {mapped}");
    }
    assert_eq!(
        vm.stats().leaves_zapped,
        2,
        "only the converted range is zapped"
    );
    // On the software-protected type the fault's private bit comes from the
    // attributes; with no guest_memfd behind the slot it exits to the VMM.
    let e = vcpu.page_fault(gpa(2), ErrorCode::WRITE).unwrap_err();
    assert_eq!(
        e,
        FaultError::MemoryFault {
            gpa: gpa(2),
            size: 4096,
            private: true
        }
    );
    // Back to shared: faults map again.
    vm.set_memory_attributes(gpa(2).0, 2 * 4096, 0, 0).unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(2), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_a_change_to_what_the_range_already_has_touches_nothing() {
    let (host, vm, mut vcpu) = vm_of(vmmu::VmType::SwProtected, Level::K4);
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    vm.set_memory_attributes(gpa(8).0, 4096, PRIVATE, 0)
        .unwrap();
    let st = vm.stats();
    let seq_probe = (st.attribute_changes, st.leaves_zapped, st.tlb_flush_remote);
    vm.set_memory_attributes(gpa(8).0, 4096, PRIVATE, 0)
        .unwrap();
    vm.set_memory_attributes(gpa(0).0, 4096, 0, 0).unwrap();
    let st = vm.stats();
    assert_eq!(
        (st.attribute_changes, st.leaves_zapped, st.tlb_flush_remote),
        seq_probe
    );
    assert!(leaf(&vm, 1).is_some());
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_no_huge_page_is_mapped_across_a_private_shared_boundary() {
    let (host, vm, mut vcpu) = vm_of(vmmu::VmType::SwProtected, Level::M2);
    // A 2 MiB chunk maps huge while it is all shared.
    vcpu.page_fault(gpa(512), ErrorCode::WRITE).unwrap();
    assert_eq!(leaf(&vm, 512).unwrap().0, Level::M2);
    // One 4 KiB page of it becomes private: the huge leaf goes, and shared
    // faults in the chunk map 4 KiB pages from now on.
    vm.set_memory_attributes(gpa(700).0, 4096, PRIVATE, 0)
        .unwrap();
    assert!(leaf(&vm, 512).is_none());
    vcpu.page_fault(gpa(513), ErrorCode::WRITE).unwrap();
    assert_eq!(
        leaf(&vm, 513).unwrap().0,
        Level::K4,
        "huge across the boundary"
    );
    // Uniform again: huge again.
    vm.set_memory_attributes(gpa(700).0, 4096, 0, 0).unwrap();
    let range = HvaRange::new(hva(512), hva(1024));
    vm.invalidate_range_start(range).end();
    vcpu.page_fault(gpa(600), ErrorCode::WRITE).unwrap();
    assert_eq!(leaf(&vm, 600).unwrap().0, Level::M2);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_a_slot_created_over_mixed_attributes_starts_with_the_mixed_flags() {
    let host = TestHost::new();
    host.set_host_level(Level::M2);
    let vm = Vm::new(
        VmConfig {
            vm_type: vmmu::VmType::SwProtected,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    // Attributes first (no slot yet), then the slot.
    vm.set_memory_attributes(gpa(1000).0, 4096, PRIVATE, 0)
        .unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(600), ErrorCode::WRITE).unwrap();
    assert_eq!(
        leaf(&vm, 600).unwrap().0,
        Level::K4,
        "mixed chunk mapped huge"
    );
    vcpu.page_fault(gpa(1100), ErrorCode::WRITE).unwrap();
    assert_eq!(
        leaf(&vm, 1100).unwrap().0,
        Level::M2,
        "a uniform chunk maps huge"
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_snp_accesses_carry_their_private_bit_and_mismatches_exit() {
    let (host, vm, mut vcpu) = vm_of(vmmu::VmType::Snp, Level::K4);
    // A private access to shared memory, and a shared access to private memory:
    // both exit with the access's own bit.
    let e = vcpu
        .page_fault(gpa(1), ErrorCode::WRITE | ErrorCode::PRIVATE)
        .unwrap_err();
    assert!(
        matches!(e, FaultError::MemoryFault { private: true, .. }),
        "{e:?}"
    );
    vm.set_memory_attributes(gpa(2).0, 4096, PRIVATE, 0)
        .unwrap();
    let e = vcpu.page_fault(gpa(2), ErrorCode::WRITE).unwrap_err();
    assert!(
        matches!(e, FaultError::MemoryFault { private: false, .. }),
        "{e:?}"
    );
    // A shared access to shared memory maps.
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    teardown(host, vm, vec![vcpu]);
}

mod gmem {
    use super::*;
    use vmmu::gmem::{
        FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED,
        GUEST_MEMFD_FLAG_MMAP,
    };
    use vmmu::{GmemError, MemslotError};

    const GMEM: u32 = 1 << 2;
    const PUNCH: u32 = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;

    /// A software-protected VM with slot 0 (8 MiB) backed by a guest_memfd for
    /// its private half.
    fn private_vm() -> (Arc<TestHost>, Vm, vmmu::GuestMemfd, VcpuMmu) {
        let host = TestHost::new();
        let vm = Vm::new(
            VmConfig {
                vm_type: vmmu::VmType::SwProtected,
                ..VmConfig::default()
            },
            host.ops(),
        )
        .unwrap();
        let file = vm.create_guest_memfd(SIZE, 0).unwrap();
        vm.set_user_memory_region2(region(0, GPA, SIZE, HVA, GMEM), Some(&file), 0)
            .unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.prepare_entry().unwrap();
        (host, vm, file, vcpu)
    }

    fn finish(host: Arc<TestHost>, vm: Vm, file: vmmu::GuestMemfd, vcpus: Vec<VcpuMmu>) {
        drop(file);
        teardown(host.clone(), vm, vcpus);
        assert_eq!(host.private_pages(), 0, "private pages leaked");
    }

    #[test]
    fn test_guest_memfd_creation_is_validated() {
        let host = TestHost::new();
        let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
        for (size, flags, what) in [
            (0, 0, "empty"),
            (4095, 0, "unaligned"),
            (4096, 1 << 5, "unknown flag"),
            (
                4096,
                GUEST_MEMFD_FLAG_INIT_SHARED,
                "INIT_SHARED without MMAP",
            ),
        ] {
            let e = vm.create_guest_memfd(size, flags).unwrap_err();
            assert_eq!(e.errno(), vmmu::errno::EINVAL, "{what}: {e:?}");
        }
        let f = vm
            .create_guest_memfd(
                1 << 20,
                GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            )
            .unwrap();
        assert_eq!(f.size(), 1 << 20);
        drop(f);
        drop(vm);
        assert_eq!(host.memory.allocated(), 0);
    }

    #[test]
    fn test_binding_rules_refuse_and_change_nothing() {
        let (host, vm, file, vcpu) = private_vm();
        let other = Vm::new(
            VmConfig {
                vm_type: vmmu::VmType::SwProtected,
                ..VmConfig::default()
            },
            host.ops(),
        )
        .unwrap();
        let foreign = other.create_guest_memfd(SIZE, 0).unwrap();
        let small = vm.create_guest_memfd(1 << 20, 0).unwrap();
        let before = vm.memslots(0).unwrap().len();
        let cases: Vec<(Result<(), MemslotError>, i32, &str)> = vec![
            (
                vm.set_user_memory_region(region(1, 2 * GPA, SIZE, 2 * HVA, GMEM)),
                vmmu::errno::EINVAL,
                "guest_memfd through the old call",
            ),
            (
                vm.set_user_memory_region2(region(1, 2 * GPA, SIZE, 2 * HVA, GMEM), None, 0),
                9,
                "no file",
            ),
            (
                vm.set_user_memory_region2(
                    region(1, 2 * GPA, 4096, 2 * HVA, GMEM),
                    Some(&small),
                    100,
                ),
                vmmu::errno::EINVAL,
                "unaligned offset",
            ),
            (
                vm.set_user_memory_region2(
                    region(1, 2 * GPA, SIZE, 2 * HVA, GMEM),
                    Some(&small),
                    0,
                ),
                vmmu::errno::EINVAL,
                "past the end",
            ),
            (
                vm.set_user_memory_region2(
                    region(1, 2 * GPA, 4096, 2 * HVA, GMEM),
                    Some(&file),
                    4096,
                ),
                vmmu::errno::EINVAL,
                "already bound",
            ),
            (
                vm.set_user_memory_region2(
                    region(1, 2 * GPA, 4096, 2 * HVA, GMEM | MemFlags::READONLY.bits()),
                    Some(&small),
                    0,
                ),
                vmmu::errno::EINVAL,
                "read-only",
            ),
            (
                vm.set_user_memory_region2(
                    region(
                        1,
                        2 * GPA,
                        4096,
                        2 * HVA,
                        GMEM | MemFlags::LOG_DIRTY_PAGES.bits(),
                    ),
                    Some(&small),
                    0,
                ),
                vmmu::errno::EINVAL,
                "dirty logging",
            ),
            (
                vm.set_user_memory_region2(
                    region(1, 2 * GPA, 4096, 2 * HVA, GMEM),
                    Some(&foreign),
                    0,
                ),
                vmmu::errno::EINVAL,
                "another VM's file",
            ),
            (
                vm.set_user_memory_region2(region(0, 4 * GPA, SIZE, HVA, GMEM), Some(&file), 0),
                vmmu::errno::EINVAL,
                "moving a guest_memfd slot",
            ),
        ];
        for (r, errno, what) in cases {
            let e = r.expect_err(what);
            assert_eq!(e.errno(), errno, "{what}: {e:?}");
        }
        assert_eq!(
            vm.memslots(0).unwrap().len(),
            before,
            "a refused call added a slot"
        );
        // The default type refuses the flag too.
        let plain = Vm::new(VmConfig::default(), host.ops()).unwrap();
        let pf = plain.create_guest_memfd(4096, 0).unwrap();
        let e = plain
            .set_user_memory_region2(region(1, GPA, 4096, HVA, GMEM), Some(&pf), 0)
            .unwrap_err();
        assert!(matches!(e, MemslotError::InvalidFlags { .. }), "{e:?}");
        drop((pf, plain, foreign, other, small));
        // Deleting the slot unbinds it: the range can be bound again.
        vm.set_user_memory_region(region(0, GPA, 0, HVA, 0))
            .unwrap();
        vm.set_user_memory_region2(region(2, 8 * GPA, SIZE, 8 * HVA, GMEM), Some(&file), 0)
            .unwrap();
        finish(host, vm, file, vec![vcpu]);
    }

    #[test]
    fn test_private_faults_map_guest_memfd_pages_shared_ones_the_host() {
        let (host, vm, file, mut vcpu) = private_vm();
        vm.set_memory_attributes(gpa(0).0, 4 * 4096, PRIVATE, 0)
            .unwrap();
        assert_eq!(
            vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap(),
            RetPf::Fixed
        );
        let (level, s) = leaf(&vm, 1).unwrap();
        assert_eq!(level, Level::K4);
        assert!(
            host.is_private_page(s.pfn()),
            "private gfn mapped {:?}",
            s.pfn()
        );
        assert_eq!(vm.stats().private_faults, 1);
        assert_eq!(file.allocated_pages(), 1);
        // A shared gfn of the same slot comes from the host address.
        assert_eq!(
            vcpu.page_fault(gpa(8), ErrorCode::WRITE).unwrap(),
            RetPf::Fixed
        );
        let (_, s) = leaf(&vm, 8).unwrap();
        assert_eq!(Some(s.pfn()), host.lookup(hva(8)).map(|m| m.0));
        finish(host, vm, file, vec![vcpu]);
    }

    #[test]
    fn test_punch_hole_invalidates_exactly_the_hole_once() {
        let (host, vm, file, mut vcpu) = private_vm();
        vm.set_memory_attributes(gpa(0).0, 16 * 4096, PRIVATE, 0)
            .unwrap();
        for p in 0..16 {
            vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
        }
        let st = vm.stats();
        let (inv0, zap0) = (st.gmem_invalidations, st.leaves_zapped);
        file.fallocate(PUNCH, 4 * 4096, 4 * 4096).unwrap();
        let st = vm.stats();
        assert_eq!(
            st.gmem_invalidations - inv0,
            1,
            "one invalidation per file and call"
        );
        assert_eq!(st.leaves_zapped - zap0, 4, "only the hole is zapped");
        for p in 0..16 {
            assert_eq!(leaf(&vm, p).is_some(), !(4..8).contains(&p), "page {p}");
        }
        assert_eq!(file.allocated_pages(), 12, "the hole's pages are freed");
        // The next fault gets a fresh (zeroed) page.
        vcpu.prepare_entry().unwrap();
        assert_eq!(
            vcpu.page_fault(gpa(5), ErrorCode::WRITE).unwrap(),
            RetPf::Fixed
        );
        assert_eq!(file.allocated_pages(), 13);
        // Allocating never invalidates; a hole with nothing bound invalidates nothing.
        file.fallocate(FALLOC_FL_KEEP_SIZE, 0, SIZE).unwrap();
        assert_eq!(file.allocated_pages(), SIZE / 4096);
        assert_eq!(vm.stats().gmem_invalidations - inv0, 1);
        for (mode, off, len) in [
            (0x10u32, 0u64, 4096u64),
            (PUNCH, 1, 4096),
            (PUNCH, SIZE, 4096),
            (PUNCH, 0, 0),
        ] {
            let e = file.fallocate(mode, off, len).unwrap_err();
            let want = if mode == 0x10 {
                vmmu::errno::EOPNOTSUPP
            } else {
                vmmu::errno::EINVAL
            };
            assert_eq!(e.errno(), want, "{mode:#x} {off:#x}+{len:#x}: {e:?}");
        }
        let _ = GmemError::NoMemory;
        finish(host, vm, file, vec![vcpu]);
    }

    #[test]
    fn test_memory_failure_poisons_the_page() {
        let (host, vm, file, mut vcpu) = private_vm();
        vm.set_memory_attributes(gpa(0).0, 4096, PRIVATE, 0)
            .unwrap();
        vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap();
        file.memory_failure(0).unwrap();
        assert!(leaf(&vm, 0).is_none(), "the failed page is zapped");
        vcpu.prepare_entry().unwrap();
        let e = vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap_err();
        assert_eq!(e.errno(), vmmu::errno::EHWPOISON, "{e:?}");
        finish(host, vm, file, vec![vcpu]);
    }

    #[test]
    fn test_closing_the_file_zaps_what_it_mapped_and_either_may_go_first() {
        let (host, vm, file, mut vcpu) = private_vm();
        vm.set_memory_attributes(gpa(0).0, 4096, PRIVATE, 0)
            .unwrap();
        vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap();
        drop(file);
        assert!(leaf(&vm, 0).is_none(), "closing the file zaps its mappings");
        assert_eq!(host.private_pages(), 0);
        vcpu.prepare_entry().unwrap();
        let e = vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap_err();
        assert_eq!(e.errno(), vmmu::errno::EFAULT, "{e:?}");
        teardown(host, vm, vec![vcpu]);
        // The VM handle may go first: the file keeps the VM until it closes.
        let (host, vm, file, mut vcpu) = private_vm();
        vm.set_memory_attributes(gpa(0).0, 4096, PRIVATE, 0)
            .unwrap();
        vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap();
        drop(vcpu);
        drop(vm);
        assert!(host.memory.allocated() > 0, "the file keeps the VM alive");
        drop(file);
        assert_eq!(host.memory.allocated(), 0, "table pages leaked");
        assert_eq!(host.private_pages(), 0, "private pages leaked");
    }
}

#[test]
fn test_capabilities_say_what_the_vm_supports() {
    use vmmu::Cap;
    let host = TestHost::new();
    let plain = Vm::new(VmConfig::default(), host.ops()).unwrap();
    let sw = Vm::new(
        VmConfig {
            vm_type: vmmu::VmType::SwProtected,
            address_spaces: 1,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    assert_eq!(plain.check_extension(Cap::MemoryAttributes), 0);
    assert_eq!(sw.check_extension(Cap::MemoryAttributes), PRIVATE);
    assert_eq!(plain.check_extension(Cap::MultiAddressSpace), 2);
    assert_eq!(sw.check_extension(Cap::MultiAddressSpace), 1);
    assert_eq!(plain.check_extension(Cap::NrMemslots), 32764);
    assert_eq!(plain.check_extension(Cap::UserMemory2), 1);
    assert_eq!(plain.check_extension(Cap::GuestMemfd), 1);
    assert_eq!(plain.check_extension(Cap::GuestMemfdFlags), 0b11);
    // Default, software-protected and the SNP-like type.
    assert_eq!(plain.check_extension(Cap::VmTypes), 1 | 2 | 16);
}
