//! `shadow-process-churn`: guests running many short-lived processes on
//! several vCPUs under the shadow MMU — the workload of the "zap only
//! obsolete roots" discussion. Each vCPU runs a kernel that spawns processes
//! (page tables built by stores to guest memory, a CR3 load), switches
//! between live ones (CR3 loads with the no-flush bit), remaps and
//! write-protects their pages, and ends them (its tables cleared, which
//! floods and zaps their shadow pages: the root too, usually while the vCPU
//! still has it cached).
//!
//! It runs twice on the same seed: with the fix (a vCPU drops only the root
//! slots that name zapped roots) and with `legacy_root_reload` (before the
//! fix: every root zap makes every vCPU drop every root it holds). Reported
//! for each: root loads per vCPU, previous-root hits and misses on switches,
//! roots zapped, slots dropped, fault rate. Upstream gave no number; this is
//! it, on this model.

use std::time::Instant;

use serde_json::json;
use vmmu::Gpa;
use vmmu_machine::guest::GuestProgram;
use vmmu_machine::processes::ProcessChurn;
use vmmu_machine::Backing;

use super::{build, REGION_GPA};
use crate::args::{BadInput, Common, Shape};
use crate::report::{secs, Report};

/// Processes alive at once per vCPU, and pages each maps.
const MAX_LIVE: usize = 6;
const PAGES: usize = 16;

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<Shape> {
    if common.mmu != vmmu::MmuKind::Shadow {
        return Err(BadInput(
            "shadow-process-churn --mmu tdp: this scenario measures the shadow MMU's roots (leave --mmu at shadow)".into(),
        )
        .into());
    }
    kernel_shape(common, 20_000, "")
}

/// The shape of a run of process kernels (2 vCPUs × 8 MiB by default,
/// `iterations` by default): each kernel needs 1 MiB at least. `what`
/// prefixes the refusal (the command, when it is not this one).
pub(super) fn kernel_shape(common: &Common, iterations: u32, what: &str) -> anyhow::Result<Shape> {
    let shape = common.shape(2, 8 << 20, iterations, Backing::Anonymous)?;
    if shape.bytes_per_vcpu < 1 << 20 {
        return Err(BadInput(format!(
            "{what}-b {}: each vCPU's kernel needs at least 1M",
            crate::args::human(shape.bytes_per_vcpu)
        ))
        .into());
    }
    Ok(shape)
}

/// One process kernel per vCPU, each in its own part of the region,
/// `ops` kernel operations long.
pub(super) fn kernels(shape: Shape, ops: u64, seed: u64) -> Vec<ProcessChurn> {
    (0..shape.vcpus)
        .map(|v| {
            ProcessChurn::new(
                v,
                Gpa(REGION_GPA + v as u64 * shape.bytes_per_vcpu),
                shape.bytes_per_vcpu,
                PAGES,
                MAX_LIVE,
                ops,
                seed,
            )
        })
        .collect()
}

/// One run's figures.
struct Side {
    ns: u64,
    accesses: u64,
    mismatches: u64,
    first_mismatch: Option<String>,
    spawned: u64,
    exited: u64,
    switches: u64,
    stats: vmmu::Stats,
    violations: u64,
    leaked: u64,
}

fn run_side(common: &Common, shape: Shape, legacy: bool) -> anyhow::Result<(Side, super::Env)> {
    let c = Common {
        legacy_root_reload: legacy,
        ..common.clone()
    };
    let mut env = build(&c, shape)?;
    let progs = kernels(shape, shape.iterations as u64, common.seed);
    let t = Instant::now();
    let out = env.m.run(progs, &Default::default(), |_| {});
    let ns = t.elapsed().as_nanos() as u64;
    let side = Side {
        ns,
        accesses: out.iter().map(|(_, r)| r.counters.accesses).sum(),
        mismatches: out.iter().map(|(p, _)| p.mismatches()).sum(),
        first_mismatch: out.iter().find_map(|(p, _)| p.first_mismatch()),
        spawned: out.iter().map(|(p, _)| p.counters.spawned).sum(),
        exited: out.iter().map(|(p, _)| p.counters.exited).sum(),
        switches: out.iter().map(|(p, _)| p.counters.switches).sum(),
        stats: env.m.vm.stats(),
        violations: env.m.oracle.total(),
        leaked: 0,
    };
    Ok((side, env))
}

fn side_json(s: &Side, vcpus: u32) -> serde_json::Value {
    let st = &s.stats;
    json!({
        "elapsed_ns": s.ns,
        "accesses": s.accesses,
        "processes_spawned": s.spawned,
        "processes_exited": s.exited,
        "switches": s.switches,
        "root_loads": st.shadow_root_loads,
        "root_loads_per_vcpu": st.shadow_root_loads as f64 / vcpus.max(1) as f64,
        "prev_root_hits": st.prev_root_hits,
        "prev_root_misses": st.prev_root_misses,
        "obsolete_roots_dropped": st.obsolete_roots_dropped,
        "root_slots_dropped_legacy": st.roots_reloaded_legacy,
        "shadow_pages_zapped": st.shadow_pages_zapped,
        "shadow_pages_created": st.shadow_pages_created,
        "shadow_flooded": st.shadow_flooded,
        "shadow_pte_writes": st.shadow_pte_writes,
        "shadow_unsynced": st.shadow_unsynced,
        "shadow_synced": st.shadow_synced,
        "shadow_entries_synced": st.shadow_entries_synced,
        "shadow_recycled": st.shadow_recycled,
        "faults": st.faults,
        "faults_per_1000_accesses": st.faults as f64 * 1000.0 / s.accesses.max(1) as f64,
        "mismatches": s.mismatches,
        "violations": s.violations,
    })
}

/// Run it.
pub fn run(common: &Common, vs_kvm: bool) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let mut r = Report::new("shadow-process-churn", &shape);
    // Before the fix first, then with it (the report's environment).
    let (mut legacy, env) = run_side(common, shape, true)?;
    let teardown = env.m.teardown();
    legacy.leaked = teardown.leaked_data_pages + teardown.leaked_table_pages;
    let (fixed, env) = run_side(common, shape, false)?;
    for (name, s) in [("fixed", &fixed), ("legacy", &legacy)] {
        let st = &s.stats;
        r.line(format!(
            "{name:>6}: {} switches, {} spawned, {} exited; root loads {} ({:.1} per vCPU), previous-root hits {} / misses {}, shadow pages zapped {}, root slots dropped: {} obsolete, {} by the legacy reload, {:.1} faults per 1000 accesses, {}",
            s.switches,
            s.spawned,
            s.exited,
            st.shadow_root_loads,
            st.shadow_root_loads as f64 / shape.vcpus as f64,
            st.prev_root_hits,
            st.prev_root_misses,
            st.shadow_pages_zapped,
            st.obsolete_roots_dropped,
            st.roots_reloaded_legacy,
            st.faults as f64 * 1000.0 / s.accesses.max(1) as f64,
            secs(s.ns)
        ));
        r.phase(name, s.ns);
        r.put(name, side_json(s, shape.vcpus));
    }
    let saved = legacy.stats.shadow_root_loads as i64 - fixed.stats.shadow_root_loads as i64;
    r.put("root_loads_saved_by_the_fix", saved);
    r.line(format!(
        "the fix saved {saved} root loads ({} with it, {} without)",
        fixed.stats.shadow_root_loads, legacy.stats.shadow_root_loads
    ));
    // vmmu's replay of the KVM schedule failing fails the run.
    let mut replay_failed = false;
    if vs_kvm {
        use super::churn_vs_kvm::NotRun;
        match super::churn_vs_kvm::run(common, &mut r) {
            Ok(v) => {
                let n = v["vmmu_violations"].as_u64().unwrap_or(0);
                if n > 0 {
                    replay_failed = true;
                    r.line(format!(
                        "FAIL (replay of the KVM schedule): {n} oracle violations"
                    ));
                }
                r.put("kvm", v);
            }
            Err(NotRun::Kvm(why)) => {
                r.line(format!("real KVM side not run: {why}"));
                r.put("kvm", json!({ "ran": false, "note": why }));
            }
            Err(NotRun::Vmmu(why)) => {
                replay_failed = true;
                r.line(format!("FAIL (replay of the KVM schedule): {why}"));
                r.put("kvm", json!({ "ran": false, "note": why }));
            }
        }
    }
    r.put("legacy_leaked_pages", legacy.leaked);
    r.put("legacy_violations", legacy.violations);
    let mut bad = replay_failed;
    for (name, s) in [("fixed", &fixed), ("legacy", &legacy)] {
        if s.mismatches > 0 {
            bad = true;
            r.line(format!(
                "FAIL ({name}): {} guest checks failed; first: {}",
                s.mismatches,
                s.first_mismatch.as_deref().unwrap_or("?")
            ));
        }
    }
    if legacy.violations > 0 || legacy.leaked > 0 {
        bad = true;
        r.line(format!(
            "FAIL (legacy): {} oracle violations, {} pages leaked",
            legacy.violations, legacy.leaked
        ));
    }
    let code = env.finish(r)?;
    Ok(if bad { 1 } else { code })
}
