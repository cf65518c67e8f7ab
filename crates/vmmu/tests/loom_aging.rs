//! Model-checked lockless aging (loom). Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vmmu --release --test loom_aging`.
//!
//! As in `loom.rs`, the protocol runs as built (every interleaving keeps the
//! invariant) and with its guard removed (the model must find a violation).
#![cfg(loom)]

use loom::thread;
use vmmu::{ErrorCode, Gpa, GuardKnobs, Hva, HvaRange, Pfn, RetPf, VmConfig};

mod loom_common;

use loom_common::{GPA, HVA};

/// (g1) Aging without `mmu_lock` (KVM 6.15) races an invalidation of the
/// page it is aging. The aged value is written only over the value it was
/// computed from, so a zap in between stays a zap: once the invalidation
/// has returned and the host has moved the page, the old frame is not
/// mapped. Run with and without A/D bits (clearing Accessed, or making the
/// entry access-tracked).
fn aging_vs_invalidation(knobs: GuardKnobs, ad_enabled: bool) {
    let config = VmConfig {
        knobs,
        ad_enabled,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = loom_common::vm_with_vcpu(config, vmmu::Level::K4);
    host.set(Hva(HVA), Pfn(0x777), true);
    assert_eq!(
        vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    let range = HvaRange::new(Hva(HVA), Hva(HVA + 4096));
    let avm = vm.clone();
    let aging = thread::spawn(move || {
        avm.clear_young(range);
    });
    let inv = vm.invalidate_range_start(range);
    host.set(Hva(HVA), Pfn(0x888), true);
    inv.end();
    aging.join().unwrap();
    let old_mapped = vm
        .mappings(0)
        .iter()
        .any(|(g, _, s)| *g == Gpa(GPA).gfn() && s.is_shadow_present() && s.pfn() == Pfn(0x777));
    drop(vcpu);
    drop(vm);
    assert!(!old_mapped, "old frame mapped after invalidation");
}

fn with_ad(knobs: GuardKnobs) {
    aging_vs_invalidation(knobs, true);
}

fn without_ad(knobs: GuardKnobs) {
    aging_vs_invalidation(knobs, false);
}

protocol!(
    loom_lockless_aging_never_undoes_a_zap,
    loom_lockless_aging_with_a_plain_store_brings_a_zapped_entry_back,
    with_ad,
    aging_plain_store,
    "old frame mapped after invalidation"
);
protocol!(
    loom_lockless_access_tracking_never_undoes_a_zap,
    loom_lockless_access_tracking_with_a_plain_store_brings_a_zapped_entry_back,
    without_ad,
    aging_plain_store,
    "old frame mapped after invalidation"
);
