//! `invalidation-storm`: vCPUs fault over a region while the host keeps
//! migrating overlapping sub-ranges of part of it (as NUMA balancing does).
//!
//! Each vCPU's chunk has a hot half, which the host migrates piece by piece, and
//! a cold half, which the host never touches: every access alternates between a
//! random hot page and the next cold page, and the cold pages are unmapped before
//! each round so every cold access is a fault. Faults are reported separately for
//! gfns inside the storm (hot) and outside it (cold), first without a storm (the
//! baseline), then with it.
//!
//! With `--conversions` the storm is one of conversions: the VM is
//! software-protected, its region guest_memfd-backed, and the host converts
//! 1 MiB ranges of the hot halves between private and shared (the VMM's
//! order: attributes, then the old side discarded) while the vCPUs fault on
//! the same gfns (inside) and on the neighbouring cold halves (outside). The
//! oracle checks every access against the side its gfn is on now.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use vmmu::{Gpa, Hva, HvaRange, Stats};
use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram, Rng};
use vmmu_machine::{Backing, RunOptions, VcpuReport};

use super::{build, build_private, progress_bar, Env, REGION_GPA, REGION_HVA};
use crate::args::Common;
use crate::report::{latency_json, Report};

/// Alternates random hot accesses with sequential cold first touches.
#[derive(Debug)]
struct StormProgram {
    hot: (u64, u64),
    cold: (u64, u64),
    next_cold: u64,
    rng: Rng,
    turn: bool,
}

impl GuestProgram for StormProgram {
    fn next(&mut self) -> Option<GuestAccess> {
        self.turn = !self.turn;
        if self.turn {
            let p = self.hot.0 + self.rng.below(self.hot.1);
            let kind = if self.rng.below(2) == 0 {
                AccessKind::Read
            } else {
                AccessKind::Write(p)
            };
            return Some(GuestAccess::shared(Gpa(p * 4096), kind));
        }
        if self.next_cold >= self.cold.1 {
            return None;
        }
        let p = self.cold.0 + self.next_cold;
        self.next_cold += 1;
        Some(GuestAccess::shared(Gpa(p * 4096), AccessKind::Write(p)))
    }
    fn complete(&mut self, _: &GuestAccess, _: AccessResult) {}
    fn mismatches(&self) -> u64 {
        0
    }
}

struct PhaseResult {
    inside: Bucket,
    outside: Bucket,
    invalidations: u64,
    /// Conversions made (conversion storm) and refused.
    conversions: u64,
    conversion_errors: u64,
    /// Time of each storm step (a migration, or a whole conversion).
    storm_ns: Histogram<u64>,
    stats: Stats,
    elapsed_ns: u64,
}

#[derive(Default)]
struct Bucket {
    faults: u64,
    retries: u64,
    retries_locked: u64,
    lock_reads: u64,
    resolve: Option<Histogram<u64>>,
    call: Option<Histogram<u64>>,
}

impl Bucket {
    fn add(&mut self, r: &VcpuReport, b: usize) {
        let c = &r.buckets[b];
        self.faults += c.faults;
        self.retries += c.retries;
        self.retries_locked += c.retries_locked;
        self.lock_reads += c.lock_reads;
        for (dst, src) in [
            (&mut self.resolve, &r.resolve_ns[b]),
            (&mut self.call, &r.fault_ns[b]),
        ] {
            match dst {
                Some(h) => {
                    let _ = h.add(src);
                }
                None => *dst = Some(src.clone()),
            }
        }
    }
    fn json(&self) -> Value {
        json!({
            "faults": self.faults,
            "retries": self.retries,
            "retries_that_took_mmu_lock": self.retries_locked,
            "mmu_lock_reads": self.lock_reads,
            "resolve_latency": self.resolve.as_ref().map(latency_json),
            "fault_call_latency": self.call.as_ref().map(latency_json),
        })
    }
    fn p99(&self) -> u64 {
        self.resolve
            .as_ref()
            .map_or(0, |h| h.value_at_quantile(0.99))
    }
}

fn round(env: &mut Env, storm: bool, rounds: u32, rng: &mut Rng) -> PhaseResult {
    let s = env.shape;
    let pages = s.bytes_per_vcpu / 4096;
    let half = pages / 2;
    let base = REGION_GPA / 4096;
    let classify: Arc<dyn Fn(Gpa) -> usize + Send + Sync> = Arc::new(move |gpa: Gpa| {
        let p = gpa.0 / 4096 - base;
        if p % pages < half {
            0
        } else {
            1
        }
    });
    let before = env.m.vm.stats();
    let mut inside = Bucket::default();
    let mut outside = Bucket::default();
    let mut invalidations = 0u64;
    let conversions = env.common.conversions;
    let (mut conversions_done, mut conversion_errors) = (0u64, 0u64);
    let mut storm_ns = Histogram::<u64>::new(3).expect("3 significant digits is valid");
    let t0 = Instant::now();
    for r in 0..rounds {
        // Unmap the cold halves so every cold access faults again.
        for i in 0..s.vcpus as u64 {
            let g = vmmu::Gfn(base + i * pages + half);
            // Address space 0, an ordered range: never refused.
            let _ = env
                .m
                .vm
                .zap_gfn_range(0, vmmu::GfnRange::new(g, g.add(pages - half)));
        }
        let progs: Vec<StormProgram> = (0..s.vcpus as u64)
            .map(|i| StormProgram {
                hot: (base + i * pages, half),
                cold: (base + i * pages + half, pages - half),
                next_cold: 0,
                rng: Rng::new(env.common.seed ^ (i << 20) ^ r as u64),
                turn: false,
            })
            .collect();
        let progress = Arc::new(AtomicU64::new(0));
        let opts = RunOptions {
            classify: Some(classify.clone()),
            buckets: 2,
            latency: true,
            ..env.options(&progress)
        };
        let bar = progress_bar(
            if storm { "storm" } else { "baseline" },
            2 * (pages - half) * s.vcpus as u64,
            env.common.json,
        );
        let trace = env.trace.clone();
        let out = env.m.run(progs, &opts, |ctx| {
            // A storm makes at least one step: vCPUs that finish their pass
            // before this thread first looks would leave a storm phase that
            // never stormed (a short `-i 1` pass on a busy machine did).
            while !ctx.done() || (storm && invalidations == 0) {
                if let Some(b) = &bar {
                    b.set_position(progress.load(Ordering::Relaxed));
                }
                if !storm {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
                // Migrate 256 pages at a random place in a random vCPU's hot half:
                // successive ranges overlap.
                let v = rng.below(s.vcpus as u64);
                let n = 256.min(half);
                let off = rng.below(half - n + 1);
                let start = REGION_HVA + (v * pages + off) * 4096;
                let range = HvaRange::new(Hva(start), Hva(start + n * 4096));
                let st = Instant::now();
                let what = if conversions {
                    // Whole 1 MiB ranges flip side; which side is drawn, so
                    // ranges overlap partly converted ones too.
                    let gpa = REGION_GPA + (v * pages + off) * 4096;
                    let private = rng.below(2) == 0;
                    if ctx.vmm.convert(gpa, n * 4096, private).is_err() {
                        conversion_errors += 1;
                    }
                    conversions_done += 1;
                    "convert"
                } else {
                    ctx.host.migrate(range);
                    "migrate"
                };
                let now = Instant::now();
                storm_ns
                    .record(now.duration_since(st).as_nanos() as u64)
                    .ok();
                if let Some(t) = &trace {
                    t.host_span(
                        what,
                        st,
                        now,
                        json!({"hva": format!("{start:#x}"), "pages": n}),
                    );
                    let s = ctx.vm.stats();
                    t.counter("zap yields", now, s.yields);
                    t.counter("remote TLB flushes", now, s.tlb_flush_remote);
                    t.counter("mmu_lock write waits", now, s.mmu_lock_write_contended);
                }
                invalidations += 1;
            }
        });
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        for (_, rep) in &out {
            inside.add(rep, 0);
            outside.add(rep, 1);
            if let Some(t) = &env.trace {
                t.faults(rep);
            }
        }
    }
    let elapsed_ns = t0.elapsed().as_nanos() as u64;
    PhaseResult {
        inside,
        outside,
        invalidations,
        conversions: conversions_done,
        conversion_errors,
        storm_ns,
        stats: env.m.vm.stats().since(&before),
        elapsed_ns,
    }
}

fn phase_json(p: &PhaseResult) -> Value {
    let s = &p.stats;
    json!({
        "elapsed_ns": p.elapsed_ns,
        "inside": p.inside.json(),
        "outside": p.outside.json(),
        "invalidations": p.invalidations,
        "precheck_retries": s.precheck_retries,
        "postcheck_retries": s.postcheck_retries,
        "locked_retries": s.locked_retries,
        "mmu_lock_read": s.mmu_lock_read,
        "mmu_lock_write": s.mmu_lock_write,
        "mmu_lock_read_waits": s.mmu_lock_read_contended,
        "mmu_lock_write_waits": s.mmu_lock_write_contended,
        "yields": s.yields,
        "remote_tlb_flushes": s.tlb_flush_remote,
        "remote_tlb_flushes_per_invalidation": if p.invalidations > 0 { s.tlb_flush_remote as f64 / p.invalidations as f64 } else { 0.0 },
        "conversions": p.conversions,
        "conversion_errors": p.conversion_errors,
        "private_faults": s.private_faults,
        "storm_step_latency": (!p.storm_ns.is_empty()).then(|| latency_json(&p.storm_ns)),
    })
}

/// Results for `bench`: (baseline outside p99, storm outside p99, storm json).
pub struct StormFigures {
    /// The JSON of both phases.
    pub json: Value,
    /// p99 of outside faults without a storm (ns).
    pub baseline_outside_p99: u64,
    /// p99 of outside faults during the storm (ns).
    pub storm_outside_p99: u64,
    /// Retries decided under mmu_lock during the storm.
    pub storm_locked_retries: u64,
    /// Pre-check retries during the storm.
    pub storm_precheck_retries: u64,
    /// Remote flushes per invalidation during the storm.
    pub flushes_per_invalidation: f64,
    /// Read acquisitions of mmu_lock by inside faults that retried.
    pub inside_retry_lock_reads: u64,
    /// Yields by zaps during the storm.
    pub yields: u64,
    /// Oracle violations in the run.
    pub violations: u64,
    /// p99 of inside faults (the gfns the storm covers) without and with it (ns).
    pub baseline_inside_p99: u64,
    /// See `baseline_inside_p99`.
    pub storm_inside_p99: u64,
    /// Conversions the storm made (conversion storm) and their rate.
    pub conversions: u64,
    /// See `conversions`.
    pub conversions_per_sec: f64,
}

/// Check the flags (before anything is allocated).
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    let shape = common.shape(2, 512 << 20, 2, Backing::Anonymous)?;
    if shape.bytes_per_vcpu < 4 << 20 {
        anyhow::bail!(crate::args::BadInput(format!(
            "-b {}: the storm needs at least 4M per vCPU",
            crate::args::human(shape.bytes_per_vcpu)
        )));
    }
    Ok(shape)
}

/// Run both phases on a fresh machine; `report` gets the details.
pub fn measure(
    common: &Common,
    report: Option<&mut Report>,
) -> anyhow::Result<(StormFigures, i32)> {
    let shape = validate(common)?;
    let mut env = if common.conversions {
        build_private(common, shape)?
    } else {
        build(common, shape)?
    };
    // Host memory pre-touched: faults measure the MMU, not page allocation.
    env.m.host.prefault(HvaRange::new(
        Hva(REGION_HVA),
        Hva(REGION_HVA + shape.total),
    ))?;
    let mut rng = Rng::new(common.seed);
    // Map the hot halves first.
    let warm = round(&mut env, false, 1, &mut rng);
    let _ = warm;
    let baseline = round(&mut env, false, shape.iterations, &mut rng);
    let storm = round(&mut env, true, shape.iterations, &mut rng);
    let figures = StormFigures {
        json: json!({"baseline": phase_json(&baseline), "storm": phase_json(&storm), "precheck": !common.no_precheck}),
        baseline_outside_p99: baseline.outside.p99(),
        storm_outside_p99: storm.outside.p99(),
        storm_locked_retries: storm.stats.locked_retries,
        storm_precheck_retries: storm.stats.precheck_retries,
        flushes_per_invalidation: if storm.invalidations > 0 {
            storm.stats.tlb_flush_remote as f64 / storm.invalidations as f64
        } else {
            0.0
        },
        inside_retry_lock_reads: storm.inside.retries_locked,
        yields: storm.stats.yields,
        violations: 0,
        baseline_inside_p99: baseline.inside.p99(),
        storm_inside_p99: storm.inside.p99(),
        conversions: storm.conversions,
        conversions_per_sec: storm.conversions as f64 * 1e9 / storm.elapsed_ns.max(1) as f64,
    };
    let mut r = Report::new("invalidation-storm", &shape);
    let ratio = figures.storm_outside_p99 as f64 / figures.baseline_outside_p99.max(1) as f64;
    r.line(format!(
        "storm: {}; pre-check: {}",
        if common.conversions {
            "conversions private <-> shared (software-protected VM, guest_memfd)"
        } else {
            "host migrations"
        },
        if common.no_precheck { "off" } else { "on" }
    ));
    if common.conversions {
        let secs = storm.elapsed_ns as f64 / 1e9;
        r.line(format!(
            "{} conversions of 1 MiB ({:.0}/s, {} refused), each {} ns p50, {} ns p99; faults racing them (inside): p99 {} ns, {} without the storm; {} private faults",
            storm.conversions,
            storm.conversions as f64 / secs.max(1e-9),
            storm.conversion_errors,
            storm.storm_ns.value_at_quantile(0.5),
            storm.storm_ns.value_at_quantile(0.99),
            storm.inside.p99(),
            baseline.inside.p99(),
            storm.stats.private_faults,
        ));
        r.put("conversions", storm.conversions);
        r.put("conversion_errors", storm.conversion_errors);
        r.put("inside_p99_storm_ns", storm.inside.p99());
        r.put("inside_p99_baseline_ns", baseline.inside.p99());
    }
    r.line(format!(
        "outside the storm: p99 {} ns without, {} ns with the storm ({ratio:.2}x)",
        figures.baseline_outside_p99, figures.storm_outside_p99
    ));
    r.line(format!(
        "inside the storm: {} faults, {} retried; pre-check retries {}, post-check {}, locked {}; retries that took mmu_lock {}",
        storm.inside.faults,
        storm.inside.retries,
        storm.stats.precheck_retries,
        storm.stats.postcheck_retries,
        storm.stats.locked_retries,
        storm.inside.retries_locked
    ));
    r.line(format!(
        "{} invalidations, {:.2} remote TLB flushes per invalidation, {} yields, mmu_lock write waits {}",
        storm.invalidations, figures.flushes_per_invalidation, storm.stats.yields, storm.stats.mmu_lock_write_contended
    ));
    r.phase("baseline", baseline.elapsed_ns);
    r.phase("storm", storm.elapsed_ns);
    r.put("outside_p99_ratio", (ratio * 100.0).round() / 100.0);
    r.put("baseline", phase_json(&baseline));
    r.put("storm", phase_json(&storm));
    let _ = report;
    let (code, violations) = env.finish_counted(r)?;
    Ok((
        StormFigures {
            violations,
            ..figures
        },
        code,
    ))
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    Ok(measure(common, None)?.1)
}
