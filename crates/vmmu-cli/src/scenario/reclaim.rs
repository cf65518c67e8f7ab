//! `reclaim` (no selftest: what access tracking is for): the guest's working
//! set is larger than the host memory it may keep resident, so the host's
//! reclaim loop (an LRU clock, `vmmu_machine::reclaim`) ages its pages
//! through the MMU's young callbacks and swaps out what stays old, through
//! the usual invalidations; the guest's next access refaults it. Run with
//! lockless aging (KVM ≥ 6.15) and with aging under `mmu_lock` (before), one
//! machine each, in one invocation.
//!
//! The vCPUs write their memory once, then run passes that touch it 90 % in
//! a hot tenth and 10 % anywhere, half of them writes, every read checked
//! against what was written last (the oracle checks every access too): no
//! access may be lost or read stale data across aging, swap-out and refault.
//! Reported per aging mode: pages reclaimed, refaults, the share of aged
//! pages found young, the time per aging call, fault latency p50/p99, and
//! `mmu_lock` write acquisitions made by aging.

use std::time::Instant;

use serde_json::json;
use vmmu::Hva;
use vmmu_machine::guest::Pattern;
use vmmu_machine::reclaim::Reclaimer;
use vmmu_machine::Backing;

use super::{build, REGION_HVA};
use crate::args::{BadInput, Common};
use crate::report::Report;

/// What `vmmu run reclaim` was asked for.
#[derive(Clone, Copy, Debug)]
pub struct ReclaimArgs {
    /// Resident pages allowed, as a share of guest memory (percent).
    pub limit_percent: u32,
    /// Run with lockless aging.
    pub lockless: bool,
    /// Run with locked aging.
    pub locked: bool,
}

/// Check the flags.
pub fn validate(common: &Common, a: &ReclaimArgs) -> anyhow::Result<crate::args::Shape> {
    if !(10..=95).contains(&a.limit_percent) {
        anyhow::bail!(BadInput(format!(
            "--limit {}: the resident limit is a share of guest memory, 10..=95 %",
            a.limit_percent
        )));
    }
    let shape = common.shape(2, 64 << 20, 6, Backing::Anonymous)?;
    if matches!(shape.backing, Backing::Hugetlb2M | Backing::Hugetlb1G) {
        anyhow::bail!(BadInput(format!(
            "-s {}: hugetlbfs pages are never swapped (valid: anonymous, anonymous_thp, shmem)",
            shape.backing.name()
        )));
    }
    if shape.bytes_per_vcpu < 1 << 20 {
        anyhow::bail!(BadInput(
            "-b: at least 1M per vCPU (the hot tenth must be more than a few pages)".into()
        ));
    }
    if common.overlap {
        anyhow::bail!(BadInput(
            "reclaim -o: each vCPU checks its own memory (drop -o)".into()
        ));
    }
    Ok(shape)
}

struct Row {
    locked: bool,
    elapsed_ns: u64,
    accesses: u64,
    reclaimed: u64,
    refaults: u64,
    scanned: u64,
    young: u64,
    aging_ns: u64,
    aging_locks: u64,
    p50: u64,
    p99: u64,
    max_resident: u64,
    violations: u64,
}

/// One aging mode on its own machine. The last mode's environment is
/// returned unfinished: it carries the report.
fn one(
    common: &Common,
    a: &ReclaimArgs,
    locked: bool,
) -> anyhow::Result<(Row, Option<super::Env>)> {
    let mut c = common.clone();
    c.locked_aging = locked;
    // The last mode prints the report; the others finish quietly.
    let last = locked || !a.locked;
    c.quiet = common.quiet || !last;
    let shape = validate(&c, a)?;
    let mut env = build(&c, shape)?;
    // Fault latencies are the figure, for the quiet modes too.
    env.m.record_latency = true;
    let pages = shape.total / 4096;
    let limit = pages * u64::from(a.limit_percent) / 100;
    let host = env.m.host.clone();
    let swapped_in0 = host
        .stats
        .swapped_in
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut reclaimer = Reclaimer::start(host.clone(), Hva(REGION_HVA), pages, limit);
    let before = env.m.vm.stats();
    let t0 = Instant::now();
    let mut models = env.models();
    let mut hist = vmmu_machine::histogram();
    let mut accesses = 0;
    let mut max_resident = 0;
    let range = vmmu::HvaRange::new(Hva(REGION_HVA), Hva(REGION_HVA + shape.total));
    for pass in 0..=shape.iterations {
        let (pattern, writes) = if pass == 0 {
            (Pattern::Sequential, 100)
        } else {
            (Pattern::HotSet, 50)
        };
        let label = if pass == 0 { "populate" } else { "hot set" };
        let (m, reports, _) = env.pass(label, models, pass + 1, pattern, writes, |_| {});
        models = m;
        for r in &reports {
            accesses += r.counters.accesses;
            for h in &r.fault_ns {
                let _ = hist.add(h);
            }
        }
        max_resident = max_resident.max(host.resident_in(range));
        // Between passes the host catches up (as a cgroup at its limit
        // would make the guest wait), so every pass starts at the limit
        // and its accesses to cold pages refault, however slow the build.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while host.resident_in(range) > limit && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    let elapsed_ns = t0.elapsed().as_nanos() as u64;
    reclaimer.stop();
    let st = env.m.vm.stats().since(&before);
    let rs = &reclaimer.stats;
    let load = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
    let row = Row {
        locked,
        elapsed_ns,
        accesses,
        reclaimed: load(&rs.reclaimed),
        refaults: load(&host.stats.swapped_in) - swapped_in0,
        scanned: load(&rs.scanned),
        young: load(&rs.young),
        aging_ns: load(&rs.aging_ns),
        aging_locks: st.aging_locked,
        p50: hist.value_at_quantile(0.50),
        p99: hist.value_at_quantile(0.99),
        max_resident,
        violations: 0,
    };
    if !last {
        let (_, v) = env.finish_counted(Report::new("reclaim", &shape))?;
        return Ok((
            Row {
                violations: v,
                ..row
            },
            None,
        ));
    }
    Ok((row, Some(env)))
}

/// Run it.
pub fn run(common: &Common, a: &ReclaimArgs) -> anyhow::Result<i32> {
    let shape = validate(common, a)?;
    let mut rows = Vec::new();
    let mut last = None;
    for (on, locked) in [(a.lockless, false), (a.locked, true)] {
        if on {
            let (row, env) = one(common, a, locked)?;
            rows.push(row);
            last = env;
        }
    }
    let env = last.ok_or_else(|| anyhow::anyhow!("no aging mode ran"))?;
    let pages = shape.total / 4096;
    let limit = pages * u64::from(a.limit_percent) / 100;
    let mut r = Report::new("reclaim", &shape);
    r.line(format!(
        "{} pages of guest memory, at most {limit} resident ({} %): {} passes of a hot tenth (90 % of accesses, half writes) after the populate",
        pages, a.limit_percent, shape.iterations
    ));
    r.line(format!(
        "{:<9} {:>10} {:>10} {:>14} {:>9} {:>12} {:>14} {:>10} {:>10}",
        "aging",
        "reclaimed",
        "refaults",
        "refaults/1000",
        "young %",
        "ns per age",
        "mmu_lock (w)",
        "fault p50",
        "fault p99"
    ));
    let mut errors = Vec::new();
    for row in &rows {
        r.line(format!(
            "{:<9} {:>10} {:>10} {:>14.2} {:>9.1} {:>12.0} {:>14} {:>8.1}µs {:>8.1}µs",
            if row.locked { "locked" } else { "lockless" },
            row.reclaimed,
            row.refaults,
            row.refaults as f64 * 1000.0 / row.accesses.max(1) as f64,
            row.young as f64 * 100.0 / row.scanned.max(1) as f64,
            row.aging_ns as f64 / row.scanned.max(1) as f64,
            row.aging_locks,
            row.p50 as f64 / 1e3,
            row.p99 as f64 / 1e3,
        ));
        let mode = if row.locked { "locked" } else { "lockless" };
        if row.reclaimed == 0 || row.refaults == 0 {
            errors.push(format!(
                "{mode}: the working set exceeds the limit, yet {} pages were reclaimed and {} refaulted",
                row.reclaimed, row.refaults
            ));
        }
        if !row.locked && row.aging_locks != 0 {
            errors.push(format!(
                "lockless aging took mmu_lock {} times",
                row.aging_locks
            ));
        }
        if row.violations > 0 {
            errors.push(format!("{mode}: {} oracle violations", row.violations));
        }
    }
    for e in &errors {
        r.line(format!("FAIL: {e}"));
    }
    r.put(
        "modes",
        json!(rows
            .iter()
            .map(|row| json!({
                "aging": if row.locked { "locked" } else { "lockless" },
                "elapsed_ns": row.elapsed_ns,
                "accesses": row.accesses,
                "reclaimed": row.reclaimed,
                "refaults": row.refaults,
                "scanned": row.scanned,
                "young": row.young,
                "aging_ns_per_call": row.aging_ns / row.scanned.max(1),
                "aging_mmu_lock_writes": row.aging_locks,
                "fault_p50_ns": row.p50,
                "fault_p99_ns": row.p99,
                "max_resident_pages": row.max_resident,
                "violations": row.violations,
            }))
            .collect::<Vec<_>>()),
    );
    r.put("limit_pages", limit);
    r.put("reclaim_errors", errors.len() as u64);
    let code = env.finish(r)?;
    Ok(if errors.is_empty() { code } else { 1 })
}
