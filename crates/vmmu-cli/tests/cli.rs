//! The `vmmu` binary as a user runs it: scenarios finish with zero violations and
//! well-formed JSON; bad input gets one line and a non-zero exit.

use std::process::Command;

mod common;
use common::{json_run, refusal, vmmu};

#[test]
fn test_demand_paging_json_has_the_selftest_figures() {
    let v = json_run(&["run", "demand-paging", "-v", "2", "-b", "8M"]);
    assert_eq!(v["scenario"], "demand-paging");
    assert_eq!(v["pages"], 4096);
    // One fault per page, plus one for each lost race: two vCPUs whose first
    // faults link the same upper-level table at once (one compare-and-exchange
    // loses and that fault retries, as in KVM).
    let c = &v["counters"];
    assert_eq!(c["faults_fixed"], 4096, "one fixed fault per page: {c}");
    assert_eq!(
        v["faults"].as_u64(),
        Some(4096 + c["faults_retry"].as_u64().unwrap_or(0)),
        "{c}"
    );
    assert_eq!(
        c["faults_retry"], c["map_retries"],
        "only lost races retry: {c}"
    );
    assert!(v["populate_ns"].as_u64().unwrap() > 0);
    assert!(v["counters"]["tables_allocated"].as_u64().unwrap() > 0);
    assert_eq!(v["leaked_table_pages"], 0);
}

#[test]
fn test_human_output_has_selftest_lines_and_table() {
    let (code, out, _) = vmmu(&["run", "demand-paging", "-b", "4M"]);
    assert_eq!(code, 0);
    assert!(out.contains("Total guest execution time:"), "{out}");
    assert!(out.contains("Overall demand paging rate:"), "{out}");
    assert!(out.contains("oracle violations"), "{out}");
}

#[test]
fn test_mmu_stress_every_store_fails_while_read_only() {
    let v = json_run(&["run", "mmu-stress", "-v", "2", "-b", "4M", "--aliases", "2"]);
    assert_eq!(v["ro_stage_efaults"], v["ro_stage_stores"]);
    assert_eq!(v["rw_stage_efaults"], 0);
}

#[test]
fn test_memslot_churn_and_roots_and_storm_run_clean() {
    json_run(&["run", "memslot-churn", "-b", "8M", "-i", "5"]);
    let r = json_run(&["run", "roots", "-b", "8M", "-i", "6"]);
    assert!(r["prev_roots_kept"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["invalid_roots_left"], 0);
    let s = json_run(&["run", "invalidation-storm", "-b", "16M", "-i", "1"]);
    assert!(s["storm"]["invalidations"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn test_trace_file_is_chrome_trace_json() {
    let path = std::env::temp_dir().join(format!("vmmu-trace-{}.json", std::process::id()));
    let p = path.to_string_lossy().to_string();
    let (code, _, err) = vmmu(&["run", "demand-paging", "-b", "4M", "--json", "--trace", &p]);
    assert_eq!(code, 0, "{err}");
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    assert!(events.iter().any(|e| e["ph"] == "X" && e["cat"] == "fault"));
    let _ = std::fs::remove_file(path);
}

#[test]
fn test_bad_input_is_one_line_and_nonzero() {
    for args in [
        &["run", "demand-paging", "-b", "100T"][..],
        &["run", "no-such-scenario"],
        &["run", "demand-paging", "--bogus"],
        &["run", "demand-paging", "-b", "12Q"],
        &["run", "demand-paging", "-v", "0"],
        &["run", "demand-paging", "-s", "hugetlb2m", "-b", "3M"],
        &["run", "demand-paging", "-x", "3", "-b", "4M"],
        &["soak", "--duration", "soon"],
        &["run"],
        &[],
    ] {
        let (code, out, err) = vmmu(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed on stdout: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("vmmu"), "{err}");
    }
}

#[test]
fn test_missing_or_unknown_names_list_what_is_valid() {
    let e = refusal(&["run"]);
    assert!(
        e.contains("<SCENARIO>") && e.contains("demand-paging") && e.contains("roots"),
        "{e}"
    );
    let e = refusal(&["run", "foo"]);
    assert!(e.contains("'foo'") && e.contains("memslot-churn"), "{e}");
    let e = refusal(&["bench", "foo"]);
    assert!(e.contains("invalidation-storm"), "{e}");
    let e = refusal(&["run", "demand-paging", "-s", "hugepages"]);
    for name in [
        "anonymous_hugetlb",
        "anonymous_hugetlb_2mb",
        "shared_hugetlb",
        "shmem",
    ] {
        assert!(e.contains(name), "{name} missing from: {e}");
    }
}

#[test]
fn test_sizes_and_counts_are_shown_as_given() {
    let e = refusal(&["run", "demand-paging", "-b", "1000"]);
    assert!(e.contains("1000 bytes"), "{e}");
    let e = refusal(&["run", "memslot-churn", "-x", "0"]);
    assert!(e.contains("-x 0: at least one memslot"), "{e}");
}

#[test]
fn test_unwritable_trace_is_refused_before_the_run() {
    let t = std::time::Instant::now();
    let e = refusal(&[
        "run",
        "demand-paging",
        "-b",
        "64M",
        "--trace",
        "/nonexistent-dir/trace.json",
    ]);
    assert!(
        e.contains("--trace") && e.contains("nonexistent-dir"),
        "{e}"
    );
    assert!(t.elapsed().as_secs() < 5, "refused only after running");
}

#[test]
fn test_flags_a_scenario_does_not_use_are_refused() {
    let e = refusal(&["run", "demand-paging", "-i", "3"]);
    assert!(
        e.contains("'-i'") && e.contains("demand-paging takes"),
        "{e}"
    );
    let e = refusal(&["run", "mmu-stress", "-i", "5"]);
    assert!(e.contains("'-i'"), "{e}");
    // -x means memslots; mmu-stress's aliases have their own flag.
    let e = refusal(&["run", "mmu-stress", "-x", "2"]);
    assert!(e.contains("--aliases"), "{e}");
    // Selftest flags the machine does not model say why.
    let e = refusal(&["run", "demand-paging", "-u", "MISSING"]);
    assert!(e.contains("userfaultfd"), "{e}");
    let e = refusal(&["run", "memslot-churn", "-q"]);
    assert!(e.contains("quirk"), "{e}");
    // A flag twice over, or its negation beside it.
    let e = refusal(&["bench", "demand-paging", "--oracle", "--no-oracle"]);
    assert!(e.contains("--no-oracle"), "{e}");
    let e = refusal(&["soak", "--duration", "0"]);
    assert!(e.contains("at least 1 second"), "{e}");
    let e = refusal(&["soak", "--duration", "2"]);
    assert!(e.contains("3 types"), "{e}");
    let e = refusal(&["soak", "--vm-type", "tdx"]);
    assert!(e.contains("sw_protected"), "{e}");
}

#[test]
fn test_scenario_help_shows_its_own_defaults() {
    for (scenario, defaults) in [
        (
            "demand-paging",
            &["[default: 1]", "[default: 1G]", "[default: anonymous]"][..],
        ),
        ("mmu-stress", &["[default: 2]", "[default: 256M]"]),
        ("memslot-churn", &["[default: 10]", "[default: 256M]"]),
        ("roots", &["[default: 20]", "[default: 64M]"]),
    ] {
        let (code, out, _) = vmmu(&["run", scenario, "--help"]);
        assert_eq!(code, 0);
        for d in defaults {
            assert!(out.contains(d), "{scenario} --help lacks {d}:\n{out}");
        }
    }
}

#[test]
fn test_selftest_flag_meanings() {
    // memslot_modification_stress_test: -d is the delay between changes.
    let v = json_run(&["run", "memslot-churn", "-b", "4M", "-i", "2", "-d", "100"]);
    assert_eq!(v["config"]["flags"]["delay_us"], 100);
    // mmu_stress_test: -H is hugetlb.
    let v = json_run(&["run", "mmu-stress", "-b", "4M", "-H"]);
    assert_eq!(v["config"]["flags"]["hugetlb"], true);
    // The selftests' backing names are accepted.
    json_run(&[
        "run",
        "demand-paging",
        "-b",
        "4M",
        "-s",
        "anonymous_hugetlb_2mb",
    ]);
}

#[test]
fn test_bench_says_vcpu_in_the_singular_for_one() {
    let (code, out, err) = vmmu(&["bench", "demand-paging", "-v", "1", "-b", "4M"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 vCPU x") && !out.contains("1 vCPUs"),
        "{out}"
    );
    assert!(out.contains("oracle violations: 0"), "{out}");
}

/// `bench demand-paging --mmu shadow`: every phase has the shadow MMU's
/// figure and the TDP MMU's from the same run; with `--mmu tdp` no TDP
/// column is added.
#[test]
fn test_bench_demand_paging_on_the_shadow_mmu_shows_the_tdp_side_too() {
    let v = json_run(&[
        "bench",
        "demand-paging",
        "-v",
        "1",
        "-b",
        "4M",
        "--mmu",
        "shadow",
    ]);
    assert_eq!(v["config"]["mmu"]["kind"], "shadow", "{v}");
    for p in v["phases"].as_array().unwrap() {
        assert!(p["vmmu_ns"].as_u64().unwrap() > 0, "{p}");
        assert!(p["vmmu_tdp_ns"].as_u64().unwrap() > 0, "{p}");
    }
    assert!(
        v["delete_populated_slot_ns"]["vmmu_tdp"].as_u64().is_some(),
        "{v}"
    );
    let (code, out, err) = vmmu(&[
        "bench",
        "demand-paging",
        "-v",
        "1",
        "-b",
        "4M",
        "--mmu",
        "shadow",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("vmmu shadow ns/page") && out.contains("shadow / TDP"),
        "{out}"
    );
    let v = json_run(&["bench", "demand-paging", "-v", "1", "-b", "4M"]);
    assert!(v["phases"][0]["vmmu_tdp_ns"].is_null(), "{v}");
}

#[test]
fn test_soak_short_run_is_clean() {
    let (code, out, err) = vmmu(&["soak", "--duration", "3", "-b", "4M", "--json"]);
    assert_eq!(code, 0, "{err}{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["violations"], 0);
    assert!(v["host_events"].as_u64().unwrap() > 0);
    // One run per VM type; the private ones made private faults and converted.
    let runs = v["runs"].as_array().unwrap();
    let types: Vec<&str> = runs
        .iter()
        .map(|r| r["vm_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["default", "sw_protected", "snp"]);
    for r in &runs[1..] {
        assert!(r["private_faults"].as_u64().unwrap() > 0, "{r}");
        assert!(r["attribute_changes"].as_u64().unwrap() > 0, "{r}");
    }
    assert_eq!(runs[0]["private_faults"], 0);
    let passes: u64 = runs.iter().map(|r| r["passes"].as_u64().unwrap()).sum();
    assert_eq!(v["passes"].as_u64().unwrap(), passes);
}

#[test]
fn test_retry_causes_add_up_to_the_retries() {
    for args in [
        &["run", "memslot-churn", "-b", "8M", "-i", "5"][..],
        &["run", "invalidation-storm", "-b", "8M", "-i", "1"],
        &["run", "roots", "-b", "8M", "-i", "4"],
    ] {
        let v = json_run(args);
        let causes = v["retries_by_cause"].as_object().expect("retries_by_cause");
        let sum: u64 = causes.values().map(|n| n.as_u64().unwrap()).sum();
        assert_eq!(sum, v["retries"].as_u64().unwrap(), "{args:?}: {causes:?}");
    }
}

#[test]
fn test_trace_names_tracks_once_prints_exact_times_and_marks_its_cut() {
    let path = std::env::temp_dir().join(format!("vmmu-trace-cut-{}.json", std::process::id()));
    let p = path.to_string_lossy().to_string();
    let v = json_run(&[
        "run",
        "demand-paging",
        "-v",
        "2",
        "-b",
        "4M",
        "--trace",
        &p,
        "--trace-limit",
        "100",
    ]);
    // 2 vCPUs x about 1024 faults, 100 kept each.
    let faults = v["faults"].as_u64().unwrap();
    assert_eq!(v["trace_faults_dropped"].as_u64().unwrap(), faults - 200);
    let text = std::fs::read_to_string(&path).unwrap();
    let t: serde_json::Value = serde_json::from_str(&text).unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    let mut names = std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| e["name"] == "thread_name") {
        *names.entry(e["tid"].as_u64().unwrap()).or_insert(0) += 1;
    }
    assert!(
        names.values().all(|n| *n == 1),
        "a track named twice: {names:?}"
    );
    let cuts: Vec<_> = events
        .iter()
        .filter(|e| e["name"] == "trace_truncated")
        .collect();
    assert_eq!(cuts.len(), 2, "one cut per vCPU");
    let dropped: u64 = cuts
        .iter()
        .map(|c| c["args"]["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(dropped, faults - 200);
    assert_eq!(
        t["otherData"]["faults_dropped"].as_u64(),
        Some(faults - 200)
    );
    for e in events {
        for key in ["ts", "dur"] {
            if let Some(x) = e.get(key) {
                let s = x.to_string();
                let decimals = s.split('.').nth(1).map_or(0, str::len);
                assert!(decimals <= 3, "{key} {s} is not in whole nanoseconds");
            }
        }
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn test_bench_speaks_of_kvm_only_when_asked_and_says_what_it_found() {
    let (code, out, err) = vmmu(&["bench", "demand-paging", "-v", "1", "-b", "4M"]);
    assert_eq!(code, 0, "{err}");
    // The host line names the CPU model, which may say KVM on a VM.
    let body: String = out
        .lines()
        .filter(|l| !l.starts_with("Measured on:"))
        .collect();
    assert!(
        !body.to_lowercase().contains("kvm"),
        "KVM mentioned without --vs-kvm:\n{out}"
    );
    let (code, out, err) = vmmu(&["bench", "demand-paging", "-v", "1", "-b", "4M", "--vs-kvm"]);
    assert_eq!(code, 0, "{err}");
    // Either the backend found at run time, or why /dev/kvm could not be used
    // with the operating system's reason.
    let found = out.contains("Real KVM: KVM API") && out.contains("MMU");
    let refused = out.contains("cannot open /dev/kvm") && out.contains("os error");
    assert!(found || refused, "{out}");
}

#[test]
fn test_soak_prints_its_summary_on_ctrl_c() {
    let child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["soak", "--duration", "120", "-b", "4M", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start soak");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let t = std::time::Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("soak ends");
    assert!(
        t.elapsed().as_secs() < 30,
        "soak did not stop soon after Ctrl-C"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the summary");
    assert_eq!(v["interrupted"], true);
    assert_eq!(v["violations"], 0);
    assert!(v["passes"].as_u64().unwrap() > 0);
}

/// access_tracking_perf_test: every access is seen at the next mark, aging
/// takes no mmu_lock (or one write acquisition per callback when locked), and
/// without A/D bits the fast path alone brings access-tracked entries back. A
/// guest small enough to live in the vCPU's TLB looks idle after a mark (no
/// flush follows aging, as in KVM), which the check reports as a failure.
#[test]
fn test_access_tracking_sees_every_access_and_ages_without_the_lock() {
    let v = json_run(&["run", "access-tracking", "-b", "64M"]);
    let pages = v["pages"].as_u64().unwrap();
    assert_eq!(v["access_tracking_errors"], 0, "{v}");
    assert_eq!(v["aging_mmu_lock_acquisitions"], 0, "{v}");
    assert_eq!(v["aging_tlb_flushes"], 0, "{v}");
    for p in v["still_idle_percent"].as_array().unwrap() {
        assert!(p.as_u64().unwrap() < 10, "{v}");
    }
    let v = json_run(&["run", "access-tracking", "-b", "64M", "--no-ad"]);
    assert_eq!(v["access_tracking_errors"], 0, "{v}");
    assert_eq!(v["access_restored_slow"], 0, "{v}");
    assert_eq!(
        v["access_restored_fast"].as_u64().unwrap(),
        2 * pages,
        "{v}"
    );
    let v = json_run(&["run", "access-tracking", "-b", "64M", "--locked-aging"]);
    assert_eq!(
        v["aging_mmu_lock_acquisitions"].as_u64().unwrap(),
        2 * pages,
        "{v}"
    );
    assert_eq!(v["config"]["flags"]["locked_aging"], true, "{v}");
    let (code, out, _) = vmmu(&["run", "access-tracking", "-b", "4M"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("were not seen accessed"), "{out}");
}

/// Every benchmark says where it was measured: the text output ends with the
/// host line (CPU, CPUs, commit, load before and after), the JSON records the
/// load before the run and whether it was busy (above 0.5 per CPU), and a
/// busy machine is warned about on stderr.
#[test]
fn test_bench_records_the_machine_and_its_load_before_and_after() {
    let (code, out, err) = vmmu(&["bench", "demand-paging", "-v", "1", "-b", "4M"]);
    assert_eq!(code, 0, "{err}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("Measured on:") && last.contains("before") && last.contains("after"),
        "{out}"
    );
    let v = json_run(&["bench", "demand-paging", "-v", "1", "-b", "4M"]);
    let h = &v["config"]["host"];
    let before = h["load_average_before"].as_array().expect("load before");
    let cpus = h["cpus"].as_f64().unwrap();
    let busy = before[0].as_f64().unwrap() > 0.5 * cpus.max(1.0);
    assert_eq!(h["busy"], busy, "{h}");
    let (_, _, err) = vmmu(&["bench", "demand-paging", "-v", "1", "-b", "4M", "--json"]);
    // Warned exactly when the load was above the threshold at the start (the
    // load may change between the runs: only a warning that names it is
    // checked when there is one).
    if err.contains("warning") {
        assert!(err.contains("busy") && err.contains("per CPU"), "{err}");
    }
}
