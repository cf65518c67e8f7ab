//! More vCPUs than CPUs: the vCPU threads share the machine's CPUs as a host
//! scheduler shares them (see `vmmu_machine::pcpu`), and the MMU stays
//! correct with 64 vCPUs on this machine's two cores.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmmu::VmType;
use vmmu_machine::guest::{AccessResult, GuestAccess, GuestProgram, Pass, Pattern};
use vmmu_machine::stress::{stress, StressConfig};
use vmmu_machine::{Backing, MachineConfig, RunOptions};

/// A pass that counts how many vCPU threads are asking for their next
/// access at the same time (a vCPU asks only while its thread runs).
struct Counted {
    pass: Pass,
    now: Arc<AtomicU32>,
    most: Arc<AtomicU32>,
}

impl GuestProgram for Counted {
    fn next(&mut self) -> Option<GuestAccess> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        // Long enough for another running thread to come in meanwhile.
        for _ in 0..200 {
            std::hint::spin_loop();
        }
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.pass.next()
    }
    fn complete(&mut self, access: &GuestAccess, result: AccessResult) {
        self.pass.complete(access, result);
    }
    fn mismatches(&self) -> u64 {
        self.pass.mismatches()
    }
}

fn most_running(vcpus: u32, pcpus: usize) -> (u32, u64) {
    let bytes = 2 << 20;
    let mut m = machine(MachineConfig::default(), vcpus, bytes, Backing::Anonymous);
    let (now, most) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let progs: Vec<Counted> = models(vcpus, bytes)
        .into_iter()
        .enumerate()
        .map(|(i, md)| Counted {
            pass: Pass::new(i as u32, 1, Pattern::Random, 50, true, md, 7),
            now: now.clone(),
            most: most.clone(),
        })
        .collect();
    let opts = RunOptions {
        pcpus: Some(pcpus),
        ..RunOptions::default()
    };
    let out = m.run(progs, &opts, |_| {});
    let accesses: u64 = out.iter().map(|(_, r)| r.counters.accesses).sum();
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    (most.load(Ordering::SeqCst), accesses)
}

#[test]
fn test_no_more_vcpus_run_than_cpus() {
    let vcpus = 16;
    let (most, accesses) = most_running(vcpus, 1);
    assert_eq!(most, 1, "one CPU: one vCPU thread at a time");
    // Every vCPU finished its pass (the hand-over starves nobody).
    assert_eq!(accesses, vcpus as u64 * 512);
}

#[test]
fn test_64_vcpus_on_this_machine_stress_zero_violations() {
    // Every VM type: the private ones add conversions and punch-holes,
    // whose invalidations made 64 freely scheduled vCPUs retry for seconds.
    for vm_type in [VmType::Default, VmType::SwProtected, VmType::Snp] {
        let cfg = StressConfig {
            vcpus: 64,
            bytes_per_vcpu: 2 << 20,
            duration: Duration::from_secs(2),
            min_passes: 1,
            vm_type,
            ..StressConfig::default()
        };
        let r = stress(&cfg).unwrap();
        eprintln!(
            "{vm_type:?}: {} passes, {} accesses ({} checked), {} faults",
            r.passes, r.accesses, r.checked, r.faults
        );
        assert!(r.passes >= 1 && r.checked > 0, "{vm_type:?}: no progress");
        assert_eq!(r.total_violations, 0, "{vm_type:?}: {:#?}", r.log);
    }
}
