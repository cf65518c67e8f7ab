//! `vmmu bench conversions`: how many private/shared conversions per second
//! the guests get, with 4 KiB and 2 MiB ranges, one and two vCPUs converting.
//!
//! Each vCPU owns a chunk of a software-protected VM's guest_memfd-backed
//! memory, first written shared page by page. Then, round after round, it
//! walks its chunk range by range: a `KVM_HC_MAP_GPA_RANGE` hypercall for the
//! range (the VMM sets the attributes, which zaps what was mapped there, then
//! discards the side the range left: `MADV_DONTNEED` of the shared pages or a
//! punch-hole of the private ones), then a write to the range's first page on
//! its new side (a fault). Rounds alternate private and shared. What is timed
//! is the whole run of the conversion rounds, on all vCPUs at once: the exit,
//! the VMM's work, the MMU's zap and flush, the discard and the fault after.

use std::time::Instant;

use serde_json::{json, Value};
use vmmu::{Gpa, Hva, UserMemoryRegion, VmType};
use vmmu_machine::guest::{AccessKind, GuestAccess, MapGpaHow, Script};
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

use crate::args::{human, BadInput};
use crate::cli::BenchConversionsArgs;

const GPA: u64 = 1 << 32;
const HVA: u64 = 0x200_0000_0000;
const PAGE: u64 = 4096;
const RANGES: [u64; 2] = [PAGE, 2 << 20];

/// One configuration's figures.
struct Figures {
    range: u64,
    vcpus: u32,
    conversions: u64,
    ns: u64,
    mmu_ns: u64,
    leaves_zapped: u64,
    private_faults: u64,
    violations: u64,
}

impl Figures {
    fn per_sec(&self) -> f64 {
        self.conversions as f64 * 1e9 / self.ns.max(1) as f64
    }
    fn json(&self) -> Value {
        json!({
            "range_bytes": self.range,
            "vcpus": self.vcpus,
            "conversions": self.conversions,
            "elapsed_ns": self.ns,
            "conversions_per_sec": self.per_sec().round(),
            "ns_per_conversion": self.ns as f64 * self.vcpus as f64 / self.conversions.max(1) as f64,
            "mmu_ns_per_conversion": self.mmu_ns / self.conversions.max(1),
            "leaves_zapped_per_conversion": self.leaves_zapped as f64 / self.conversions.max(1) as f64,
            "private_faults": self.private_faults,
            "violations": self.violations,
        })
    }
}

/// Check the flags.
pub fn validate(a: &BenchConversionsArgs) -> anyhow::Result<()> {
    if a.bytes < 2 << 20 || !a.bytes.is_multiple_of(2 << 20) || a.bytes > 1 << 30 {
        anyhow::bail!(BadInput(format!(
            "-b {}: memory per vCPU must be a multiple of 2M from 2M to 1G",
            human(a.bytes)
        )));
    }
    if a.iterations == 0 || a.iterations > 1000 {
        anyhow::bail!(BadInput(format!(
            "-i {}: rounds of conversions must be 1 to 1000",
            a.iterations
        )));
    }
    Ok(())
}

fn one(a: &BenchConversionsArgs, range: u64, vcpus: u32) -> anyhow::Result<Figures> {
    let total = a.bytes * vcpus as u64;
    let mut m = Machine::new(
        MachineConfig {
            memory_bytes: 2 * total + (1 << 30),
            vm: vmmu::VmConfig {
                vm_type: VmType::SwProtected,
                ..vmmu::VmConfig::default()
            },
            oracle: a.flags.oracle,
            poison: true,
            dirty_ring: 0,
        },
        vcpus,
    )?;
    m.map(Hva(HVA), total, Backing::Anonymous)?;
    m.vmm.create_gmem_slot(UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: GPA,
        memory_size: total,
        userspace_addr: HVA,
    })?;
    let chunk = |v: u32| GPA + v as u64 * a.bytes;
    let write = |gpa: u64, private: bool| GuestAccess {
        gpa: Gpa(gpa),
        kind: AccessKind::Write(gpa),
        private,
    };
    // Everything written shared first, so the first round has leaves to zap.
    let warm: Vec<Script> = (0..vcpus)
        .map(|v| {
            Script::new(
                (0..a.bytes / PAGE)
                    .map(|p| write(chunk(v) + p * PAGE, false))
                    .collect(),
            )
        })
        .collect();
    m.run(warm, &RunOptions::default(), |_| {});
    let progs: Vec<Script> = (0..vcpus)
        .map(|v| {
            let mut s = Vec::new();
            for round in 0..a.iterations {
                let private = round % 2 == 0;
                for r in 0..a.bytes / range {
                    let gpa = chunk(v) + r * range;
                    s.push(GuestAccess {
                        gpa: Gpa(gpa),
                        kind: AccessKind::MapGpaRange {
                            size: range,
                            private,
                            how: MapGpaHow::Convert,
                        },
                        private,
                    });
                    s.push(write(gpa, private));
                }
            }
            Script::new(s)
        })
        .collect();
    let before = m.vm.stats();
    let c0 = conversions(&m);
    let mmu0 = m
        .vmm
        .counters
        .attributes_ns
        .load(std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    let out = m.run(progs, &RunOptions::default(), |_| {});
    let ns = t.elapsed().as_nanos() as u64;
    let st = m.vm.stats().since(&before);
    let done = conversions(&m) - c0;
    let mmu_ns = m
        .vmm
        .counters
        .attributes_ns
        .load(std::sync::atomic::Ordering::Relaxed)
        - mmu0;
    let failed: u64 = out
        .iter()
        .flat_map(|(s, _)| s.results.iter())
        .filter(|(_, r)| {
            !matches!(
                r,
                vmmu_machine::guest::AccessResult::Hypercall(0)
                    | vmmu_machine::guest::AccessResult::Memory(_)
            )
        })
        .count() as u64;
    let violations = m.oracle.total();
    let t = m.teardown();
    anyhow::ensure!(
        failed == 0,
        "{failed} conversions or accesses failed ({} B ranges, {vcpus} vCPUs)",
        range
    );
    anyhow::ensure!(
        t.leaked_data_pages + t.leaked_table_pages + t.double_frees == 0,
        "teardown found leaks: {t:?}"
    );
    Ok(Figures {
        range,
        vcpus,
        conversions: done,
        ns,
        mmu_ns,
        leaves_zapped: st.leaves_zapped,
        private_faults: st.private_faults,
        violations,
    })
}

fn conversions(m: &Machine) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    m.vmm.counters.to_private.load(Relaxed) + m.vmm.counters.to_shared.load(Relaxed)
}

/// Run it.
pub fn run(a: &BenchConversionsArgs) -> anyhow::Result<i32> {
    validate(a)?;
    let mut all = Vec::new();
    for range in RANGES {
        for vcpus in [1, 2] {
            all.push(one(a, range, vcpus)?);
        }
    }
    let violations: u64 = all.iter().map(|f| f.violations).sum();
    if a.flags.json {
        println!(
            "{}",
            json!({
                "mode": "bench",
                "scenario": "conversions",
                "config": crate::report::config_json(
                    "bench conversions",
                    serde_json::to_value(a).unwrap_or_default(),
                    &vmmu::VmConfig { vm_type: VmType::SwProtected, ..vmmu::VmConfig::default() },
                    a.flags.oracle,
                ),
                "runs": all.iter().map(Figures::json).collect::<Vec<_>>(),
                "violations": violations,
            })
        );
    } else {
        use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
        println!(
            "Conversions of {} per vCPU, {} rounds (alternately to private and to shared), each followed by a write on the new side; all figures from this one run.\n",
            human(a.bytes),
            a.iterations
        );
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "range",
            "vCPUs",
            "conversions",
            "conversions/s",
            "us per conversion per vCPU",
            "of which in the MMU (us)",
            "leaves zapped per conversion",
        ]);
        for f in &all {
            t.add_row(vec![
                human(f.range),
                f.vcpus.to_string(),
                f.conversions.to_string(),
                format!("{:.0}", f.per_sec()),
                format!(
                    "{:.2}",
                    f.ns as f64 * f.vcpus as f64 / f.conversions.max(1) as f64 / 1e3
                ),
                format!("{:.2}", f.mmu_ns as f64 / f.conversions.max(1) as f64 / 1e3),
                format!(
                    "{:.1}",
                    f.leaves_zapped as f64 / f.conversions.max(1) as f64
                ),
            ]);
        }
        println!("{t}");
        println!("{}", crate::report::host_line());
        if a.flags.oracle {
            println!("oracle violations: {violations}");
        }
    }
    Ok(if violations > 0 { 1 } else { 0 })
}
