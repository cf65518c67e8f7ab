//! Private memory as a user runs it: conversions, memory-fault exits,
//! pre-faulting, the guest_memfd contract, the conversion benchmarks.

mod common;
use common::{json_run, refusal, vmmu};

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
    let err = refusal(&["bench", "conversions", "-b", "3M"]);
    assert!(
        err.contains("-b 3") && err.contains("multiple of 2M"),
        "{err}"
    );
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
