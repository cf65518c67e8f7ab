//! `vmmu bench scaling` as a user runs it: both sides measured in every
//! round, the ratio to the machine's ceiling computed from them; bad flags
//! get one line.

mod common;
use common::{refusal, vmmu};

#[test]
fn test_bench_scaling_measures_vmmu_and_the_ceiling_in_every_round() {
    let (code, out, err) = vmmu(&[
        "bench",
        "scaling",
        "-b",
        "8M",
        "--loop-bytes",
        "1M",
        "--rounds",
        "2",
        "--samples",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["violations"], 0);
    assert_eq!(v["config"]["flags"]["samples"], 2, "{v}");
    let rounds = v["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    let mut ratios = Vec::new();
    for r in rounds {
        for k in [
            "vmmu_pages_per_s_1",
            "vmmu_pages_per_s_n",
            "loop_ops_per_s_1",
            "loop_ops_per_s_n",
        ] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
        // The ratio is vmmu's scaling over the loop's, as printed.
        let vmmu =
            r["vmmu_pages_per_s_n"].as_f64().unwrap() / r["vmmu_pages_per_s_1"].as_f64().unwrap();
        let ceiling =
            r["loop_ops_per_s_n"].as_f64().unwrap() / r["loop_ops_per_s_1"].as_f64().unwrap();
        let of = r["of_ceiling"].as_f64().unwrap();
        assert!((of - vmmu / ceiling).abs() < 0.01, "{r}");
        ratios.push(of);
    }
    ratios.sort_by(f64::total_cmp);
    // The median of two rounds is the upper one.
    assert_eq!(v["of_ceiling_median"].as_f64().unwrap(), ratios[1], "{v}");
}

#[test]
fn test_bench_scaling_refuses_bad_flags_in_one_line() {
    for (args, needle) in [
        (&["-v", "1"][..], "-v 1"),
        (&["--rounds", "0"], "--rounds 0"),
        (&["--samples", "0"], "--samples 0"),
        (&["--samples", "11"], "1..=10 samples"),
        (&["--loop-bytes", "4K"], "--loop-bytes 4 KiB"),
        (&["-b", "100T"], "does not fit"),
    ] {
        let mut a = vec!["bench", "scaling"];
        a.extend_from_slice(args);
        // Exit 2, nothing on stdout, one line on stderr.
        let e = refusal(&a);
        assert!(e.contains(needle), "{a:?}: {e}");
    }
}
