//! The stress run: vCPUs write and verify while a host thread performs a random
//! mix of every host event and memslot change, with the oracle on.
//!
//! With a VM type that has private memory, the data slot is backed by a
//! guest_memfd as well, and the mix gains conversions (the VMM flipping random
//! ranges between private and shared, discarding the side left) and
//! punch-holes. On the SNP-like type the guests mark their accesses private or
//! shared (a side per page and pass), so a page whose side changed exits with a
//! memory fault the VMM answers by converting it, as QEMU does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmmu::{Gpa, GuardKnobs, Hva, HvaRange, MemFlags, UserMemoryRegion, VmConfig, VmType};

use crate::guest::{Discarded, GuestProgram, Pass, Pattern, RefModel, Rng};
use crate::machine::{
    Machine, MachineConfig, MachineError, MemoryFaultPolicy, PhaseCtx, RunOptions,
};
use crate::primary_mmu::Backing;
use crate::processes::ProcessChurn;

/// Guest physical base of the data slot.
pub const DATA_GPA: u64 = 1 << 30;
/// Host virtual base of the data region.
pub const DATA_HVA: u64 = 0x10_0000_0000;
const DUMMY_SLOT: u32 = 7;
const DATA_SLOT: u32 = 1;

/// What to run.
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// Bytes each vCPU owns (multiple of 2 MiB).
    pub bytes_per_vcpu: u64,
    /// How long to keep going.
    pub duration: Duration,
    /// Keep going past `duration` until this many passes are done (at most
    /// six times `duration`), so a slow build on a busy machine still runs
    /// the passes a check needs.
    pub min_passes: u64,
    /// Seed of the guest programs and the host event mix.
    pub seed: u64,
    /// Backing of the data region.
    pub backing: Backing,
    /// Test-only switches that remove a guarding step in the MMU.
    pub knobs: GuardKnobs,
    /// Hardware A/D bits (off: access tracking).
    pub ad_enabled: bool,
    /// The fault pre-check.
    pub precheck: bool,
    /// Stop as soon as the oracle has seen a violation.
    pub stop_on_violation: bool,
    /// Threads running host events at once (Linux invalidates from many CPUs;
    /// with one thread a zapper never finds another zapper's work done).
    pub host_threads: u32,
    /// Finish the current pass and stop (Ctrl-C).
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Updated after every pass, for a progress display.
    pub progress: Option<Arc<StressProgress>>,
    /// The VM type: with private memory, the data slot has a guest_memfd and
    /// conversions and punch-holes join the host events.
    pub vm_type: VmType,
    /// How dirty logging catches writes while a slot logs (the stress turns
    /// logging on, harvests and turns it off again among its host events).
    pub dirty_tracking: vmmu::DirtyTracking,
    /// The guests run with paging on: a kernel per vCPU spawning, switching
    /// and ending processes ([`crate::processes`]) instead of write/verify
    /// passes. Host events that would change guest memory under the guest's
    /// feet (discards, read-only protection, slot moves and deletions) are
    /// left out: a real host does not do them to a guest's page tables.
    pub guest_paging: bool,
    /// The MMU (shadow paging: the default VM type only).
    pub mmu: vmmu::MmuKind,
    /// The iTLB-multihit mitigation: with it the read passes fetch too (on
    /// the default VM type), NX recovery passes and run-time toggles join
    /// the host events.
    pub nx_huge_pages: bool,
}

/// A stress run's progress, readable while it runs.
#[derive(Debug, Default)]
pub struct StressProgress {
    /// Passes finished (over all vCPUs together).
    pub passes: std::sync::atomic::AtomicU64,
    /// Guest accesses so far.
    pub accesses: std::sync::atomic::AtomicU64,
    /// Oracle violations so far.
    pub violations: std::sync::atomic::AtomicU64,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            vcpus: 2,
            bytes_per_vcpu: 8 << 20,
            duration: Duration::from_secs(10),
            min_passes: 0,
            seed: 1,
            backing: Backing::AnonymousThp,
            knobs: GuardKnobs::default(),
            ad_enabled: true,
            precheck: true,
            stop_on_violation: false,
            host_threads: 2,
            stop: None,
            progress: None,
            vm_type: VmType::Default,
            dirty_tracking: vmmu::DirtyTracking::WriteProtect,
            guest_paging: false,
            mmu: vmmu::MmuKind::Tdp,
            nx_huge_pages: true,
        }
    }
}

/// Host events, by kind.
pub const EVENT_NAMES: [&str; EVENTS] = [
    "migrate",
    "swap_out",
    "ksm_merge",
    "thp_split",
    "thp_collapse",
    "mprotect_ro_rw",
    "age",
    "dontneed",
    "dummy_slot_create_delete",
    "data_slot_move",
    "data_slot_delete_recreate",
    "dirty_log_toggle",
    "zap_all_roots",
    "dirty_harvest",
    "nx_recovery",
    "nx_toggle",
    "reclaim",
    "convert",
    "punch_hole",
];

/// Number of host event kinds.
pub const EVENTS: usize = 19;

/// Events that need private memory (the last ones of [`EVENT_NAMES`]).
const PRIVATE_EVENTS: usize = 2;

/// Events that change what guest memory holds or where it is (discard,
/// read-only, slot move, slot delete, conversion, punch-hole): not run under
/// a paging guest.
const PAGING_REFUSED: [usize; 6] = [5, 7, 9, 10, 17, 18];

/// The NX huge page events: run only with the mitigation on.
const NX_EVENTS: [usize; 2] = [14, 15];

/// Events a private-memory data slot refuses, as KVM does on guest_memfd
/// slots (moves and dirty logging): not run there.
const GMEM_REFUSED: [usize; 2] = [9, 11];

/// What a stress run did.
#[derive(Debug, Clone, Default)]
pub struct StressReport {
    /// Write/verify passes completed per vCPU.
    pub passes: u64,
    /// Guest accesses.
    pub accesses: u64,
    /// Accesses the oracle checked.
    pub checked: u64,
    /// MMU faults handled.
    pub faults: u64,
    /// Memory-fault exits the VMM answered with a conversion (SNP-like guests).
    pub conversions: u64,
    /// Conversions the VMM made (host events and exits), to private and to
    /// shared.
    pub vmm_conversions: (u64, u64),
    /// The MMU's counters at the end (faults by outcome, retries by cause, ...).
    pub stats: vmmu::Stats,
    /// The run was stopped early (`StressConfig::stop`).
    pub interrupted: bool,
    /// Host events by kind (same order as [`EVENT_NAMES`]).
    pub events: [u64; EVENTS],
    /// Oracle violations by kind.
    pub violations: Vec<(&'static str, u64)>,
    /// Total violations.
    pub total_violations: u64,
    /// First violations, described.
    pub log: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
}

fn data_region(bytes: u64, gpa: u64, flags: u32) -> UserMemoryRegion {
    UserMemoryRegion {
        slot: DATA_SLOT,
        flags,
        guest_phys_addr: gpa,
        memory_size: bytes,
        userspace_addr: DATA_HVA,
    }
}

/// The host's side: random events until the vCPUs are done.
fn host_events(
    ctx: &PhaseCtx<'_>,
    rng: &mut Rng,
    total: u64,
    discarded: &Discarded,
    events: &mut [u64; EVENTS],
    paging: bool,
) {
    let pages = total / 4096;
    let private = ctx.vm.config().vm_type.has_private_mem();
    let nx = ctx.vm.nx_huge_pages();
    let kinds: Vec<usize> = (0..EVENTS)
        .filter(|k| {
            if (!nx && NX_EVENTS.contains(k)) || (paging && PAGING_REFUSED.contains(k)) {
                false
            } else if private {
                !GMEM_REFUSED.contains(k)
            } else {
                *k < EVENTS - PRIVATE_EVENTS
            }
        })
        .collect();
    while !ctx.done() {
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let start_page = rng.below(pages);
        let n = 1 + rng.below(1024.min(pages - start_page));
        let range = HvaRange::new(
            Hva(DATA_HVA + start_page * 4096),
            Hva(DATA_HVA + (start_page + n) * 4096),
        );
        match kind {
            0 => {
                ctx.host.migrate(range);
            }
            1 => {
                ctx.host.swap_out(range);
            }
            2 => {
                ctx.host.ksm_merge(range);
            }
            3 => ctx.host.thp_split(range),
            4 => {
                ctx.host.thp_collapse(range);
            }
            5 => {
                ctx.host.mprotect(range, false);
                std::thread::sleep(Duration::from_micros(200));
                ctx.host.mprotect(range, true);
            }
            6 => {
                ctx.host.age(range);
            }
            7 => {
                let gpa = Gpa(DATA_GPA + start_page * 4096);
                discarded.mark(gpa, n);
                ctx.host.madvise_dontneed(range);
                discarded.mark(gpa, n);
            }
            8 => {
                let r = UserMemoryRegion {
                    slot: DUMMY_SLOT,
                    flags: 0,
                    guest_phys_addr: DATA_GPA - 4096,
                    memory_size: 4096,
                    userspace_addr: DATA_HVA - 0x10_0000,
                };
                if ctx.vm.set_user_memory_region(r).is_ok() {
                    let _ = ctx.vm.set_user_memory_region(UserMemoryRegion {
                        memory_size: 0,
                        ..r
                    });
                }
            }
            9 => {
                let _ = ctx
                    .vm
                    .set_user_memory_region(data_region(total, 8 * DATA_GPA, 0));
                std::thread::sleep(Duration::from_micros(300));
                let _ = ctx
                    .vm
                    .set_user_memory_region(data_region(total, DATA_GPA, 0));
            }
            10 => {
                let _ = ctx.vm.set_user_memory_region(data_region(0, DATA_GPA, 0));
                std::thread::sleep(Duration::from_micros(300));
                // A guest_memfd slot comes back bound to the same file, so
                // its private pages are still there.
                let _ = ctx.vmm.recreate_slot(data_region(total, DATA_GPA, 0));
            }
            11 => {
                let _ = ctx.vm.set_user_memory_region(data_region(
                    total,
                    DATA_GPA,
                    MemFlags::LOG_DIRTY_PAGES.bits(),
                ));
                std::thread::sleep(Duration::from_micros(150));
                // A harvest while the vCPUs write (it write-protects, or
                // with PML clears Dirty bits, racing the processor).
                let _ = ctx.vm.get_dirty_log(DATA_SLOT);
                std::thread::sleep(Duration::from_micros(150));
                let _ = ctx
                    .vm
                    .set_user_memory_region(data_region(total, DATA_GPA, 0));
            }
            12 => {
                // Every VM has address space 0: `All` is never refused.
                let _ = ctx.vm.invalidate_roots(vmmu::RootFilter::All);
            }
            13 => {
                // Clear the Dirty bits of the range (as D-bit dirty logging
                // harvests), so the next writes must set them again through the
                // processor's walk.
                let g = vmmu::Gfn((DATA_GPA >> 12) + start_page);
                let _ = ctx.clear_dirty(0, vmmu::GfnRange::new(g, g.add(n)));
            }
            14 => {
                // A pass of the NX recovery worker (a ratio of 1..=4 of what
                // the guests' fetches split).
                let _ = ctx.vm.recover_nx_huge_pages(1 + rng.below(4) as u32);
            }
            15 => {
                // The mitigation turned off and on again at run time: each
                // change zaps every root.
                ctx.vm.set_nx_huge_pages(false);
                std::thread::sleep(Duration::from_micros(300));
                ctx.vm.set_nx_huge_pages(true);
            }
            16 => {
                // The host's reclaim loop over the range: age every page
                // through the MMU, swap out what stayed old for a turn.
                let mut lru = crate::reclaim::Lru::new(range.start, n);
                let stats = crate::reclaim::ReclaimStats::default();
                lru.sweep(ctx.host, n / 2, &stats);
            }
            17 => {
                // The VMM converts the range (marking it discarded around).
                let to_private = rng.below(2) == 0;
                let _ = ctx
                    .vmm
                    .convert(DATA_GPA + start_page * 4096, n * 4096, to_private);
            }
            _ => {
                // A punch-hole in the data slot's guest_memfd: private pages of
                // the range are gone, later private reads see zeros.
                let gpa = Gpa(DATA_GPA + start_page * 4096);
                discarded.mark(gpa, n);
                let _ = ctx.vmm.punch_hole(gpa.0, n * 4096);
                discarded.mark(gpa, n);
            }
        }
        events[kind] += 1;
    }
}

/// Run the stress test.
pub fn stress(cfg: &StressConfig) -> Result<StressReport, MachineError> {
    let total = cfg.vcpus as u64 * cfg.bytes_per_vcpu;
    let vm = VmConfig {
        knobs: cfg.knobs,
        ad_enabled: cfg.ad_enabled,
        precheck: cfg.precheck,
        vm_type: cfg.vm_type,
        dirty_tracking: cfg.dirty_tracking,
        mmu: cfg.mmu,
        nx_huge_pages: cfg.nx_huge_pages,
        ..VmConfig::default()
    };
    let private = cfg.vm_type.has_private_mem();
    let mcfg = MachineConfig {
        memory_bytes: (total * 3).max(1 << 30) + (1 << 30),
        vm,
        oracle: true,
        poison: true,
        dirty_ring: 0,
    };
    let mut m = Machine::new(mcfg, cfg.vcpus)?;
    m.map(Hva(DATA_HVA), total, cfg.backing)?;
    m.map(Hva(DATA_HVA - 0x10_0000), 0x10_0000, Backing::Anonymous)?;
    let discarded = Arc::new(Discarded::new(Gpa(DATA_GPA), total / 4096));
    if private {
        m.vmm.create_gmem_slot(data_region(total, DATA_GPA, 0))?;
        m.vmm.set_discarded(Some(discarded.clone()));
    } else {
        m.set_memslot(data_region(total, DATA_GPA, 0))?;
    }
    // Snp-like guests mark accesses: a page's side changes between passes and
    // the VMM converts on the exit. Elsewhere an exit can only come from a
    // conversion racing the fault: run again.
    let marks = cfg.vm_type == VmType::Snp;
    let opts = RunOptions {
        memory_faults: if marks {
            MemoryFaultPolicy::Convert
        } else {
            MemoryFaultPolicy::Reenter
        },
        ..RunOptions::default()
    };
    let mut models: Vec<RefModel> = (0..cfg.vcpus)
        .map(|i| {
            RefModel::new(
                Gpa(DATA_GPA + i as u64 * cfg.bytes_per_vcpu),
                cfg.bytes_per_vcpu / 4096,
            )
        })
        .collect();
    let mut kernels: Vec<ProcessChurn> = if cfg.guest_paging {
        (0..cfg.vcpus)
            .map(|i| {
                let base = Gpa(DATA_GPA + i as u64 * cfg.bytes_per_vcpu);
                ProcessChurn::new(i, base, cfg.bytes_per_vcpu, 16, 6, 0, cfg.seed)
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut rng = Rng::new(cfg.seed);
    let mut report = StressReport::default();
    let start = Instant::now();
    let mut pass_no = 0u32;
    let stopped = || {
        cfg.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    };
    let more = |passes: u64| {
        let t = start.elapsed();
        t < cfg.duration || (passes < cfg.min_passes && t < cfg.duration * 6)
    };
    while more(report.passes) && !(cfg.stop_on_violation && m.oracle.total() > 0) && !stopped() {
        pass_no += 1;
        let pattern = [Pattern::Sequential, Pattern::Random, Pattern::HotSet][pass_no as usize % 3];
        let write = if pass_no % 2 == 1 { 100 } else { 0 };
        let progs: Vec<Pass> = models
            .drain(..)
            .enumerate()
            .map(|(i, md)| {
                let mut p = Pass::new(i as u32, pass_no, pattern, write, true, md, cfg.seed)
                    .with_discarded(discarded.clone());
                if cfg.nx_huge_pages && cfg.vm_type == VmType::Default {
                    p = p.with_fetch_percent(10);
                }
                if marks {
                    p.with_private_percent(50)
                } else {
                    p
                }
            })
            .collect();
        if cfg.guest_paging {
            // The kernels keep their processes from pass to pass.
            for k in kernels.iter_mut() {
                k.add_ops(PAGING_OPS_PER_PASS);
            }
        }
        let paging = cfg.guest_paging;
        let progs: Vec<Guest> = if paging {
            kernels.drain(..).map(Guest::Kernel).collect()
        } else {
            progs.into_iter().map(Guest::Pass).collect()
        };
        let threads = cfg.host_threads.max(1);
        let seeds: Vec<u64> = (0..threads).map(|_| rng.next_u64()).collect();
        let out = m.run(progs, &opts, |ctx| {
            let per_thread: Vec<[u64; EVENTS]> = std::thread::scope(|s| {
                let handles: Vec<_> = seeds
                    .iter()
                    .map(|&seed| {
                        let discarded = &discarded;
                        s.spawn(move || {
                            let mut rng = Rng::new(seed);
                            let mut events = [0u64; EVENTS];
                            host_events(ctx, &mut rng, total, discarded, &mut events, paging);
                            events
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            });
            for ev in per_thread {
                for (total, n) in report.events.iter_mut().zip(ev) {
                    *total += n;
                }
            }
        });
        for (p, r) in out {
            report.accesses += r.counters.accesses;
            report.conversions += r.counters.conversions;
            match p {
                Guest::Pass(p) => models.push(p.into_model()),
                Guest::Kernel(k) => kernels.push(k),
            }
        }
        report.passes += 1;
        if let Some(pr) = &cfg.progress {
            use std::sync::atomic::Ordering::Relaxed;
            pr.passes.store(report.passes, Relaxed);
            pr.accesses.store(report.accesses, Relaxed);
            pr.violations.store(m.oracle.total(), Relaxed);
        }
    }
    report.elapsed = start.elapsed();
    report.interrupted = stopped();
    report.stats = m.vm.stats();
    report.faults = report.stats.faults;
    report.checked = m.oracle.checks();
    {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &m.vmm.counters;
        report.vmm_conversions = (c.to_private.load(Relaxed), c.to_shared.load(Relaxed));
    }
    let oracle = m.oracle.clone();
    m.teardown();
    report.violations = oracle.by_kind();
    report.total_violations = oracle.total();
    report.log = oracle.log();
    Ok(report)
}

/// Operations each kernel makes per stress pass.
const PAGING_OPS_PER_PASS: u64 = 4000;

/// What a vCPU runs in a stress pass.
enum Guest {
    Pass(Pass),
    Kernel(ProcessChurn),
}

impl GuestProgram for Guest {
    fn next(&mut self) -> Option<crate::guest::GuestAccess> {
        match self {
            Guest::Pass(p) => p.next(),
            Guest::Kernel(k) => k.next(),
        }
    }
    fn complete(&mut self, a: &crate::guest::GuestAccess, r: crate::guest::AccessResult) {
        match self {
            Guest::Pass(p) => p.complete(a, r),
            Guest::Kernel(k) => k.complete(a, r),
        }
    }
    fn mismatches(&self) -> u64 {
        match self {
            Guest::Pass(p) => p.mismatches(),
            Guest::Kernel(k) => k.mismatches(),
        }
    }
    fn first_mismatch(&self) -> Option<String> {
        match self {
            Guest::Pass(p) => p.first_mismatch(),
            Guest::Kernel(k) => k.first_mismatch(),
        }
    }
    fn converted(&mut self, gpa: Gpa, size: u64, private: bool) {
        match self {
            Guest::Pass(p) => p.converted(gpa, size, private),
            Guest::Kernel(k) => k.converted(gpa, size, private),
        }
    }
}
