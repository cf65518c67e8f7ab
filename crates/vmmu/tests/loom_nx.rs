//! Model-checked NX huge page protocols (loom). Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vmmu --release --test loom_nx`.
//!
//! As in `loom.rs`, each protocol runs as built (every interleaving keeps the
//! invariant) and with its guard removed (the model must find a violation).
#![cfg(loom)]

use std::sync::Arc;

use loom::thread;
use vmmu::testing::TestHost;
use vmmu::{ErrorCode, Gpa, GuardKnobs, Hva, HvaRange, Level, Vm, VmConfig};

mod loom_common;

use loom_common::{GPA, HVA};

/// A VM with the mitigation on, over a host that maps 2 MiB, with one 2 MiB
/// slot (id 0) at `GPA`, and a vCPU whose table cache is full.
fn nx_vm(knobs: GuardKnobs) -> (Arc<TestHost>, Vm, vmmu::VcpuMmu) {
    let config = VmConfig {
        nx_huge_pages: true,
        knobs,
        ..VmConfig::default()
    };
    loom_common::vm_with_vcpu(config, Level::M2)
}

/// (n1) A fetch splits a huge leaf and lists the table it made, while a
/// huge-page recovery under the read lock (dirty logging turned off) builds
/// the huge leaf back over that very table. The list never keeps a table
/// that is no longer linked: the fault checks its link under the list's lock.
fn fetch_split_vs_huge_recovery(knobs: GuardKnobs) {
    let (_host, vm, mut vcpu) = nx_vm(knobs);
    vcpu.page_fault(Gpa(GPA), ErrorCode::empty()).unwrap();
    // A spurious fault tops the cache up outside the model's threads.
    vcpu.page_fault(Gpa(GPA), ErrorCode::empty()).unwrap();
    // The fault runs on the model's first thread, so one preemption is
    // enough to put the whole recovery between any two of its steps.
    let rvm = vm.clone();
    let recovery = thread::spawn(move || {
        vmmu::testing::recover_huge_pages(&rvm, 0).unwrap();
    });
    let _ = vcpu.page_fault(Gpa(GPA + 4096), ErrorCode::FETCH | ErrorCode::PRESENT);
    recovery.join().unwrap();
    drop(vcpu);
    let check = vm.check_possible_nx_huge_pages();
    drop(vm);
    if let Err(e) = check {
        panic!("{e}");
    }
}

/// (n2) NX recovery zaps a listed table under the read lock while the host
/// invalidates a page inside it. Once the invalidation has returned (the host
/// may free the page), no vCPU may still use a translation through the
/// zapped table: recovery flushes before it lets go of the lock, so an
/// invalidation that finds nothing left to zap (and so flushes nothing) still
/// leaves the vCPU a flush to do.
fn nx_recovery_vs_invalidation(knobs: GuardKnobs) {
    let (_host, vm, mut vcpu) = nx_vm(knobs);
    vcpu.page_fault(Gpa(GPA), ErrorCode::FETCH).unwrap();
    assert_eq!(vm.possible_nx_huge_pages(), 1);
    // The vCPU enters with the translation cached; nothing is pending.
    vcpu.prepare_entry().unwrap();
    assert_eq!(vm.debug_pending_requests(0), Some(0));
    let rvm = vm.clone();
    let recovery = thread::spawn(move || {
        rvm.recover_nx_huge_pages(1);
    });
    let inv = vm.invalidate_range_start(HvaRange::new(Hva(HVA), Hva(HVA + 4096)));
    let pending = vm.debug_pending_requests(0).unwrap_or(0);
    inv.end();
    recovery.join().unwrap();
    drop(vcpu);
    // A page that nobody zapped yet is still mapped: nothing to check then.
    let still_mapped = vm
        .mappings(0)
        .iter()
        .any(|(g, _, s)| *g == Gpa(GPA).gfn() && s.is_shadow_present());
    assert!(
        still_mapped || pending & vmmu::request::REQ_TLB_FLUSH != 0,
        "an invalidation returned with the page's translation still usable"
    );
}

protocol!(
    loom_fetch_split_never_lists_a_table_a_recovery_replaced,
    loom_fetch_split_lists_a_replaced_table_without_the_recheck,
    fetch_split_vs_huge_recovery,
    nx_track_without_recheck,
    "is not linked by a marked entry"
);
protocol!(
    loom_nx_recovery_flushes_before_an_invalidation_can_run,
    loom_nx_recovery_leaves_a_usable_translation_when_it_flushes_after_unlocking,
    nx_recovery_vs_invalidation,
    skip_flush_before_yield,
    "still usable"
);
