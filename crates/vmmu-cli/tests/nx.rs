//! `vmmu run nx-huge-pages` as a user runs it: every step's 2 MiB pages and
//! splits match KVM's rules, recovery follows the ratio, bad flags are
//! refused in one line.

mod common;
use common::vmmu;

fn steps(v: &serde_json::Value) -> Vec<(String, u64, u64)> {
    v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap_or_default().to_string(),
                s["pages_2m"].as_u64().unwrap_or(u64::MAX),
                s["nx_lpage_splits"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

#[test]
fn test_nx_huge_pages_steps_follow_kvms_rules_with_the_mitigation_on_and_off() {
    let (code, out, err) = vmmu(&["run", "nx-huge-pages", "-p", "20", "--json"]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["violations"], 0);
    assert_eq!(v["nx_huge_pages_errors"], 0, "{v}");
    let s = steps(&v);
    // The selftest's checks, on: a fetch splits, a read does not undo it,
    // recovery lets the reads map huge again.
    assert_eq!(s[2], ("execute from hpage 0".into(), 1, 1));
    assert_eq!(s[3], ("execute from hpage 2".into(), 1, 2));
    assert_eq!(s[5], ("read hpage 2".into(), 1, 2));
    assert_eq!(s[6], ("recovery period".into(), 1, 0));
    assert_eq!(s[9], ("read hpage 2".into(), 3, 0));
    // Off (turned off at run time, which zapped everything): fetches map huge.
    let off = s
        .iter()
        .position(|x| x.0 == "nx_huge_pages=off")
        .expect("toggle");
    assert_eq!(s[off].1, 0, "turning the mitigation off zaps");
    assert_eq!(s[off + 3], ("execute from hpage 0".into(), 2, 0));
    assert_eq!(s.last().map(|x| x.2), Some(1), "on again: the fetch split");
    assert!(v["recovery"]["zapped"].as_u64().unwrap() >= 3);
}

#[test]
fn test_nx_huge_pages_recovery_zaps_ceil_listed_over_ratio_each_period() {
    let (code, out, err) = vmmu(&[
        "run",
        "nx-huge-pages",
        "-p",
        "20",
        "--recovery-ratio",
        "2",
        "--mitigation",
        "on",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let s = steps(&v);
    // Two listed: the first period takes ceil(2/2) = 1, the second the last.
    assert_eq!((s[6].1, s[6].2), (1, 1));
    assert_eq!((s[7].1, s[7].2), (1, 0));
    assert!(!s.iter().any(|x| x.0.starts_with("nx_huge_pages=")));
}

#[test]
fn test_nx_huge_pages_refuses_what_it_cannot_run_in_one_line() {
    for (args, needle) in [
        (&["--recovery-ratio", "0"][..], "--recovery-ratio 0"),
        (&["--mmu", "shadow"], "--mmu shadow"),
        (&["-s", "anonymous"], "-s anonymous"),
        (&["-p", "0"], "--recovery-period 0"),
        (&["--mitigation", "maybe"], "maybe"),
    ] {
        let mut a = vec!["run", "nx-huge-pages"];
        a.extend_from_slice(args);
        let (code, out, err) = vmmu(&a);
        assert_ne!(code, 0, "{a:?} was accepted");
        assert!(out.is_empty(), "{a:?} printed {out}");
        assert!(err.contains(needle), "{a:?}: {err}");
    }
}

#[test]
fn test_bench_nx_recovery_zaps_every_listed_table_and_huge_pages_come_back() {
    let (code, out, err) = vmmu(&[
        "bench",
        "nx-recovery",
        "-b",
        "16M",
        "--fault-bytes",
        "8M",
        "--oracle",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["violations"], 0);
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for (r, lock) in runs.iter().zip(["read", "write"]) {
        assert_eq!(r["lock"], lock);
        assert_eq!(
            (r["listed"].as_u64(), r["zapped"].as_u64()),
            (Some(8), Some(8))
        );
        assert_eq!(
            r["read_faults_while_split"], 4096,
            "split: a fault per page"
        );
        assert_eq!(r["read_faults_after_recovery"], 8, "one per huge page");
        assert_eq!(r["huge_pages_after"], 8);
    }
    let (code, _, err) = vmmu(&["bench", "nx-recovery", "-b", "3M"]);
    assert_eq!(code, 2);
    assert!(err.contains("-b 3 MiB") || err.contains("-b 3"), "{err}");
}
