//! `vmmu bench nx-recovery`: what NX huge page recovery costs and what it
//! gives back, under the read lock (KVM ≥ 6.18) and the write lock (before).
//!
//! A guest executes from every 2 MiB page of a hugetlb-backed region and reads
//! all of it, so under the mitigation each huge page is a listed table of 512
//! 4 KiB leaves. Then, while the vCPU faults in a second region page by page
//! (first touches: each fault needs `mmu_lock` for read), one recovery pass
//! with ratio 1 zaps every listed table. Measured in the same run, for each
//! lock: the pass's time and per table, the vCPU's fault latency (p50, p99,
//! max) during the pass against outside it, and the faults a read of the
//! whole region takes afterwards (one per huge page once it maps huge again)
//! against the faults it took while split.

use serde_json::{json, Value};
use vmmu::{Gpa, Gva, Hva, Level, UserMemoryRegion};
use vmmu_machine::guest::{AccessKind, GuestAccess, Script};
use vmmu_machine::paging::{LinearAccess, LinearOp};
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

use super::window::Latency;
use crate::args::{human, BadInput};
use crate::cli::BenchNxRecoveryArgs;

const SPLIT_GPA: u64 = 1 << 32;
const SPLIT_HVA: u64 = 0x200_0000_0000;
const FAULT_GPA: u64 = 1 << 36;
const FAULT_HVA: u64 = 0x300_0000_0000;
const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;

/// One lock's figures.
struct Figures {
    write_lock: bool,
    listed: u64,
    zapped: u64,
    pass_ns: u64,
    during: Latency,
    outside: Latency,
    faults_split: u64,
    faults_rebuild: u64,
    huge_after: u64,
    violations: u64,
}

impl Figures {
    fn json(&self) -> Value {
        json!({
            "lock": if self.write_lock { "write" } else { "read" },
            "listed": self.listed,
            "zapped": self.zapped,
            "pass_ns": self.pass_ns,
            "ns_per_table": self.pass_ns / self.zapped.max(1),
            "faults_during_pass": self.during.json(),
            "faults_outside_pass": self.outside.json(),
            "read_faults_while_split": self.faults_split,
            "read_faults_after_recovery": self.faults_rebuild,
            "huge_pages_after": self.huge_after,
            "violations": self.violations,
        })
    }
}

/// Check the flags.
pub fn validate(a: &BenchNxRecoveryArgs) -> anyhow::Result<()> {
    if a.bytes < HUGE || !a.bytes.is_multiple_of(HUGE) || a.bytes > 4 << 30 {
        anyhow::bail!(BadInput(format!(
            "-b {}: the split region must be a multiple of 2M from 2M to 4G",
            human(a.bytes)
        )));
    }
    if a.fault_bytes < 4 << 20 || !a.fault_bytes.is_multiple_of(PAGE) || a.fault_bytes > 4 << 30 {
        anyhow::bail!(BadInput(format!(
            "--fault-bytes {}: the region the vCPU faults in during recovery must be 4M to 4G (a multiple of 4K)",
            human(a.fault_bytes)
        )));
    }
    Ok(())
}

fn read(gpa: u64) -> GuestAccess {
    GuestAccess::shared(Gpa(gpa), AccessKind::Read)
}

fn fetch(gpa: u64) -> GuestAccess {
    GuestAccess::linear(
        Gva(gpa),
        LinearAccess {
            op: LinearOp::Fetch,
            user: false,
            ac: false,
        },
    )
}

fn one(a: &BenchNxRecoveryArgs, write_lock: bool) -> anyhow::Result<Figures> {
    let mut m = Machine::new(
        MachineConfig {
            memory_bytes: a.bytes + a.fault_bytes + (a.bytes + a.fault_bytes) / 64 + (1 << 30),
            vm: vmmu::VmConfig {
                nx_huge_pages: true,
                nx_recovery_write_lock: write_lock,
                ..vmmu::VmConfig::default()
            },
            oracle: a.flags.oracle,
            poison: true,
            dirty_ring: 0,
        },
        1,
    )?;
    m.map(Hva(SPLIT_HVA), a.bytes, Backing::Hugetlb2M)?;
    m.map(Hva(FAULT_HVA), a.fault_bytes, Backing::Anonymous)?;
    m.set_memslot(UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: SPLIT_GPA,
        memory_size: a.bytes,
        userspace_addr: SPLIT_HVA,
    })?;
    m.set_memslot(UserMemoryRegion {
        slot: 2,
        flags: 0,
        guest_phys_addr: FAULT_GPA,
        memory_size: a.fault_bytes,
        userspace_addr: FAULT_HVA,
    })?;
    let huge_pages = a.bytes / HUGE;
    let read_all = || -> Vec<GuestAccess> {
        (0..a.bytes / PAGE)
            .map(|p| read(SPLIT_GPA + p * PAGE))
            .collect()
    };
    // Execute from every huge page (each splits and is listed), then read
    // everything: 4 KiB leaves below the listed tables.
    let mut split: Vec<GuestAccess> = (0..huge_pages)
        .map(|h| fetch(SPLIT_GPA + h * HUGE + PAGE))
        .collect();
    split.extend(read_all());
    let before = m.vm.stats();
    m.run(vec![Script::new(split)], &RunOptions::default(), |_| {});
    let faults_split = m.vm.stats().since(&before).faults;
    let listed = m.vm.possible_nx_huge_pages();
    anyhow::ensure!(
        listed == huge_pages,
        "{listed} of {huge_pages} huge pages were listed after the fetches"
    );

    // Recovery while the vCPU takes first-touch faults in the other region.
    let touches: Vec<GuestAccess> = (0..a.fault_bytes / PAGE)
        .map(|p| GuestAccess::shared(Gpa(FAULT_GPA + p * PAGE), AccessKind::Write(p)))
        .collect();
    let n_touches = touches.len() as u64;
    let w = super::window::among_faults(&mut m, vec![Script::new(touches)], n_touches, |ctx| {
        ctx.vm.recover_nx_huge_pages(1)
    })?;

    // Read the region again: huge leaves come back, one fault each.
    let before = m.vm.stats();
    m.run(
        vec![Script::new(read_all())],
        &RunOptions::default(),
        |_| {},
    );
    let after = m.vm.stats();
    let faults_rebuild = after.since(&before).faults;
    let huge_after = after.present(Level::M2);
    let violations = m.oracle.total();
    let t = m.teardown();
    anyhow::ensure!(
        t.leaked_data_pages + t.leaked_table_pages + t.double_frees == 0,
        "teardown found leaks: {t:?}"
    );
    Ok(Figures {
        write_lock,
        listed,
        zapped: w.result.zapped,
        pass_ns: w.ns,
        during: w.during,
        outside: w.outside,
        faults_split,
        faults_rebuild,
        huge_after,
        violations,
    })
}

/// Run it.
pub fn run(a: &BenchNxRecoveryArgs) -> anyhow::Result<i32> {
    validate(a)?;
    let all = [one(a, false)?, one(a, true)?];
    let violations: u64 = all.iter().map(|f| f.violations).sum();
    if a.flags.json {
        println!(
            "{}",
            json!({
                "mode": "bench",
                "scenario": "nx-recovery",
                "config": crate::report::config_json(
                    "bench nx-recovery",
                    serde_json::to_value(a).unwrap_or_default(),
                    &vmmu::VmConfig { nx_huge_pages: true, ..vmmu::VmConfig::default() },
                    a.flags.oracle,
                ),
                "runs": all.iter().map(Figures::json).collect::<Vec<_>>(),
                "violations": violations,
            })
        );
    } else {
        use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
        println!(
            "NX recovery of {} split into {} listed tables of 4 KiB leaves (one pass, ratio 1) while the vCPU faults in {} page by page; both locks in this one run.\n",
            human(a.bytes),
            a.bytes / HUGE,
            human(a.fault_bytes)
        );
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "recovery holds",
            "tables zapped",
            "pass (ms)",
            "µs per table",
            "faults during pass",
            "fault p50 / p99 / max during (µs)",
            "fault p50 / p99 / max outside (µs)",
            "read faults: split / after",
        ]);
        let us = |ns: u64| ns as f64 / 1e3;
        for f in &all {
            t.add_row(vec![
                if f.write_lock {
                    "write lock (before 6.18)".to_string()
                } else {
                    "read lock (6.18)".to_string()
                },
                f.zapped.to_string(),
                format!("{:.2}", f.pass_ns as f64 / 1e6),
                format!("{:.2}", us(f.pass_ns) / f.zapped.max(1) as f64),
                f.during.n.to_string(),
                f.during.us(),
                f.outside.us(),
                format!("{} / {}", f.faults_split, f.faults_rebuild),
            ]);
        }
        println!("{t}");
        println!(
            "After recovery the read maps {} huge pages again ({} faults for {} pages).",
            all[0].huge_after,
            all[0].faults_rebuild,
            a.bytes / PAGE
        );
        println!("{}", crate::report::host_line());
        if a.flags.oracle {
            println!("oracle violations: {violations}");
        }
    }
    Ok(if violations > 0 { 1 } else { 0 })
}
