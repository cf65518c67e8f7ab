//! End-to-end behaviour of the fault pipeline, invalidations, memslots and roots
//! on the tracking test host.

use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, FaultError, Gfn, GfnRange, Gpa, HostFaultError, HvaRange, Level, MemFlags, RetPf,
    RootFilter, Vm, VmConfig,
};

mod common;
use common::*;

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

/// A gpa at or past the guest's physical address width has no memslot and
/// never will: emulated at once (KVM's "beyond max gfn" check), counted
/// neither as a retry nor as an MMIO entry, and nothing is mapped.
#[test]
fn test_fault_past_the_address_width_is_emulated_without_a_mapping() {
    let config = VmConfig::default();
    let width = config.maxphyaddr;
    let (host, vm, mut vcpu) = setup(config);
    let before = vm.stats();
    for g in [Gpa(1 << width), Gpa((1 << width) + 0x5000)] {
        assert_eq!(
            vcpu.page_fault(g, ErrorCode::empty()).unwrap(),
            RetPf::Emulate
        );
        assert_eq!(
            vcpu.page_fault(g, ErrorCode::WRITE).unwrap(),
            RetPf::Emulate
        );
    }
    let s = vm.stats();
    assert_eq!(s.faults_emulate - before.faults_emulate, 4);
    assert_eq!(s.faults_retry, before.faults_retry);
    assert_eq!(s.mmio_sptes_created, before.mmio_sptes_created);
    assert_eq!(s.tables_allocated, before.tables_allocated);
    // The last page below the width is an ordinary gpa without a slot.
    let below = Gpa((1 << width) - 0x1000);
    assert_eq!(
        vcpu.page_fault(below, ErrorCode::empty()).unwrap(),
        RetPf::Emulate
    );
    assert_eq!(vm.stats().mmio_sptes_created, before.mmio_sptes_created + 1);
    teardown(host, vm, vec![vcpu]);
}
