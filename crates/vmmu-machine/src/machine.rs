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
    Gpa, HostOps, Hva, HvaRange, Kick, MemslotError, UserMemoryRegion, VcpuMmu, Vm, VmConfig,
    VmError,
};

use crate::guest::GuestProgram;
use crate::guest_oracle::FlushLog;
use crate::host_memory::{HostMemory, MemoryError};
use crate::oracle::{Oracle, Violation};
use crate::paging::GuestCpu;
use crate::primary_mmu::{Backing, HostError, HostMmu};
use crate::run::{run_vcpu, VcpuEnv};
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::tlb::Tlb;
use crate::vmm::Vmm;

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
    /// Log dirty pages into per-vCPU rings of this many entries (0: bitmaps),
    /// enabled before the vCPUs are created.
    pub dirty_ring: u32,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            memory_bytes: 4 << 30,
            vm: VmConfig::default(),
            oracle: true,
            poison: true,
            dirty_ring: 0,
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
    /// A guest_memfd slot.
    #[error(transparent)]
    GmemSlot(#[from] crate::vmm::GmemSlotError),
    /// The dirty ring could not be enabled.
    #[error("dirty ring: {0}")]
    DirtyRing(String),
    /// The guest page tables could not be written where asked.
    #[error("guest page tables at {0}: {1}")]
    Tables(Gpa, String),
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
    /// Exits because the vCPU's dirty ring was full.
    pub dirty_ring_full_exits: u64,
    /// PML-full exits (the vCPU's page-modification log filled up).
    pub pml_full_exits: u64,
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
    /// Page faults the guest's own paging raised (delivered to the guest).
    pub guest_page_faults: u64,
    /// Faults that said "retry".
    pub retries: u64,
    /// SMM switches the VM refused (it has one address space).
    pub smm_refused: u64,
    /// Hypercalls (`MapGpaRange`) handled.
    pub hypercalls: u64,
    /// Conversions the VMM made on memory-fault exits.
    pub conversions: u64,
    /// TLB hits / misses.
    pub tlb_hits: u64,
    /// TLB misses.
    pub tlb_misses: u64,
    /// Shadow paging: #PF exits to the MMU.
    pub shadow_pf_exits: u64,
    /// Shadow paging: paging instructions that exited (CR0/CR4, CR3 loads,
    /// INVLPG, INVPCID).
    pub paging_exits: u64,
    /// Shadow paging: guest stores to shadowed tables the MMU emulated.
    pub emulated_writes: u64,
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
    /// The guest's paging state (off until its program turns it on).
    pub paging: GuestCpu,
    /// The guest's flushes, for the oracle's paging check.
    pub flushes: FlushLog,
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
    /// What the VMM does with a memory-fault exit.
    pub memory_faults: MemoryFaultPolicy,
    /// The physical CPUs the vCPUs share (see [`crate::pcpu`]); `None`:
    /// this machine's, when there are more vCPUs than CPUs.
    pub pcpus: Option<usize>,
}

/// What the VMM does when a vCPU exits with `KVM_EXIT_MEMORY_FAULT`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MemoryFaultPolicy {
    /// Fail the access (a VMM that does not handle private memory).
    #[default]
    Fail,
    /// Run the vCPU again unchanged (the exit came from a conversion that
    /// raced the fault; the next fault sees the new attributes).
    Reenter,
    /// Convert the range to what the access wanted, then run the vCPU again
    /// (QEMU's implicit conversion). A range already on that side is not
    /// converted (the exit had another cause: its memslot is being replaced,
    /// or a conversion raced the fault); the vCPU just runs again.
    Convert,
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
    /// Time of each `page_fault` call by its outcome, indexed like
    /// [`FAULT_OUTCOMES`] (ns; with `latency` or a trace).
    pub outcome_ns: Vec<Histogram<u64>>,
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
    /// The VMM (guest_memfd slots, conversions).
    pub vmm: &'a Vmm,
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

    /// Harvest (clear) the Dirty bits of `range` while vCPUs run (the oracle
    /// learns of it from the VM's [`Vm::dirty_bit_clears`]).
    pub fn clear_dirty(&self, as_id: u16, range: vmmu::GfnRange) -> Result<u64, VmError> {
        self.vm.clear_dirty_gfn_range(as_id, range)
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
    /// The VMM's private-memory side.
    pub vmm: Arc<Vmm>,
    /// Time every `page_fault` call of every run (as `RunOptions::latency`
    /// does for one run) and keep the calls' latency by outcome in
    /// [`Machine::outcome_ns`].
    pub record_latency: bool,
    /// Fault-call latency by outcome over every run so far, indexed like
    /// [`FAULT_OUTCOMES`] (ns).
    pub outcome_ns: Vec<Histogram<u64>>,
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

pub(crate) const BATCH: u32 = 256;
pub(crate) const STUCK_AFTER: Duration = Duration::from_secs(20);

/// A running vCPU, counted out of `PhaseCtx::done`'s count when it ends.
struct Leaving<'a>(&'a AtomicU64);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a `page_fault` call came to, as reports and traces name it.
pub const FAULT_OUTCOMES: [&str; 8] = [
    "fixed",
    "spurious",
    "retry",
    "emulate",
    "write_protected",
    "other",
    "memory_fault",
    "efault",
];

/// The index in [`FAULT_OUTCOMES`] of a fault's result.
pub fn fault_outcome(r: &Result<vmmu::RetPf, vmmu::FaultError>) -> usize {
    match r {
        Ok(vmmu::RetPf::Fixed) => 0,
        Ok(vmmu::RetPf::Spurious) => 1,
        Ok(vmmu::RetPf::Retry) => 2,
        Ok(vmmu::RetPf::Emulate) => 3,
        Ok(vmmu::RetPf::WriteProtected) => 4,
        Ok(_) => 5,
        Err(vmmu::FaultError::MemoryFault { .. }) => 6,
        Err(_) => 7,
    }
}

/// An empty latency histogram (1 ns to 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
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
        if cfg.dirty_ring > 0 {
            vm.enable_dirty_ring(cfg.dirty_ring)
                .map_err(|e| MachineError::DirtyRing(e.to_string()))?;
        }
        host.register(Arc::new(vm.clone()));
        let vcpus = (0..vcpus)
            .map(|id| {
                Ok(Vcpu {
                    id,
                    mmu: vm.create_vcpu(id)?,
                    tlb: Tlb::default(),
                    paging: GuestCpu::default(),
                    flushes: FlushLog::default(),
                })
            })
            .collect::<Result<Vec<_>, VmError>>()?;
        let vmm = Arc::new(Vmm::new(vm.clone(), host.clone()));
        Ok(Machine {
            vmm,
            mem,
            host,
            vm,
            oracle: Arc::new(Oracle::new(cfg.oracle)),
            kicker,
            record_latency: false,
            outcome_ns: FAULT_OUTCOMES.iter().map(|_| histogram()).collect(),
            vcpus,
        })
    }

    /// The vCPUs.
    pub fn vcpus(&mut self) -> &mut [Vcpu] {
        &mut self.vcpus
    }

    /// Start every vCPU with paging on (4-level, CR0.WP, NX, PCIDs) over a
    /// direct map of guest memory, as a VMM writes a guest's page tables and
    /// puts it in long mode before its first entry (KVM's selftests do): vCPU
    /// `i` gets its PML4 at `tables + i * 8 KiB` and the direct map's PDPT
    /// (512 1 GiB pages) in the page after it; `tables` must lie in a memslot
    /// of address space 0 that the guest programs do not touch. Under shadow
    /// paging the guests' physical accesses then go through the direct map,
    /// so the MMU shadows real guest tables; the TDP MMU only records the
    /// state.
    pub fn start_paging_over_direct_map(&mut self, tables: Gpa) -> Result<(), MachineError> {
        let slots = self
            .vm
            .memslots(0)
            .ok_or_else(|| MachineError::Tables(tables, "no address space 0".into()))?;
        // Every table page in a memslot before anything is written: a
        // refused call changes nothing.
        let pages = 2 * self.vcpus.len() as u64;
        if let Some(gpa) = (0..pages)
            .map(|i| Gpa(tables.0 + i * 0x1000))
            .find(|g| slots.lookup(g.gfn()).is_none())
        {
            return Err(MachineError::Tables(
                tables,
                format!("{gpa} is in no memslot"),
            ));
        }
        for v in &mut self.vcpus {
            let pml4 = Gpa(tables.0 + v.id as u64 * 0x2000);
            for (gpa, value) in crate::paging::direct_map_entries(pml4, Gpa(pml4.0 + 0x1000)) {
                let slot = slots.lookup(gpa.gfn()).ok_or_else(|| {
                    MachineError::Tables(tables, format!("{gpa} is in no memslot"))
                })?;
                let hva = slot.gfn_to_hva(gpa.gfn()).add(gpa.0 & 0xfff);
                self.host
                    .write_u64(hva, value)
                    .map_err(|e| MachineError::Tables(tables, e.to_string()))?;
            }
            v.paging.set_mode(crate::paging::PagingMode::long_mode());
            v.paging.cr3 = pml4.0;
            v.mmu
                .set_guest_paging(crate::run_shadow::guest_paging(v))
                .map_err(MachineError::Vm)?;
        }
        Ok(())
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
        let timed;
        let opts = if self.record_latency && !opts.latency {
            timed = RunOptions {
                latency: true,
                ..opts.clone()
            };
            &timed
        } else {
            opts
        };
        let (mem, host, oracle, vm) = (&self.mem, &self.host, &self.oracle, &self.vm);
        let vmm = &*self.vmm;
        let cpus = opts.pcpus.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let pool = crate::pcpu::Pcpus::for_run(programs.len(), cpus);
        let pcpus = pool.as_ref();
        let out = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(programs)
                .map(|(vcpu, mut prog)| {
                    let (barrier, running) = (&barrier, &running);
                    s.spawn(move || {
                        barrier.wait();
                        // Counted out however the vCPU ends: a vCPU that panics
                        // (a debug assertion in the MMU) must not leave the host
                        // side waiting for it forever; its panic is raised again
                        // when it is joined.
                        let _out = Leaving(running);
                        let env = VcpuEnv {
                            mem,
                            host,
                            oracle,
                            vm,
                            vmm,
                            pcpus,
                        };
                        let report = run_vcpu(&env, vcpu, &mut prog, opts);
                        (prog, report)
                    })
                })
                .collect();
            barrier.wait();
            meanwhile(&PhaseCtx {
                host,
                vm,
                running: &running,
                vmm,
            });
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect::<Vec<_>>()
        });
        for (_, r) in &out {
            for (acc, h) in self.outcome_ns.iter_mut().zip(&r.outcome_ns) {
                let _ = acc.add(h);
            }
        }
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
            vmm,
            vcpus,
            record_latency: _,
            outcome_ns: _,
        } = self;
        drop(vcpus);
        host.unregister_all();
        // The guest_memfd files hold the VM: close them first (each release
        // zaps what its file backed and frees its pages).
        vmm.clear();
        drop(vmm);
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

/// Convenience: an `HvaRange` of `len` bytes at `start`.
pub fn hva_range(start: u64, len: u64) -> HvaRange {
    HvaRange::new(Hva(start), Hva(start + len))
}
