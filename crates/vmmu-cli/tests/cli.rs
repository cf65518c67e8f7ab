//! The `vmmu` binary as a user runs it: scenarios finish with zero violations and
//! well-formed JSON; bad input gets one line and a non-zero exit.

use std::process::Command;

fn vmmu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .output()
        .expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_run(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, err) = vmmu(&a);
    assert_eq!(code, 0, "vmmu {args:?} failed: {err}\n{out}");
    assert_eq!(
        out.lines().count(),
        1,
        "--json prints exactly one line on stdout: {out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["violations"], 0, "{v}");
    v
}

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

/// The one line the command prints for `args` (checked to be one line, exit 2).
fn refusal(args: &[&str]) -> String {
    let (code, out, err) = vmmu(args);
    assert_eq!(code, 2, "{args:?} was not refused: {err}{out}");
    assert!(out.is_empty(), "{args:?} printed on stdout: {out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    err.trim_end().to_string()
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

#[test]
fn test_private_conversions_run_clean_with_nothing_zapped_outside_a_conversion() {
    let v = json_run(&["run", "private-conversions", "-n", "2", "-m", "2"]);
    assert_eq!(v["violations"], 0, "{v}");
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {v}"));
    // Per vCPU: the selftest's 2 × 5 ranges convert both ways, plus the punch
    // test's whole-chunk conversion.
    assert!(n("conversions") >= 2 * 31, "{v}");
    assert_eq!(n("audited_conversions"), n("conversions"));
    assert!(n("leaves_zapped_by_conversions_in_range") > 0, "{v}");
    assert_eq!(n("leaves_zapped_outside_range"), 0);
    assert!(
        n("private_faults") > 0 && n("private_pages_punched") > 0,
        "{v}"
    );
    assert_eq!(n("memory_fault_exits"), 0);
    assert_eq!(n("memslots"), 2);
}

#[test]
fn test_private_conversions_refuses_memslots_that_do_not_split_the_file() {
    let e = refusal(&["run", "private-conversions", "-m", "3"]);
    assert!(e.contains("-m 3"), "{e}");
}

#[test]
fn test_private_exits_name_the_page_size_and_private_flag() {
    let v = json_run(&["run", "private-exits"]);
    for case in [
        "slot_deleted_under_private_page",
        "private_attribute_on_plain_slot",
    ] {
        assert_eq!(v[format!("{case}_pass")], true, "{case}: {v}");
        assert_eq!(v[format!("{case}_gpa")], 0xc000_0000u64, "{v}");
        assert_eq!(v[format!("{case}_size")], 4096, "{v}");
        assert_eq!(v[format!("{case}_flags")], 8, "{v}");
    }
    assert!(v["slot_deleted_under_private_page_reads"].as_u64().unwrap() > 0);
    assert_eq!(v["cases_failed"], 0);
}

#[test]
fn test_prefault_calls_leave_what_the_selftest_expects() {
    let v = json_run(&["run", "prefault"]);
    assert_eq!(v["cases_failed"], 0, "{v}");
    for variant in ["default", "sw_protected_shared", "sw_protected_private"] {
        assert_eq!(v[format!("{variant}_call1_left")], 0, "{v}");
        assert_eq!(v[format!("{variant}_call2_left")], 4096, "{v}");
        assert_eq!(v[format!("{variant}_call3_errno")], 2, "{v}");
        assert!(v[format!("{variant}_pre_faulted_bytes")].as_u64().unwrap() >= 2 << 20);
    }
    assert!(v["sw_protected_private_private_faults"].as_u64().unwrap() >= 513);
}

#[test]
fn test_guest_memfd_contract_holds_and_compares_with_kvm_when_asked() {
    let v = json_run(&["run", "guest-memfd"]);
    assert_eq!(v["cases_failed"], 0, "{v}");
    assert!(v["cases"].as_u64().unwrap() >= 48);
    assert_eq!(v["cases_not_modelled"], 0, "{v}");
    let guest = v["case_table"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "guest: runs on gmem-only shared memory")
        .expect("the guest case");
    assert_eq!(guest["vmmu"], "ok", "{guest}");
    assert!(
        v.get("kvm_cases_compared").is_none(),
        "KVM without --vs-kvm"
    );
    assert_eq!(v["punch_invalidations"], 1);
    assert_eq!(v["punch_leaves_zapped"], v["hole_pages"]);
    let (code, out, err) = vmmu(&["run", "guest-memfd", "--vs-kvm", "--json"]);
    if code == 0 {
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v["kvm_cases_compared"].as_u64().unwrap() > 0, "{v}");
        assert!(v["kvm_caps"]["guest_memfd"].as_i64().is_some(), "{v}");
    } else {
        // No usable /dev/kvm: one line that says why, with the OS's reason.
        assert!(err.contains("--vs-kvm") && err.contains("KVM"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn test_bench_conversions_measures_four_configurations_and_refuses_bad_sizes() {
    let v = json_run(&["bench", "conversions", "-b", "2M", "-i", "2"]);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "{v}");
    for r in runs {
        let per_vcpu = 2u64 << 20;
        let want = 2 * per_vcpu / r["range_bytes"].as_u64().unwrap() * r["vcpus"].as_u64().unwrap();
        assert_eq!(r["conversions"].as_u64().unwrap(), want, "{r}");
        assert!(r["conversions_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
    let (code, _, err) = vmmu(&["bench", "conversions", "-b", "3M"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("-b 3") && err.contains("multiple of 2M"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn test_conversion_storm_converts_and_the_oracle_sees_every_access() {
    let v = json_run(&[
        "run",
        "invalidation-storm",
        "-b",
        "4M",
        "-i",
        "1",
        "--conversions",
    ]);
    assert!(v["conversions"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["conversion_errors"], 0, "{v}");
    assert_eq!(v["config"]["mmu"]["vm_type"], "sw_protected", "{v}");
    assert!(v["oracle_checked_accesses"].as_u64().unwrap() > 0, "{v}");
}

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
    let (code, _, err) = vmmu(&["run", "dirty-log", "-M", "ring"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("-M ring") && err.contains("valid: dirty-log, clear-log, dirty-ring"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = vmmu(&["run", "dirty-log", "-c", "300"]);
    assert_ne!(code, 0);
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
    let (code, _, err) = vmmu(&["run", "live-migration", "--hot-percent", "0"]);
    assert_ne!(code, 0);
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
    let (code, _, err) = vmmu(&["bench", "dirty-log", "-b", "3M"]);
    assert_ne!(code, 0);
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
    let (code, _, err) = vmmu(&["run", "page-splitting", "-s", "anonymous"]);
    assert_ne!(code, 0);
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

/// `access`: a sample of the guest-paging cases agrees with the reference
/// walk (faults, error codes, A/D bits) and the oracle; a stride of 0 is
/// refused in one line.
#[test]
fn test_access_cases_agree_with_the_reference() {
    let v = json_run(&["run", "access", "--stride", "499"]);
    let cases = v["cases"].as_u64().unwrap();
    assert!(cases > 4000, "{v}");
    assert_eq!(v["case_failures"], 0, "{v}");
    let faulted = v["cases_faulted"].as_u64().unwrap();
    assert!(faulted > 0 && faulted < cases, "{v}");
    assert!(
        v["oracle_checked_accesses"].as_u64().unwrap() > cases,
        "{v}"
    );
    let e = refusal(&["run", "access", "--stride", "0"]);
    assert!(e.contains("--stride 0") && e.contains("1..="), "{e}");
}

/// `--mmu shadow`: the `access` sample agrees with the reference when the
/// shadow MMU's walker decides the faults, its stores to shadowed tables are
/// emulated, and the JSON says which MMU ran; what shadow paging cannot run
/// is refused in one line.
#[test]
fn test_shadow_mmu_runs_the_access_cases_and_refuses_what_it_cannot() {
    let v = json_run(&["run", "access", "--stride", "499", "--mmu", "shadow"]);
    assert_eq!(v["config"]["mmu"]["kind"], "shadow", "{v}");
    assert_eq!(v["case_failures"], 0, "{v}");
    assert!(v["cases"].as_u64().unwrap() > 4000, "{v}");
    assert!(v["emulated_writes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["shadow_pf_exits"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["violations"], 0, "{v}");
    let e = refusal(&["run", "access", "--mmu", "nested"]);
    assert!(e.contains("tdp, shadow"), "{e}");
    let e = refusal(&["run", "dirty-log", "--mmu", "shadow", "--tracking", "pml"]);
    assert!(e.contains("write-protect"), "{e}");
    let e = refusal(&[
        "soak",
        "--mmu",
        "shadow",
        "--vm-type",
        "snp",
        "--duration",
        "1",
    ]);
    assert!(e.contains("--vm-type default"), "{e}");
}

/// `shadow-process-churn`: the same guests with the free-obsolete-roots fix
/// and without it; the fix drops only zapped roots and loads fewer; both
/// sides keep every guest check and the oracle clean; `--mmu tdp` is refused.
#[test]
fn test_shadow_process_churn_shows_what_freeing_only_obsolete_roots_saves() {
    let v = json_run(&["run", "shadow-process-churn", "-i", "5000"]);
    assert_eq!(v["config"]["mmu"]["kind"], "shadow", "{v}");
    let (fixed, legacy) = (&v["fixed"], &v["legacy"]);
    for side in [fixed, legacy] {
        assert_eq!(side["mismatches"], 0, "{v}");
        assert_eq!(side["violations"], 0, "{v}");
        assert!(side["prev_root_hits"].as_u64().unwrap() > 0, "{v}");
    }
    assert!(fixed["obsolete_roots_dropped"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(fixed["root_slots_dropped_legacy"], 0, "{v}");
    assert!(
        legacy["root_slots_dropped_legacy"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert!(
        fixed["root_loads"].as_u64().unwrap() < legacy["root_loads"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(v["legacy_leaked_pages"], 0, "{v}");
    assert_eq!(v["leaked_table_pages"], 0, "{v}");
    let e = refusal(&["run", "shadow-process-churn", "--mmu", "tdp"]);
    assert!(e.contains("shadow MMU"), "{e}");
}

/// Unsync pages take most stores to the kernel's page tables off the exit
/// path: with `--no-unsync` the same guests have more of them emulated; the
/// config says which ran; the page limit and unsync flags are refused
/// without a shadow MMU or below KVM's minimum.
#[test]
fn test_shadow_unsync_and_page_limit_flags() {
    let on = json_run(&[
        "run",
        "shadow-process-churn",
        "-i",
        "3000",
        "--nr-mmu-pages",
        "64",
    ]);
    let off = json_run(&["run", "shadow-process-churn", "-i", "3000", "--no-unsync"]);
    assert_eq!(on["config"]["mmu"]["shadow_unsync"], true, "{on}");
    assert_eq!(off["config"]["mmu"]["shadow_unsync"], false, "{off}");
    let (a, b) = (&on["fixed"], &off["fixed"]);
    assert!(a["shadow_unsynced"].as_u64().unwrap() > 0, "{on}");
    assert!(a["shadow_recycled"].as_u64().unwrap() > 0, "{on}");
    assert_eq!(b["shadow_unsynced"], 0, "{off}");
    assert!(
        a["shadow_pte_writes"].as_u64().unwrap() < b["shadow_pte_writes"].as_u64().unwrap(),
        "{on} {off}"
    );
    for v in [&on, &off] {
        assert_eq!(v["fixed"]["violations"], 0, "{v}");
        assert_eq!(v["fixed"]["mismatches"], 0, "{v}");
    }
    let e = refusal(&["run", "demand-paging", "--no-unsync"]);
    assert!(e.contains("--mmu shadow"), "{e}");
    let e = refusal(&[
        "run",
        "demand-paging",
        "--mmu",
        "shadow",
        "--nr-mmu-pages",
        "63",
    ]);
    assert!(e.contains("at least 64"), "{e}");
}

/// `roots --mmu shadow`: processes zap their own roots while the host zaps
/// every root; once every vCPU has handled its requests no zapped root is
/// held, valid cached roots survived single-root zaps, guests and oracle
/// clean.
#[test]
fn test_roots_on_the_shadow_mmu_frees_only_obsolete_roots() {
    let v = json_run(&["run", "roots", "--mmu", "shadow", "-i", "4", "-b", "4M"]);
    assert_eq!(v["config"]["mmu"]["kind"], "shadow", "{v}");
    assert!(v["zaps_all_roots"].as_u64().unwrap() > 0, "{v}");
    assert!(v["processes_exited"].as_u64().unwrap() > 0, "{v}");
    assert!(v["prev_roots_kept"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["invalid_roots_left"], 0, "{v}");
    assert_eq!(v["guest_mismatches"], 0, "{v}");
}

/// `--guest-paging` (shadow only): the vCPUs start over a direct map, so
/// the shadow MMU shadows guest tables (indirect pages) where it shadows
/// none without it; refused in one line under the TDP MMU.
#[test]
fn test_guest_paging_makes_the_shadow_mmu_shadow_guest_tables() {
    let on = json_run(&[
        "run",
        "demand-paging",
        "-v",
        "2",
        "-b",
        "4M",
        "--mmu",
        "shadow",
        "--guest-paging",
    ]);
    assert_eq!(on["shadow"]["guest_paging"], true, "{on}");
    assert!(
        on["shadow"]["indirect_pages"].as_u64().unwrap() >= 2,
        "{on}"
    );
    let off = json_run(&[
        "run",
        "demand-paging",
        "-v",
        "2",
        "-b",
        "4M",
        "--mmu",
        "shadow",
    ]);
    assert_eq!(off["shadow"]["indirect_pages"], 0, "{off}");
    let e = refusal(&["run", "demand-paging", "--guest-paging"]);
    assert!(e.contains("--mmu shadow"), "{e}");
    let e = refusal(&["bench", "demand-paging", "--guest-paging"]);
    assert!(e.contains("--mmu shadow"), "{e}");
}

/// `shadow-process-churn --vs-kvm`: the real KVM's side ran (both phases,
/// with the shadow MMU's counters and the emulation count), or the report
/// says why not; without the flag there is no KVM side.
#[test]
fn test_shadow_process_churn_vs_kvm_runs_both_phases_or_says_why_not() {
    let v = json_run(&[
        "run",
        "shadow-process-churn",
        "-i",
        "500",
        "-b",
        "2M",
        "--vs-kvm",
    ]);
    let k = &v["kvm"];
    if let Some(phases) = k["phases"].as_array() {
        let names: Vec<_> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["switches", "churn"], "{k}");
        for p in phases {
            assert!(
                p["kvm_stats"]["insn_emulation"].as_u64().unwrap() > 0,
                "{p}"
            );
            let flushes = &p["counters"]["tlb_flush_local"];
            assert!(flushes["kvm"].as_u64().unwrap() >= 4000, "{p}");
            assert!(flushes["vmmu"].as_u64().unwrap() >= 4000, "{p}");
            // Six address spaces round robin through a cache of four: vmmu
            // loads a root at nearly every switch.
            assert!(p["vmmu_root_loads"].as_u64().unwrap() >= 4000, "{p}");
        }
        let created = &phases[0]["counters"]["shadow_pages_created"];
        assert!(created["kvm"].as_u64().unwrap() > 0, "{k}");
        assert!(created["vmmu"].as_u64().unwrap() > 0, "{k}");
        assert_eq!(phases[1]["respawns"], 1000, "{k}");
        // Each respawn writes its root four times with no fault through it
        // in between: both MMUs zap that root for write flooding.
        for c in ["shadow_flooded", "shadow_pages_zapped"] {
            let n = &phases[1]["counters"][c];
            assert!(n["vmmu"].as_u64().unwrap() >= 1000, "{c}: {k}");
            assert!(n["kvm"].as_u64().unwrap() >= 1000, "{c}: {k}");
        }
        assert_eq!(k["vmmu_violations"], 0, "{k}");
    } else {
        assert_eq!(k["ran"], false, "{k}");
        assert!(k["note"].as_str().unwrap().contains("kvm"), "{k}");
    }
    let v = json_run(&["run", "shadow-process-churn", "-i", "500", "-b", "2M"]);
    assert!(v.get("kvm").is_none(), "{v}");
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
