//! Shared setup for machine tests.
#![allow(dead_code)]

use vmmu::{Gpa, UserMemoryRegion};
use vmmu_machine::guest::{Pass, Pattern, RefModel};
use vmmu_machine::{Backing, Machine, MachineConfig};

pub const GPA: u64 = 1 << 30;
pub const HVA: u64 = 0x10_0000_0000;

/// A machine with one memslot of `vcpus * bytes` at GPA 1 GiB.
pub fn machine(cfg: MachineConfig, vcpus: u32, bytes: u64, backing: Backing) -> Machine {
    let m = Machine::new(cfg, vcpus).unwrap();
    m.map(vmmu::Hva(HVA), vcpus as u64 * bytes, backing)
        .unwrap();
    m.set_memslot(UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: GPA,
        memory_size: vcpus as u64 * bytes,
        userspace_addr: HVA,
    })
    .unwrap();
    m
}

pub fn models(vcpus: u32, bytes: u64) -> Vec<RefModel> {
    (0..vcpus)
        .map(|i| RefModel::new(Gpa(GPA + i as u64 * bytes), bytes / 4096))
        .collect()
}

/// Run one pass per vCPU; returns the updated models.
pub fn pass(
    m: &mut Machine,
    models: Vec<RefModel>,
    pass: u32,
    pattern: Pattern,
    write: u32,
) -> Vec<RefModel> {
    let progs: Vec<Pass> = models
        .into_iter()
        .enumerate()
        .map(|(i, md)| Pass::new(i as u32, pass, pattern, write, true, md, 7))
        .collect();
    m.run(progs, &Default::default(), |_| {})
        .into_iter()
        .map(|(p, _)| p.into_model())
        .collect()
}
