//! How a run ends: a vCPU thread that panics (a debug assertion in the MMU)
//! ends the run with its panic instead of leaving the host side waiting for
//! it forever.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use vmmu_machine::guest::{AccessResult, GuestAccess, GuestProgram, Pass, Pattern};
use vmmu_machine::{Backing, MachineConfig};

/// A pass that panics after `left` accesses.
struct Panics {
    pass: Pass,
    left: u32,
}

impl GuestProgram for Panics {
    fn next(&mut self) -> Option<GuestAccess> {
        if self.left == 0 {
            panic!("the program's planned panic");
        }
        self.left -= 1;
        self.pass.next()
    }
    fn complete(&mut self, access: &GuestAccess, result: AccessResult) {
        self.pass.complete(access, result);
    }
    fn mismatches(&self) -> u64 {
        self.pass.mismatches()
    }
}

#[test]
fn test_a_panicking_vcpu_ends_the_run_with_its_panic() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let bytes = 2 << 20;
        let mut m = machine(MachineConfig::default(), 2, bytes, Backing::Anonymous);
        let progs: Vec<Panics> = models(2, bytes)
            .into_iter()
            .enumerate()
            .map(|(i, md)| Panics {
                pass: Pass::new(i as u32, 1, Pattern::Sequential, 100, true, md, 7),
                left: if i == 0 { 10 } else { u32::MAX },
            })
            .collect();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // The host side runs until every vCPU is done, as the stress
            // run's host events do.
            m.run(progs, &Default::default(), |ctx| {
                while !ctx.done() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        }));
        let _ = tx.send(r.is_err());
    });
    let panicked = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the run never ended: the host side waits for a vCPU that panicked");
    assert!(panicked, "the vCPU's panic is raised again by the run");
}
