//! The host's reclaim loop against a running guest: pages aged through the
//! MMU, the cold ones swapped out and refaulted, every access checked by the
//! oracle. And the proof the check can fail: without the flush after the
//! swap-out's zap, a vCPU keeps using a frame the host has freed.

use std::sync::atomic::Ordering;

use vmmu::{Gpa, GuardKnobs, Hva, UserMemoryRegion, VmConfig};
use vmmu_machine::guest::{Pass, Pattern, RefModel};
use vmmu_machine::reclaim::Reclaimer;
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

const GPA: u64 = 1 << 32;
const HVA: u64 = 0x100_0000_0000;
const PER_VCPU: u64 = 4 << 20;

/// Two vCPUs over 8 MiB with at most half of it resident; returns the
/// violations, the pages reclaimed and the refaults.
fn run(knobs: GuardKnobs, lockless: bool) -> (u64, u64, u64) {
    let mut m = Machine::new(
        MachineConfig {
            memory_bytes: 1 << 30,
            vm: VmConfig {
                knobs,
                lockless_aging: lockless,
                ..VmConfig::default()
            },
            oracle: true,
            poison: true,
            dirty_ring: 0,
        },
        2,
    )
    .unwrap();
    m.map(Hva(HVA), 2 * PER_VCPU, Backing::Anonymous).unwrap();
    m.set_memslot(UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: GPA,
        memory_size: 2 * PER_VCPU,
        userspace_addr: HVA,
    })
    .unwrap();
    let pages = 2 * PER_VCPU / 4096;
    let mut reclaimer = Reclaimer::start(m.host.clone(), Hva(HVA), pages, pages / 2);
    let mut models: Vec<RefModel> = (0..2)
        .map(|v| RefModel::new(Gpa(GPA + v * PER_VCPU), PER_VCPU / 4096))
        .collect();
    for pass in 1..=8u32 {
        let (pattern, writes) = if pass == 1 {
            (Pattern::Sequential, 100)
        } else {
            (Pattern::Random, 50)
        };
        let progs: Vec<Pass> = models
            .drain(..)
            .enumerate()
            .map(|(i, md)| Pass::new(i as u32, pass, pattern, writes, true, md, 7))
            .collect();
        for (p, _) in m.run(progs, &RunOptions::default(), |_| {}) {
            models.push(p.into_model());
        }
        if knobs != GuardKnobs::default() && m.oracle.total() > 0 {
            break;
        }
    }
    reclaimer.stop();
    let reclaimed = reclaimer.stats.reclaimed.load(Ordering::Relaxed);
    let refaults = m.host.stats.swapped_in.load(Ordering::Relaxed);
    let oracle = m.oracle.clone();
    m.teardown();
    (oracle.total(), reclaimed, refaults)
}

#[test]
fn test_reclaim_under_a_running_guest_loses_no_access() {
    for lockless in [true, false] {
        let (violations, reclaimed, refaults) = run(GuardKnobs::default(), lockless);
        assert!(reclaimed > 0 && refaults > 0, "{reclaimed} / {refaults}");
        assert_eq!(violations, 0, "lockless {lockless}");
    }
}

#[test]
fn test_reclaim_without_the_flush_after_the_zap_is_caught() {
    let knobs = GuardKnobs {
        skip_flush_after_zap: true,
        ..GuardKnobs::default()
    };
    let (violations, reclaimed, _) = run(knobs, true);
    assert!(reclaimed > 0);
    assert!(violations > 0, "the oracle missed stale translations");
}
