//! Memslots as a VMM reads them back: every accessor reports what the slot was
//! created with, and changes of flags are seen.

use vmmu::{Gfn, Hva, MemFlags, VmConfig};

mod common;
use common::*;

#[test]
fn test_memslot_accessors_report_what_the_slot_was_created_with() {
    let (host, vm, vcpu) = setup(VmConfig::default());
    let slots = vm.memslots(0).unwrap();
    let s = slots.by_id(0).unwrap();
    assert_eq!(s.slot_number(), 0);
    assert_eq!(s.as_id(), 0);
    assert_eq!(s.base_gfn(), Gfn(GPA >> 12));
    assert_eq!(s.npages(), SIZE / 4096);
    assert_eq!(s.userspace_addr(), Hva(HVA));
    assert_eq!(s.gfn_to_hva(Gfn((GPA >> 12) + 3)), Hva(HVA + 3 * 4096));
    assert_eq!(s.flags(), MemFlags::empty());
    assert!(!s.is_readonly() && !s.dirty_logging() && !s.has_guest_memfd());
    // Flags changed in place are what the slot reports.
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, MemFlags::LOG_DIRTY_PAGES.bits()))
        .unwrap();
    let slots = vm.memslots(0).unwrap();
    let s = slots.by_id(0).unwrap();
    assert_eq!(s.flags(), MemFlags::LOG_DIRTY_PAGES);
    assert!(s.dirty_logging());
    // A guest_memfd slot says so.
    let file = vm.create_guest_memfd(SIZE, 0).unwrap();
    vm.set_user_memory_region2(region(1, 4 * GPA, SIZE, 4 * HVA, 1 << 2), Some(&file), 0)
        .unwrap();
    let slots = vm.memslots(0).unwrap();
    let g = slots.by_id(1).unwrap();
    assert!(g.has_guest_memfd());
    assert_eq!(g.flags(), MemFlags::GUEST_MEMFD);
    drop(file);
    teardown(host, vm, vec![vcpu]);
}
