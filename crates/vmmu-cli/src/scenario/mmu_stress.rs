//! `mmu-stress` (mmu_stress_test): write, reset the MMU context, rewrite, read,
//! mprotect read-only (every store must fail with EFAULT), read-write again.
//! With `--aliases N` the same host memory is installed as N aliased memslots
//! and each vCPU works through one of them.

use std::time::Instant;

use vmmu::{Gpa, Hva, HvaRange, UserMemoryRegion};
use vmmu_machine::guest::{Pattern, RefModel};
use vmmu_machine::Backing;

use super::{build, sum, REGION_GPA, REGION_HVA};
use crate::args::Common;
use crate::report::{secs, Report};

/// Check the flags (before anything is allocated).
pub fn validate(common: &Common) -> anyhow::Result<(crate::args::Shape, u32, Common)> {
    let aliases = common.aliases.unwrap_or(1);
    let mut c = common.clone();
    c.slots = Some(1);
    let shape = c.shape(2, 256 << 20, 1, Backing::Shmem)?;
    if aliases == 0 || aliases > 512 {
        anyhow::bail!(crate::args::BadInput(format!(
            "--aliases {aliases}: aliased memslots must be 1..=512"
        )));
    }
    Ok((shape, aliases, c))
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let (shape, aliases, c) = validate(common)?;
    let mut env = build(&c, shape)?;
    // Extra aliases of the same host memory at consecutive guest addresses.
    for a in 1..aliases as u64 {
        env.m.set_memslot(UserMemoryRegion {
            slot: 1 + a as u32,
            flags: 0,
            guest_phys_addr: REGION_GPA + a * shape.total,
            memory_size: shape.total,
            userspace_addr: REGION_HVA,
        })?;
    }
    let mut r = Report::new("mmu-stress", &shape);
    r.line(format!(
        "Running with {} of guest memory and {} vCPUs ({} aliased memslots)",
        crate::args::human(shape.total),
        shape.vcpus,
        aliases
    ));
    // vCPU i works through alias i % aliases on its own host chunk.
    let models: Vec<RefModel> = (0..shape.vcpus as u64)
        .map(|i| {
            let alias = i % aliases as u64;
            RefModel::new(
                Gpa(REGION_GPA + alias * shape.total + i * shape.bytes_per_vcpu),
                shape.bytes_per_vcpu / 4096,
            )
        })
        .collect();
    let pages = shape.total / 4096;

    r.line("Waiting for vCPUs to finish run 1...");
    let (models, _, run1) = env.pass("run1", models, 1, Pattern::Sequential, 100, |_| {});
    let t = Instant::now();
    for v in env.m.vcpus() {
        // Reset the MMU context: unload the root and load it again (the root is
        // preserved by the MMU's own reference and comes back from the cache).
        v.mmu.set_smm(true)?;
        let _ = v.mmu.prepare_entry();
        v.mmu.set_smm(false)?;
        let _ = v.mmu.prepare_entry();
    }
    let reset = t.elapsed();
    r.line("Waiting for vCPUs to finish run 2...");
    let (models, _, run2) = env.pass("run2", models, 2, Pattern::Sequential, 100, |_| {});
    r.line("Waiting for vCPUs to finish reading...");
    let (models, _, read) = env.pass("read", models, 3, Pattern::Sequential, 0, |_| {});
    let range = HvaRange::new(Hva(REGION_HVA), Hva(REGION_HVA + shape.total));
    let t = Instant::now();
    env.m.host.mprotect(range, false);
    let ro_call = t.elapsed();
    r.line("Waiting for vCPUs to finish the read-only stage (every store must fail)...");
    let (models, ro_reports, ro) = env.pass("ro", models, 4, Pattern::Sequential, 100, |_| {});
    let ro_efaults = sum(&ro_reports, |x| x.counters.efaults);
    env.m.host.mprotect(range, true);
    r.line("Waiting for vCPUs to finish the read-write stage...");
    let (models, rw_reports, rw) = env.pass("rw", models, 5, Pattern::Sequential, 100, |_| {});
    let rw_efaults = sum(&rw_reports, |x| x.counters.efaults);
    let (_, _, verify) = env.pass("verify", models, 6, Pattern::Sequential, 0, |_| {});
    r.line(format!(
        "run1 = {}, reset = {}, run2 = {}, ro = {}, rw = {}",
        secs(run1.as_nanos() as u64),
        secs(reset.as_nanos() as u64),
        secs(run2.as_nanos() as u64),
        secs(ro.as_nanos() as u64),
        secs(rw.as_nanos() as u64)
    ));
    for (n, d) in [
        ("run1", run1),
        ("reset", reset),
        ("run2", run2),
        ("read", read),
        ("ro", ro),
        ("rw", rw),
        ("verify", verify),
    ] {
        r.phase(n, d.as_nanos() as u64);
    }
    r.put("mprotect_ro_call_ns", ro_call.as_nanos() as u64);
    r.put("ro_stage_stores", pages);
    r.put("ro_stage_efaults", ro_efaults);
    r.put("rw_stage_efaults", rw_efaults);
    r.put("aliases", aliases);
    let code = env.finish(r)?;
    if ro_efaults != pages {
        eprintln!("vmmu: mmu-stress: {ro_efaults} of {pages} stores failed in the read-only stage; every store must fail");
        return Ok(1);
    }
    if rw_efaults != 0 {
        eprintln!(
            "vmmu: mmu-stress: {rw_efaults} stores failed after the memory was made writable again"
        );
        return Ok(1);
    }
    Ok(code)
}
