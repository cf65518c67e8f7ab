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
