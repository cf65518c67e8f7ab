//! Prints real KVM's demand-paging figures next to the host's own first-touch cost.
//!
//! `cargo run -p vmmu-kvm --release --example demand_paging -- [MiB per vCPU] [--thp]`
//! (default 512 MiB, 4 KiB host pages); runs 1 and 2 vCPUs.

use vmmu_kvm::{plain_first_touch, run_demand_paging, DemandPagingConfig, Phase, PAGE_SIZE};

fn row(p: &Phase) {
    let c = &p.counters;
    println!(
        "  {:<45} {:>10.1} ns/page  ({:>8.2} ms, pf_fixed {:>7}, exits {:>7}, pages_4k {:>7}, pages_2m {:>5}, insn_emulation {})",
        p.name,
        p.ns_per_page(),
        p.wall_ns as f64 / 1e6,
        c.pf_fixed,
        c.exits,
        c.pages_4k,
        c.pages_2m,
        c.insn_emulation
    );
}

fn main() {
    let mut mib = 512u64;
    let mut thp = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--thp" => thp = true,
            n => match n.parse() {
                Ok(v) => mib = v,
                Err(_) => {
                    eprintln!("usage: demand_paging [MiB per vCPU] [--thp]");
                    std::process::exit(2);
                }
            },
        }
    }
    let bytes = mib << 20;
    for vcpus in [1, 2] {
        let cfg = DemandPagingConfig {
            vcpus,
            bytes_per_vcpu: bytes,
            host_thp: thp,
        };
        let report = match run_demand_paging(&cfg) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        println!(
            "{} vCPU(s) x {mib} MiB, host THP {thp}: {}",
            vcpus, report.backend.description
        );
        row(&report.first_touch_untouched_host);
        row(&report.first_touch_pretouched_host);
        row(&report.warm);
        println!(
            "  host pre-touch (1 thread) {:.1} ns/page; delete populated slot {:.2} ms; emulated guest: {}",
            report.host_pretouch_ns as f64 / report.warm.pages as f64,
            report.delete_populated_slot_ns as f64 / 1e6,
            report.emulated_guest
        );
        for w in &report.warnings {
            println!("  warning: {w}");
        }
        match plain_first_touch(vcpus, bytes, thp) {
            Ok(ns) => {
                let pages = vcpus as u64 * bytes / PAGE_SIZE;
                println!(
                    "  plain threads first-touch (no KVM) {:>10.1} ns/page",
                    ns as f64 / pages as f64
                );
            }
            Err(e) => eprintln!("  plain first-touch failed: {e}"),
        }
    }
}
