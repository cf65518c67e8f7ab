//! Fault latency inside and outside a window of host work (a recovery pass,
//! an aging pass), from the faults the vCPUs recorded with a trace epoch.

use serde_json::{json, Value};
use vmmu_machine::VcpuReport;

/// Latency summary of a set of faults (ns).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) n: u64,
    pub(crate) p50: u64,
    pub(crate) p99: u64,
    pub(crate) max: u64,
}

impl Latency {
    fn of(mut v: Vec<u64>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Latency {
            n: v.len() as u64,
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }

    pub(crate) fn json(&self) -> Value {
        json!({"faults": self.n, "p50_ns": self.p50, "p99_ns": self.p99, "max_ns": self.max})
    }

    /// "p50 / p99 / max" in µs.
    pub(crate) fn us(&self) -> String {
        let us = |ns: u64| ns as f64 / 1e3;
        format!(
            "{:.1} / {:.1} / {:.1}",
            us(self.p50),
            us(self.p99),
            us(self.max)
        )
    }
}

/// The recorded faults that overlap `[t0, t1]` (ns since the trace epoch)
/// and the others.
pub(crate) fn split<'a, P: 'a>(
    out: impl IntoIterator<Item = &'a (P, VcpuReport)>,
    t0: u64,
    t1: u64,
) -> (Latency, Latency) {
    let (mut during, mut outside) = (Vec::new(), Vec::new());
    for (_, rep) in out {
        for f in &rep.trace {
            if f.start_ns + f.dur_ns >= t0 && f.start_ns <= t1 {
                during.push(f.dur_ns);
            } else {
                outside.push(f.dur_ns);
            }
        }
    }
    (Latency::of(during), Latency::of(outside))
}

/// What [`among_faults`] measured.
pub(crate) struct Window<R> {
    /// What the host work returned.
    pub(crate) result: R,
    /// How long it took (ns).
    pub(crate) ns: u64,
    /// The vCPUs' faults that overlapped it.
    pub(crate) during: Latency,
    /// Their other faults.
    pub(crate) outside: Latency,
}

/// Run `scripts` (one per vCPU, `accesses` in all) with every fault traced,
/// and, once a quarter of the accesses are done, the host `work` beside
/// them; the work's time and the fault latency during it and outside it.
pub(crate) fn among_faults<R>(
    m: &mut vmmu_machine::Machine,
    scripts: Vec<vmmu_machine::guest::Script>,
    accesses: u64,
    work: impl FnOnce(&vmmu_machine::PhaseCtx<'_>) -> R,
) -> anyhow::Result<Window<R>> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    let per_vcpu = accesses as usize / scripts.len().max(1) + 16;
    let epoch = Instant::now();
    let progress = std::sync::Arc::new(AtomicU64::new(0));
    let opts = vmmu_machine::RunOptions {
        trace_epoch: Some(epoch),
        trace_limit: per_vcpu,
        latency: true,
        progress: Some(progress.clone()),
        ..vmmu_machine::RunOptions::default()
    };
    let window = std::sync::Mutex::new(None);
    let out = m.run(scripts, &opts, |ctx| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while progress.load(Ordering::Relaxed) < accesses / 4
            && !ctx.done()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        let t0 = epoch.elapsed().as_nanos() as u64;
        let r = work(ctx);
        let t1 = epoch.elapsed().as_nanos() as u64;
        if let Ok(mut w) = window.lock() {
            *w = Some((t0, t1, r));
        }
    });
    let (t0, t1, result) = window
        .into_inner()
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("the host work did not run"))?;
    let (during, outside) = split(&out, t0, t1);
    Ok(Window {
        result,
        ns: t1 - t0,
        during,
        outside,
    })
}
