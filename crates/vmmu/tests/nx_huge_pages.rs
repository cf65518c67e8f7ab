//! NX huge pages: fetches list the tables they make, data faults stay below
//! them until recovery zaps them, recovery takes `ceil(listed / ratio)` and
//! leaves dirty-logged slots alone, and toggling the mitigation zaps.

use vmmu::{ErrorCode, GuardKnobs, Level, MemFlags, RetPf, VcpuMmu, Vm, VmConfig};

mod common;
use common::*;

fn nx_config(knobs: GuardKnobs) -> VmConfig {
    VmConfig {
        nx_huge_pages: true,
        knobs,
        ..VmConfig::default()
    }
}

fn executable(s: vmmu::Spte) -> bool {
    s.raw() & vmmu::spte::ept::X != 0
}

fn fault(vcpu: &mut VcpuMmu, page: u64, ec: ErrorCode) {
    let r = vcpu.page_fault(gpa(page), ec).unwrap();
    assert!(matches!(r, RetPf::Fixed | RetPf::Spurious), "{r:?}");
}

fn splits(vm: &Vm) -> u64 {
    let s = vm.stats().nx_lpage_splits();
    assert_eq!(s, vm.possible_nx_huge_pages(), "counter and list disagree");
    assert_eq!(vm.check_possible_nx_huge_pages(), Ok(s));
    s
}

/// The selftest's first half: reads map huge, a fetch splits and lists, and
/// reads in a split range stay at 4 KiB.
#[test]
fn test_a_fetch_lists_its_range_and_reads_there_stay_at_4k() {
    let (host, vm, mut vcpu) = huge_host_vm(nx_config(GuardKnobs::default()));
    fault(&mut vcpu, 0, ErrorCode::empty());
    fault(&mut vcpu, 512, ErrorCode::empty());
    assert_eq!(vm.stats().present(Level::M2), 2);
    assert_eq!(splits(&vm), 0);
    // Execute from the first huge page: split, listed.
    fault(&mut vcpu, 1, ErrorCode::FETCH | ErrorCode::PRESENT);
    assert_eq!(vm.stats().present(Level::M2), 1);
    assert_eq!(splits(&vm), 1);
    // Execute from a range never mapped: 4 KiB at once, listed too.
    fault(&mut vcpu, 1024 + 3, ErrorCode::FETCH);
    assert_eq!(splits(&vm), 2);
    // Another fetch in a listed range lists nothing new.
    fault(&mut vcpu, 1024 + 4, ErrorCode::FETCH);
    assert_eq!(splits(&vm), 2);
    // Data accesses in the split ranges map below the tables.
    let before = vm.stats();
    fault(&mut vcpu, 1024 + 100, ErrorCode::empty());
    fault(&mut vcpu, 1024 + 101, ErrorCode::WRITE);
    assert_eq!(leaf(&vm, 1024 + 100).unwrap().0, Level::K4);
    assert_eq!(leaf(&vm, 1024 + 101).unwrap().0, Level::K4);
    assert_eq!(vm.stats().since(&before).nx_disallowed_adjusts, 2);
    assert_eq!(splits(&vm), 2);
    assert_eq!(vm.stats().present(Level::M2), 1);
    for (g, l, s) in vm.mappings(0) {
        assert!(
            l == Level::K4 || !executable(s),
            "executable huge leaf at {g:?}"
        );
    }
    assert_eq!(vm.stats().invariant_violations, 0);
    teardown(host, vm, vec![vcpu]);
}

/// Without `disallowed_hugepage_adjust` a read undoes the split (the guard
/// the test above checks).
#[test]
fn test_without_the_adjust_a_read_replaces_the_split_table() {
    let knobs = GuardKnobs {
        nx_replace_disallowed_table: true,
        ..GuardKnobs::default()
    };
    let (host, vm, mut vcpu) = huge_host_vm(nx_config(knobs));
    fault(&mut vcpu, 1024 + 3, ErrorCode::FETCH);
    assert_eq!(splits(&vm), 1);
    fault(&mut vcpu, 1024 + 100, ErrorCode::empty());
    assert_eq!(leaf(&vm, 1024 + 100).unwrap().0, Level::M2);
    assert_eq!(splits(&vm), 0, "the replaced table left the list");
    teardown(host, vm, vec![vcpu]);
}

/// Recovery zaps `ceil(listed / ratio)` of the oldest tables; their ranges map
/// huge again at the next read; ratio 0 does nothing.
#[test]
fn test_recovery_zaps_a_share_of_the_oldest_and_huge_pages_come_back() {
    let (host, vm, mut vcpu) = huge_host_vm(nx_config(GuardKnobs::default()));
    fault(&mut vcpu, 1, ErrorCode::FETCH);
    fault(&mut vcpu, 512 + 1, ErrorCode::FETCH);
    fault(&mut vcpu, 1024 + 1, ErrorCode::FETCH);
    assert_eq!(splits(&vm), 3);
    let none = vm.recover_nx_huge_pages(0);
    assert_eq!((none.to_zap, none.zapped), (0, 0));
    assert_eq!(splits(&vm), 3);
    let before = vm.stats();
    let r = vm.recover_nx_huge_pages(2);
    assert_eq!((r.listed, r.to_zap, r.zapped, r.gone), (3, 2, 2, 0));
    assert!(vm.stats().since(&before).tlb_flush_remote >= 1, "no flush");
    assert_eq!(splits(&vm), 1);
    // The oldest two went: their ranges are unmapped and map huge on a read.
    assert!(leaf(&vm, 1).is_none() && leaf(&vm, 512 + 1).is_none());
    assert!(leaf(&vm, 1024 + 1).is_some());
    fault(&mut vcpu, 5, ErrorCode::empty());
    assert_eq!(leaf(&vm, 5).unwrap().0, Level::M2);
    let r = vm.recover_nx_huge_pages(2);
    assert_eq!((r.listed, r.to_zap, r.zapped), (1, 1, 1));
    assert_eq!(splits(&vm), 0);
    fault(&mut vcpu, 1024 + 9, ErrorCode::empty());
    assert_eq!(leaf(&vm, 1024 + 9).unwrap().0, Level::M2);
    assert_eq!(vm.stats().present(Level::M2), 2);
    teardown(host, vm, vec![vcpu]);
}

/// In a slot that logs dirty pages, recovery takes the table off the list but
/// leaves it (and its mappings) in place.
#[test]
fn test_recovery_leaves_tables_in_dirty_logged_slots_in_place() {
    for ignore in [false, true] {
        let knobs = GuardKnobs {
            nx_recovery_ignores_dirty_log: ignore,
            ..GuardKnobs::default()
        };
        let (host, vm, mut vcpu) = huge_host_vm(nx_config(knobs));
        fault(&mut vcpu, 1, ErrorCode::FETCH);
        assert_eq!(splits(&vm), 1);
        let logging = MemFlags::LOG_DIRTY_PAGES.bits();
        vm.set_user_memory_region(region(0, GPA, SIZE, HVA, logging))
            .unwrap();
        let r = vm.recover_nx_huge_pages(1);
        assert_eq!(splits(&vm), 0);
        if ignore {
            assert_eq!((r.zapped, r.skipped_dirty_log), (1, 0));
            assert!(leaf(&vm, 1).is_none(), "the knob zaps the logged table");
        } else {
            assert_eq!((r.zapped, r.skipped_dirty_log), (0, 1));
            assert_eq!(leaf(&vm, 1).unwrap().0, Level::K4, "mapping kept");
        }
        teardown(host, vm, vec![vcpu]);
    }
}

/// Toggling the mitigation zaps every root: turned off, a fetch maps an
/// executable huge leaf; turned on again, it splits.
#[test]
fn test_toggling_nx_huge_pages_zaps_and_changes_what_fetches_map() {
    let (host, vm, mut vcpu) = huge_host_vm(nx_config(GuardKnobs::default()));
    assert!(vm.nx_huge_pages());
    fault(&mut vcpu, 1, ErrorCode::FETCH);
    assert_eq!(splits(&vm), 1);
    assert!(!vm.set_nx_huge_pages(true), "no change, nothing done");
    assert!(leaf(&vm, 1).is_some());
    assert!(vm.set_nx_huge_pages(false));
    assert!(!vm.nx_huge_pages());
    assert!(vm.mappings(0).is_empty(), "the toggle zapped nothing");
    assert_eq!(splits(&vm), 0);
    vcpu.prepare_entry().unwrap();
    fault(&mut vcpu, 1, ErrorCode::FETCH);
    let (level, s) = leaf(&vm, 1).unwrap();
    assert_eq!(level, Level::M2);
    assert!(executable(s));
    assert!(vm.set_nx_huge_pages(true));
    assert!(vm.mappings(0).is_empty());
    vcpu.prepare_entry().unwrap();
    fault(&mut vcpu, 1, ErrorCode::FETCH);
    assert_eq!(leaf(&vm, 1).unwrap().0, Level::K4);
    assert_eq!(splits(&vm), 1);
    assert_eq!(vm.stats().invariant_violations, 0);
    teardown(host, vm, vec![vcpu]);
}

/// A 1 GiB range split by a fetch lists both the 1 GiB and the 2 MiB table:
/// both sizes could have been mapped.
#[test]
fn test_a_fetch_in_a_1g_range_lists_both_levels() {
    let host = vmmu::testing::TestHost::new();
    host.set_host_level(Level::G1);
    let vm = Vm::new(nx_config(GuardKnobs::default()), host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, 1 << 30, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    fault(&mut vcpu, 3, ErrorCode::FETCH);
    assert_eq!(splits(&vm), 2);
    // A read elsewhere in the 1 GiB range maps 2 MiB below the listed 1 GiB
    // table; one in the listed 2 MiB range maps 4 KiB.
    fault(&mut vcpu, 4096, ErrorCode::empty());
    assert_eq!(leaf(&vm, 4096).unwrap().0, Level::M2);
    fault(&mut vcpu, 4, ErrorCode::empty());
    assert_eq!(leaf(&vm, 4).unwrap().0, Level::K4);
    // Deleting the slot zaps everything: nothing stays listed.
    vm.set_user_memory_region(region(0, GPA, 0, HVA, 0))
        .unwrap();
    assert_eq!(splits(&vm), 0);
    teardown(host, vm, vec![vcpu]);
}

/// Recovery takes `mmu_lock` for read (6.18), or for write with the old
/// behaviour kept for measuring.
#[test]
fn test_recovery_takes_the_read_lock_unless_asked_for_the_old_write_lock() {
    for write_lock in [false, true] {
        let config = VmConfig {
            nx_recovery_write_lock: write_lock,
            ..nx_config(GuardKnobs::default())
        };
        let (host, vm, mut vcpu) = huge_host_vm(config);
        fault(&mut vcpu, 1, ErrorCode::FETCH);
        let before = vm.stats();
        assert_eq!(vm.recover_nx_huge_pages(1).zapped, 1);
        let d = vm.stats().since(&before);
        assert_eq!(
            (d.mmu_lock_read, d.mmu_lock_write),
            if write_lock { (0, 1) } else { (1, 0) },
            "write_lock {write_lock}"
        );
        teardown(host, vm, vec![vcpu]);
    }
}

/// A pass larger than one hold of the lock (64 pages) takes exactly
/// `ceil(listed / ratio)`, oldest first, across holds.
#[test]
fn test_recovery_across_several_holds_takes_exactly_its_share() {
    let host = vmmu::testing::TestHost::new();
    host.set_host_level(Level::M2);
    let vm = Vm::new(nx_config(GuardKnobs::default()), host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, 400 << 20, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    for h in 0..200 {
        fault(&mut vcpu, h * 512 + 1, ErrorCode::FETCH);
    }
    assert_eq!(splits(&vm), 200);
    let r = vm.recover_nx_huge_pages(2);
    assert_eq!((r.listed, r.to_zap, r.zapped), (200, 100, 100));
    assert_eq!(splits(&vm), 100);
    // The oldest went: the first 100 ranges are unmapped, the rest are not.
    assert!(leaf(&vm, 99 * 512 + 1).is_none());
    assert!(leaf(&vm, 100 * 512 + 1).is_some());
    teardown(host, vm, vec![vcpu]);
}
