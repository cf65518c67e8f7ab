//! `vmmu bench aging`: one aging pass over populated guest memory while the
//! vCPUs fault, with lockless aging (KVM ≥ 6.15) and under `mmu_lock`
//! (before), in one invocation.
//!
//! The vCPUs first write all of the aged region (so every page has a leaf),
//! then each takes first-touch faults in a region of its own, page by page
//! (every fault takes `mmu_lock` for read). A quarter of the way in, the host
//! ages the aged region page by page through the mmu_notifier
//! (`clear_young`, as page_idle and `folio_referenced` do). Measured: the
//! pass's time, and the vCPUs' fault latency (p50, p99, max) during the pass
//! against outside it.

use serde_json::{json, Value};
use vmmu::{Gpa, Hva, HvaRange, UserMemoryRegion};
use vmmu_machine::guest::{AccessKind, GuestAccess, Script};
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

use super::window::Latency;
use crate::args::{human, BadInput};
use crate::cli::BenchAgingArgs;

const AGED_GPA: u64 = 1 << 32;
const AGED_HVA: u64 = 0x200_0000_0000;
const FAULT_GPA: u64 = 1 << 38;
const FAULT_HVA: u64 = 0x400_0000_0000;
const PAGE: u64 = 4096;

struct Figures {
    locked: bool,
    pass_ns: u64,
    calls: u64,
    young: u64,
    lock_writes: u64,
    during: Latency,
    outside: Latency,
    violations: u64,
}

impl Figures {
    fn json(&self) -> Value {
        json!({
            "aging": if self.locked { "locked" } else { "lockless" },
            "pass_ns": self.pass_ns,
            "callbacks": self.calls,
            "ns_per_callback": self.pass_ns / self.calls.max(1),
            "young": self.young,
            "mmu_lock_writes": self.lock_writes,
            "faults_during_pass": self.during.json(),
            "faults_outside_pass": self.outside.json(),
            "violations": self.violations,
        })
    }
}

/// Check the flags.
pub fn validate(a: &BenchAgingArgs) -> anyhow::Result<()> {
    if a.bytes < 2 << 20 || !a.bytes.is_multiple_of(2 << 20) || a.bytes > 16 << 30 {
        anyhow::bail!(BadInput(format!(
            "-b {}: the aged memory must be a multiple of 2M from 2M to 16G",
            human(a.bytes)
        )));
    }
    if a.vcpus == 0 || a.vcpus > 64 {
        anyhow::bail!(BadInput(format!("-v {}: vCPUs must be 1..=64", a.vcpus)));
    }
    if a.fault_bytes < 1 << 20 || !a.fault_bytes.is_multiple_of(PAGE) || a.fault_bytes > 4 << 30 {
        anyhow::bail!(BadInput(format!(
            "--fault-bytes {}: each vCPU's fault region must be 1M to 4G (a multiple of 4K)",
            human(a.fault_bytes)
        )));
    }
    Ok(())
}

fn one(a: &BenchAgingArgs, locked: bool) -> anyhow::Result<Figures> {
    let v = u64::from(a.vcpus);
    let mut m = Machine::new(
        MachineConfig {
            memory_bytes: a.bytes
                + v * a.fault_bytes
                + (a.bytes + v * a.fault_bytes) / 64
                + (1 << 30),
            vm: vmmu::VmConfig {
                lockless_aging: !locked,
                ad_enabled: !a.no_ad,
                ..vmmu::VmConfig::default()
            },
            oracle: a.flags.oracle,
            poison: true,
            dirty_ring: 0,
        },
        a.vcpus,
    )?;
    m.map(Hva(AGED_HVA), a.bytes, Backing::Anonymous)?;
    m.map(Hva(FAULT_HVA), v * a.fault_bytes, Backing::Anonymous)?;
    m.set_memslot(UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: AGED_GPA,
        memory_size: a.bytes,
        userspace_addr: AGED_HVA,
    })?;
    m.set_memslot(UserMemoryRegion {
        slot: 2,
        flags: 0,
        guest_phys_addr: FAULT_GPA,
        memory_size: v * a.fault_bytes,
        userspace_addr: FAULT_HVA,
    })?;
    let write = |gpa: u64| GuestAccess::shared(Gpa(gpa), AccessKind::Write(gpa));
    let share = a.bytes / v;
    let populate: Vec<Script> = (0..v)
        .map(|i| {
            Script::new(
                (0..share / PAGE)
                    .map(|p| write(AGED_GPA + i * share + p * PAGE))
                    .collect(),
            )
        })
        .collect();
    m.run(populate, &RunOptions::default(), |_| {});
    let touches: Vec<Script> = (0..v)
        .map(|i| {
            Script::new(
                (0..a.fault_bytes / PAGE)
                    .map(|p| write(FAULT_GPA + i * a.fault_bytes + p * PAGE))
                    .collect(),
            )
        })
        .collect();
    let n_touches = v * a.fault_bytes / PAGE;
    let before = m.vm.stats();
    let w = super::window::among_faults(&mut m, touches, n_touches, |ctx| {
        let mut young = 0;
        for p in 0..a.bytes / PAGE {
            let hva = AGED_HVA + p * PAGE;
            young += u64::from(ctx.host.age(HvaRange::new(Hva(hva), Hva(hva + PAGE))));
        }
        young
    })?;
    let st = m.vm.stats().since(&before);
    let violations = m.oracle.total();
    let t = m.teardown();
    anyhow::ensure!(
        t.leaked_data_pages + t.leaked_table_pages + t.double_frees == 0,
        "teardown found leaks: {t:?}"
    );
    Ok(Figures {
        locked,
        pass_ns: w.ns,
        calls: a.bytes / PAGE,
        young: w.result,
        lock_writes: st.aging_locked,
        during: w.during,
        outside: w.outside,
        violations,
    })
}

/// Run it.
pub fn run(a: &BenchAgingArgs) -> anyhow::Result<i32> {
    validate(a)?;
    let all = [one(a, false)?, one(a, true)?];
    let violations: u64 = all.iter().map(|f| f.violations).sum();
    let ratio = all[1].pass_ns as f64 / all[0].pass_ns.max(1) as f64;
    if a.flags.json {
        println!(
            "{}",
            json!({
                "mode": "bench",
                "scenario": "aging",
                "config": crate::report::config_json(
                    "bench aging",
                    serde_json::to_value(a).unwrap_or_default(),
                    &vmmu::VmConfig { ad_enabled: !a.no_ad, ..vmmu::VmConfig::default() },
                    a.flags.oracle,
                ),
                "runs": all.iter().map(Figures::json).collect::<Vec<_>>(),
                "locked_over_lockless": ratio,
                "violations": violations,
            })
        );
    } else {
        use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
        println!(
            "One aging pass over {} ({} clear_young callbacks, EPT A/D bits {}) while {} vCPUs fault in {} each page by page; both modes in this one run.\n",
            human(a.bytes),
            a.bytes / PAGE,
            if a.no_ad { "off" } else { "on" },
            a.vcpus,
            human(a.fault_bytes)
        );
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "aging",
            "pass (ms)",
            "ns per callback",
            "mmu_lock (write)",
            "faults during pass",
            "fault p50 / p99 / max during (µs)",
            "fault p50 / p99 / max outside (µs)",
        ]);
        for f in &all {
            t.add_row(vec![
                if f.locked {
                    "under mmu_lock (before 6.15)".to_string()
                } else {
                    "lockless (6.15)".to_string()
                },
                format!("{:.1}", f.pass_ns as f64 / 1e6),
                (f.pass_ns / f.calls.max(1)).to_string(),
                f.lock_writes.to_string(),
                f.during.n.to_string(),
                f.during.us(),
                f.outside.us(),
            ]);
        }
        println!("{t}");
        println!("Locked pass / lockless pass: {ratio:.2}×");
        println!("{}", crate::report::host_line());
        if a.flags.oracle {
            println!("oracle violations: {violations}");
        }
    }
    Ok(if violations > 0 { 1 } else { 0 })
}
