//! `roots`: fast zaps of roots while vCPUs run and enter and leave SMM (each
//! switch swaps the current root with one from the previous-roots cache). SMM
//! sees the same memory through address space 1. Half the zaps invalidate every
//! root, half only the SMM address space's: a vCPU in SMM then holds a valid
//! cached normal root, which must survive its "free obsolete roots" request while
//! its obsolete SMM root is dropped.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmmu::RootFilter;
use vmmu_machine::Backing;

use super::{build, sum};
use crate::args::Common;
use crate::report::Report;

/// Check the flags (before anything is allocated).
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    if common.mmu == vmmu::MmuKind::Shadow {
        return super::roots_shadow::validate(common);
    }
    Ok(common.shape(2, 64 << 20, 20, Backing::Anonymous)?)
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    if common.mmu == vmmu::MmuKind::Shadow {
        // SMM switches reset a shadow MMU's roots: processes instead.
        return super::roots_shadow::run(common);
    }
    let shape = validate(common)?;
    let mut env = build(common, shape)?;
    // SMM sees the same memory through address space 1, as KVM mirrors memslots.
    let per_slot = shape.total / shape.slots as u64;
    for i in 0..shape.slots as u64 {
        env.m.set_memslot(vmmu::UserMemoryRegion {
            slot: (1 << 16) | (1 + i as u32),
            flags: 0,
            guest_phys_addr: super::REGION_GPA + i * per_slot,
            memory_size: per_slot,
            userspace_addr: super::REGION_HVA + i * per_slot,
        })?;
    }
    let mut r = Report::new("roots", &shape);
    let (progs, mut opts, stop) = env.repeating(50);
    opts.smm_toggle_every = Some(2048);
    let smm = std::sync::Arc::new(vmmu_machine::SmmState::new(shape.vcpus));
    opts.smm_state = Some(smm.clone());
    let iterations = shape.iterations;
    let trace = env.trace.clone();
    let mut all_zaps = 0u64;
    let mut smm_zaps = 0u64;
    let t0 = Instant::now();
    let out = env.m.run(progs, &opts, |ctx| {
        // Zaps are paced by the vCPUs' progress, not by the clock, so a loaded
        // machine still interleaves role switches with zaps: before each zap the
        // vCPUs switch roles twice each, and an SMM-only zap waits for a vCPU in
        // SMM (the case where a valid cached root must survive). Bounded waits:
        // a vCPU that cannot progress is the oracle's "stuck".
        let wait = |cond: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !cond() && !ctx.done() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        for i in 0..iterations {
            let filter = if i % 2 == 0 {
                RootFilter::All
            } else {
                RootFilter::AddressSpace(1)
            };
            let base = smm.switches.load(Ordering::Acquire);
            wait(&|| smm.switches.load(Ordering::Acquire) >= base + 2 * shape.vcpus as u64);
            let kept_before = ctx.vm.stats().prev_roots_kept;
            if i % 2 == 1 {
                // Catch a vCPU in SMM and keep it there until it has handled the
                // zap: its cached normal root must survive the request.
                for _ in 0..1000 {
                    wait(&|| smm.any_in_smm());
                    smm.hold.store(true, Ordering::Release);
                    // A switch already under way when the hold was set may have
                    // just left SMM: look again, and retry if so.
                    std::thread::sleep(Duration::from_micros(50));
                    if smm.any_in_smm() || ctx.done() {
                        break;
                    }
                    smm.hold.store(false, Ordering::Release);
                }
            }
            let s = Instant::now();
            // The scenario's VM has both address spaces: never refused.
            let _ = ctx.vm.invalidate_roots(filter);
            if let Some(t) = &trace {
                t.host_span(
                    if i % 2 == 0 {
                        "zap_all_roots"
                    } else {
                        "zap_smm_roots"
                    },
                    s,
                    Instant::now(),
                    serde_json::json!({}),
                );
            }
            if i % 2 == 0 {
                all_zaps += 1;
            } else {
                smm_zaps += 1;
                wait(&|| ctx.vm.stats().prev_roots_kept > kept_before);
                smm.hold.store(false, Ordering::Release);
            }
        }
        stop.store(true, Ordering::Release);
    });
    let elapsed = t0.elapsed();
    let owned: Vec<_> = out.into_iter().map(|(_, x)| x).collect();
    if let Some(t) = &env.trace {
        for x in &owned {
            t.faults(x);
        }
    }
    // Let every vCPU handle its pending requests once more, as it would before
    // its next entry.
    for v in env.m.vcpus() {
        let _ = v.mmu.prepare_entry();
    }
    let st = env.m.vm.stats();
    let roots = env.m.vm.roots();
    let invalid_left = roots.iter().filter(|x| !x.valid).count();
    r.phase("run", elapsed.as_nanos() as u64);
    r.put("zaps_all_roots", all_zaps);
    r.put("zaps_smm_roots", smm_zaps);
    r.put("accesses", sum(&owned, |x| x.counters.accesses));
    r.put("prev_roots_kept", st.prev_roots_kept);
    r.put("obsolete_roots_dropped", st.obsolete_roots_dropped);
    r.put("prev_root_hits", st.prev_root_hits);
    r.put("live_roots", roots.len() as u64);
    r.put("invalid_roots_left", invalid_left as u64);
    r.line(format!(
        "roots: created {}, invalidated {}, freed {}; previous roots kept valid {} times, obsolete roots dropped {}",
        st.roots_created, st.roots_invalidated, st.roots_freed, st.prev_roots_kept, st.obsolete_roots_dropped
    ));
    let freed_all = st.roots_freed == st.roots_invalidated;
    let kept = st.prev_roots_kept > 0 || smm_zaps == 0;
    let code = env.finish(r)?;
    if invalid_left > 0 || !freed_all {
        eprintln!(
            "vmmu: roots: {invalid_left} invalid roots left after every vCPU handled its requests"
        );
        return Ok(1);
    }
    if !kept {
        eprintln!("vmmu: roots: no valid cached previous root survived an SMM-only zap");
        return Ok(1);
    }
    Ok(code)
}
