//! Dirty logging as a user runs it: every write reported in every mode,
//! PML, live migration, eager splitting, the dirty-log benchmarks.

mod common;
use common::{json_run, refusal, vmmu};

#[test]
fn test_dirty_log_reports_every_write_in_every_mode() {
    let v = json_run(&[
        "run",
        "dirty-log",
        "-i",
        "6",
        "--vcpus",
        "2",
        "--bytes",
        "8M",
        "-c",
        "256",
    ]);
    let modes = v["log_modes"].as_array().unwrap();
    assert_eq!(modes.len(), 3, "{v}");
    for m in modes {
        assert_eq!(m["lost_writes"], 0, "{m}");
        assert_eq!(m["stale_reports"], 0, "{m}");
        assert!(m["pages_reported"].as_u64().unwrap() > 0, "{m}");
        assert!(m["entries_write_protected"].as_u64().unwrap() > 0, "{m}");
    }
    let ring = &modes[2];
    assert_eq!(ring["mode"], "dirty-ring");
    assert!(
        ring["ring_entries_collected"].as_u64().unwrap() > 0,
        "{ring}"
    );
    assert!(
        ring["ring_full_exits"].as_u64().unwrap() > 0,
        "a 256-entry ring fills: {ring}"
    );
    assert_eq!(ring["ring_overflows"], 0, "{ring}");
    assert_eq!(v["dirty_log_errors"], 0);
    let err = refusal(&["run", "dirty-log", "-M", "ring"]);
    assert!(
        err.contains("-M ring") && err.contains("valid: dirty-log, clear-log, dirty-ring"),
        "{err}"
    );
    let err = refusal(&["run", "dirty-log", "-c", "300"]);
    assert!(
        err.contains("-c 300") && err.contains("power of two"),
        "{err}"
    );
}

/// PML: every mode reports every write without a single write fault (the
/// processor logs them), the ring fills and drains as before, and PML without
/// A/D bits or an unknown tracking is refused in one line.
#[test]
fn test_dirty_log_with_pml_reports_every_write_without_faults() {
    let v = json_run(&[
        "run",
        "dirty-log",
        "-i",
        "6",
        "--vcpus",
        "2",
        "--bytes",
        "8M",
        "-c",
        "256",
        "--tracking",
        "pml",
    ]);
    assert_eq!(v["config"]["mmu"]["dirty_tracking"], "pml", "{v}");
    let modes = v["log_modes"].as_array().unwrap();
    assert_eq!(modes.len(), 3, "{v}");
    for m in modes {
        assert_eq!(m["lost_writes"], 0, "{m}");
        assert_eq!(m["stale_reports"], 0, "{m}");
        assert!(m["pages_reported"].as_u64().unwrap() > 0, "{m}");
        assert_eq!(m["fast_path_fixed"], 0, "no write faults with PML: {m}");
        assert_eq!(m["entries_write_protected"], 0, "{m}");
        assert!(m["dirty_bits_cleared"].as_u64().unwrap() > 0, "{m}");
        assert!(m["pml_entries_drained"].as_u64().unwrap() > 0, "{m}");
    }
    assert_eq!(v["dirty_log_errors"], 0);
    assert_eq!(v["violations"], 0);
    let (code, _, err) = vmmu(&["run", "dirty-log", "--tracking", "pml", "--no-ad"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--tracking pml") && err.contains("A/D"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = vmmu(&["run", "live-migration", "--tracking", "d"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("valid: write-protect, pml"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn test_live_migration_destination_equals_source_in_both_modes() {
    for mode in ["dirty-log", "clear-log", "dirty-ring"] {
        let v = json_run(&[
            "run",
            "live-migration",
            "-b",
            "8M",
            "-M",
            mode,
            "--max-rounds",
            "4",
        ]);
        assert_eq!(v["pages_mismatched"], 0, "{v}");
        assert_eq!(v["migration_errors"], 0, "{v}");
        assert_eq!(v["failed_writes"], 0, "{v}");
        let rounds = v["pages_sent_per_round"].as_array().unwrap();
        assert_eq!(
            rounds.len(),
            5,
            "four pre-copy rounds and the stop-and-copy: {v}"
        );
        assert_eq!(
            rounds[0], v["guest_pages"],
            "the first round sends everything"
        );
        assert!(v["downtime_ns"].as_u64().unwrap() > 0);
    }
    // On THP, logging starts after the guest has mapped its memory huge:
    // eager splitting splits every 2 MiB leaf when it turns on, unless turned
    // off; with PML no write faults at all once split.
    for (extra, splits) in [
        (&[][..], 4),
        (&["--no-eager-split"][..], 0),
        (&["--tracking", "pml"][..], 4),
    ] {
        let mut args = vec![
            "run",
            "live-migration",
            "-b",
            "4M",
            "-s",
            "anonymous_thp",
            "--max-rounds",
            "3",
        ];
        args.extend_from_slice(extra);
        let v = json_run(&args);
        assert_eq!(v["pages_mismatched"], 0, "{v}");
        assert_eq!(v["migration_errors"], 0, "{v}");
        assert_eq!(v["eager_splits"], splits, "{extra:?}: {v}");
        if extra.contains(&"pml") {
            assert_eq!(v["fast_path_fixed"], 0, "{v}");
            assert!(v["dirty_bits_cleared"].as_u64().unwrap() > 0, "{v}");
        } else {
            assert!(v["fast_path_fixed"].as_u64().unwrap() > 0, "{v}");
        }
    }
    let err = refusal(&["run", "live-migration", "--hot-percent", "0"]);
    assert!(
        err.contains("--hot-percent 0") && err.contains("1..=100"),
        "{err}"
    );
}

#[test]
fn test_bench_dirty_log_reports_exactly_the_pattern_and_compares_with_kvm_when_asked() {
    let v = json_run(&["bench", "dirty-log", "-b", "8M", "--stride", "5"]);
    assert_eq!(v["pages"], 2048);
    assert_eq!(v["pattern_pages"], 410);
    assert_eq!(v["vmmu"]["pages_reported_for_the_pattern"], 410, "{v}");
    assert!(v["kvm"].is_null(), "KVM without --vs-kvm: {v}");
    let (code, out, err) = vmmu(&["bench", "dirty-log", "-b", "8M", "--vs-kvm", "--json"]);
    if code == 0 {
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["bitmap_pages_differing"], 0, "{v}");
    } else {
        assert!(err.contains("--vs-kvm") && err.contains("KVM"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let err = refusal(&["bench", "dirty-log", "-b", "3M"]);
    assert!(
        err.contains("-b 3") && err.contains("multiple of 2M"),
        "{err}"
    );
    // Two vCPUs, each its own half, with PML: each half's pattern exactly
    // (2 x ceil(1024 / 5) pages).
    let v = json_run(&[
        "bench",
        "dirty-log",
        "-b",
        "8M",
        "-v",
        "2",
        "--stride",
        "5",
        "--tracking",
        "pml",
    ]);
    assert_eq!(v["pattern_pages"], 410, "{v}");
    assert_eq!(v["vmmu"]["pages_reported_for_the_pattern"], 410, "{v}");
    assert_eq!(v["config"]["mmu"]["dirty_tracking"], "pml", "{v}");
    let (code, _, err) = vmmu(&["bench", "dirty-log", "-b", "6M", "-v", "2"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("-v 2") && err.contains("multiple of 2M"),
        "{err}"
    );
}

#[test]
fn test_page_splitting_splits_on_enable_and_recovers_on_disable() {
    let v = json_run(&["run", "page-splitting", "-b", "16M"]);
    assert_eq!(v["page_splitting_errors"], 0, "{v}");
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels[0]["pages_2m"], 8, "{v}");
    assert_eq!(levels[1]["pages_4k"], 4096);
    assert_eq!(levels[1]["pages_2m"], 0);
    assert_eq!(
        levels[4]["pages_2m"], 8,
        "recovered before the guest ran: {v}"
    );
    assert_eq!(v["pages_reported"], 4096);
    let err = refusal(&["run", "page-splitting", "-s", "anonymous"]);
    assert!(
        err.contains("-s anonymous") && err.contains("anonymous_thp"),
        "{err}"
    );
}

#[test]
fn test_dirty_log_perf_prints_the_selftest_lines_and_misses_no_page() {
    let (code, out, err) = vmmu(&["run", "dirty-log-perf", "-b", "8M", "-i", "2", "-x", "2"]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "Populate memory time:",
        "Enabling dirty logging time:",
        "Iteration 2 dirty memory time:",
        "Iteration 2 get dirty log time:",
        "Iteration 2 clear dirty log time:",
        "Disabling dirty logging time:",
        "Get dirty log over 2 iterations took",
    ] {
        assert!(out.contains(line), "missing {line:?}:\n{out}");
    }
    let v = json_run(&["run", "dirty-log-perf", "-b", "8M", "-g", "-r", "5"]);
    assert_eq!(v["pages_missing_from_logs"], 0, "{v}");
    assert_eq!(v["manual_protect"], false);
    assert_eq!(v["config"]["flags"]["random_seed"], 5);
}
