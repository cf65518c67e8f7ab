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

const LOG: u32 = MemFlags::LOG_DIRTY_PAGES.bits();
const RO: u32 = MemFlags::READONLY.bits();
const GMEM: u32 = MemFlags::GUEST_MEMFD.bits();
const P: u64 = 4096;

fn ids(set: &vmmu::MemslotSet) -> Vec<u16> {
    let mut v: Vec<u16> = set.iter().map(|s| s.id()).collect();
    v.sort_unstable();
    v
}

/// The set as a VMM reads it: its size, its slots, and which slots a range of
/// gfns touches, with exactly the overlapping gfns.
#[test]
fn test_memslot_set_size_iteration_and_gfn_overlaps() {
    let host = vmmu::testing::TestHost::new();
    let vm = vmmu::Vm::new(VmConfig::default(), host.ops()).unwrap();
    let set = vm.memslots(0).unwrap();
    assert!(set.is_empty() && set.iter().next().is_none());
    assert_eq!(set.len(), 0);
    let base = GPA / P;
    // Pages [0,16), [16,32) (adjacent: allowed) and [64,80) of the region.
    for (id, first, n) in [(0, 0, 16), (1, 16, 16), (2, 64, 16)] {
        vm.set_user_memory_region(region(id, GPA + first * P, n * P, HVA + first * P, 0))
            .unwrap();
    }
    let set = vm.memslots(0).unwrap();
    assert_eq!(set.len(), 3);
    assert!(!set.is_empty());
    assert_eq!(ids(&set), [0, 1, 2]);
    let overlaps = |s: u64, e: u64| {
        let mut v = Vec::new();
        set.for_each_gfn_overlap(
            vmmu::GfnRange::new(Gfn(base + s), Gfn(base + e)),
            |slot, r| v.push((slot.id(), r.start.0 - base, r.end.0 - base)),
        );
        v
    };
    assert_eq!(overlaps(8, 70), [(0, 8, 16), (1, 16, 32), (2, 64, 70)]);
    assert_eq!(overlaps(15, 16), [(0, 15, 16)]);
    assert_eq!(overlaps(16, 17), [(1, 16, 17)]);
    assert_eq!(overlaps(31, 33), [(1, 31, 32)]);
    assert!(overlaps(32, 64).is_empty(), "the hole between slots");
    assert!(overlaps(80, 90).is_empty(), "past the last slot");
    assert!(overlaps(5, 5).is_empty(), "an empty range");
    assert_eq!(overlaps(0, 1000).len(), 3);
    drop(set);
    // Low in guest memory, where a slot's first gfn times its size is less
    // than its end: pages [1, 5) are found from page 4.
    vm.set_user_memory_region(region(3, P, 4 * P, 2 * HVA, 0))
        .unwrap();
    let set = vm.memslots(0).unwrap();
    let mut v = Vec::new();
    set.for_each_gfn_overlap(vmmu::GfnRange::new(Gfn(4), Gfn(6)), |slot, r| {
        v.push((slot.id(), r.start.0, r.end.0))
    });
    assert_eq!(v, [(3, 4, 5)]);
    drop(set);
    drop(vm);
}

/// Overlap in guest physical space is refused (EEXIST) by one page either
/// way, adjacency is not, and a slot may move onto a range that overlaps its
/// own old place.
#[test]
fn test_overlap_is_refused_by_one_page_and_a_move_may_overlap_itself() {
    let (host, vm, vcpu) = setup(VmConfig::default());
    let n = SIZE / P;
    // Slot 0 is pages [0, n) at GPA.
    let before = vm.memslots(0).unwrap().generation();
    for (first, what) in [(n - 1, "last page"), (0u64.wrapping_sub(1), "first page")] {
        let gpa = GPA.wrapping_add(first.wrapping_mul(P));
        let e = vm
            .set_user_memory_region(region(1, gpa, 2 * P, 2 * HVA, 0))
            .unwrap_err();
        assert_eq!(e.errno(), vmmu::errno::EEXIST, "{what}: {e}");
    }
    assert_eq!(
        vm.memslots(0).unwrap().generation(),
        before,
        "nothing changed"
    );
    vm.set_user_memory_region(region(1, GPA + SIZE, 2 * P, 2 * HVA, 0))
        .expect("adjacent after");
    vm.set_user_memory_region(region(2, GPA - 2 * P, 2 * P, 3 * HVA, 0))
        .expect("adjacent before");
    // Slot 1 moves one page up: its old and new ranges overlap, no one else's.
    vm.set_user_memory_region(region(1, GPA + SIZE + P, 2 * P, 2 * HVA, 0))
        .expect("a move overlapping only itself");
    // Moving slot 1 back down by two pages would overlap slot 0.
    let e = vm
        .set_user_memory_region(region(1, GPA + SIZE - P, 2 * P, 2 * HVA, 0))
        .unwrap_err();
    assert_eq!(e.errno(), vmmu::errno::EEXIST);
    teardown(host, vm, vec![vcpu]);
}

/// After the largest slot is deleted, a host invalidation of the last page of
/// another big slot still finds it (the host-address search starts one
/// largest-slot size below the range), and deleting one slot leaves the
/// others reachable from host addresses.
#[test]
fn test_host_invalidations_find_slots_after_deletes() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    // Slot 0: 8 MiB at HVA. Slot 1: 16 MiB elsewhere, then deleted.
    vm.set_user_memory_region(region(1, 4 * GPA, 2 * SIZE, 4 * HVA, 0))
        .unwrap();
    vm.set_user_memory_region(region(2, 8 * GPA, 4 * P, 8 * HVA, 0))
        .unwrap();
    vm.set_user_memory_region(region(1, 0, 0, 0, 0)).unwrap();
    let last = SIZE / P - 1;
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(last), vmmu::ErrorCode::WRITE).unwrap();
    vcpu.page_fault(vmmu::Gpa(8 * GPA), vmmu::ErrorCode::WRITE)
        .unwrap();
    assert!(leaf(&vm, last).is_some());
    let inv = vm.invalidate_range_start(vmmu::HvaRange::new(hva(last), hva(last + 1)));
    inv.end();
    assert!(
        leaf(&vm, last).is_none(),
        "slot 0's last page must be zapped"
    );
    let g = vmmu::Gpa(8 * GPA).gfn();
    let mapped = |vm: &vmmu::Vm| {
        vm.mappings(0)
            .iter()
            .any(|(x, _, s)| *x == g && s.is_shadow_present())
    };
    assert!(mapped(&vm));
    let inv = vm.invalidate_range_start(vmmu::HvaRange::new(Hva(8 * HVA), Hva(8 * HVA + P)));
    inv.end();
    assert!(
        !mapped(&vm),
        "slot 2 must still be found by its host address"
    );
    teardown(host, vm, vec![vcpu]);
}

/// The address limits are inclusive of their last byte: a slot may end
/// exactly at the top of user space and exactly at the guest's physical
/// width, not one page beyond.
#[test]
fn test_slots_may_end_exactly_at_the_address_limits() {
    let host = vmmu::testing::TestHost::new();
    let vm = vmmu::Vm::new(
        VmConfig {
            maxphyaddr: 36,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    let top = vmmu::memslot::USER_ADDR_LIMIT;
    vm.set_user_memory_region(region(0, GPA, 4 * P, top - 4 * P, 0))
        .expect("ends at the user address limit");
    let e = vm
        .set_user_memory_region(region(1, 2 * GPA, 4 * P, top - 3 * P, 0))
        .unwrap_err();
    assert_eq!(e.errno(), vmmu::errno::EINVAL);
    let end = 1u64 << 36;
    vm.set_user_memory_region(region(2, end - 4 * P, 4 * P, HVA, 0))
        .expect("ends at the guest's physical width");
    let e = vm
        .set_user_memory_region(region(3, end - 3 * P, 4 * P, 2 * HVA, 0))
        .unwrap_err();
    assert_eq!(e.errno(), vmmu::errno::EINVAL);
    drop(vm);
}

/// Flags: guest_memfd only through the second call on a VM that supports it,
/// never with dirty logging or read-only; a read-only slot may start logging;
/// a move may change the logging flag and then logs.
#[test]
fn test_flag_rules_on_create_change_and_move() {
    let (host, vm, vcpu) = setup(VmConfig::default());
    let file = vm.create_guest_memfd(4 * SIZE, 0).unwrap();
    let e = vm
        .set_user_memory_region(region(1, 4 * GPA, SIZE, 4 * HVA, GMEM))
        .unwrap_err();
    assert_eq!(
        e.errno(),
        vmmu::errno::EINVAL,
        "the old call has no guest_memfd"
    );
    for bad in [GMEM | LOG, GMEM | RO] {
        let e = vm
            .set_user_memory_region2(region(1, 4 * GPA, SIZE, 4 * HVA, bad), Some(&file), 0)
            .unwrap_err();
        assert_eq!(e.errno(), vmmu::errno::EINVAL, "flags {bad:#x}");
    }
    assert!(vm.memslots(0).unwrap().by_id(1).is_none());
    // A read-only slot turns logging on and off.
    vm.set_user_memory_region(region(2, 8 * GPA, SIZE, 8 * HVA, RO))
        .unwrap();
    vm.set_user_memory_region(region(2, 8 * GPA, SIZE, 8 * HVA, RO | LOG))
        .expect("logging on a read-only slot");
    assert!(vm.memslots(0).unwrap().by_id(2).unwrap().dirty_logging());
    // Slot 0 moves and starts logging in one call.
    vm.set_user_memory_region(region(0, 2 * GPA, SIZE, HVA, LOG))
        .unwrap();
    let set = vm.memslots(0).unwrap();
    let s = set.by_id(0).unwrap();
    assert_eq!(s.base_gfn(), Gfn(2 * GPA / P));
    assert_eq!(s.flags(), MemFlags::LOG_DIRTY_PAGES);
    assert!(vm.get_dirty_log(0).is_ok(), "the moved slot logs");
    drop(set);
    drop(file);
    teardown(host, vm, vec![vcpu]);
}

/// A guest_memfd slot can be set again unchanged but not moved, resized or
/// given other flags; two slots can bind neighbouring ranges of one file but
/// not overlapping ones.
#[test]
fn test_guest_memfd_slot_changes_and_file_ranges() {
    let (host, vm, vcpu) = setup(VmConfig::default());
    let file = vm.create_guest_memfd(4 * SIZE, 0).unwrap();
    let r = region(1, 4 * GPA, SIZE, 4 * HVA, GMEM);
    vm.set_user_memory_region2(r, Some(&file), 0).unwrap();
    vm.set_user_memory_region2(r, Some(&file), 0)
        .expect("the same again");
    let gen = vm.memslots(0).unwrap().generation();
    for (what, bad) in [
        ("moved", region(1, 5 * GPA, SIZE, 4 * HVA, GMEM)),
        ("resized", region(1, 4 * GPA, SIZE / 2, 4 * HVA, GMEM)),
        (
            "other host address",
            region(1, 4 * GPA, SIZE, 5 * HVA, GMEM),
        ),
        ("other flags", region(1, 4 * GPA, SIZE, 4 * HVA, 0)),
    ] {
        let e = vm.set_user_memory_region2(bad, Some(&file), 0).unwrap_err();
        assert_eq!(e.errno(), vmmu::errno::EINVAL, "{what}: {e}");
    }
    assert_eq!(vm.memslots(0).unwrap().generation(), gen, "nothing changed");
    // The file's next range binds; one overlapping slot 1's last page does not.
    vm.set_user_memory_region2(region(2, 6 * GPA, SIZE, 6 * HVA, GMEM), Some(&file), SIZE)
        .expect("the neighbouring file range");
    let e = vm
        .set_user_memory_region2(
            region(3, 7 * GPA, SIZE, 7 * HVA, GMEM),
            Some(&file),
            2 * SIZE - P,
        )
        .unwrap_err();
    assert_eq!(e.errno(), vmmu::errno::EINVAL);
    assert!(e.to_string().contains("bound to another memslot"), "{e}");
    assert!(vm.memslots(0).unwrap().by_id(3).is_none());
    drop(file);
    teardown(host, vm, vec![vcpu]);
}

/// The largest slot is `KVM_MEM_MAX_NR_PAGES` pages; one more page is refused.
/// A delete (size 0) ignores its guest address, as KVM checks the guest's
/// physical width only when a slot is created or moved.
#[test]
fn test_largest_slot_and_a_delete_with_any_address() {
    let host = vmmu::testing::TestHost::new();
    let vm = vmmu::Vm::new(VmConfig::default(), host.ops()).unwrap();
    // KVM's value, written out: the test must not follow the constant.
    let max = (1u64 << 31) - 1;
    assert_eq!(vmmu::memslot::MEM_MAX_NR_PAGES, max);
    vm.set_user_memory_region(region(0, 0, max * P, 1 << 40, 0))
        .expect("KVM_MEM_MAX_NR_PAGES pages");
    let e = vm
        .set_user_memory_region(region(1, 16 << 40, (max + 1) * P, 1 << 44, 0))
        .unwrap_err();
    assert_eq!(e.errno(), vmmu::errno::EINVAL);
    assert!(vm.memslots(0).unwrap().by_id(1).is_none());
    vm.set_user_memory_region(region(0, !0xfff, 0, 0, 0))
        .expect("a delete ignores the address");
    assert!(vm.memslots(0).unwrap().is_empty());
    drop(vm);
}

/// While a memslot update is in progress its generation carries the
/// in-progress bit, so an MMIO entry cached before it can never match: a
/// fault in that window on a gfn the new slot covers must not be emulated as
/// MMIO (KVM's `KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`).
#[test]
fn test_mmio_entries_are_not_trusted_while_a_slot_is_being_created() {
    use std::sync::{mpsc, Arc, Mutex};
    use vmmu::{ErrorCode, HookPoint, RetPf, TestHooks};
    let (paused_tx, paused_rx) = mpsc::channel::<u64>();
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let armed = Arc::new(Mutex::new(false));
    let chans = Arc::new(Mutex::new((paused_tx, resume_rx)));
    let hooks = {
        let armed = armed.clone();
        TestHooks {
            on: Some(Arc::new(move |p: HookPoint| {
                if let HookPoint::MemslotSetSwapped { generation, .. } = p {
                    if std::mem::take(&mut *armed.lock().unwrap()) {
                        let (paused, resume) = &*chans.lock().unwrap();
                        paused.send(generation).unwrap();
                        resume.recv().unwrap();
                    }
                }
            })),
        }
    };
    let (host, vm, mut vcpu) = setup(VmConfig {
        hooks,
        ..VmConfig::default()
    });
    // Past slot 0's end: no slot, an MMIO entry is cached and then hit fast.
    let g = gpa(SIZE / P + 1);
    assert_eq!(
        vcpu.page_fault(g, ErrorCode::empty()).unwrap(),
        RetPf::Emulate
    );
    let hits = vcpu.stats().mmio_fast_hits;
    assert_eq!(vcpu.page_fault(g, ErrorCode::RSVD).unwrap(), RetPf::Emulate);
    assert_eq!(
        vcpu.stats().mmio_fast_hits,
        hits + 1,
        "the cached entry is used"
    );
    // A slot appears over that gfn; the fault runs inside the update.
    *armed.lock().unwrap() = true;
    let installer = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            vm.set_user_memory_region(region(1, GPA + SIZE, SIZE, HVA + 2 * SIZE, 0))
        })
    };
    let generation = paused_rx.recv().unwrap();
    assert!(generation & vmmu::memslot::GEN_UPDATE_IN_PROGRESS != 0);
    let r = vcpu.page_fault(g, ErrorCode::RSVD).unwrap();
    resume_tx.send(()).unwrap();
    installer.join().unwrap().unwrap();
    assert_ne!(r, RetPf::Emulate, "MMIO emulated for a gfn that has a slot");
    teardown(host, vm, vec![vcpu]);
}

/// One invalidation over slots that follow each other in host memory: the
/// ranges of slots that also follow each other in gfn are zapped together,
/// and a slot whose gfns lie between two of them (mapped from elsewhere in
/// host memory) keeps its pages.
#[test]
fn test_an_invalidation_over_adjacent_slots_zaps_their_gfns_and_nothing_between() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let p = 4096;
    // (slot, first page, first host page), four pages each. Slots 1, 2 and 4
    // are adjacent in host memory; 2 and 4 are adjacent in gfn too; slot 3
    // fills the gfn gap between 1 and 2 from another host range.
    let slots = [
        (1, 4096, 100_000),
        (2, 4104, 100_004),
        (4, 4108, 100_008),
        (3, 4100, 200_000),
    ];
    for (slot, page, hpage) in slots {
        vm.set_user_memory_region(region(slot, gpa(page).0, 4 * p, hva(hpage).0, 0))
            .unwrap();
    }
    for page in 4096..4112 {
        vcpu.page_fault(gpa(page), vmmu::ErrorCode::WRITE).unwrap();
        assert!(leaf(&vm, page).is_some(), "page {page} mapped");
    }
    let inv = vm.invalidate_range_start(vmmu::HvaRange::new(hva(100_000), hva(100_012)));
    inv.end();
    for page in 4096..4112 {
        let in_gap = (4100..4104).contains(&page);
        assert_eq!(
            leaf(&vm, page).is_some(),
            in_gap,
            "page {page}: only slot 3's pages stay mapped"
        );
    }
    teardown(host, vm, vec![vcpu]);
}
