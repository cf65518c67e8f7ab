//! `access-tracking` (access_tracking_perf_test, page_idle flavour): the
//! guest populates its memory, writes and reads it, then the host marks every
//! page idle through the mmu_notifier's `clear_young` (as writing the
//! page_idle bitmap does), the guest writes it, the host marks it idle again,
//! the guest reads it. Each mark counts the pages still idle, i.e. not seen
//! accessed since the previous mark: as in the selftest, 10 % or more fails
//! the run. (No TLB flush follows aging, as in KVM: a translation the vCPU's
//! TLB still holds lets accesses through without setting Accessed, so a small
//! guest whose pages all fit in the TLB looks idle; the default 1 GiB does
//! not.) Then the host marks memory idle over and over while the vCPUs read
//! it, for the vCPUs' access time under aging.
//!
//! Reported: each phase's time, `mmu_lock` acquisitions and TLB flushes
//! during the marks (none with lockless aging, one write acquisition per
//! callback with `--locked-aging`), and how access-tracked entries came back
//! (the fast path, never the slow path, without A/D bits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use vmmu::{Hva, HvaRange};
use vmmu_machine::guest::Pattern;
use vmmu_machine::Backing;

use super::{build, REGION_HVA};
use crate::args::Common;
use crate::report::{secs, Report};

/// Pages found still idle by a mark must stay below this share.
const MAX_STILL_IDLE_PERCENT: u64 = 10;

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    Ok(common.shape(1, 1 << 30, 1, Backing::Anonymous)?)
}

/// Mark every page idle (`clear_young` per page, as page_idle does); returns
/// how many were still idle (not young) and the time.
fn mark_idle(vm: &vmmu::Vm, pages: u64, stop: Option<&AtomicBool>) -> (u64, u64, u64) {
    let t = Instant::now();
    let mut idle = 0;
    let mut marked = 0;
    for p in 0..pages {
        if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
            break;
        }
        let hva = Hva(REGION_HVA + p * 4096);
        if !vm.clear_young(HvaRange::new(hva, hva.add(4096))) {
            idle += 1;
        }
        marked += 1;
    }
    (idle, marked, t.elapsed().as_nanos() as u64)
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let mut env = build(common, shape)?;
    let pages = shape.total / 4096;
    let mut r = Report::new("access-tracking", &shape);
    r.line(format!(
        "Aging: {} (mmu_notifier clear_young per page); EPT A/D bits {}",
        if env.m.vm.config().lockless_aging {
            "lockless"
        } else {
            "under mmu_lock"
        },
        if common.no_ad { "off" } else { "on" }
    ));
    let mut pass = 0;
    // The reference models go from pass to pass, so every read checks the
    // data of the last write.
    let mut models = Some(env.models());
    let mut phase = |env: &mut super::Env, r: &mut Report, label: &str, key: &str, write: bool| {
        pass += u32::from(write);
        let (m, _, t) = env.pass(
            key,
            models.take().unwrap_or_default(),
            pass.max(1),
            Pattern::Sequential,
            if write { 100 } else { 0 },
            |_| {},
        );
        models = Some(m);
        let ns = t.as_nanos() as u64;
        r.line(format!("{label}: {}", secs(ns)));
        r.phase(key, ns);
    };
    phase(&mut env, &mut r, "Populating memory time", "populate", true);
    phase(
        &mut env,
        &mut r,
        "Writing to populated memory time",
        "write_populated",
        true,
    );
    phase(
        &mut env,
        &mut r,
        "Reading from populated memory time",
        "read_populated",
        false,
    );
    let mut bad = 0u64;
    let mut idle_pct = Vec::new();
    let mut marks_ns = 0u64;
    let (mut aging_locks, mut aging_flushes) = (0u64, 0u64);
    let before = env.m.vm.stats();
    let mut mark = |env: &mut super::Env, r: &mut Report| {
        let s0 = env.m.vm.stats();
        let (idle, _, ns) = mark_idle(&env.m.vm, pages, None);
        let d = env.m.vm.stats().since(&s0);
        aging_locks += d.mmu_lock_read + d.mmu_lock_write;
        aging_flushes += d.tlb_flush_remote;
        marks_ns += ns;
        r.line(format!("Mark memory idle (page_idle) time: {}", secs(ns)));
        let pct = idle * 100 / pages.max(1);
        r.line(format!(
            "Pages still idle when marked again: {idle} of {pages} ({pct}%)"
        ));
        idle_pct.push(pct);
        if pct >= MAX_STILL_IDLE_PERCENT {
            bad += 1;
            r.line(format!(
                "ERROR: {pct}% of pages were not seen accessed (at most {}% allowed)",
                MAX_STILL_IDLE_PERCENT - 1
            ));
        }
    };
    // The accesses of the reading pass above must have been seen too.
    mark(&mut env, &mut r);
    phase(
        &mut env,
        &mut r,
        "Writing to idle memory time",
        "write_idle",
        true,
    );
    mark(&mut env, &mut r);
    phase(
        &mut env,
        &mut r,
        "Reading from idle memory time",
        "read_idle",
        false,
    );
    let aging = env.m.vm.stats().since(&before);
    // Aging while the vCPUs read: the host marks memory idle again and again
    // until the pass is done.
    let done = AtomicBool::new(false);
    let mut concurrent_marks = 0u64;
    let vm = env.m.vm.clone();
    let (_, reports, t) = env.pass(
        "read_while_aging",
        models.take().unwrap_or_default(),
        pass,
        Pattern::Sequential,
        0,
        |ctx| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    while !ctx.done() {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    done.store(true, Ordering::Release);
                });
                while !done.load(Ordering::Acquire) {
                    let (_, marked, _) = mark_idle(&vm, pages, Some(&done));
                    concurrent_marks += marked;
                }
            });
        },
    );
    // The machine's teardown counts what the VM still holds: no handle may
    // outlive it.
    drop(vm);
    let ns = t.as_nanos() as u64;
    r.line(format!(
        "Reading while memory is marked idle time: {} ({concurrent_marks} pages marked meanwhile)",
        secs(ns)
    ));
    r.phase("read_while_aging", ns);
    let per_access = ns / (pages / u64::from(shape.vcpus)).max(1);
    r.line(format!(
        "mmu_lock taken {aging_locks} times and {} remote TLB flushes during the marks; access-tracked entries restored by the fast path {}, by the slow path {}",
        aging_flushes, aging.access_restored_fast, aging.access_restored_slow
    ));
    r.put("mark_idle_ns", marks_ns);
    r.put("still_idle_percent", serde_json::json!(idle_pct));
    r.put("aging_mmu_lock_acquisitions", aging_locks);
    r.put("aging_tlb_flushes", aging_flushes);
    r.put("access_restored_fast", aging.access_restored_fast);
    r.put("access_restored_slow", aging.access_restored_slow);
    r.put("pages_marked_while_reading", concurrent_marks);
    r.put("read_while_aging_ns_per_page", per_access);
    r.put("efaults", super::sum(&reports, |x| x.counters.efaults));
    r.put("access_tracking_errors", bad);
    let code = env.finish(r)?;
    Ok(if bad > 0 { 1 } else { code })
}
