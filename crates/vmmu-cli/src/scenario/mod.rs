//! Scenarios: KVM selftests re-created on the machine model.

pub mod access;
pub mod access_tracking;
pub mod churn_vs_kvm;
pub mod demand_paging;
pub mod dirty_log;
pub mod dirty_log_perf;
pub mod guest_memfd;
pub mod invalidation_storm;
pub mod live_migration;
pub mod memslot_churn;
pub mod memslot_perf;
pub mod mmu_stress;
pub mod nx_huge_pages;
pub mod page_splitting;
pub mod prefault;
pub mod private_conversions;
pub mod private_exits;
pub mod reclaim;
pub mod roots;
pub mod roots_shadow;
pub mod shadow_process_churn;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use vmmu::{Gpa, Hva, HvaRange, UserMemoryRegion, VmConfig};
use vmmu_machine::guest::{Pass, Pattern, RefModel};
use vmmu_machine::{Machine, MachineConfig, PhaseCtx, RunOptions, VcpuReport};

use crate::args::{Common, Shape};
use crate::report::Report;
use crate::trace::Trace;

/// Guest physical base of the test region.
pub const REGION_GPA: u64 = 4 << 30;
/// Host virtual base of the test region.
pub const REGION_HVA: u64 = 0x100_0000_0000;

/// A built machine and what the run needs to know about it.
pub struct Env {
    /// The machine.
    pub m: Machine,
    /// The run's shape.
    pub shape: Shape,
    /// Flags.
    pub common: Common,
    /// The trace, when asked for.
    pub trace: Option<Arc<Trace>>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// The VM configuration the flags ask for.
pub fn vm_config(common: &Common) -> VmConfig {
    VmConfig {
        precheck: !common.no_precheck,
        ad_enabled: !common.no_ad,
        dirty_tracking: common.dirty_tracking,
        eager_page_split: !common.no_eager_split,
        lockless_aging: !common.locked_aging,
        nx_huge_pages: common.nx_huge_pages,
        mmu: common.mmu,
        legacy_root_reload: common.legacy_root_reload,
        shadow_unsync: !common.no_unsync,
        // The conversion storm converts memory: only a VM with private memory can.
        vm_type: if common.conversions {
            vmmu::VmType::SwProtected
        } else {
            vmmu::VmType::Default
        },
        ..VmConfig::default()
    }
}

/// Harvest the dirty rings as a VMM does: collect every vCPU's ring (from its
/// fetch index in `fetch`) into a bitmap of memslot `slot`'s `pages`, then
/// reset them (which write-protects what was collected). Returns the bitmap,
/// the entries collected and the entries reset (the two must agree).
pub fn harvest_rings(
    vm: &vmmu::Vm,
    fetch: &mut [u32],
    slot: u32,
    pages: u64,
) -> (Vec<u64>, u64, u64) {
    let mut log = vec![0u64; pages.div_ceil(64) as usize];
    let mut collected = 0;
    for (v, f) in fetch.iter_mut().enumerate() {
        collected += vm.collect_dirty_ring(v as u32, f, |s, off| {
            if s == slot && off < pages {
                log[(off / 64) as usize] |= 1 << (off % 64);
            }
        });
    }
    let reset = vm.reset_dirty_rings();
    (log, collected, reset)
}

/// Build the machine: the region mapped with the backing, split into memslots.
pub fn build(common: &Common, shape: Shape) -> anyhow::Result<Env> {
    let cfg = MachineConfig {
        // Host memory for what the run touches (all of it but for a sparse
        // guest) and the tables over it.
        memory_bytes: shape.host_bytes() + shape.host_bytes() / 64 + (1 << 30),
        vm: vm_config(common),
        oracle: !common.no_oracle,
        poison: true,
        dirty_ring: common.dirty_ring,
    };
    let mut m = Machine::new(cfg, shape.vcpus)?;
    if let Some(n) = common.nr_mmu_pages {
        m.vm.set_nr_mmu_pages(n)?;
    }
    m.map(Hva(REGION_HVA), shape.total, shape.backing)?;
    let per_slot = shape.total / shape.slots as u64;
    for i in 0..shape.slots as u64 {
        m.set_memslot(UserMemoryRegion {
            slot: 1 + i as u32,
            flags: 0,
            guest_phys_addr: REGION_GPA + i * per_slot,
            memory_size: per_slot,
            userspace_addr: REGION_HVA + i * per_slot,
        })?;
    }
    if common.guest_paging {
        // The guests' page tables in a slot of their own (as KVM's selftests
        // keep them apart from the measured memory).
        m.map(
            Hva(TABLES_HVA),
            TABLES_BYTES,
            vmmu_machine::Backing::Anonymous,
        )?;
        m.set_memslot(UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: TABLES_BYTES,
            userspace_addr: TABLES_HVA,
        })?;
        m.start_paging_over_direct_map(Gpa(0))?;
    }
    let trace = common.trace.as_ref().map(|_| Arc::new(Trace::new()));
    Ok(Env::new(m, shape, common, trace))
}

/// Host address of the guests' page tables with `--guest-paging`.
const TABLES_HVA: u64 = 0x80_0000_0000;
/// Their slot's size: two pages per vCPU, 64 vCPUs at most.
const TABLES_BYTES: u64 = 1 << 20;

/// As [`build`], on a software-protected VM whose memslots are bound to one
/// guest_memfd of the region's size (each slot its part of the file; the
/// shared side stays at the region's host address).
pub fn build_private(common: &Common, shape: Shape) -> anyhow::Result<Env> {
    let cfg = MachineConfig {
        memory_bytes: 2 * shape.total + shape.total / 64 + (1 << 30),
        vm: vm_config(common),
        oracle: !common.no_oracle,
        poison: true,
        dirty_ring: 0,
    };
    anyhow::ensure!(
        cfg.vm.vm_type.has_private_mem(),
        "a guest_memfd-backed region needs a VM type with private memory"
    );
    let m = Machine::new(cfg, shape.vcpus)?;
    m.map(Hva(REGION_HVA), shape.total, shape.backing)?;
    let file = Arc::new(m.vm.create_guest_memfd(shape.total, 0)?);
    let per_slot = shape.total / shape.slots as u64;
    for i in 0..shape.slots as u64 {
        m.vmm.bind_gmem_slot(
            UserMemoryRegion {
                slot: 1 + i as u32,
                flags: 0,
                guest_phys_addr: REGION_GPA + i * per_slot,
                memory_size: per_slot,
                userspace_addr: REGION_HVA + i * per_slot,
            },
            file.clone(),
            i * per_slot,
        )?;
    }
    let trace = common.trace.as_ref().map(|_| Arc::new(Trace::new()));
    Ok(Env::new(m, shape, common, trace))
}

impl Env {
    /// An environment around a machine already set up.
    pub fn new(mut m: Machine, shape: Shape, common: &Common, trace: Option<Arc<Trace>>) -> Env {
        // Fault latencies for the report (not while a benchmark drives the
        // scenario quietly: the clock reads would be in its figures).
        m.record_latency = !common.quiet;
        Env {
            m,
            shape,
            common: common.clone(),
            trace,
        }
    }

    /// Populate the host memory the vCPUs will touch (all of the region but
    /// for a sparse guest) and commit the arena frames the MMU's tables will
    /// take (one last-level table per 2 MiB touched, one upper table per
    /// 1 GiB, a root per vCPU), so that faults measure the MMU rather than
    /// the host's page allocation (a kernel hands KVM table pages that are
    /// already there).
    pub fn prefault_host(&mut self) -> anyhow::Result<()> {
        let shape = self.shape;
        let page = shape.backing.alignment().max(4096);
        let mut last = None;
        for v in 0..shape.vcpus as u64 {
            for i in 0..shape.touched_pages_per_vcpu() {
                let hva = REGION_HVA + v * shape.bytes_per_vcpu + i * shape.touch_stride;
                let start = hva / page * page;
                if last.replace(start) != Some(start) {
                    self.m
                        .host
                        .prefault(HvaRange::new(Hva(start), Hva(start + page)))?;
                }
            }
        }
        let spans = |size: u64| shape.touch_bytes.div_ceil(shape.touch_stride.max(size));
        let tables = shape.vcpus as u64 * (spans(2 << 20) + spans(1 << 30) + 2);
        self.m.mem.commit_ahead(tables * 4096);
        Ok(())
    }

    /// Per-vCPU reference models (each vCPU owns a chunk, or with `-o` the whole
    /// region).
    pub fn models(&self) -> Vec<RefModel> {
        let s = &self.shape;
        (0..s.vcpus)
            .map(|i| {
                if self.common.overlap {
                    RefModel::new(Gpa(REGION_GPA), s.total / 4096)
                } else {
                    RefModel::strided(
                        Gpa(REGION_GPA + i as u64 * s.bytes_per_vcpu),
                        s.touched_pages_per_vcpu(),
                        s.touch_stride,
                    )
                }
            })
            .collect()
    }

    /// Default run options (progress and trace wired in).
    pub fn options(&self, progress: &Arc<std::sync::atomic::AtomicU64>) -> RunOptions {
        RunOptions {
            progress: Some(progress.clone()),
            trace_epoch: self.trace.as_ref().map(|t| t.epoch),
            trace_limit: self.common.trace_limit,
            ..RunOptions::default()
        }
    }

    /// Programs that keep writing (`write_percent` of accesses) and verifying in
    /// random order until stopped, with run options wired to the stop flag.
    pub fn repeating(
        &self,
        write_percent: u32,
    ) -> (Vec<Pass>, RunOptions, Arc<std::sync::atomic::AtomicBool>) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut opts = self.options(&Arc::new(std::sync::atomic::AtomicU64::new(0)));
        opts.stop = Some(stop.clone());
        let verify = !self.common.overlap;
        let progs = self
            .models()
            .into_iter()
            .enumerate()
            .map(|(i, md)| {
                Pass::new(
                    i as u32,
                    1,
                    Pattern::Random,
                    write_percent,
                    verify,
                    md,
                    self.common.seed,
                )
                .repeating()
            })
            .collect();
        (progs, opts, stop)
    }

    /// Run one pass of `pattern` on every vCPU; returns the models, the reports
    /// and the wall time.
    pub fn pass(
        &mut self,
        label: &str,
        models: Vec<RefModel>,
        pass: u32,
        pattern: Pattern,
        write_percent: u32,
        meanwhile: impl FnOnce(&PhaseCtx<'_>),
    ) -> (Vec<RefModel>, Vec<VcpuReport>, Duration) {
        let verify = !self.common.overlap;
        let total: u64 = models.iter().map(RefModel::pages).sum();
        let progs: Vec<Pass> = models
            .into_iter()
            .enumerate()
            .map(|(i, md)| {
                Pass::new(
                    i as u32,
                    pass,
                    pattern,
                    write_percent,
                    verify,
                    md,
                    self.common.seed,
                )
            })
            .collect();
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let opts = self.options(&progress);
        let bar = progress_bar(label, total, self.common.json);
        let t0 = Instant::now();
        let out = self.m.run(progs, &opts, |ctx| {
            let watcher = || {
                while !ctx.done() {
                    if let Some(b) = &bar {
                        b.set_position(progress.load(std::sync::atomic::Ordering::Relaxed));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            };
            if bar.is_some() {
                std::thread::scope(|s| {
                    s.spawn(watcher);
                    meanwhile(ctx);
                });
            } else {
                meanwhile(ctx);
            }
        });
        let elapsed = t0.elapsed();
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let mut models = Vec::new();
        let mut reports = Vec::new();
        for (p, r) in out {
            if let Some(t) = &self.trace {
                t.faults(&r);
            }
            models.push(p.into_model());
            reports.push(r);
        }
        (models, reports, elapsed)
    }

    /// Tear down, check for leaks, fill the report's oracle results, write the
    /// trace. Returns the process exit code.
    pub fn finish(self, report: Report) -> anyhow::Result<i32> {
        Ok(self.finish_counted(report)?.0)
    }

    /// [`Env::finish`], also returning the number of violations.
    pub fn finish_counted(self, mut report: Report) -> anyhow::Result<(i32, u64)> {
        let Env {
            m, common, trace, ..
        } = self;
        let by_outcome: serde_json::Map<String, serde_json::Value> = vmmu_machine::FAULT_OUTCOMES
            .iter()
            .zip(&m.outcome_ns)
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| (name.to_string(), crate::report::histogram_json(h)))
            .collect();
        if !by_outcome.is_empty() {
            report.put("fault_latency", serde_json::Value::Object(by_outcome));
        }
        report.stats = m.vm.stats();
        report.config = common.config.clone();
        // The host block as of now: the load after the run beside the one
        // recorded before it.
        if let Some(c) = report.config.as_object_mut() {
            c.insert("host".into(), crate::report::host_json());
        }
        if m.vm.config().mmu == vmmu::MmuKind::Shadow {
            // What the shadow MMU did (indirect pages: guest tables shadowed,
            // none with guest paging off).
            let i = m.vm.shadow_info();
            let st = &report.stats;
            report.put(
                "shadow",
                serde_json::json!({
                    "guest_paging": common.guest_paging,
                    "pages": i.pages,
                    "indirect_pages": i.indirect,
                    "tracked_gfns": i.tracked_gfns,
                    "pages_created": st.shadow_pages_created,
                    "pages_zapped": st.shadow_pages_zapped,
                    "pte_writes_emulated": st.shadow_pte_writes,
                    "unsynced": st.shadow_unsynced,
                    "root_loads": st.shadow_root_loads,
                }),
            );
        }
        let oracle = m.oracle.clone();
        let teardown = m.teardown();
        report.put("leaked_data_pages", teardown.leaked_data_pages);
        report.put("leaked_table_pages", teardown.leaked_table_pages);
        report.put("oracle_checked_accesses", oracle.checks());
        report.violations = oracle.total();
        report.violation_kinds = oracle.by_kind();
        report.violation_log = oracle.log();
        if let Some(t) = &trace {
            report.put("trace_faults_dropped", t.dropped());
            if t.dropped() > 0 {
                report.line(format!(
                    "trace: {} faults not recorded (at most {} per vCPU and run, --trace-limit); the trace marks each cut",
                    t.dropped(),
                    common.trace_limit
                ));
            }
        }
        if let (Some(t), Some(path)) = (&trace, &common.trace) {
            t.write(path)
                .map_err(|e| anyhow::anyhow!("cannot write trace {}: {e}", path.display()))?;
        }
        if !common.quiet {
            report.print(common.json);
        }
        Ok((if report.violations > 0 { 1 } else { 0 }, report.violations))
    }
}

/// A progress bar on stderr when stdout is a terminal (and not in JSON mode).
pub fn progress_bar(label: &str, total: u64, json: bool) -> Option<ProgressBar> {
    if json || !std::io::stdout().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} pages ({per_sec})")
    {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_prefix(label.to_string());
    Some(b)
}

/// Sum of a counter over vCPU reports.
pub fn sum(reports: &[VcpuReport], f: impl Fn(&VcpuReport) -> u64) -> u64 {
    reports.iter().map(f).sum()
}
