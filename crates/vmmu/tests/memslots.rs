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

#[test]
fn test_slot_numbers_carry_the_address_space() {
    let (host, vm, vcpu) = setup(VmConfig::default());
    vm.set_user_memory_region(region((1 << 16) | 3, GPA, SIZE, HVA, 0))
        .unwrap();
    let smm = vm.memslots(1).unwrap();
    let s = smm.by_id(3).unwrap();
    assert_eq!(s.slot_number(), (1 << 16) | 3);
    assert_eq!(s.as_id(), 1);
    teardown(host, vm, vec![vcpu]);
}

/// A host invalidation just past a slot's end is no concern of the slot; one
/// over its last page is.
#[test]
fn test_a_slot_ends_where_its_host_range_ends() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let last = SIZE / 4096 - 1;
    vcpu.page_fault(gpa(last), vmmu::ErrorCode::WRITE).unwrap();
    let before = vm.stats().invalidations_with_slots;
    vm.invalidate_range_start(vmmu::HvaRange::new(hva(last + 1), hva(last + 2)))
        .end();
    assert_eq!(vm.stats().invalidations_with_slots, before, "past the end");
    assert!(leaf(&vm, last).is_some());
    vm.invalidate_range_start(vmmu::HvaRange::new(hva(last), hva(last + 1)))
        .end();
    assert_eq!(vm.stats().invalidations_with_slots, before + 1);
    assert!(leaf(&vm, last).is_none(), "the last page was zapped");
    teardown(host, vm, vec![vcpu]);
}

/// What a slot reports of its guest_memfd page for a gfn is the page the
/// private fault mapped there, with the slot's file offset applied.
#[test]
fn test_peek_private_page_follows_the_slots_file_offset() {
    let host = vmmu::testing::TestHost::new();
    let vm = vmmu::Vm::new(
        VmConfig {
            vm_type: vmmu::VmType::SwProtected,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    let file = vm.create_guest_memfd(2 * SIZE, 0).unwrap();
    // The slot starts 16 pages into the file.
    vm.set_user_memory_region2(region(0, GPA, SIZE, HVA, 1 << 2), Some(&file), 16 * 4096)
        .unwrap();
    vm.set_memory_attributes(GPA, SIZE, vmmu::MEMORY_ATTRIBUTE_PRIVATE, 0)
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(5), vmmu::ErrorCode::WRITE).unwrap();
    let (_, s) = leaf(&vm, 5).unwrap();
    let slots = vm.memslots(0).unwrap();
    let slot = slots.by_id(0).unwrap();
    assert_eq!(
        slot.peek_private_page(gpa(5).gfn()),
        vmmu::PrivatePage::Page {
            pfn: s.pfn(),
            poisoned: false
        }
    );
    assert_eq!(
        slot.peek_private_page(gpa(6).gfn()),
        vmmu::PrivatePage::Absent
    );
    drop(file);
    teardown(host, vm, vec![vcpu]);
}
