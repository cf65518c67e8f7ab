//! `vmmu run reclaim` as a user runs it: the host reclaims and the guest
//! refaults with every read checked, lockless aging never takes `mmu_lock`,
//! bad flags get one line.

mod common;
use common::vmmu;

#[test]
fn test_reclaim_swaps_out_cold_pages_and_refaults_them_with_both_agings() {
    let (code, out, err) = vmmu(&["run", "reclaim", "-b", "8M", "-i", "3", "--json"]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["violations"], 0);
    assert_eq!(v["reclaim_errors"], 0, "{v}");
    let modes = v["modes"].as_array().expect("modes");
    assert_eq!(modes.len(), 2);
    for m in modes {
        assert!(m["reclaimed"].as_u64().unwrap() > 0, "{m}");
        assert!(m["refaults"].as_u64().unwrap() > 0, "{m}");
        assert!(
            m["young"].as_u64().unwrap() > 0,
            "the hot set is seen young: {m}"
        );
        assert_eq!(m["violations"], 0);
    }
    assert_eq!(modes[0]["aging"], "lockless");
    assert_eq!(modes[0]["aging_mmu_lock_writes"], 0);
    assert_eq!(modes[1]["aging"], "locked");
    assert!(modes[1]["aging_mmu_lock_writes"].as_u64().unwrap() > 0);
}

#[test]
fn test_reclaim_refuses_what_it_cannot_run_in_one_line() {
    for (args, needle) in [
        (&["--limit", "100"][..], "--limit 100"),
        (&["-s", "anonymous_hugetlb_2mb"], "never swapped"),
        (&["--aging", "sometimes"], "sometimes"),
    ] {
        let mut a = vec!["run", "reclaim"];
        a.extend_from_slice(args);
        let (code, out, err) = vmmu(&a);
        assert_eq!(code, 2, "{a:?}: {err}");
        assert!(out.is_empty());
        assert!(
            err.contains(needle) && err.lines().count() == 1,
            "{a:?}: {err}"
        );
    }
}

#[test]
fn test_bench_aging_runs_both_modes_and_only_the_locked_one_takes_mmu_lock() {
    for ad in [&[][..], &["--no-ad"][..]] {
        let mut args = vec![
            "bench",
            "aging",
            "-b",
            "8M",
            "--fault-bytes",
            "2M",
            "--oracle",
            "--json",
        ];
        args.extend_from_slice(ad);
        let (code, out, err) = vmmu(&args);
        assert_eq!(code, 0, "{err}\n{out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(v["violations"], 0);
        let runs = v["runs"].as_array().expect("runs");
        assert_eq!(runs[0]["aging"], "lockless");
        assert_eq!(runs[0]["mmu_lock_writes"], 0);
        assert_eq!(runs[1]["aging"], "locked");
        assert_eq!(runs[1]["mmu_lock_writes"], 2048, "one per callback");
        for r in runs {
            assert_eq!(r["callbacks"], 2048);
            // Every page was written before the pass: all young.
            assert_eq!(r["young"], 2048, "{r}");
        }
    }
}
