//! `prefault`: pre_fault_memory_test on the machine model.
//!
//! A slot of 2 MiB + 4 KiB (slot 10) at the top of the guest-physical space,
//! aligned down to 2 MiB, on a default VM, a software-protected VM (shared),
//! and a software-protected VM with the range private (guest_memfd). Three
//! `KVM_PRE_FAULT_MEMORY` calls — (0, 2 MiB) must leave 0 bytes, (2 MiB,
//! 8 KiB) and (2 MiB + 4 KiB, 4 KiB) must leave 4 KiB and end with ENOENT —
//! each raced by a thread that deletes the slot and recreates it when asked.
//! Every call either makes progress or fails, never both; EINTR is retried;
//! once the slot is back the call is retried until it completes. Then the guest
//! reads every page.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmmu::errno::{EINTR, ENOENT};
use vmmu::{Gpa, Hva, PreFaultRange, UserMemoryRegion, VmType, MEMORY_ATTRIBUTE_PRIVATE};
use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, Script};
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

use crate::args::{Common, Shape};
use crate::report::Report;

const HVA: u64 = 0x100_0000_0000;
const SLOT: u32 = 10;
const SIZE: u64 = (2 << 20) + 4096;

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<Shape> {
    Ok(common.shape(1, 4 << 20, 1, Backing::Anonymous)?)
}

/// The three calls: (offset, size, bytes left at the end, the error that ends
/// the last call).
const CALLS: [(u64, u64, u64, Option<i32>); 3] = [
    (0, 2 << 20, 0, None),
    (2 << 20, 8192, 4096, Some(ENOENT)),
    ((2 << 20) + 4096, 4096, 4096, Some(ENOENT)),
];

#[derive(Debug, Default)]
struct CallOutcome {
    left: u64,
    /// The errno of the last call (None: it succeeded).
    error: Option<i32>,
    calls: u64,
    /// Errors seen before the slot was back, by errno.
    errors_while_racing: std::collections::BTreeMap<i32, u64>,
    eintr: u64,
    /// A call that both moved the range and failed, or succeeded without
    /// moving it.
    contract_broken: u64,
}

struct Variant {
    name: &'static str,
    vm_type: VmType,
    private: bool,
}

fn region(base: u64, size: u64) -> UserMemoryRegion {
    UserMemoryRegion {
        slot: SLOT,
        flags: 0,
        guest_phys_addr: base,
        memory_size: size,
        userspace_addr: HVA,
    }
}

/// One call raced by a delete, as the selftest runs it: a worker deletes the
/// slot as soon as the call starts and recreates it when asked. After the
/// first answer (EINTR is retried at once) the slot is recreated and, if
/// bytes are left, the call retried; it ends when nothing is left or a call
/// fails with the slot present.
fn raced_call(m: &mut Machine, base: u64, offset: u64, size: u64) -> CallOutcome {
    let vm = m.vm.clone();
    let vmm = m.vmm.clone();
    let recreate = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let worker = {
        let (recreate, go) = (recreate.clone(), go.clone());
        std::thread::spawn(move || {
            while !go.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            let _ = vm.set_user_memory_region(region(base, 0));
            let t = Instant::now();
            while !recreate.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(10) {
                std::hint::spin_loop();
            }
            let _ = vmm.recreate_slot(region(base, SIZE));
        })
    };
    let mut worker = Some(worker);
    let mut out = CallOutcome::default();
    let mut r = PreFaultRange {
        gpa: base + offset,
        size,
        flags: 0,
    };
    let vcpu = &mut m.vcpus()[0].mmu;
    go.store(true, Ordering::Release);
    loop {
        let before = r;
        out.calls += 1;
        let res = vcpu.pre_fault_memory(&mut r);
        let moved = r.size < before.size;
        if moved == res.is_err() {
            out.contract_broken += 1;
        }
        out.error = res.as_ref().err().map(|e| e.errno());
        if out.error == Some(EINTR) {
            out.eintr += 1;
            continue;
        }
        if let Some(w) = worker.take() {
            if let Some(e) = out.error {
                *out.errors_while_racing.entry(e).or_default() += 1;
            }
            recreate.store(true, Ordering::Release);
            let _ = w.join();
            if r.size > 0 {
                continue;
            }
        }
        if r.size == 0 || out.error.is_some() || out.calls > 1_000_000 {
            break;
        }
    }
    if let Some(w) = worker.take() {
        recreate.store(true, Ordering::Release);
        let _ = w.join();
    }
    out.left = r.size;
    out
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let variants = [
        Variant {
            name: "default",
            vm_type: VmType::Default,
            private: false,
        },
        Variant {
            name: "sw_protected_shared",
            vm_type: VmType::SwProtected,
            private: false,
        },
        Variant {
            name: "sw_protected_private",
            vm_type: VmType::SwProtected,
            private: true,
        },
    ];
    let mut r = Report::new("prefault", &shape);
    let mut failed = 0u64;
    let mut violations = 0u64;
    let mut last = None;
    for v in &variants {
        let mut m = Machine::new(
            MachineConfig {
                memory_bytes: 1 << 30,
                vm: vmmu::VmConfig {
                    vm_type: v.vm_type,
                    ..super::vm_config(common)
                },
                oracle: !common.no_oracle,
                poison: true,
                dirty_ring: 0,
            },
            1,
        )?;
        // The top of the guest-physical space, aligned down to 2 MiB.
        let top = m.vm.config().gfn_limit() * 4096;
        let base = (top - SIZE) & !((2 << 20) - 1);
        m.map(Hva(HVA), 4 << 20, Backing::Anonymous)?;
        if v.private {
            m.vmm.create_gmem_slot(region(base, SIZE))?;
            m.vm.set_memory_attributes(base, SIZE, MEMORY_ATTRIBUTE_PRIVATE, 0)?;
        } else {
            m.set_memslot(region(base, SIZE))?;
        }
        m.vcpus()[0].mmu.prepare_entry()?;
        for (i, (offset, size, want_left, want_err)) in CALLS.iter().enumerate() {
            let o = raced_call(&mut m, base, *offset, *size);
            let ok = o.left == *want_left && o.error == *want_err && o.contract_broken == 0;
            failed += u64::from(!ok);
            r.line(format!(
                "{} call {} (offset {:#x}, size {:#x}): {} left {:#x}{}; {} calls, while the slot was deleted: {}",
                v.name,
                i + 1,
                offset,
                size,
                if ok { "PASS" } else { "FAIL" },
                o.left,
                o.error
                    .map(|e| format!(", ended with errno {e}"))
                    .unwrap_or_default(),
                o.calls,
                if o.errors_while_racing.is_empty() {
                    "no error".to_string()
                } else {
                    o.errors_while_racing
                        .iter()
                        .map(|(e, n)| format!("errno {e} x{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
            let key = format!("{}_call{}", v.name, i + 1);
            r.put(&format!("{key}_left"), o.left);
            r.put(&format!("{key}_errno"), o.error.unwrap_or(0) as u64);
            r.put(&format!("{key}_calls"), o.calls);
            r.put(
                &format!("{key}_errors_while_racing"),
                o.errors_while_racing.values().sum::<u64>(),
            );
            r.put(&format!("{key}_pass"), ok);
        }
        // Finally the guest reads every page of the slot.
        let reads: Vec<GuestAccess> = (0..SIZE / 4096)
            .map(|p| GuestAccess {
                gpa: Gpa(base + p * 4096),
                kind: AccessKind::Read,
                private: v.private,
            })
            .collect();
        let (s, _) = m
            .run(vec![Script::new(reads)], &RunOptions::default(), |_| {})
            .pop()
            .unwrap_or_else(|| unreachable!("one program"));
        let all_read = s
            .results
            .iter()
            .all(|(_, res)| matches!(res, AccessResult::Memory(0)));
        failed += u64::from(!all_read || s.results.len() as u64 != SIZE / 4096);
        r.line(format!(
            "{}: guest read {} of {} pages{}",
            v.name,
            s.results.len(),
            SIZE / 4096,
            if all_read {
                ""
            } else {
                " (FAIL: not all as zeros)"
            }
        ));
        let st = m.vm.stats();
        r.put(
            &format!("{}_pre_faulted_bytes", v.name),
            st.pre_faulted_bytes,
        );
        r.put(&format!("{}_private_faults", v.name), st.private_faults);
        if let Some(prev) = last.replace(m) {
            let prev: Machine = prev;
            let o = prev.oracle.clone();
            prev.teardown();
            violations += o.total();
        }
    }
    r.put("cases_failed", failed);
    r.put("earlier_variants_violations", violations);
    let m = last.unwrap_or_else(|| unreachable!("three variants"));
    let env = super::Env::new(m, shape, common, None);
    let code = env.finish(r)?;
    Ok(if failed > 0 || violations > 0 {
        1
    } else {
        code
    })
}
