//! Where the time of a fault goes on the machine model, and how fault throughput
//! scales with vCPUs: pre-touched host memory, so only the MMU and the machine's
//! own work are measured.
//!
//! `cargo run --release -p vmmu-machine --example fault_cost -- [MiB per vCPU] [rounds]`

use std::time::Instant;

use vmmu::{ErrorCode, Gpa, Hva, HvaRange, UserMemoryRegion};
use vmmu_machine::guest::{Pass, Pattern, RefModel};
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

const GPA: u64 = 4 << 30;
const HVA: u64 = 1 << 40;

fn machine(vcpus: u32, bytes: u64) -> Machine {
    let total = vcpus as u64 * bytes;
    let cfg = MachineConfig {
        memory_bytes: 2 * total + (1 << 30),
        oracle: false,
        ..MachineConfig::default()
    };
    let m = Machine::new(cfg, vcpus).unwrap();
    m.map(Hva(HVA), total, Backing::Anonymous).unwrap();
    m.set_memslot(UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: GPA,
        memory_size: total,
        userspace_addr: HVA,
    })
    .unwrap();
    m.host
        .prefault(HvaRange::new(Hva(HVA), Hva(HVA + total)))
        .unwrap();
    m
}

fn clean(t: vmmu_machine::TeardownReport) {
    assert_eq!(
        t.leaked_data_pages + t.leaked_table_pages + t.double_frees,
        0,
        "{t:?}"
    );
}

/// Pages per second of a populate pass with `vcpus` vCPUs.
fn populate(vcpus: u32, bytes: u64) -> f64 {
    let mut m = machine(vcpus, bytes);
    let pages = bytes / 4096;
    let progs: Vec<Pass> = (0..vcpus)
        .map(|i| {
            Pass::new(
                i,
                1,
                Pattern::Sequential,
                100,
                false,
                RefModel::new(Gpa(GPA + i as u64 * bytes), pages),
                1,
            )
        })
        .collect();
    let t = Instant::now();
    m.run(progs, &RunOptions::default(), |_| {});
    let rate = (vcpus as u64 * pages) as f64 / t.elapsed().as_secs_f64();
    clean(m.teardown());
    rate
}

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let rounds: u32 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let bytes = mib << 20;
    let pages = bytes / 4096;

    let mut m = machine(1, bytes);
    let v = &mut m.vcpus()[0];
    v.mmu.prepare_entry().unwrap();
    let t = Instant::now();
    for p in 0..pages {
        v.mmu
            .page_fault(Gpa(GPA + p * 4096), ErrorCode::WRITE)
            .unwrap();
    }
    println!(
        "page_fault called directly: {:.0} ns/fault",
        t.elapsed().as_nanos() as f64 / pages as f64
    );
    clean(m.teardown());

    // The same from two threads at once, each on its own vCPU and range.
    let mut m = machine(2, bytes);
    let t = Instant::now();
    std::thread::scope(|s| {
        for (i, v) in m.vcpus().iter_mut().enumerate() {
            s.spawn(move || {
                v.mmu.prepare_entry().unwrap();
                let base = GPA + i as u64 * bytes;
                for p in 0..pages {
                    v.mmu
                        .page_fault(Gpa(base + p * 4096), ErrorCode::WRITE)
                        .unwrap();
                }
            });
        }
    });
    println!(
        "page_fault called directly from 2 threads: {:.0} ns/fault of wall time",
        t.elapsed().as_nanos() as f64 / (2 * pages) as f64
    );
    clean(m.teardown());

    for r in 0..rounds {
        let one = populate(1, bytes);
        let two = populate(2, bytes);
        println!(
            "round {r}: populate (pre-touched) 1 vCPU {:.0} ns/page, 2 vCPUs {:.0} ns/page of wall time; throughput x{:.2}",
            1e9 / one,
            1e9 / two,
            two / one
        );
    }
}
