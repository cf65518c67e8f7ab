//! `shadow-process-churn --vs-kvm`: one fixed process-churn schedule on the
//! real KVM's shadow MMU and on vmmu's, counters side by side.
//!
//! The real-KVM side is `vmmu_kvm::process_churn`: a CPL0 kernel, every
//! instruction of which this machine's `kvm_pvm` backend emulates (so its
//! accesses make no shadow page faults and its times are the emulator's).
//! vmmu runs the same schedule (`vmmu_machine::churn_schedule`: the same
//! processes, pages, switches and respawns) on one vCPU of its shadow MMU,
//! with the oracle on. What compares: pages created and zapped, write
//! flooding (each respawn writes its root four times with no fault through
//! it, so both MMUs zap the root: the root-zap path on both), upper-level
//! entries zapped by stores, TLB flushes; vmmu's root loads and
//! previous-root hits have no KVM counter.

use serde_json::json;
use vmmu::Gpa;
use vmmu_kvm::process_churn::{self, ProcessChurnConfig};
use vmmu_machine::churn_schedule::{ChurnSchedule, ChurnShape};
use vmmu_machine::guest::GuestProgram;

use super::{build, REGION_GPA};
use crate::args::Common;
use crate::report::{secs, Report};

/// CR3 switches per phase on both sides.
const SWITCHES: u64 = 4_000;

/// (vmmu counter, KVM statistic, what both count).
const PAIRS: [(&str, &str, &str); 5] = [
    (
        "shadow_pages_created",
        "mmu_cache_miss",
        "shadow pages created",
    ),
    (
        "shadow_pages_zapped",
        "mmu_shadow_zapped",
        "shadow pages zapped",
    ),
    ("shadow_flooded", "mmu_flooded", "zapped for write flooding"),
    (
        "shadow_pde_zapped",
        "mmu_pde_zapped",
        "upper-level entries zapped by a store",
    ),
    ("tlb_flush_local", "tlb_flush", "local TLB flushes"),
];

/// vmmu's side: both phases of the schedule; per phase its time, counter
/// deltas and oracle violations.
fn vmmu_side(common: &Common) -> anyhow::Result<Vec<(u64, vmmu::Stats, u64)>> {
    let shape = ChurnShape {
        processes: process_churn::PROCESSES,
        pages: process_churn::PAGES,
        respawn_every: 0,
        switches: SWITCHES,
    };
    let c = Common {
        vcpus: Some(1),
        bytes: Some(shape.bytes().next_multiple_of(2 << 20)),
        quiet: true,
        mmu: vmmu::MmuKind::Shadow,
        ..common.clone()
    };
    let mut env = build(
        &c,
        c.shape(1, 2 << 20, 1, vmmu_machine::Backing::Anonymous)?,
    )?;
    let mut out = Vec::new();
    for (phase, respawn_every) in [(1, 0), (2, process_churn::RESPAWN_EVERY)] {
        let prog = ChurnSchedule::new(
            Gpa(REGION_GPA),
            ChurnShape {
                respawn_every,
                ..shape
            },
            phase == 1,
        );
        let before = env.m.vm.stats();
        let t = std::time::Instant::now();
        let r = env.m.run(vec![prog], &Default::default(), |_| {});
        let ns = t.elapsed().as_nanos() as u64;
        let mismatches: u64 = r.iter().map(|(p, _)| p.mismatches()).sum();
        if let Some(m) = r.iter().find_map(|(p, _)| p.first_mismatch()) {
            anyhow::bail!(
                "vmmu's replay of the KVM schedule: {mismatches} guest checks failed; first: {m}"
            );
        }
        out.push((ns, env.m.vm.stats().since(&before), 0));
    }
    // Torn down as every scenario is (quietly: `quiet` is set above).
    let (_, violations) = env.finish_counted(Report::default())?;
    if let Some(last) = out.last_mut() {
        last.2 = violations;
    }
    Ok(out)
}

/// Why the comparison has no figures.
#[derive(Debug)]
pub enum NotRun {
    /// The real KVM could not run it (no /dev/kvm, or the run failed): a
    /// note in the report, not a failure of vmmu.
    Kvm(String),
    /// vmmu's replay failed a guest check: a failure of the run.
    Vmmu(String),
}

/// Run both sides; the report gets a line per phase and side.
pub fn run(common: &Common, r: &mut Report) -> Result<serde_json::Value, NotRun> {
    let info = vmmu_kvm::kvm_available().map_err(|e| NotRun::Kvm(format!("/dev/kvm: {e}")))?;
    let kvm = process_churn::run_process_churn(&ProcessChurnConfig { switches: SWITCHES })
        .map_err(|e| NotRun::Kvm(format!("real KVM run failed: {e}")))?;
    let ours = vmmu_side(common).map_err(|e| NotRun::Vmmu(format!("{e:#}")))?;
    r.line(format!(
        "side by side with the real KVM ({}): one kernel switching between {} processes ({} user pages each), {SWITCHES} switches per phase; phase 2 also ends and respawns one every {} switches. KVM emulates every instruction of this CPL0 kernel here: compare counts, not times",
        info.description,
        process_churn::PROCESSES,
        process_churn::PAGES,
        process_churn::RESPAWN_EVERY
    ));
    let mut phases = Vec::new();
    let mut violations = 0;
    for (k, (ns, delta, v)) in kvm.phases.iter().zip(&ours) {
        violations += v;
        let fields = delta.fields();
        let d = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, x)| *x)
        };
        let kv = |name: &str| *k.kvm.get(name).unwrap_or(&0);
        r.line(format!(
            "   {}: vmmu {} / KVM {} ({} instructions emulated); {}; vmmu root loads {}, previous-root hits {} / misses {}, faults {}",
            k.name,
            secs(*ns),
            secs(k.ns),
            kv("insn_emulation"),
            PAIRS
                .iter()
                .map(|(ours, theirs, what)| format!("{what} {} / {}", d(ours), kv(theirs)))
                .collect::<Vec<_>>()
                .join(", "),
            d("shadow_root_loads"),
            d("prev_root_hits"),
            d("prev_root_misses"),
            d("faults"),
        ));
        let pairs: serde_json::Map<String, serde_json::Value> = PAIRS
            .iter()
            .map(|(ours, theirs, _)| {
                (
                    ours.to_string(),
                    json!({"vmmu": d(ours), "kvm": kv(theirs), "kvm_stat": theirs}),
                )
            })
            .collect();
        phases.push(json!({
            "name": k.name,
            "switches": k.switches,
            "respawns": k.respawns,
            "vmmu_ns": ns,
            "kvm_ns": k.ns,
            "counters": pairs,
            "vmmu_root_loads": d("shadow_root_loads"),
            "vmmu_prev_root_hits": d("prev_root_hits"),
            "vmmu_prev_root_misses": d("prev_root_misses"),
            "vmmu_faults": d("faults"),
            "kvm_stats": k.kvm,
        }));
    }
    Ok(json!({
        "description": info.description,
        "phases": phases,
        "vmmu_violations": violations,
    }))
}
