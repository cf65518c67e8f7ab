//! `access` (kvm-unit-tests' `x86/access`): a guest with paging on sets up,
//! case by case, every combination of PTE and PDE bits (present, writable,
//! user, accessed, dirty, NX, reserved bit 51; PDE page size and reserved bit
//! 13), paging mode (EFER.NX, CR0.WP, SMEP, SMAP and EFLAGS.AC) and access
//! (user or supervisor read, write or fetch, once or after a read), runs the
//! access through its own tables and reads the entries back. Each case must
//! give the fault (and error code) or the address, and the Accessed/Dirty
//! updates, of the oracle's reference walk; the oracle also checks every
//! access of the run on its own. On the TDP MMU (the default) the guest's
//! walk is the processor's; with `--mmu shadow` it is the shadow MMU's, and
//! every case's table writes are emulated stores to shadowed tables.
//!
//! Reported: cases run, cases that faulted, cases that disagreed (with the
//! first few named by their flags), and the time per case.

use std::time::Instant;

use vmmu::Gpa;
use vmmu_machine::access_test::{case_count, AccessTest};
use vmmu_machine::Backing;

use super::{build, REGION_GPA};
use crate::args::{BadInput, Common, Shape};
use crate::report::{secs, Report};

/// Guest memory the cases use (tables at 1 MiB, data at 4 MiB).
const BYTES: u64 = 8 << 20;

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<Shape> {
    let stride = common.stride.unwrap_or(1);
    if stride == 0 || stride > case_count() {
        return Err(BadInput(format!(
            "--stride {stride}: must be 1..={} (one case in N is run)",
            case_count()
        ))
        .into());
    }
    Ok(common.shape(1, BYTES, 1, Backing::Anonymous)?)
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let stride = common.stride.unwrap_or(1);
    let mut env = build(common, shape)?;
    let mut r = Report::new("access", &shape);
    let total = case_count();
    let mmu = match common.mmu {
        vmmu::MmuKind::Tdp => "TDP (the guest's walk is the processor's)",
        vmmu::MmuKind::Shadow => "shadow (the guest's walk is the MMU's)",
    };
    r.line(format!(
        "Cases: about one in {stride} of {total}; MMU: {mmu}"
    ));
    let t = Instant::now();
    let prog = AccessTest::new(Gpa(REGION_GPA), stride).with_seed(common.seed);
    let out = env.m.run(vec![prog], &Default::default(), |_| {});
    let ns = t.elapsed().as_nanos() as u64;
    let (p, rep) = out
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no vCPU ran"))?;
    r.phase("cases", ns);
    r.line(format!(
        "{} cases in {} ({} ns per case); {} faulted; {} disagreed with the reference",
        p.cases,
        secs(ns),
        ns / p.cases.max(1),
        p.faulted,
        p.failures
    ));
    for f in &p.failed {
        r.line(format!("FAIL: {f}"));
    }
    r.put("cases", p.cases);
    r.put("cases_total", total);
    r.put("stride", stride);
    r.put("cases_faulted", p.faulted);
    r.put("case_failures", p.failures);
    r.put("failed_cases", serde_json::json!(p.failed));
    r.put("guest_page_faults", rep.counters.guest_page_faults);
    r.put("ept_violations", rep.counters.violations);
    r.put("shadow_pf_exits", rep.counters.shadow_pf_exits);
    r.put("emulated_writes", rep.counters.emulated_writes);
    r.put("paging_exits", rep.counters.paging_exits);
    let code = env.finish(r)?;
    Ok(if p.failures > 0 { 1 } else { code })
}
