//! `dirty-log-perf` (dirty_log_perf_test): populate guest memory, turn dirty
//! logging on for every memslot, then per iteration a guest write pass, a get
//! of each slot's log and (with manual protection, unless `-g`) a clear of
//! it; finally logging off. The selftest's timing lines, plus checks that each
//! iteration's get reported every page the pass wrote.

use std::time::{Duration, Instant};

use serde_json::json;
use vmmu::dirty_log::MANUAL_PROTECT_ENABLE;
use vmmu::{MemFlags, UserMemoryRegion};
use vmmu_machine::guest::Pattern;
use vmmu_machine::Backing;

use super::{build, REGION_GPA, REGION_HVA};
use crate::args::Common;
use crate::report::{secs, Report};

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    Ok(common.shape(1, 1 << 30, 2, Backing::Anonymous)?)
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let manual = !common.no_manual_protect;
    let mut env = build(common, shape)?;
    if manual {
        env.m
            .vm
            .enable_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE)?;
    }
    let per_slot = shape.total / shape.slots as u64;
    let slot_pages = per_slot / 4096;
    let region = |i: u64, flags: u32| UserMemoryRegion {
        slot: 1 + i as u32,
        flags,
        guest_phys_addr: REGION_GPA + i * per_slot,
        memory_size: per_slot,
        userspace_addr: REGION_HVA + i * per_slot,
    };
    let mut r = Report::new("dirty-log-perf", &shape);
    r.line("Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages");
    r.line(format!(
        "guest physical test memory: [{:#x}, {:#x})",
        REGION_GPA,
        REGION_GPA + shape.total
    ));
    let models = env.models();
    let (models, _, populate) = env.pass("populate", models, 1, Pattern::Sequential, 100, |_| {});
    r.line(format!("Populate memory time: {}", secs(ns(populate))));
    let slots: Vec<u64> = (0..shape.slots as u64).collect();
    let t = Instant::now();
    for &i in &slots {
        env.m
            .set_memslot(region(i, MemFlags::LOG_DIRTY_PAGES.bits()))?;
    }
    let enable = t.elapsed();
    r.line(format!("Enabling dirty logging time: {}", secs(ns(enable))));
    let mut models = models;
    let mut iters = Vec::new();
    let mut missing = 0u64;
    let (mut dirty_total, mut get_total, mut clear_total) = (0u64, 0u64, 0u64);
    for it in 1..=shape.iterations {
        let (m, _, dirty) = env.pass("dirty", models, it + 1, Pattern::Sequential, 100, |_| {});
        models = m;
        r.line(format!(
            "Iteration {it} dirty memory time: {}",
            secs(ns(dirty))
        ));
        let t = Instant::now();
        let mut logs = Vec::new();
        for &i in &slots {
            logs.push(env.m.vm.get_dirty_log(1 + i as u32)?);
        }
        let get = t.elapsed();
        r.line(format!(
            "Iteration {it} get dirty log time: {}",
            secs(ns(get))
        ));
        for log in &logs {
            let set: u64 = log.iter().map(|w| w.count_ones() as u64).sum();
            missing += slot_pages - set.min(slot_pages);
        }
        let mut clear = Duration::ZERO;
        if manual {
            let t = Instant::now();
            for (&i, log) in slots.iter().zip(&logs) {
                env.m.vm.clear_dirty_log(1 + i as u32, 0, slot_pages, log)?;
            }
            clear = t.elapsed();
            r.line(format!(
                "Iteration {it} clear dirty log time: {}",
                secs(ns(clear))
            ));
        }
        dirty_total += ns(dirty);
        get_total += ns(get);
        clear_total += ns(clear);
        iters.push(json!({"iteration": it, "dirty_ns": ns(dirty), "get_ns": ns(get), "clear_ns": ns(clear)}));
    }
    let t = Instant::now();
    for &i in &slots {
        env.m.set_memslot(region(i, 0))?;
    }
    let disable = t.elapsed();
    r.line(format!(
        "Disabling dirty logging time: {}",
        secs(ns(disable))
    ));
    let n = shape.iterations as u64;
    r.line(format!(
        "Get dirty log over {n} iterations took {}. (Avg {} per iteration)",
        secs(get_total),
        secs(get_total / n)
    ));
    if manual {
        r.line(format!(
            "Clear dirty log over {n} iterations took {}. (Avg {} per iteration)",
            secs(clear_total),
            secs(clear_total / n)
        ));
    }
    if missing > 0 {
        r.line(format!(
            "FAIL: {missing} written pages missing from the logs"
        ));
    }
    let s = env.m.vm.stats();
    r.line(format!(
        "{} huge leaves split eagerly, {} recovered when logging went off",
        s.eager_splits, s.huge_recovered
    ));
    r.put("populate_ns", ns(populate));
    r.put("enable_ns", ns(enable));
    r.put("disable_ns", ns(disable));
    r.put("iterations_detail", json!(iters));
    r.put("dirty_ns_total", dirty_total);
    r.put("get_ns_total", get_total);
    r.put("clear_ns_total", clear_total);
    r.put("manual_protect", manual);
    r.put("pages_missing_from_logs", missing);
    let code = env.finish(r)?;
    Ok(if missing > 0 { 1 } else { code })
}
