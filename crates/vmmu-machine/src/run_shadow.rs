//! One access of a shadow-paging guest: the processor walks the shadow
//! tables; a #PF exits to the MMU, which fixes the shadow entry, gives the
//! #PF back to the guest, or asks for the store to be emulated; paging
//! instructions exit too. The oracle judges each access against the
//! reference walk of the guest's tables and the host's mapping.

use std::time::Instant;

use vmmu::{FaultError, GuestPaging, Gva, GvaFault, MemslotSet, RetPf};

use crate::cpu::Mmu;
use crate::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram, Invpcid, PagingOp};
use crate::guest_oracle::{check_linear, Outcome};
use crate::machine::{Vcpu, VcpuCounters};
use crate::oracle::{check_access, check_emulated, Violation};
use crate::paging::{LinearAccess, LinearOp, Permissions, DIRECT_MAP};
use crate::run::{retry_or_stuck, VcpuEnv};
use crate::shadow_cpu::{translate_shadow, ShadowExit};
use crate::sync::Ordering;

/// What the vCPU loop does next.
pub(crate) enum Flow {
    /// Go on with the next (or pending) access.
    Next,
    /// The vCPU cannot go on (no memory for tables, a broken MMU).
    Stop,
}

/// The core's view of the machine's paging state.
pub(crate) fn guest_paging(vcpu: &Vcpu) -> GuestPaging {
    let m = vcpu.paging.mode();
    GuestPaging {
        paging: m.enabled,
        wp: m.wp,
        smep: m.smep,
        smap: m.smap,
        nx: m.nx,
        pcide: m.pcide,
        cr3: vcpu.paging.cr3,
    }
}

/// Tell the MMU about a paging instruction the processor carried out (it
/// exits under shadow paging).
pub(crate) fn paging_exit(vcpu: &mut Vcpu, op: PagingOp) {
    let r = match op {
        PagingOp::SetMode(_) => {
            // A mode change flushes every translation (CR0.PG/WP, CR4.PGE
            // and PCIDE toggles): the MMU resyncs what it keeps.
            let r = vcpu.mmu.set_guest_paging(guest_paging(vcpu));
            vcpu.mmu.flush_guest_tlb();
            r
        }
        // The raw value: its no-flush bit decides whether the PCID is synced.
        PagingOp::LoadCr3(value) => vcpu.mmu.load_cr3(value),
        PagingOp::Invlpg(gva) => {
            vcpu.mmu.invlpg(gva);
            Ok(())
        }
        PagingOp::Invpcid(Invpcid::Address { pcid, gva }) => {
            vcpu.mmu.invpcid_address(pcid, gva);
            Ok(())
        }
        PagingOp::Invpcid(Invpcid::Context(pcid)) => {
            vcpu.mmu.invpcid_context(pcid);
            Ok(())
        }
        PagingOp::Invpcid(_) => {
            vcpu.mmu.flush_guest_tlb();
            Ok(())
        }
    };
    // The processor model only builds CR3 values inside its address width.
    debug_assert!(r.is_ok(), "paging state refused: {r:?}");
}

/// The linear access an access kind makes under shadow paging: physical
/// accesses go through the direct map once paging is on.
fn linear_of(vcpu: &Vcpu, access: &GuestAccess) -> (Gva, LinearAccess, bool) {
    if let AccessKind::Linear { gva, access: la } = access.kind {
        return (gva, la, true);
    }
    let op = match access.kind {
        AccessKind::Write(v) | AccessKind::PteWrite { value: v, .. } => LinearOp::Write(v),
        _ => LinearOp::Read,
    };
    let base = if vcpu.paging.mode().enabled {
        DIRECT_MAP
    } else {
        0
    };
    (
        Gva(base + access.gpa.0),
        LinearAccess {
            op,
            user: false,
            ac: false,
        },
        false,
    )
}

/// Run one access. `in_guest` goes false when it exited.
#[allow(clippy::too_many_arguments)]
pub(crate) fn shadow_access<P: GuestProgram>(
    env: &VcpuEnv<'_>,
    vcpu: &mut Vcpu,
    prog: &mut P,
    view: &Mmu,
    perms: &Permissions,
    slots: Option<&std::sync::Arc<MemslotSet>>,
    access: GuestAccess,
    first_exit: Option<Instant>,
    c: &mut VcpuCounters,
    pending: &mut Option<(GuestAccess, Option<Instant>)>,
    in_guest: &mut bool,
) -> Flow {
    let (mem, host, oracle, vm) = (env.mem, env.host, env.oracle, env.vm);
    let (gva, la, linear) = linear_of(vcpu, &access);
    let write = la.is_write();
    // What the oracle is told the access did.
    let judge = |vcpu: &Vcpu, outcome: Outcome| {
        let Some(s) = slots else { return };
        if linear {
            check_linear(
                oracle,
                host,
                s.as_ref(),
                &vcpu.paging,
                &vcpu.flushes,
                gva,
                &la,
                outcome,
                false,
            );
        } else if let Outcome::Frame(pfn) = outcome {
            check_access(oracle, host, mem, vm, s, access.gpa, pfn, write, false);
        }
    };
    match translate_shadow(mem, &mut vcpu.tlb, view, &vcpu.paging, perms, gva, &la) {
        Ok((t, _)) => {
            judge(vcpu, Outcome::Frame(t.pfn));
            if !mem.contains(t.pfn) {
                oracle.report(Violation::WildWalk, || {
                    format!("{gva} translated to {:?}, outside host memory", t.pfn)
                });
                prog.complete(&access, AccessResult::Fault);
                return Flow::Next;
            }
            let word = &mem.page(t.pfn)[((gva.0 & 0xfff) / 8) as usize];
            let result = match la.op {
                LinearOp::Write(v) => {
                    word.store(v, Ordering::Release);
                    AccessResult::Memory(v)
                }
                _ => AccessResult::Memory(word.load(Ordering::Relaxed)),
            };
            prog.complete(&access, result);
            c.accesses += 1;
            Flow::Next
        }
        Err(ShadowExit::Wild) => {
            oracle.report(Violation::WildWalk, || {
                format!("shadow walk for {gva} left host memory")
            });
            prog.complete(&access, AccessResult::Fault);
            Flow::Next
        }
        Err(ShadowExit::PageFault(ec)) => {
            vcpu.mmu.exit_guest_mode();
            *in_guest = false;
            c.shadow_pf_exits += 1;
            let t0 = first_exit.or_else(|| Some(Instant::now()));
            match vcpu.mmu.page_fault_gva(gva, ec, la.ac) {
                Ok(GvaFault::Mmu(RetPf::Retry)) => {
                    c.retries += 1;
                    *pending = retry_or_stuck(oracle, vcpu.id, prog, access, t0);
                }
                Ok(GvaFault::Mmu(_)) => *pending = Some((access, t0)),
                Ok(GvaFault::Inject(e)) => {
                    judge(vcpu, Outcome::Fault(e));
                    if !linear {
                        oracle.report(Violation::GuestTranslation, || {
                            format!(
                                "physical access to {} through the direct map faulted ({e:?}): no direct map?",
                                access.gpa
                            )
                        });
                    }
                    c.guest_page_faults += 1;
                    c.accesses += 1;
                    prog.complete(&access, AccessResult::PageFault(e));
                }
                Ok(GvaFault::Emulate { gpa, mmio: true }) => {
                    if let Some(s) = slots {
                        check_emulated(oracle, vm, s, vcpu.mmu.role().as_id(), gpa, write);
                    }
                    c.mmio += 1;
                    c.accesses += 1;
                    prog.complete(&access, AccessResult::Mmio);
                }
                Ok(GvaFault::Emulate { gpa, mmio: false }) => {
                    let LinearOp::Write(v) = la.op else {
                        // Only stores are intercepted for emulation.
                        *pending = Some((access, t0));
                        return Flow::Next;
                    };
                    judge(vcpu, Outcome::Reached(gpa));
                    match vcpu.mmu.emulate_write(gpa, v) {
                        Ok(()) => {
                            c.emulated_writes += 1;
                            c.accesses += 1;
                            prog.complete(&access, AccessResult::Memory(v));
                        }
                        Err(_) => {
                            c.efaults += 1;
                            c.accesses += 1;
                            prog.complete(&access, AccessResult::Fault);
                        }
                    }
                }
                Err(FaultError::Host { .. }) | Err(FaultError::MemoryFault { .. }) => {
                    c.efaults += 1;
                    c.accesses += 1;
                    prog.complete(&access, AccessResult::Fault);
                }
                Err(FaultError::NoMemory(_))
                | Err(FaultError::WrongMmu(_))
                | Err(FaultError::NoShadowPages { .. }) => {
                    c.efaults += 1;
                    prog.complete(&access, AccessResult::Fault);
                    return Flow::Stop;
                }
            }
            Flow::Next
        }
    }
}
