//! `memslot-churn` (memslot_modification_stress_test plus the delete/move
//! semantics of set_memory_region_test): vCPUs keep writing and verifying while
//! slots are created, deleted and moved. Accesses to a deleted or moved-away
//! slot must reach MMIO emulation, never stale memory (the oracle checks every
//! access against the memslots published when the vCPU entered).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmmu::UserMemoryRegion;
use vmmu_machine::Backing;

use super::{build, sum, REGION_GPA, REGION_HVA};
use crate::args::Common;
use crate::report::{secs, Report};

/// Check the flags (before anything is allocated).
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    Ok(common.shape(1, 256 << 20, 10, Backing::Anonymous)?)
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let mut env = build(common, shape)?;
    let mut r = Report::new("memslot-churn", &shape);
    r.line("Memslot zap quirk enabled");
    r.line("Finished creating vCPUs");
    let per_slot = shape.total / shape.slots as u64;
    let slot1 = UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: REGION_GPA,
        memory_size: per_slot,
        userspace_addr: REGION_HVA,
    };
    let dummy = UserMemoryRegion {
        slot: 7000,
        flags: 0,
        guest_phys_addr: REGION_GPA - 4096,
        memory_size: 4096,
        userspace_addr: REGION_HVA - (2 << 20),
    };
    env.m.map(
        vmmu::Hva(REGION_HVA - (2 << 20)),
        2 << 20,
        Backing::Anonymous,
    )?;
    let (progs, opts, stop) = env.repeating(shape.write_percent.min(50));
    r.line("Started all vCPUs");
    let iterations = shape.iterations;
    let delay = Duration::from_micros(common.delay_us);
    let mut op_ns: Vec<(&str, u64, u64)> = vec![
        ("dummy_create", 0, 0),
        ("dummy_delete", 0, 0),
        ("move_away", 0, 0),
        ("move_back", 0, 0),
        ("delete", 0, 0),
        ("recreate", 0, 0),
    ];
    let t0 = Instant::now();
    let trace = env.trace.clone();
    let out = env.m.run(progs, &opts, |ctx| {
        let mut timed =
            |i: usize, f: &dyn Fn() -> Result<(), vmmu::MemslotError>| -> anyhow::Result<()> {
                // The selftest's -d: a pause between memslot changes.
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                let s = Instant::now();
                f()?;
                let e = Instant::now();
                op_ns[i].1 += (e - s).as_nanos() as u64;
                op_ns[i].2 += 1;
                if let Some(t) = &trace {
                    t.host_span(op_ns[i].0, s, e, serde_json::json!({}));
                }
                Ok(())
            };
        let res: anyhow::Result<()> = (|| {
            // Let the vCPUs fault everything in first.
            std::thread::sleep(Duration::from_millis(20));
            for _ in 0..iterations {
                timed(0, &|| ctx.vm.set_user_memory_region(dummy))?;
                timed(1, &|| {
                    ctx.vm.set_user_memory_region(UserMemoryRegion {
                        memory_size: 0,
                        ..dummy
                    })
                })?;
                timed(2, &|| {
                    ctx.vm.set_user_memory_region(UserMemoryRegion {
                        guest_phys_addr: REGION_GPA + (64 << 30),
                        ..slot1
                    })
                })?;
                std::thread::sleep(Duration::from_millis(1));
                timed(3, &|| ctx.vm.set_user_memory_region(slot1))?;
                timed(4, &|| {
                    ctx.vm.set_user_memory_region(UserMemoryRegion {
                        memory_size: 0,
                        ..slot1
                    })
                })?;
                std::thread::sleep(Duration::from_millis(1));
                timed(5, &|| ctx.vm.set_user_memory_region(slot1))?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Release);
        if let Err(e) = res {
            eprintln!("vmmu: memslot-churn: {e}");
        }
    });
    let elapsed = t0.elapsed();
    r.line("All vCPU threads joined");
    let reports: Vec<_> = out.iter().map(|(_, x)| x).collect();
    let passes: u64 = out.iter().map(|(p, _)| p.pass_number() as u64).sum();
    if let Some(t) = &env.trace {
        for x in &reports {
            t.faults(x);
        }
    }
    let owned: Vec<_> = out.into_iter().map(|(_, x)| x).collect();
    r.phase("run", elapsed.as_nanos() as u64);
    r.put("iterations", iterations);
    r.put("vcpu_passes", passes);
    r.put("accesses", sum(&owned, |x| x.counters.accesses));
    r.put("mmio_exits", sum(&owned, |x| x.counters.mmio));
    for (name, ns, n) in &op_ns {
        r.put(&format!("{name}_avg_ns"), if *n > 0 { ns / n } else { 0 });
    }
    r.line(format!(
        "Memslot operations: {} in {}",
        op_ns.iter().map(|o| o.2).sum::<u64>(),
        secs(elapsed.as_nanos() as u64)
    ));
    env.finish(r)
}
