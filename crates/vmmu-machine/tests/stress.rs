//! The stress test: vCPUs writing and verifying while the host migrates, swaps,
//! merges, splits, collapses, protects, ages and discards their memory and the VMM
//! creates, deletes and moves memslots. Zero violations allowed.
//!
//! And the proof that the oracle can fail: with a guarding step of the MMU
//! removed through a test-only switch, the same run must report violations.

use std::time::Duration;

use vmmu::GuardKnobs;
use vmmu_machine::stress::{stress, StressConfig, StressReport, EVENT_NAMES};
use vmmu_machine::Backing;

fn secs(default: u64) -> Duration {
    Duration::from_secs(
        std::env::var("VMMU_STRESS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

fn assert_clean(r: &StressReport) {
    assert!(r.passes >= 2, "the vCPUs made progress");
    assert!(r.checked > 0);
    assert_eq!(r.total_violations, 0, "{:#?}", r.log);
}

#[test]
fn test_stress_host_events_and_memslot_churn_zero_violations() {
    let cfg = StressConfig {
        duration: secs(25),
        min_passes: 2,
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    eprintln!(
        "stress: {} passes, {} accesses, {} faults, events {:?}",
        r.passes, r.accesses, r.faults, r.events
    );
    // Every event but the private-memory ones (this VM has none).
    for (i, name) in EVENT_NAMES.iter().enumerate() {
        let private_only = ["convert", "punch_hole"].contains(name);
        assert_eq!(
            r.events[i] > 0,
            !private_only,
            "host event {name}: {}",
            r.events[i]
        );
    }
    // The read passes' fetches split huge pages under the NX mitigation and
    // later reads went below the listed tables.
    let st = &r.stats;
    assert!(
        st.nx_pages_tracked > 0 && st.nx_disallowed_adjusts > 0,
        "listed {}, adjusted {}",
        st.nx_pages_tracked,
        st.nx_disallowed_adjusts
    );
    assert_clean(&r);
}

#[test]
fn test_stress_access_tracking_without_ad_bits_zero_violations() {
    let cfg = StressConfig {
        duration: secs(10),
        min_passes: 2,
        ad_enabled: false,
        backing: Backing::Anonymous,
        seed: 2,
        ..StressConfig::default()
    };
    assert_clean(&stress(&cfg).unwrap());
}

fn must_fail(knobs: GuardKnobs, precheck: bool) -> StressReport {
    must_fail_on(knobs, precheck, vmmu::VmType::Default)
}

fn must_fail_on(knobs: GuardKnobs, precheck: bool, vm_type: vmmu::VmType) -> StressReport {
    let cfg = StressConfig {
        duration: secs(25),
        knobs,
        precheck,
        stop_on_violation: true,
        backing: Backing::Anonymous,
        vm_type,
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    assert!(
        r.total_violations > 0,
        "the oracle saw nothing with {knobs:?}: {r:#?}"
    );
    r
}

#[test]
fn test_oracle_catches_missing_tlb_flush_after_zap() {
    let r = must_fail(
        GuardKnobs {
            skip_flush_after_zap: true,
            ..GuardKnobs::default()
        },
        true,
    );
    eprintln!("without the flush: {:?}", r.log.first());
}

#[test]
fn test_oracle_catches_missing_locked_retry_check() {
    // The unlocked pre- and post-checks usually catch the race first; without them
    // the locked check is the only guard left, and removing it must show.
    let r = must_fail(
        GuardKnobs {
            skip_locked_retry: true,
            ..GuardKnobs::default()
        },
        false,
    );
    eprintln!("without the locked check: {:?}", r.log.first());
}

/// Private memory under the same storm, plus conversions and punch-holes: on
/// the software-protected type (the attributes decide each fault's side) and
/// on the SNP-like type (the guests mark their accesses; the VMM converts on
/// the memory-fault exits a changed side causes).
fn private_stress(vm_type: vmmu::VmType, seed: u64) -> StressReport {
    let cfg = StressConfig {
        duration: secs(10),
        min_passes: 2,
        vm_type,
        seed,
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    eprintln!(
        "{vm_type:?}: {} passes, {} accesses, {} faults ({} private), {} attribute changes, \
         {} gmem invalidations, events {:?}",
        r.passes,
        r.accesses,
        r.faults,
        r.stats.private_faults,
        r.stats.attribute_changes,
        r.stats.gmem_invalidations,
        r.events
    );
    eprintln!(
        "  faults fixed {} spurious {} retry {} emulate {} error {}; retries {:?}",
        r.stats.faults_fixed,
        r.stats.faults_spurious,
        r.stats.faults_retry,
        r.stats.faults_emulate,
        r.stats.faults_error,
        r.stats.retries_by_cause()
    );
    assert_clean(&r);
    assert!(r.stats.private_faults > 0, "nothing was private");
    assert!(
        r.events[14] > 0 && r.events[15] > 0,
        "no conversions or punches"
    );
    assert_eq!(
        r.events[9] + r.events[11],
        0,
        "events a gmem slot refuses ran"
    );
    r
}

#[test]
fn test_stress_private_memory_software_protected_zero_violations() {
    private_stress(vmmu::VmType::SwProtected, 3);
}

#[test]
fn test_stress_private_memory_snp_marked_accesses_zero_violations() {
    let r = private_stress(vmmu::VmType::Snp, 4);
    assert!(
        r.conversions > 0,
        "no implicit conversion on a memory-fault exit"
    );
}

/// Paging guests (kernels spawning, switching, remapping and ending
/// processes) under the host events that keep guest memory's contents:
/// every read returns its stamp and the oracle's reference walk agrees with
/// every linear access.
#[test]
fn test_stress_guest_paging_zero_violations() {
    let cfg = StressConfig {
        duration: secs(10),
        min_passes: 2,
        guest_paging: true,
        seed: 3,
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    assert!(r.accesses > 10_000, "{r:#?}");
    assert_clean(&r);
}

/// The same world finds a missing flush after a zap.
#[test]
fn test_oracle_catches_missing_tlb_flush_after_zap_under_guest_paging() {
    let cfg = StressConfig {
        duration: secs(25),
        knobs: GuardKnobs {
            skip_flush_after_zap: true,
            ..GuardKnobs::default()
        },
        stop_on_violation: true,
        backing: Backing::Anonymous,
        guest_paging: true,
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    assert!(r.total_violations > 0, "the oracle saw nothing: {r:#?}");
}

/// The shadow MMU under the same world: kernels churning processes (their
/// tables shadowed and write-protected, stores to them emulated) and the
/// host events that keep guest memory's contents.
#[test]
fn test_stress_shadow_guest_paging_zero_violations() {
    let cfg = StressConfig {
        duration: secs(10),
        min_passes: 2,
        guest_paging: true,
        mmu: vmmu::MmuKind::Shadow,
        seed: 5,
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    assert!(r.accesses > 10_000, "{r:#?}");
    assert_clean(&r);
}

/// Shadow paging with guest paging off (direct shadow pages) under every
/// host event, memslot moves and deletions included.
#[test]
fn test_stress_shadow_direct_zero_violations() {
    let cfg = StressConfig {
        duration: secs(10),
        min_passes: 2,
        mmu: vmmu::MmuKind::Shadow,
        seed: 6,
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    assert!(r.accesses > 10_000, "{r:#?}");
    assert_clean(&r);
}

/// The shadow world finds a missing flush after a zap too: an emulated
/// store's zap (or an invalidation's) that leaves a vCPU's TLB alone lets
/// it keep the old translation.
#[test]
fn test_oracle_catches_missing_flush_after_shadow_zap() {
    let cfg = StressConfig {
        duration: secs(25),
        knobs: GuardKnobs {
            skip_flush_after_zap: true,
            ..GuardKnobs::default()
        },
        stop_on_violation: true,
        backing: Backing::Anonymous,
        guest_paging: true,
        mmu: vmmu::MmuKind::Shadow,
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    assert!(r.total_violations > 0, "the oracle saw nothing: {r:#?}");
}
