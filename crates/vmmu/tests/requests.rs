//! vCPU requests and guest mode, one thread at a time where possible: what a
//! request does to the next entry, to `enter_guest_mode` and to a vCPU in guest
//! mode, and the vCPU's own accessors. (The races themselves are the loom
//! model `loom_requests_*`; these pin each step's result.)

use vmmu::{ErrorCode, HvaRange, RetPf, RootFilter, VmConfig};

mod common;
use common::*;

#[test]
fn test_a_zap_requests_a_flush_that_blocks_entry_until_processed() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    // Nothing pending: the entry needs no flush and guest mode is entered.
    assert!(!vcpu.prepare_entry().unwrap().flush_tlb);
    assert!(!vcpu.has_requests());
    assert!(vcpu.enter_guest_mode());
    assert!(!vcpu.exit_requested(), "nobody asked this vCPU to leave");
    vcpu.exit_guest_mode();
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    // A zap of a mapped page asks every vCPU to flush.
    vm.zap_gfn_range(0, vmmu::GfnRange::new(gpa(0).gfn(), gpa(8).gfn()))
        .unwrap();
    assert!(vcpu.has_requests(), "the zap's flush request is pending");
    assert!(
        !vcpu.enter_guest_mode(),
        "entry must not proceed past a pending request"
    );
    assert!(!vcpu.exit_requested());
    let e = vcpu.prepare_entry().unwrap();
    assert!(e.flush_tlb, "the request becomes the entry's flush");
    assert!(!vcpu.has_requests());
    assert!(vcpu.enter_guest_mode());
    vcpu.exit_guest_mode();
    // Processed once: the next entry flushes nothing.
    assert!(!vcpu.prepare_entry().unwrap().flush_tlb);
    teardown(host, vm, vec![vcpu]);
}

/// A vCPU in guest mode sees the requester's "exit" and leaves; the
/// requester's zap returns only after it did.
#[test]
fn test_a_vcpu_in_guest_mode_is_asked_to_exit_and_the_requester_waits() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    vcpu.prepare_entry().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        assert!(vcpu.enter_guest_mode());
        tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut seen = false;
        while std::time::Instant::now() < deadline {
            if vcpu.exit_requested() {
                seen = true;
                break;
            }
            std::hint::spin_loop();
        }
        vcpu.exit_guest_mode();
        (seen, vcpu)
    });
    rx.recv().unwrap();
    vm.zap_gfn_range(0, vmmu::GfnRange::new(gpa(0).gfn(), gpa(8).gfn()))
        .unwrap();
    let (seen, vcpu) = t.join().unwrap();
    assert!(seen, "the vCPU in guest mode was never asked to exit");
    assert!(vcpu.has_requests(), "it still has the flush to process");
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_vcpu_accessors_report_its_own_id_and_lock_traffic() {
    let (host, vm, vcpu) = setup(VmConfig::default());
    let mut v7 = vm.create_vcpu(7).unwrap();
    assert_eq!(v7.id(), 7);
    assert_eq!(vcpu.id(), 0);
    v7.prepare_entry().unwrap();
    let before = v7.mmu_lock_reads();
    assert_eq!(
        v7.page_fault(gpa(3), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(
        v7.mmu_lock_reads(),
        before + 1,
        "one read acquisition per fault"
    );
    assert!(!v7.debug_current_root_freed());
    teardown(host, vm, vec![vcpu, v7]);
}

/// A cached previous root of the wanted role is reused only while valid; an
/// invalidated one is dropped at the next entry and a new root is created.
#[test]
fn test_an_invalidated_cached_root_is_not_reused_on_a_role_switch() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vcpu.set_smm(true).unwrap();
    vcpu.prepare_entry().unwrap();
    let smm = vcpu.root_id();
    vcpu.set_smm(false).unwrap();
    vcpu.prepare_entry().unwrap();
    let normal = vcpu.root_id();
    assert_eq!(vcpu.prev_root_ids()[0], smm, "the SMM root is cached");
    assert_ne!(smm, normal);
    vm.invalidate_roots(RootFilter::AddressSpace(1)).unwrap();
    let created = vm.stats().roots_created;
    vcpu.set_smm(true).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_ne!(vcpu.root_id(), smm, "an invalidated root came back");
    assert_eq!(vm.stats().roots_created, created + 1);
    teardown(host, vm, vec![vcpu]);
}

/// The pre-check's range is half-open: a fault on the first gfn past an
/// invalidation in progress maps without a retry.
#[test]
fn test_precheck_does_not_retry_the_gfn_just_past_the_invalidation() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let inv = vm.invalidate_range_start(HvaRange::new(hva(0), hva(16)));
    let before = vcpu.stats();
    assert_eq!(
        vcpu.page_fault(gpa(16), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(
        vcpu.page_fault(gpa(15), ErrorCode::WRITE).unwrap(),
        RetPf::Retry
    );
    let d = vcpu.stats().since(&before);
    assert_eq!(d.precheck_retries, 1, "only the gfn inside retried");
    inv.end();
    teardown(host, vm, vec![vcpu]);
}
