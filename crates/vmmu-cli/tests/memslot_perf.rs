//! `vmmu run memslot-perf` as a user runs it: every loop over every slot
//! count, the data checked, the growth from the smallest to the largest
//! count reported; bad flags get one line.

mod common;
use common::{refusal, vmmu};

#[test]
fn test_memslot_perf_runs_every_loop_at_each_slot_count_with_the_data_checked() {
    let (code, out, err) = vmmu(&[
        "run",
        "memslot-perf",
        "-s",
        "3,4096",
        "-l",
        "0.01",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["violations"], 0, "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for (row, slots) in rows.iter().zip([3, 4096]) {
        assert_eq!(row["slots"], slots);
        let tests = row["tests"].as_array().unwrap();
        let names: Vec<&str> = tests.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "map",
                "unmap",
                "unmap-chunked",
                "move-active",
                "move-inactive",
                "rw"
            ]
        );
        for t in tests {
            assert!(t["iterations"].as_u64().unwrap() >= 1, "{t}");
            assert!(t["ns_per_iteration"].as_u64().unwrap() > 0, "{t}");
            assert!(t["guest_accesses"].as_u64().unwrap() > 0, "{t}");
        }
        // The guest of move-inactive never writes the moved slot.
        assert_eq!(tests[4]["mmio_exits"], 0, "{row}");
    }
    let ratio = &v["ratio_largest_to_smallest"];
    assert!(ratio["map"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn test_memslot_perf_refuses_what_it_cannot_run_in_one_line() {
    for (args, needle) in [
        (&["-s", "1"][..], "-s 1"),
        (&["-s", "40000"], "32764"),
        (&["-s", "2", "-f", "3", "-e", "3"], "the move tests"),
        (&["-f", "4", "-e", "2"], "first at most last"),
        (&["-e", "6"], "0..=5"),
        (&["-l", "0"], "-l 0"),
        (&["-q"], "slot-zap-all"),
    ] {
        let mut a = vec!["run", "memslot-perf"];
        a.extend_from_slice(args);
        // Exit 2, nothing on stdout, one line on stderr.
        let e = refusal(&a);
        assert!(e.contains(needle), "{a:?}: {e}");
    }
}
