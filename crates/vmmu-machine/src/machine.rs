//! The machine: host memory, the host MMU, one VM and its vCPU threads.
//!
//! A vCPU thread runs a guest program access by access. Each access goes through
//! the vCPU's TLB and page walker; a violation exits guest mode and is handed to
//! the MMU's fault pipeline, then the access is retried. With the oracle on, every
//! access made in guest mode is checked against the host's current mapping first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use vmmu::{
    Access, FaultError, Gpa, HostOps, Hva, HvaRange, Kick, MemslotError, MemslotSet, RetPf,
    UserMemoryRegion, VcpuMmu, Vm, VmConfig, VmError,
};

use crate::cpu::{peek_leaf, translate, Exit, Mmu, Source};
use crate::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram};
use crate::host_memory::{HostMemory, MemoryError};
use crate::oracle::{Oracle, Violation};
use crate::primary_mmu::{Backing, HostError, HostMmu};
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::tlb::Tlb;

/// How a machine is built.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Host memory to reserve (only touched pages cost memory).
    pub memory_bytes: u64,
    /// The VM's MMU configuration.
    pub vm: VmConfig,
    /// Check every guest access against the host (slower).
    pub oracle: bool,
    /// Poison freed frames.
    pub poison: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            memory_bytes: 4 << 30,
            vm: VmConfig::default(),
            oracle: true,
            poison: true,
        }
    }
}

/// Errors building or driving a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Host memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A host mapping.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A memslot.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
}

/// Counts kicks; vCPU threads notice them by polling their exit request.
#[derive(Debug, Default)]
pub struct Kicker {
    /// Kicks delivered.
    pub kicks: AtomicU64,
}

impl Kick for Kicker {
    fn kick(&self, _vcpu_id: u32) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-vCPU counters of one run.
#[derive(Debug, Default, Clone)]
pub struct VcpuCounters {
    /// Accesses completed (memory, MMIO or fault).
    pub accesses: u64,
    /// Guest entries.
    pub entries: u64,
    /// EPT violation exits.
    pub violations: u64,
    /// EPT misconfiguration (MMIO entry) exits.
    pub misconfigs: u64,
    /// Exits because a requester asked (kick) or the batch ended.
    pub other_exits: u64,
    /// Accesses completed as MMIO.
    pub mmio: u64,
    /// Accesses that failed with EFAULT.
    pub efaults: u64,
    /// Memory-fault exits.
    pub memory_faults: u64,
    /// Faults that said "retry".
    pub retries: u64,
    /// SMM switches the VM refused (it has one address space).
    pub smm_refused: u64,
    /// TLB hits / misses.
    pub tlb_hits: u64,
    /// TLB misses.
    pub tlb_misses: u64,
}

/// One vCPU: its MMU context, its TLB.
#[derive(Debug)]
#[repr(align(128))] // the TLB's counters change on every access: no sharing a line
pub struct Vcpu {
    /// Id.
    pub id: u32,
    /// The MMU context.
    pub mmu: VcpuMmu,
    /// Hardware TLB.
    pub tlb: Tlb,
}

/// Options of one run.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Sorts faults into latency buckets by address (e.g. inside/outside a range).
    pub classify: Option<Arc<dyn Fn(Gpa) -> usize + Send + Sync>>,
    /// Number of buckets `classify` returns.
    pub buckets: usize,
    /// Enter or leave SMM every this many accesses (root switching).
    pub smm_toggle_every: Option<u64>,
    /// Per vCPU (indexed by id): set while it is in SMM and counting its role
    /// switches, so a host thread can act while vCPUs are in a given role.
    pub smm_state: Option<Arc<SmmState>>,
    /// Stop all vCPUs when set.
    pub stop: Option<Arc<AtomicBool>>,
    /// Count completed accesses here (for progress bars).
    pub progress: Option<Arc<AtomicU64>>,
    /// Record every fault (start, duration, address, outcome) relative to this
    /// instant, up to `trace_limit` per vCPU.
    pub trace_epoch: Option<Instant>,
    /// Cap on recorded faults per vCPU.
    pub trace_limit: usize,
    /// Measure fault latencies (two clock reads per fault).
    pub latency: bool,
}

/// Where each vCPU's role is, visible to other threads.
#[derive(Debug, Default)]
pub struct SmmState {
    /// In SMM now, per vCPU id.
    pub in_smm: Vec<AtomicBool>,
    /// Role switches made, over all vCPUs.
    pub switches: AtomicU64,
    /// While set, vCPUs keep their roles (no switches).
    pub hold: AtomicBool,
}

impl SmmState {
    /// State for `vcpus` vCPUs, all outside SMM.
    pub fn new(vcpus: u32) -> SmmState {
        SmmState {
            in_smm: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            switches: AtomicU64::new(0),
            hold: AtomicBool::new(false),
        }
    }

    /// Whether any vCPU is in SMM.
    pub fn any_in_smm(&self) -> bool {
        self.in_smm.iter().any(|b| b.load(Ordering::Acquire))
    }
}

/// One recorded fault.
#[derive(Debug, Clone, Copy)]
pub struct FaultRecord {
    /// Start, ns since the trace epoch.
    pub start_ns: u64,
    /// Duration of the `page_fault` call.
    pub dur_ns: u64,
    /// Faulting address.
    pub gpa: u64,
    /// Outcome (KVM's name).
    pub outcome: &'static str,
    /// `mmu_lock` read acquisitions during the call.
    pub lock_reads: u64,
}

/// Per-bucket fault counts.
#[derive(Debug, Clone, Default)]
pub struct BucketCounts {
    /// `page_fault` calls.
    pub faults: u64,
    /// Calls that returned Retry.
    pub retries: u64,
    /// `mmu_lock` read acquisitions made by those calls.
    pub lock_reads: u64,
    /// Retry calls that took `mmu_lock`.
    pub retries_locked: u64,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("buckets", &self.buckets)
            .finish_non_exhaustive()
    }
}

/// What one vCPU did in a run.
#[derive(Debug)]
pub struct VcpuReport {
    /// vCPU id.
    pub id: u32,
    /// Time from the common start to this vCPU's last access.
    pub elapsed: Duration,
    /// Counters.
    pub counters: VcpuCounters,
    /// Time from an access's first exit to its completion, per bucket (ns).
    pub resolve_ns: Vec<Histogram<u64>>,
    /// Time of each `page_fault` call, per bucket (ns).
    pub fault_ns: Vec<Histogram<u64>>,
    /// Fault counts per bucket.
    pub buckets: Vec<BucketCounts>,
    /// Recorded faults (with `trace_epoch`).
    pub trace: Vec<FaultRecord>,
    /// Faults not recorded because `trace_limit` was reached, and when the
    /// first of them happened (ns since the trace epoch).
    pub trace_dropped: u64,
    /// Start of the first fault that was not recorded.
    pub trace_cut_ns: Option<u64>,
}

/// Things the closure running beside the vCPUs can use.
pub struct PhaseCtx<'a> {
    /// The host MMU.
    pub host: &'a Arc<HostMmu>,
    /// The VM.
    pub vm: &'a Vm,
    /// vCPUs still running.
    pub running: &'a AtomicU64,
    harvests: &'a AtomicU64,
}

impl std::fmt::Debug for PhaseCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhaseCtx").finish_non_exhaustive()
    }
}

impl PhaseCtx<'_> {
    /// Whether every vCPU finished its program.
    pub fn done(&self) -> bool {
        self.running.load(Ordering::Acquire) == 0
    }

    /// Harvest (clear) the Dirty bits of `range` while vCPUs run. Harvests go
    /// through here so the oracle knows a clean leaf may be the harvest's doing,
    /// not a processor that forgot to set D.
    pub fn clear_dirty(&self, as_id: u16, range: vmmu::GfnRange) -> Result<u64, VmError> {
        // SeqCst: a vCPU that reads the same even count before its walk and
        // after its check saw no harvest in between.
        self.harvests.fetch_add(1, Ordering::SeqCst);
        let r = self.vm.clear_dirty_gfn_range(as_id, range);
        self.harvests.fetch_add(1, Ordering::SeqCst);
        r
    }
}

/// What teardown found.
#[derive(Debug, Clone, Default)]
pub struct TeardownReport {
    /// Data frames still allocated after everything was unmapped.
    pub leaked_data_pages: u64,
    /// Table pages still allocated after the VM was destroyed.
    pub leaked_table_pages: u64,
    /// Double frees and bad reference drops seen by the arena.
    pub double_frees: u64,
}

/// The machine.
pub struct Machine {
    /// Host memory.
    pub mem: Arc<HostMemory>,
    /// The host MMU.
    pub host: Arc<HostMmu>,
    /// The VM.
    pub vm: Vm,
    /// The oracle.
    pub oracle: Arc<Oracle>,
    /// Kicks.
    pub kicker: Arc<Kicker>,
    /// Dirty-bit harvests started and finished (odd while one runs).
    harvests: Arc<AtomicU64>,
    vcpus: Vec<Vcpu>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("mem", &self.mem)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

const BATCH: u32 = 256;
const STUCK_AFTER: Duration = Duration::from_secs(20);

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .unwrap_or_else(|_| unreachable!("valid bounds"))
}

impl Machine {
    /// Build a machine with `vcpus` vCPUs and no memory mapped yet.
    pub fn new(cfg: MachineConfig, vcpus: u32) -> Result<Machine, MachineError> {
        let mem = Arc::new(HostMemory::new(cfg.memory_bytes, cfg.poison)?);
        let host = Arc::new(HostMmu::new(mem.clone()));
        let kicker = Arc::new(Kicker::default());
        let ops = HostOps {
            memory: mem.clone(),
            primary: host.clone(),
            kick: kicker.clone(),
            private: Some(mem.clone()),
        };
        let vm = Vm::new(cfg.vm, ops)?;
        host.register(Arc::new(vm.clone()));
        let vcpus = (0..vcpus)
            .map(|id| {
                Ok(Vcpu {
                    id,
                    mmu: vm.create_vcpu(id)?,
                    tlb: Tlb::default(),
                })
            })
            .collect::<Result<Vec<_>, VmError>>()?;
        Ok(Machine {
            mem,
            host,
            vm,
            oracle: Arc::new(Oracle::new(cfg.oracle)),
            kicker,
            harvests: Arc::new(AtomicU64::new(0)),
            vcpus,
        })
    }

    /// The vCPUs.
    pub fn vcpus(&mut self) -> &mut [Vcpu] {
        &mut self.vcpus
    }

    /// Map host memory.
    pub fn map(&self, hva: Hva, len: u64, backing: Backing) -> Result<(), MachineError> {
        Ok(self.host.map_region(hva, len, backing)?)
    }

    /// `KVM_SET_USER_MEMORY_REGION`.
    pub fn set_memslot(&self, region: UserMemoryRegion) -> Result<(), MachineError> {
        Ok(self.vm.set_user_memory_region(region)?)
    }

    /// Run one program per vCPU to completion, all released together, while
    /// `meanwhile` runs on the calling thread.
    pub fn run<P: GuestProgram>(
        &mut self,
        programs: Vec<P>,
        opts: &RunOptions,
        meanwhile: impl FnOnce(&PhaseCtx<'_>),
    ) -> Vec<(P, VcpuReport)> {
        assert_eq!(programs.len(), self.vcpus.len(), "one program per vCPU");
        let running = AtomicU64::new(programs.len() as u64);
        let barrier = std::sync::Barrier::new(programs.len() + 1);
        let (mem, host, oracle, vm) = (&self.mem, &self.host, &self.oracle, &self.vm);
        let harvests = &*self.harvests;
        let out = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(programs)
                .map(|(vcpu, mut prog)| {
                    let (barrier, running) = (&barrier, &running);
                    s.spawn(move || {
                        barrier.wait();
                        let env = VcpuEnv {
                            mem,
                            host,
                            oracle,
                            vm,
                            harvests,
                        };
                        let report = run_vcpu(&env, vcpu, &mut prog, opts);
                        running.fetch_sub(1, Ordering::AcqRel);
                        (prog, report)
                    })
                })
                .collect();
            barrier.wait();
            meanwhile(&PhaseCtx {
                host,
                vm,
                running: &running,
                harvests,
            });
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect::<Vec<_>>()
        });
        for (p, _) in &out {
            self.oracle
                .report_n(Violation::DataMismatch, p.mismatches(), || {
                    p.first_mismatch().unwrap_or_default()
                });
        }
        let inv = self.vm.stats().invariant_violations;
        let seen = self.oracle.count(Violation::MmuInvariant);
        if inv > seen {
            self.oracle
                .report_n(Violation::MmuInvariant, inv - seen, || {
                    "the MMU counted invariant violations".into()
                });
        }
        out
    }

    /// Destroy the VM, unmap everything, and check that nothing leaked.
    pub fn teardown(self) -> TeardownReport {
        let Machine {
            mem,
            host,
            vm,
            oracle,
            kicker: _,
            harvests: _,
            vcpus,
        } = self;
        drop(vcpus);
        host.unregister_all();
        drop(vm);
        let leaked_table_pages = mem.table_pages();
        host.ksm_release();
        let regions: Vec<u64> = host.region_starts();
        for r in regions {
            host.unmap_region(Hva(r));
        }
        let report = TeardownReport {
            leaked_data_pages: mem.data_pages(),
            leaked_table_pages,
            double_frees: mem.violations.double_frees.load(Ordering::Relaxed)
                + mem.violations.bad_puts.load(Ordering::Relaxed),
        };
        let bad = report.leaked_data_pages + report.leaked_table_pages + report.double_frees;
        oracle.report_n(Violation::Leak, bad, || format!("teardown: {report:?}"));
        report
    }
}

fn check_access(
    oracle: &Oracle,
    host: &HostMmu,
    slots: &MemslotSet,
    gpa: Gpa,
    pfn: vmmu::Pfn,
    write: bool,
) {
    oracle.checked();
    let gfn = gpa.gfn();
    match slots.lookup(gfn) {
        None => oracle.report(Violation::NoSlotAccess, || {
            format!("{gpa} reached {pfn:?} with no memslot")
        }),
        Some(s) if s.is_invalid() => {}
        Some(s) => {
            let hva = s.gfn_to_hva(gfn);
            match host.translate(hva) {
                None => oracle.report(Violation::StaleTranslation, || {
                    format!("{gpa} ({hva}) reached {pfn:?} but the host maps nothing there")
                }),
                Some(m) if m.pfn != pfn => oracle.report(Violation::StaleTranslation, || {
                    format!(
                        "{gpa} ({hva}) reached {pfn:?} but the host maps {:?}",
                        m.pfn
                    )
                }),
                Some(m) if write && !m.writable => oracle
                    .report(Violation::WriteToReadOnly, || {
                        format!("write to {gpa} ({hva}, {pfn:?}) the host maps read-only")
                    }),
                Some(_) => {}
            }
        }
    }
}

/// Oracle (d), the reverse direction: the MMU answered "emulate" for `gpa`.
/// That is wrong if the memslots the vCPU entered with are still the current
/// ones (so the fault saw them too) and hold a valid slot there, unless the
/// access writes a read-only slot.
fn check_emulated(
    oracle: &Oracle,
    vm: &Vm,
    entry_slots: &Arc<MemslotSet>,
    as_id: u16,
    gpa: Gpa,
    write: bool,
) {
    let Some(current) = vm.memslots(as_id) else {
        return;
    };
    if !Arc::ptr_eq(&current, entry_slots) {
        return;
    }
    if let Some(slot) = current.lookup(gpa.gfn()) {
        let legitimate = slot.is_invalid() || (write && slot.is_readonly());
        if !legitimate {
            oracle.report(Violation::EmulatedMemory, || {
                format!(
                    "{} {gpa} completed as MMIO, but slot {:#x} maps it (generation {:#x})",
                    if write { "write to" } else { "read of" },
                    slot.slot_number(),
                    current.generation()
                )
            });
        }
    }
}

/// Oracle (e): a write that walked the tables (A/D on) must leave the leaf it
/// used dirty. Only checked while the leaf still maps the same frame writable
/// (a zap or a remap in between replaced it, and a writable leaf is created
/// dirty) and when `no_harvest` says no Dirty-bit harvest overlapped.
fn check_dirty_after_walk(
    oracle: &Oracle,
    mem: &HostMemory,
    view: &Mmu,
    gpa: Gpa,
    pfn: vmmu::Pfn,
    no_harvest: impl FnOnce() -> bool,
) {
    if let Some((leaf, level)) = peek_leaf(mem, view, gpa) {
        let offset = gpa.gfn().0 & (level.pages() - 1);
        let same = leaf.pfn().0 + offset == pfn.0;
        if same && leaf.is_writable() && !leaf.is_dirty() && no_harvest() {
            oracle.report(Violation::DirtyNotSet, || {
                format!("write to {gpa} ({pfn:?}) walked the tables but its leaf {leaf:?} is clean")
            });
        }
    }
}

/// What a vCPU thread shares with the machine.
struct VcpuEnv<'a> {
    mem: &'a HostMemory,
    host: &'a HostMmu,
    oracle: &'a Oracle,
    vm: &'a Vm,
    harvests: &'a AtomicU64,
}

fn run_vcpu<P: GuestProgram>(
    env: &VcpuEnv<'_>,
    vcpu: &mut Vcpu,
    prog: &mut P,
    opts: &RunOptions,
) -> VcpuReport {
    let (mem, host, oracle, vm) = (env.mem, env.host, env.oracle, env.vm);
    let start = Instant::now();
    let timing = opts.latency || opts.trace_epoch.is_some();
    let buckets = opts.buckets.max(1);
    let mut resolve_ns: Vec<_> = (0..buckets).map(|_| histogram()).collect();
    let mut fault_ns: Vec<_> = (0..buckets).map(|_| histogram()).collect();
    let mut bucket_counts: Vec<BucketCounts> = vec![BucketCounts::default(); buckets];
    let mut trace: Vec<FaultRecord> = Vec::new();
    let mut trace_dropped = 0u64;
    let mut trace_cut_ns = None;
    let mut c = VcpuCounters::default();
    let (h0, m0) = (vcpu.tlb.hits, vcpu.tlb.misses);
    let mut in_guest = false;
    let mut mmu_view: Option<Mmu> = None;
    let mut slots: Option<Arc<MemslotSet>> = None;
    let mut batch = 0u32;
    let mut pending: Option<(GuestAccess, Option<Instant>)> = None;
    let mut since_toggle = 0u64;
    let mut smm_toggle = opts.smm_toggle_every;
    loop {
        if opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            break;
        }
        if !in_guest {
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
        let write = matches!(access.kind, AccessKind::Write(_));
        let want = if write { Access::WRITE } else { Access::READ };
        let check_dirty = write && view.ad && slots.is_some();
        // SeqCst: pairs with the harvest count in `PhaseCtx::clear_dirty`.
        let harvests_before = if check_dirty {
            env.harvests.load(Ordering::SeqCst)
        } else {
            0
        };
        match translate(mem, &mut vcpu.tlb, &view, access.gpa, want) {
            Ok((t, source)) => {
                if let Some(s) = &slots {
                    check_access(oracle, host, s, access.gpa, t.pfn, write);
                    if check_dirty && source == Source::Walk {
                        check_dirty_after_walk(oracle, mem, &view, access.gpa, t.pfn, || {
                            harvests_before % 2 == 0
                                && env.harvests.load(Ordering::SeqCst) == harvests_before
                        });
                    }
                }
                if !mem.contains(t.pfn) {
                    // Only a corrupted or freed table can translate to a frame that
                    // is not host memory; never let it reach the access.
                    oracle.report(Violation::WildWalk, || {
                        format!(
                            "{} translated to {:?}, outside host memory",
                            access.gpa, t.pfn
                        )
                    });
                    prog.complete(&access, AccessResult::Fault);
                    continue;
                }
                let word = &mem.page(t.pfn)[((access.gpa.0 & 0xfff) / 8) as usize];
                let result = match access.kind {
                    AccessKind::Read => AccessResult::Memory(word.load(Ordering::Relaxed)),
                    AccessKind::Write(v) => {
                        word.store(v, Ordering::Relaxed);
                        AccessResult::Memory(v)
                    }
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
                    Exit::Violation { gpa, error } => {
                        c.violations += 1;
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
                            outcome: match r {
                                Ok(RetPf::Fixed) => "fixed",
                                Ok(RetPf::Spurious) => "spurious",
                                Ok(RetPf::Retry) => "retry",
                                Ok(RetPf::Emulate) => "emulate",
                                Ok(RetPf::WriteProtected) => "write_protected",
                                Ok(_) => "other",
                                Err(FaultError::MemoryFault { .. }) => "memory_fault",
                                Err(_) => "efault",
                            },
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
                        let t0 = t0.unwrap_or_else(Instant::now);
                        if t0.elapsed() > STUCK_AFTER {
                            oracle.report(Violation::Stuck, || {
                                format!("vCPU {} retried {gpa} for 20 s", vcpu.id)
                            });
                            prog.complete(&access, AccessResult::Fault);
                        } else {
                            pending = Some((access, Some(t0)));
                        }
                    }
                    Ok(_) => pending = Some((access, t0)),
                    Err(FaultError::MemoryFault { .. }) => {
                        c.memory_faults += 1;
                        c.accesses += 1;
                        prog.complete(&access, AccessResult::Fault);
                    }
                    Err(FaultError::Host { .. }) => {
                        c.efaults += 1;
                        c.accesses += 1;
                        prog.complete(&access, AccessResult::Fault);
                    }
                    Err(FaultError::NoMemory(_)) => {
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
        buckets: bucket_counts,
        trace,
        trace_dropped,
        trace_cut_ns,
    }
}

/// Convenience: an `HvaRange` of `len` bytes at `start`.
pub fn hva_range(start: u64, len: u64) -> HvaRange {
    HvaRange::new(Hva(start), Hva(start + len))
}
