//! `private-exits`: private_mem_kvm_exits_test on the machine model.
//!
//! A software-protected VM with one 4 KiB page at 0xC000_0000 (slot 10) that
//! the guest reads in a loop. Case 1: the page is private in a guest_memfd
//! slot and the slot is deleted while the vCPU runs. Case 2: the page is
//! private but its slot is a plain one. Both must end the run with a
//! memory-fault exit (`KVM_EXIT_MEMORY_FAULT`, `EFAULT`) naming exactly that
//! gpa, size 4096 and the PRIVATE flag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmmu::{Gpa, Hva, UserMemoryRegion, VmType, MEMORY_ATTRIBUTE_PRIVATE};
use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram};
use vmmu_machine::{Backing, Machine, MachineConfig, MemoryFaultPolicy, RunOptions};

use crate::args::{Common, Shape};
use crate::report::Report;

const GPA: u64 = 0xc000_0000;
const HVA: u64 = 0x100_0000_0000;
const SLOT: u32 = 10;
/// Reads after which a guest that never exited is a failure.
const MAX_READS: u64 = 50_000_000;

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<Shape> {
    Ok(common.shape(1, 2 << 20, 1, Backing::Anonymous)?)
}

/// The guest: read the page until the run stops.
struct Spinner {
    reads: Arc<AtomicU64>,
    exit: Option<AccessResult>,
}

impl GuestProgram for Spinner {
    fn next(&mut self) -> Option<GuestAccess> {
        if self.exit.is_some() || self.reads.load(Ordering::Relaxed) >= MAX_READS {
            return None;
        }
        Some(GuestAccess {
            gpa: Gpa(GPA),
            kind: AccessKind::Read,
            private: true,
        })
    }
    fn complete(&mut self, _a: &GuestAccess, r: AccessResult) {
        match r {
            AccessResult::Memory(_) => {
                self.reads.fetch_add(1, Ordering::Relaxed);
            }
            other => self.exit = Some(other),
        }
    }
    fn mismatches(&self) -> u64 {
        0
    }
}

struct Case {
    name: &'static str,
    exit: Option<AccessResult>,
    reads: u64,
}

fn region(flags: u32, size: u64) -> UserMemoryRegion {
    UserMemoryRegion {
        slot: SLOT,
        flags,
        guest_phys_addr: GPA,
        memory_size: size,
        userspace_addr: HVA,
    }
}

fn machine(common: &Common) -> anyhow::Result<Machine> {
    let m = Machine::new(
        MachineConfig {
            memory_bytes: 1 << 30,
            vm: vmmu::VmConfig {
                vm_type: VmType::SwProtected,
                ..super::vm_config(common)
            },
            oracle: !common.no_oracle,
            poison: true,
            dirty_ring: 0,
        },
        1,
    )?;
    m.map(Hva(HVA), 2 << 20, Backing::Anonymous)?;
    Ok(m)
}

fn run_case(
    m: &mut Machine,
    name: &'static str,
    meanwhile: impl FnOnce(&vmmu_machine::PhaseCtx<'_>, &AtomicU64),
) -> Case {
    let reads = Arc::new(AtomicU64::new(0));
    let prog = Spinner {
        reads: reads.clone(),
        exit: None,
    };
    let opts = RunOptions {
        memory_faults: MemoryFaultPolicy::Fail,
        ..RunOptions::default()
    };
    let (p, _) = m
        .run(vec![prog], &opts, |ctx| meanwhile(ctx, &reads))
        .pop()
        .unwrap_or_else(|| unreachable!("one program, one result"));
    Case {
        name,
        exit: p.exit,
        reads: reads.load(Ordering::Relaxed),
    }
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let mut cases = Vec::new();

    // Case 1: private in a guest_memfd slot, the slot deleted under the guest.
    let mut m = machine(common)?;
    m.vmm.create_gmem_slot(region(0, 4096))?;
    m.vm.set_memory_attributes(GPA, 4096, MEMORY_ATTRIBUTE_PRIVATE, 0)?;
    cases.push(run_case(
        &mut m,
        "slot_deleted_under_private_page",
        |ctx, reads| {
            // Let the guest spin on the private page first.
            let t = Instant::now();
            while reads.load(Ordering::Relaxed) < 1000
                && !ctx.done()
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_micros(100));
            }
            let _ = ctx.vm.set_user_memory_region(region(0, 0));
        },
    ));
    let first = m;

    // Case 2: private attribute over a plain slot.
    let mut m = machine(common)?;
    m.set_memslot(region(0, 4096))?;
    m.vm.set_memory_attributes(GPA, 4096, MEMORY_ATTRIBUTE_PRIVATE, 0)?;
    cases.push(run_case(
        &mut m,
        "private_attribute_on_plain_slot",
        |_, _| {},
    ));

    let want = AccessResult::MemoryFault {
        gpa: Gpa(GPA),
        size: 4096,
        private: true,
    };
    let mut r = Report::new("private-exits", &shape);
    let mut failed = 0;
    for c in &cases {
        let ok = c.exit == Some(want);
        failed += u64::from(!ok);
        let got = match c.exit {
            Some(AccessResult::MemoryFault { gpa, size, private }) => format!(
                "KVM_EXIT_MEMORY_FAULT (EFAULT) gpa {:#x} size {size} flags {}",
                gpa.0,
                if private { "PRIVATE" } else { "0" }
            ),
            Some(other) => format!("{other:?}"),
            None => format!("no exit after {} reads", c.reads),
        };
        r.line(format!(
            "{}: {} after {} reads of the page: {}",
            c.name,
            if ok { "PASS" } else { "FAIL" },
            c.reads,
            got
        ));
        r.put(&format!("{}_pass", c.name), ok);
        r.put(&format!("{}_reads", c.name), c.reads);
        if let Some(AccessResult::MemoryFault { gpa, size, private }) = c.exit {
            r.put(&format!("{}_gpa", c.name), gpa.0);
            r.put(&format!("{}_size", c.name), size);
            r.put(
                &format!("{}_flags", c.name),
                if private { MEMORY_ATTRIBUTE_PRIVATE } else { 0 },
            );
        }
    }
    r.put("cases_failed", failed);
    // The first machine's oracle counts too (its accesses, leaks, double frees).
    let first_oracle = first.oracle.clone();
    first.teardown();
    let first_bad = first_oracle.total();
    for l in first_oracle.log() {
        r.line(format!("case 1 violation: {l}"));
    }
    r.put("case1_violations", first_bad);
    let env = super::Env::new(m, shape, common, None);
    let code = env.finish(r)?;
    if failed > 0 || first_bad > 0 {
        return Ok(1);
    }
    Ok(code)
}
