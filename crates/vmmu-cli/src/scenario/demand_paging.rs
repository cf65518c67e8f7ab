//! `demand-paging` (demand_paging_test): every vCPU touches every page of its
//! chunk once, each touch a first fault; then a read pass verifies the contents.

use vmmu_machine::guest::Pattern;
use vmmu_machine::Backing;

use super::{build, sum};
use crate::args::Common;
use crate::report::{secs, Report};

/// Check the flags (before anything is allocated).
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    Ok(common.shape(1, 1 << 30, 1, Backing::Anonymous)?)
}

/// Run it; returns the exit code.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let mut env = build(common, shape)?;
    if common.prefault_host {
        env.prefault_host()?;
    }
    let mut r = Report::new("demand-paging", &shape);
    r.line(format!(
        "guest physical test memory: [{:#x}, {:#x})",
        super::REGION_GPA,
        super::REGION_GPA + shape.total
    ));
    r.line("Finished creating vCPUs and starting uffd threads");
    r.line("Started all vCPUs");
    let pattern = if common.random {
        Pattern::Random
    } else {
        Pattern::Sequential
    };
    let models = env.models();
    let (models, reports, t) =
        env.pass("populate", models, 1, pattern, shape.write_percent, |_| {});
    r.line("All vCPU threads joined");
    let ns = t.as_nanos() as u64;
    let pages_per_vcpu = if common.overlap {
        shape.total / 4096
    } else {
        shape.touched_pages_per_vcpu()
    };
    let per_vcpu: f64 = reports
        .iter()
        .map(|x| pages_per_vcpu as f64 / x.elapsed.as_secs_f64().max(1e-9))
        .sum::<f64>()
        / reports.len() as f64;
    let overall = (pages_per_vcpu * shape.vcpus as u64) as f64 / t.as_secs_f64().max(1e-9);
    r.line(format!("Total guest execution time: {}", secs(ns)));
    r.line(format!(
        "Per-vcpu demand paging rate: {per_vcpu:.2} pgs/sec/vcpu"
    ));
    r.line(format!("Overall demand paging rate: {overall:.2} pgs/sec"));
    r.phase("populate", ns);
    r.put("per_vcpu_rate_pages_per_s", per_vcpu.round());
    r.put("overall_rate_pages_per_s", overall.round());
    r.put(
        "populate_ns_per_page",
        (ns as f64 / (pages_per_vcpu * shape.vcpus as u64) as f64).round(),
    );
    r.put("efaults", sum(&reports, |x| x.counters.efaults));
    // What the MMU's page tables cost against what they map, and what the
    // whole process holds (a sparse guest reserves address space only).
    let touched = pages_per_vcpu * shape.vcpus as u64 * 4096;
    let tables = env.m.mem.table_pages() * 4096;
    r.put("touched_bytes", touched);
    r.put("mmu_table_bytes", tables);
    r.put(
        "mmu_table_percent_of_touched",
        (tables as f64 * 1e4 / touched as f64).round() / 100.0,
    );
    r.line(format!(
        "MMU page tables: {} for {} touched ({:.3} %)",
        crate::args::human(tables),
        crate::args::human(touched),
        tables as f64 * 100.0 / touched as f64
    ));
    if let Some(rss) = peak_rss() {
        r.put("peak_rss_bytes", rss);
    }
    let (_, _, v) = env.pass("verify", models, 2, Pattern::Sequential, 0, |_| {});
    r.phase("verify", v.as_nanos() as u64);
    env.finish(r)
}

/// The process's peak resident memory (`VmHWM`), where /proc tells.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
