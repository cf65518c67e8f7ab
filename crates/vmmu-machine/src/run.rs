//! One vCPU thread: the guest program run access by access through the TLB and
//! the walker, exits handed to the MMU's fault pipeline, hypercalls and
//! memory-fault exits handled as a VMM handles them, and the oracle's
//! per-access checks.

use std::sync::Arc;
use std::time::Instant;

use vmmu::{Access, ErrorCode, FaultError, MemslotSet, RetPf, Vm};

use crate::cpu::{translate, Exit, Mmu, Source};
use crate::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram};
use crate::guest::{Invpcid, PagingOp};
use crate::guest_oracle::{check_linear, Outcome};
use crate::host_memory::{HostMemory, PageState};
use crate::machine::{
    fault_outcome, histogram, BucketCounts, FaultRecord, MemoryFaultPolicy, RunOptions, Vcpu,
    VcpuCounters, VcpuReport, BATCH, FAULT_OUTCOMES, STUCK_AFTER,
};
use crate::oracle::{check_access, check_dirty_after_walk, check_emulated, Oracle, Violation};
use crate::paging::{translate_linear, LinearAccess, LinearFault, LinearOp, CR3_NOFLUSH};
use crate::pcpu::Pcpus;
use crate::primary_mmu::HostMmu;
use crate::sync::Ordering;
use crate::vmm::Vmm;

/// What a vCPU thread shares with the machine.
pub(crate) struct VcpuEnv<'a> {
    pub(crate) mem: &'a HostMemory,
    pub(crate) host: &'a HostMmu,
    pub(crate) oracle: &'a Oracle,
    pub(crate) vm: &'a Vm,
    pub(crate) vmm: &'a Vmm,
    /// The CPUs the vCPUs share, when there are more vCPUs than CPUs.
    pub(crate) pcpus: Option<&'a Pcpus>,
}

pub(crate) fn run_vcpu<P: GuestProgram>(
    env: &VcpuEnv<'_>,
    vcpu: &mut Vcpu,
    prog: &mut P,
    opts: &RunOptions,
) -> VcpuReport {
    let (mem, host, oracle, vm) = (env.mem, env.host, env.oracle, env.vm);
    let vm_type = vm.config().vm_type;
    // The guest's accesses carry their private marking to the hardware (SNP's
    // C-bit): a frame on the other side than the access is a fault, as an RMP
    // check makes it.
    let marks_private = vm_type == vmmu::VmType::Snp;
    let private_mem = vm_type.has_private_mem();
    let start = Instant::now();
    let timing = opts.latency || opts.trace_epoch.is_some();
    let buckets = opts.buckets.max(1);
    let mut resolve_ns: Vec<_> = (0..buckets).map(|_| histogram()).collect();
    let mut fault_ns: Vec<_> = (0..buckets).map(|_| histogram()).collect();
    let mut outcome_ns: Vec<_> = FAULT_OUTCOMES.iter().map(|_| histogram()).collect();
    let mut bucket_counts: Vec<BucketCounts> = vec![BucketCounts::default(); buckets];
    let mut trace: Vec<FaultRecord> = Vec::new();
    let mut trace_dropped = 0u64;
    let mut trace_cut_ns = None;
    let mut c = VcpuCounters::default();
    let (h0, m0) = (vcpu.tlb.hits, vcpu.tlb.misses);
    let mut in_guest = false;
    // The vCPU thread runs while it holds a CPU (see `crate::pcpu`).
    let mut cpu = Pcpus::take(env.pcpus);
    let mut mmu_view: Option<Mmu> = None;
    let mut slots: Option<Arc<MemslotSet>> = None;
    let mut batch = 0u32;
    let mut pending: Option<(GuestAccess, Option<Instant>)> = None;
    let mut since_toggle = 0u64;
    let mut table_writes: Vec<vmmu::Gpa> = Vec::new();
    let mut smm_toggle = opts.smm_toggle_every;
    let shadow = vm.config().mmu == vmmu::MmuKind::Shadow;
    let mut hw_perms = crate::shadow_cpu::hardware_permissions(vcpu.paging.mode());
    if shadow {
        // The MMU follows the paging state the guest starts in.
        crate::run_shadow::paging_exit(vcpu, PagingOp::SetMode(*vcpu.paging.mode()));
    }
    loop {
        if opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            break;
        }
        if !in_guest {
            // An entry point, outside guest mode and holding no lock: where
            // a vCPU whose slice is over lets a waiting one run.
            cpu.reschedule();
            let held = opts
                .smm_state
                .as_ref()
                .is_some_and(|s| s.hold.load(Ordering::Acquire));
            if let Some(every) = smm_toggle.filter(|_| !held) {
                if since_toggle >= every {
                    since_toggle = 0;
                    // Enter or leave SMM: switch roles (and roots). A VM without
                    // the SMM address space refuses; stop asking.
                    let smm = vcpu.mmu.role().smm;
                    if vcpu.mmu.set_smm(!smm).is_err() {
                        c.smm_refused += 1;
                        smm_toggle = None;
                    } else if let Some(st) = &opts.smm_state {
                        if let Some(b) = st.in_smm.get(vcpu.id as usize) {
                            b.store(!smm, Ordering::Release);
                        }
                        st.switches.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
            let entry = match vcpu.mmu.prepare_entry() {
                Ok(e) => e,
                Err(vmmu::VmError::DirtyRingFull { .. }) => {
                    // KVM_EXIT_DIRTY_RING_FULL: wait for the VMM (the host
                    // thread harvesting the rings) to collect and reset.
                    c.dirty_ring_full_exits += 1;
                    cpu.off_cpu(|| {
                        while vcpu.mmu.dirty_ring_soft_full() {
                            std::thread::sleep(std::time::Duration::from_micros(50));
                        }
                    });
                    continue;
                }
                Err(_) => break,
            };
            if entry.flush_tlb {
                vcpu.tlb.flush_all();
            }
            if !vcpu.mmu.enter_guest_mode() {
                continue;
            }
            in_guest = true;
            batch = 0;
            c.entries += 1;
            mmu_view = Some(Mmu {
                root: entry.root,
                root_id: entry.root_id,
                root_level: entry.root_level,
                ad: entry.ad_enabled,
            });
            if oracle.enabled() {
                slots = vm.memslots(vcpu.mmu.role().as_id());
            }
        }
        let (access, first_exit) = match pending.take() {
            Some(p) => p,
            None => match prog.next() {
                Some(a) => (a, None),
                None => break,
            },
        };
        if vcpu.mmu.exit_requested() || batch >= BATCH {
            vcpu.mmu.exit_guest_mode();
            in_guest = false;
            c.other_exits += 1;
            pending = Some((access, first_exit));
            continue;
        }
        batch += 1;
        let Some(view) = mmu_view else { break };
        match access.kind {
            AccessKind::MapGpaRange { size, private, how } => {
                // A hypercall exit the VMM handles, then completes.
                vcpu.mmu.exit_guest_mode();
                in_guest = false;
                c.hypercalls += 1;
                c.accesses += 1;
                let ret = match env.vmm.map_gpa_range(access.gpa.0, size, private, how) {
                    Ok(()) => 0,
                    Err(e) => -(e.errno() as i64),
                };
                prog.complete(&access, AccessResult::Hypercall(ret));
                continue;
            }
            AccessKind::Ucall(_) => {
                vcpu.mmu.exit_guest_mode();
                in_guest = false;
                c.accesses += 1;
                prog.complete(&access, AccessResult::Hypercall(0));
                continue;
            }
            AccessKind::Paging(op) => {
                // With a second stage none of these exits: the processor
                // changes its own state and TLB. Under shadow paging each
                // exits to the MMU, which follows the guest's state.
                paging_op(oracle, vcpu, op);
                if shadow {
                    vcpu.mmu.exit_guest_mode();
                    in_guest = false;
                    c.paging_exits += 1;
                    crate::run_shadow::paging_exit(vcpu, op);
                    hw_perms = crate::shadow_cpu::hardware_permissions(vcpu.paging.mode());
                }
                c.accesses += 1;
                prog.complete(&access, AccessResult::Done);
                continue;
            }
            AccessKind::PteWrite { space, .. } => oracle.note_pte_write(space),
            _ => {}
        }
        if shadow {
            let flow = crate::run_shadow::shadow_access(
                env,
                vcpu,
                prog,
                &view,
                &hw_perms,
                slots.as_ref(),
                access,
                first_exit,
                &mut c,
                &mut pending,
                &mut in_guest,
            );
            match flow {
                crate::run_shadow::Flow::Next => continue,
                crate::run_shadow::Flow::Stop => break,
            }
        }
        let (write, store) = match access.kind {
            AccessKind::Write(v) | AccessKind::PteWrite { value: v, .. } => (true, Some(v)),
            AccessKind::Linear {
                access:
                    LinearAccess {
                        op: LinearOp::Write(v),
                        ..
                    },
                ..
            } => (true, Some(v)),
            _ => (false, None),
        };
        let want = if write { Access::WRITE } else { Access::READ };
        let check_dirty = write && view.ad && slots.is_some();
        // Dirty-bit clearing walks finished before this access (SeqCst
        // inside): with none started by the check, a clean leaf is a bug.
        let clears_finished = if check_dirty {
            vm.dirty_bit_clears().1
        } else {
            0
        };
        // The walk's A/D writes to guest tables filled the PML log: exit
        // after this access.
        let mut pml_full_tables = false;
        let translated = if let AccessKind::Linear { gva, access: la } = access.kind {
            table_writes.clear();
            let r = translate_linear(
                mem,
                &mut vcpu.tlb,
                &view,
                &vcpu.paging,
                gva,
                &la,
                &mut table_writes,
            );
            // The processor logs the A/D writes that set a table page's D
            // (PML); a full log exits after this access.
            for &g in &table_writes {
                pml_full_tables |= vcpu.mmu.pml_log(g);
            }
            if let Some(s) = &slots {
                let actual = match r {
                    Ok(l) => Some((Outcome::Reached(l.gpa), l.global)),
                    Err(LinearFault::Guest(e)) => Some((Outcome::Fault(e), false)),
                    Err(LinearFault::Exit(_)) => None,
                };
                if let Some((actual, global)) = actual {
                    check_linear(
                        oracle,
                        host,
                        s,
                        &vcpu.paging,
                        &vcpu.flushes,
                        gva,
                        &la,
                        actual,
                        global,
                    );
                }
            }
            match r {
                Ok(l) => Ok((l.gpa, l.t, l.source)),
                Err(LinearFault::Exit(e)) => Err(e),
                Err(LinearFault::Guest(e)) => {
                    // A #PF the guest handles: no exit with a second stage
                    // (unless the walk's A/D writes filled the log).
                    if pml_full_tables {
                        vcpu.mmu.exit_guest_mode();
                        in_guest = false;
                        c.pml_full_exits += 1;
                    }
                    c.guest_page_faults += 1;
                    c.accesses += 1;
                    prog.complete(&access, AccessResult::PageFault(e));
                    continue;
                }
            }
        } else {
            translate(mem, &mut vcpu.tlb, &view, access.gpa, want)
                .map(|(t, source)| (access.gpa, t, source))
        };
        let translated = match translated {
            Ok((gpa, t, _)) if marks_private && is_private(mem, t.pfn) != access.private => {
                Err(Exit::Violation {
                    gpa,
                    error: if write {
                        ErrorCode::PRESENT | ErrorCode::WRITE
                    } else {
                        ErrorCode::PRESENT
                    },
                })
            }
            r => r,
        };
        match translated {
            Ok((gpa, t, source)) => {
                if let Some(s) = &slots {
                    check_access(oracle, host, mem, vm, s, gpa, t.pfn, write, private_mem);
                    if check_dirty && source == Source::Walk {
                        check_dirty_after_walk(oracle, mem, &view, gpa, t.pfn, || {
                            vm.dirty_bit_clears().0 == clears_finished
                        });
                    }
                }
                if !mem.contains(t.pfn) {
                    // Only a corrupted or freed table can translate to a frame that
                    // is not host memory; never let it reach the access.
                    oracle.report(Violation::WildWalk, || {
                        format!("{gpa} translated to {:?}, outside host memory", t.pfn)
                    });
                    prog.complete(&access, AccessResult::Fault);
                    continue;
                }
                // The processor logs the write that set D (PML); a full log
                // makes it exit after this access, which drains the log.
                let pml_full = (t.set_dirty && vcpu.mmu.pml_log(gpa)) || pml_full_tables;
                let word = &mem.page(t.pfn)[((gpa.0 & 0xfff) / 8) as usize];
                let result = match store {
                    Some(v) => {
                        // Guest tables are read with acquire loads by walkers.
                        word.store(v, Ordering::Release);
                        AccessResult::Memory(v)
                    }
                    None => AccessResult::Memory(word.load(Ordering::Relaxed)),
                };
                prog.complete(&access, result);
                c.accesses += 1;
                if c.accesses % 4096 == 0 {
                    if let Some(p) = &opts.progress {
                        p.fetch_add(4096, Ordering::Relaxed);
                    }
                }
                since_toggle += 1;
                if let (true, Some(t0)) = (timing, first_exit) {
                    let b = opts
                        .classify
                        .as_ref()
                        .map_or(0, |f| f(access.gpa))
                        .min(buckets - 1);
                    let _ = resolve_ns[b].record(t0.elapsed().as_nanos() as u64);
                }
                if pml_full {
                    vcpu.mmu.exit_guest_mode();
                    in_guest = false;
                    c.pml_full_exits += 1;
                }
            }
            Err(exit) => {
                vcpu.mmu.exit_guest_mode();
                in_guest = false;
                let t0 = if timing {
                    Some(first_exit.unwrap_or_else(Instant::now))
                } else {
                    first_exit
                };
                let (gpa, error) = match exit {
                    Exit::Violation { gpa, mut error } => {
                        c.violations += 1;
                        if marks_private && access.private {
                            error |= ErrorCode::PRIVATE;
                        }
                        (gpa, error)
                    }
                    Exit::Misconfig { gpa } => {
                        c.misconfigs += 1;
                        (gpa, vmmu::ErrorCode::RSVD)
                    }
                    Exit::Wild { gpa } => {
                        oracle.report(Violation::WildWalk, || {
                            format!("walk for {gpa} left host memory")
                        });
                        prog.complete(&access, AccessResult::Fault);
                        continue;
                    }
                };
                let b = opts
                    .classify
                    .as_ref()
                    .map_or(0, |f| f(gpa))
                    .min(buckets - 1);
                let l0 = vcpu.mmu.mmu_lock_reads();
                let f0 = timing.then(Instant::now);
                let r = vcpu.mmu.page_fault(gpa, error);
                let dur = f0.map_or(0, |f0| f0.elapsed().as_nanos() as u64);
                let locks = vcpu.mmu.mmu_lock_reads() - l0;
                if timing {
                    let _ = fault_ns[b].record(dur.max(1));
                    let _ = outcome_ns[fault_outcome(&r)].record(dur.max(1));
                }
                let bc = &mut bucket_counts[b];
                bc.faults += 1;
                bc.lock_reads += locks;
                if matches!(r, Ok(RetPf::Retry)) {
                    bc.retries += 1;
                    bc.retries_locked += (locks > 0) as u64;
                }
                if let (Some(epoch), Some(f0)) = (opts.trace_epoch, f0) {
                    let start_ns = f0.duration_since(epoch).as_nanos() as u64;
                    if trace.len() >= opts.trace_limit {
                        trace_dropped += 1;
                        trace_cut_ns.get_or_insert(start_ns);
                    } else {
                        trace.push(FaultRecord {
                            start_ns,
                            dur_ns: dur,
                            gpa: gpa.0,
                            outcome: FAULT_OUTCOMES[fault_outcome(&r)],
                            lock_reads: locks,
                        });
                    }
                }
                match r {
                    Ok(RetPf::Emulate) => {
                        if let Some(s) = &slots {
                            check_emulated(oracle, vm, s, vcpu.mmu.role().as_id(), gpa, write);
                        }
                        c.mmio += 1;
                        c.accesses += 1;
                        // Reads complete with MMIO_READ_VALUE; writes go to the device.
                        prog.complete(&access, AccessResult::Mmio);
                    }
                    Ok(RetPf::Retry) => {
                        c.retries += 1;
                        pending = retry_or_stuck(oracle, vcpu.id, prog, access, t0);
                    }
                    Ok(_) => pending = Some((access, t0)),
                    Err(FaultError::MemoryFault {
                        gpa: fgpa,
                        size,
                        private,
                    }) => {
                        c.memory_faults += 1;
                        match opts.memory_faults {
                            MemoryFaultPolicy::Fail => {
                                c.accesses += 1;
                                prog.complete(
                                    &access,
                                    AccessResult::MemoryFault {
                                        gpa: fgpa,
                                        size,
                                        private,
                                    },
                                );
                            }
                            MemoryFaultPolicy::Reenter => {
                                pending = retry_or_stuck(oracle, vcpu.id, prog, access, t0);
                            }
                            MemoryFaultPolicy::Convert
                                if !env.vmm.needs_conversion(fgpa.0, size, private) =>
                            {
                                pending = retry_or_stuck(oracle, vcpu.id, prog, access, t0);
                            }
                            MemoryFaultPolicy::Convert => {
                                match env.vmm.convert(fgpa.0, size, private) {
                                    Ok(()) => {
                                        c.conversions += 1;
                                        prog.converted(fgpa, size, private);
                                        pending = retry_or_stuck(oracle, vcpu.id, prog, access, t0);
                                    }
                                    Err(_) => {
                                        c.accesses += 1;
                                        prog.complete(&access, AccessResult::Fault);
                                    }
                                }
                            }
                        }
                    }
                    Err(FaultError::Host { .. }) => {
                        c.efaults += 1;
                        c.accesses += 1;
                        prog.complete(&access, AccessResult::Fault);
                    }
                    Err(
                        FaultError::NoMemory(_)
                        | FaultError::WrongMmu(_)
                        | FaultError::NoShadowPages { .. },
                    ) => {
                        c.efaults += 1;
                        prog.complete(&access, AccessResult::Fault);
                        break;
                    }
                }
            }
        }
    }
    if in_guest {
        vcpu.mmu.exit_guest_mode();
    }
    drop(cpu);
    c.tlb_hits = vcpu.tlb.hits - h0;
    c.tlb_misses = vcpu.tlb.misses - m0;
    if let Some(p) = &opts.progress {
        p.fetch_add(c.accesses % 4096, Ordering::Relaxed);
    }
    VcpuReport {
        id: vcpu.id,
        elapsed: start.elapsed(),
        counters: c,
        resolve_ns,
        fault_ns,
        outcome_ns,
        buckets: bucket_counts,
        trace,
        trace_dropped,
        trace_cut_ns,
    }
}

/// Carry out a paging instruction on the vCPU's state and TLB, and log the
/// flush it makes for the oracle.
fn paging_op(oracle: &Oracle, vcpu: &mut Vcpu, op: PagingOp) {
    let clock = oracle.pte_clock();
    let (tlb, log) = (&mut vcpu.tlb, &mut vcpu.flushes);
    match op {
        PagingOp::SetMode(mode) => {
            let old = *vcpu.paging.mode();
            if old.enabled != mode.enabled || old.pcide != mode.pcide || old.pge != mode.pge {
                tlb.flush_linear(None, true);
                log.flush_all(clock);
            }
            vcpu.paging.set_mode(mode);
        }
        PagingOp::LoadCr3(value) => {
            let mode = *vcpu.paging.mode();
            let keep = mode.pcide && value & CR3_NOFLUSH != 0;
            vcpu.paging.cr3 = value & !CR3_NOFLUSH;
            if !keep {
                let pcid = vcpu.paging.pcid();
                // Global translations stay (there are none without PGE).
                tlb.flush_linear(Some(pcid), false);
                log.flush_pcid(pcid, clock);
            }
        }
        PagingOp::Invlpg(gva) => {
            let pcid = vcpu.paging.pcid();
            tlb.invalidate_page(pcid, gva, true);
            log.flush_page(pcid, gva, true, clock);
        }
        PagingOp::Invpcid(kind) => match kind {
            Invpcid::Address { pcid, gva } => {
                tlb.invalidate_page(pcid, gva, false);
                log.flush_page(pcid, gva, false, clock);
            }
            Invpcid::Context(pcid) => {
                tlb.flush_linear(Some(pcid), false);
                log.flush_pcid(pcid, clock);
            }
            Invpcid::AllIncludingGlobal => {
                tlb.flush_linear(None, true);
                log.flush_all(clock);
            }
            Invpcid::AllNonGlobal => {
                tlb.flush_linear(None, false);
                log.flush_nonglobal(clock);
            }
        },
    }
}

fn is_private(mem: &HostMemory, pfn: vmmu::Pfn) -> bool {
    mem.state(pfn) == PageState::Private
}

/// Run the access again, unless it has been retried for too long: then it is
/// reported stuck and completed as failed.
pub(crate) fn retry_or_stuck<P: GuestProgram>(
    oracle: &Oracle,
    vcpu: u32,
    prog: &mut P,
    access: GuestAccess,
    first_exit: Option<Instant>,
) -> Option<(GuestAccess, Option<Instant>)> {
    let t0 = first_exit.unwrap_or_else(Instant::now);
    if t0.elapsed() > STUCK_AFTER {
        oracle.report(Violation::Stuck, || {
            format!("vCPU {vcpu} retried {} for 20 s", access.gpa)
        });
        prog.complete(&access, AccessResult::Fault);
        None
    } else {
        Some((access, Some(t0)))
    }
}
