//! A sparse guest (`demand-paging --stride/--touch`): a guest far larger than
//! the host's memory, of which only what is touched costs memory; the MMU's
//! page-table memory and the process's peak are in the report.

mod common;
use common::{refusal, vmmu};

fn json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["run", "demand-paging", "--json"];
    a.extend_from_slice(args);
    let (code, out, err) = vmmu(&a);
    assert_eq!(code, 0, "{a:?}: {err}\n{out}");
    serde_json::from_str(&out).expect("JSON")
}

#[test]
fn test_stride_touches_one_page_per_stride_and_each_needs_its_own_table() {
    // 2 vCPUs × 64 MiB, one page per 2 MiB: 32 pages each, all verified.
    let v = json(&["-v", "2", "-b", "64M", "--stride", "2M"]);
    assert_eq!(v["violations"], 0);
    assert_eq!(v["touched_bytes"], 2 * 32 * 4096);
    assert_eq!(v["faults"], 2 * 32, "{v}");
    // Every touched page sits alone under its last-level table.
    let tables = v["mmu_table_bytes"].as_u64().unwrap();
    assert!((64 * 4096..80 * 4096).contains(&tables), "{v}");
    // Dense 4 KiB pages need about one table page per 512 pages.
    let dense = json(&["-b", "64M"]);
    let pct = dense["mmu_table_percent_of_touched"].as_f64().unwrap();
    assert!(pct > 0.19 && pct <= 0.25, "{dense}");
}

#[test]
fn test_a_256g_guest_reserves_address_space_only() {
    // 256 GiB of guest memory on any machine: 2 GiB of it touched at one page
    // per 2 MiB, so 1024 pages. The host's page table of the region alone
    // would be 512 MiB if it were written out rather than committed where
    // touched.
    let v = json(&[
        "-b",
        "256G",
        "--stride",
        "2M",
        "--touch",
        "2G",
        "--no-oracle",
    ]);
    assert_eq!(v["violations"], 0);
    assert_eq!(v["faults"], 1024, "{v}");
    let rss = v["peak_rss_bytes"].as_u64().expect("peak RSS on Linux");
    assert!(rss < 256 << 20, "peak RSS {rss} bytes for 4 MiB touched");
    // A dense window of the same guest: the same pages as a small guest.
    let w = json(&["-b", "256G", "--touch", "8M", "--prefault-host"]);
    assert_eq!(w["faults"], 2048, "{w}");
    assert_eq!(w["violations"], 0);
}

#[test]
fn test_bad_stride_and_touch_are_refused_in_one_line() {
    for (args, needle) in [
        (&["--stride", "3K"][..], "--stride 3 KiB"),
        (&["-b", "4M", "--stride", "8M"], "at most -b"),
        (&["-b", "4M", "--touch", "8M"], "--touch 8 MiB"),
        (&["-v", "2", "-o", "--touch", "1M"], "-o"),
        (&["-b", "2T", "--stride", "2M"], "1 TiB in all"),
        (&["-b", "200G"], "64 GiB touched"),
    ] {
        let mut a = vec!["run", "demand-paging"];
        a.extend_from_slice(args);
        // Exit 2, nothing on stdout, one line on stderr.
        let e = refusal(&a);
        assert!(e.contains(needle), "{a:?}: {e}");
    }
}
