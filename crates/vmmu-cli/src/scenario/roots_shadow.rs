//! `roots --mmu shadow`: the roots scenario on the shadow MMU. A shadow
//! VM's roots are the shadow pages of the guests' top-level tables, so the
//! vCPUs run kernels with processes (CR3 switches through the
//! previous-roots cache, processes that end and so zap their root while a
//! vCPU may still cache it) instead of SMM switches, which reset a shadow
//! MMU's roots altogether. The host zaps every root at paced intervals (a
//! fast zap, as a memslot change does): then every vCPU drops every slot.
//! Between those, each process exit zaps one root and a vCPU must drop only
//! the slots naming it, keeping its other cached roots.
//!
//! Checked: the guests' own reads and protection faults, the oracle, no
//! zapped root still held once every vCPU has handled its requests, and at
//! least one valid cached root kept through a single-root zap.

use std::time::{Duration, Instant};

use vmmu::RootFilter;
use vmmu_machine::guest::GuestProgram;

use super::build;
use crate::args::{Common, Shape};
use crate::report::Report;

/// Kernel operations per vCPU and host zap.
const OPS_PER_ZAP: u64 = 1_000;
/// CR3 switches (all vCPUs) between two host zaps.
const SWITCHES_PER_ZAP: u64 = 100;

/// Check the flags (the shape: 2 vCPUs × 8 MiB, 20 host zaps).
pub fn validate(common: &Common) -> anyhow::Result<Shape> {
    super::shadow_process_churn::kernel_shape(common, 20, "roots --mmu shadow ")
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let mut env = build(common, shape)?;
    let mut r = Report::new("roots", &shape);
    let ops = OPS_PER_ZAP * shape.iterations.max(1) as u64;
    let progs = super::shadow_process_churn::kernels(shape, ops, common.seed);
    let iterations = shape.iterations;
    let mut all_zaps = 0u64;
    let t0 = Instant::now();
    let out = env.m.run(progs, &Default::default(), |ctx| {
        // Paced by the guests' CR3 switches, not the clock, so a loaded
        // machine still interleaves switches and zaps.
        let switches = || {
            let s = ctx.vm.stats();
            s.prev_root_hits + s.prev_root_misses
        };
        for _ in 0..iterations {
            let base = switches();
            let t = Instant::now();
            while switches() < base + SWITCHES_PER_ZAP
                && !ctx.done()
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            if ctx.done() {
                break;
            }
            // Every VM has address space 0: `All` is never refused.
            let _ = ctx.vm.invalidate_roots(RootFilter::All);
            all_zaps += 1;
        }
    });
    let elapsed = t0.elapsed();
    // Every vCPU handles its pending requests once more, as it would before
    // its next entry.
    for v in env.m.vcpus() {
        let _ = v.mmu.prepare_entry();
    }
    let st = env.m.vm.stats();
    let info = env.m.vm.shadow_info();
    let mismatches: u64 = out.iter().map(|(p, _)| p.mismatches()).sum();
    let first = out.iter().find_map(|(p, _)| p.first_mismatch());
    let exited: u64 = out.iter().map(|(p, _)| p.counters.exited).sum();
    r.phase("run", elapsed.as_nanos() as u64);
    r.put("zaps_all_roots", all_zaps);
    r.put("processes_exited", exited);
    r.put(
        "accesses",
        out.iter().map(|(_, x)| x.counters.accesses).sum::<u64>(),
    );
    r.put("root_loads", st.shadow_root_loads);
    r.put(
        "root_loads_per_vcpu",
        st.shadow_root_loads as f64 / shape.vcpus.max(1) as f64,
    );
    r.put("prev_root_hits", st.prev_root_hits);
    r.put("prev_root_misses", st.prev_root_misses);
    r.put("prev_roots_kept", st.prev_roots_kept);
    r.put("obsolete_roots_dropped", st.obsolete_roots_dropped);
    r.put("shadow_pages_zapped", st.shadow_pages_zapped);
    r.put("invalid_roots_left", info.invalid_roots);
    r.put("guest_mismatches", mismatches);
    r.line(format!(
        "shadow roots: {all_zaps} zaps of every root, {exited} processes ended (each zapping its root); root loads {} ({:.1} per vCPU), previous-root hits {} / misses {}, cached roots kept through a zap {} times, obsolete slots dropped {}",
        st.shadow_root_loads,
        st.shadow_root_loads as f64 / shape.vcpus.max(1) as f64,
        st.prev_root_hits,
        st.prev_root_misses,
        st.prev_roots_kept,
        st.obsolete_roots_dropped
    ));
    let code = env.finish(r)?;
    if mismatches > 0 {
        eprintln!(
            "vmmu: roots --mmu shadow: {mismatches} guest checks failed; first: {}",
            first.as_deref().unwrap_or("?")
        );
        return Ok(1);
    }
    if info.invalid_roots > 0 {
        eprintln!(
            "vmmu: roots --mmu shadow: {} zapped roots still held after every vCPU handled its requests",
            info.invalid_roots
        );
        return Ok(1);
    }
    if st.prev_roots_kept == 0 {
        eprintln!("vmmu: roots --mmu shadow: no valid cached root survived a single-root zap");
        return Ok(1);
    }
    Ok(code)
}
