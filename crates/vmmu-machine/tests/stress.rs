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
        ..StressConfig::default()
    };
    let r = stress(&cfg).unwrap();
    eprintln!(
        "stress: {} passes, {} accesses, {} faults, events {:?}",
        r.passes, r.accesses, r.faults, r.events
    );
    for (i, name) in EVENT_NAMES.iter().enumerate() {
        assert!(r.events[i] > 0, "host event {name} never ran");
    }
    assert_clean(&r);
}

#[test]
fn test_stress_access_tracking_without_ad_bits_zero_violations() {
    let cfg = StressConfig {
        duration: secs(10),
        ad_enabled: false,
        backing: Backing::Anonymous,
        seed: 2,
        ..StressConfig::default()
    };
    assert_clean(&stress(&cfg).unwrap());
}

fn must_fail(knobs: GuardKnobs, precheck: bool) -> StressReport {
    let cfg = StressConfig {
        duration: secs(25),
        knobs,
        precheck,
        stop_on_violation: true,
        backing: Backing::Anonymous,
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
