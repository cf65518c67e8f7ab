//! Roots as the VM reports them: reference counts, what an address-space
//! filter reaches, invalidated roots zapped and freed, cached roots reused only
//! while valid, and memslot installs waiting for invalidations in progress.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmmu::{ErrorCode, GfnRange, HvaRange, RootFilter, VmConfig};

mod common;
use common::*;

fn refcount(vm: &vmmu::Vm, id: Option<u64>) -> u32 {
    vm.roots()
        .into_iter()
        .find(|r| Some(r.id) == id)
        .map_or(0, |r| r.refcount)
}

#[test]
fn test_root_refcounts_count_the_mmu_and_each_vcpu() {
    let (host, vm, v0) = setup(VmConfig::default());
    assert_eq!(
        refcount(&vm, v0.root_id()),
        2,
        "the MMU's reference and vCPU 0's"
    );
    let mut v1 = vm.create_vcpu(1).unwrap();
    v1.prepare_entry().unwrap();
    assert_eq!(v1.root_id(), v0.root_id());
    assert_eq!(refcount(&vm, v0.root_id()), 3);
    let id = v1.root_id();
    drop(v1);
    assert_eq!(refcount(&vm, id), 2, "a destroyed vCPU drops its reference");
    teardown(host, vm, vec![v0]);
}

/// A zap of address space 0 leaves the SMM address space's mappings alone.
#[test]
fn test_a_zap_reaches_only_the_roots_of_its_address_space() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    // The same memory in the SMM address space.
    vm.set_user_memory_region(region(1 << 16, GPA, SIZE, HVA, 0))
        .unwrap();
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    vcpu.set_smm(true).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    let present = |a| {
        vm.mappings(a)
            .iter()
            .filter(|(_, _, s)| s.is_shadow_present())
            .count()
    };
    let (in0, in1) = (present(0), present(1));
    assert!(in0 > 0 && in1 > 0);
    vm.zap_gfn_range(0, GfnRange::new(gpa(0).gfn(), gpa(8).gfn()))
        .unwrap();
    assert_eq!(present(0), 0, "address space 0 zapped");
    assert_eq!(present(1), in1, "the SMM address space untouched");
    teardown(host, vm, vec![vcpu]);
}

/// Invalidated roots are zapped (their leaves counted removed) and freed once
/// the last vCPU let go.
#[test]
fn test_invalidated_roots_are_zapped_and_freed() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    for p in 0..4 {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    let before = vm.stats();
    vm.invalidate_roots(RootFilter::All).unwrap();
    let d = vm.stats().since(&before);
    assert_eq!(
        d.leaves_zapped, 4,
        "the invalidated root's leaves are zapped"
    );
    assert_eq!(d.roots_freed, 0, "the vCPU still holds it");
    vcpu.prepare_entry().unwrap();
    assert_eq!(vm.stats().since(&before).roots_freed, 1);
    teardown(host, vm, vec![vcpu]);
}

/// Switching back to a role whose cached root was invalidated is no cache
/// hit, and the next entry drops it (counted once).
#[test]
fn test_an_invalid_cached_root_is_no_hit_and_dropped_once() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.set_smm(true).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.set_smm(false).unwrap();
    let hits = vm.stats().prev_root_hits;
    assert_eq!(hits, 1, "the normal root came back from the cache");
    vcpu.prepare_entry().unwrap();
    vm.invalidate_roots(RootFilter::AddressSpace(1)).unwrap();
    let before = vm.stats();
    vcpu.prepare_entry().unwrap();
    let d = vm.stats().since(&before);
    assert_eq!(d.obsolete_roots_dropped, 1, "the cached SMM root, once");
    vcpu.set_smm(true).unwrap();
    assert_eq!(vm.stats().prev_root_hits, hits, "an invalid root is no hit");
    vcpu.prepare_entry().unwrap();
    // Entries with nothing to free keep nothing either: no cached roots left
    // to count.
    let before = vm.stats();
    vcpu.prepare_entry().unwrap();
    assert_eq!(vm.stats().since(&before).prev_roots_kept, 0);
    teardown(host, vm, vec![vcpu]);
}

/// A memslot update waits for the invalidations in progress to end (so start
/// and end see the same slots).
#[test]
fn test_a_memslot_install_waits_for_an_invalidation_in_progress() {
    let (host, vm, vcpu) = setup(VmConfig::default());
    let inv = vm.invalidate_range_start(HvaRange::new(hva(0), hva(8)));
    let done = Arc::new(AtomicBool::new(false));
    let (vm2, done2) = (vm.clone(), done.clone());
    let t = std::thread::spawn(move || {
        vm2.set_user_memory_region(region(3, 4 * GPA, SIZE, 4 * HVA, 0))
            .unwrap();
        done2.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "the install finished while an invalidation was in progress"
    );
    inv.end();
    t.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert!(vm.memslots(0).unwrap().by_id(3).is_some());
    teardown(host, vm, vec![vcpu]);
}
