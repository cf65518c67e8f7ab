//! The NX recovery worker: a host thread that wakes every period and runs one
//! recovery pass over the VM (KVM's per-VM `kvm-nx-lpage-recovery` thread).
//!
//! Scenarios that check counts between steps hold the worker off with
//! [`NxRecoveryWorker::hold`] and then wait for the next pass, so what a step
//! sees never depends on where a period happened to fall; the passes still
//! come from the worker's own clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmmu::{NxRecovery, Vm};

/// How often the worker runs (KVM's `nx_huge_pages_recovery_period_ms`; 0
/// means "derived from the ratio": an hour divided by the ratio, never less
/// than a second), or `None` when it does not run at all (ratio 0).
pub fn recovery_period(period_ms: u64, ratio: u32) -> Option<Duration> {
    if ratio == 0 {
        return None;
    }
    if period_ms != 0 {
        return Some(Duration::from_millis(period_ms));
    }
    Some(Duration::from_millis(
        3_600_000 / u64::from(ratio.min(3600)),
    ))
}

#[derive(Debug, Default)]
struct Progress {
    passes: u64,
    totals: NxRecovery,
    /// Time of each pass (for the report's pass-time figure).
    pass_ns: Vec<u64>,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    gate: Mutex<()>,
    progress: Mutex<Progress>,
    changed: Condvar,
}

/// A running worker; stops and joins when dropped.
#[derive(Debug)]
pub struct NxRecoveryWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the worker has done so far.
#[derive(Clone, Debug, Default)]
pub struct NxWorkerReport {
    /// Passes run (with the mitigation on; none run while it is off).
    pub passes: u64,
    /// What the passes did, summed (`listed` and `to_zap` too).
    pub totals: NxRecovery,
    /// Nanoseconds each pass took.
    pub pass_ns: Vec<u64>,
}

impl NxRecoveryWorker {
    /// Start a worker over `vm` that runs a pass every `period` with `ratio`.
    /// As in KVM, a pass is skipped while the mitigation is off.
    pub fn start(vm: Vm, period: Duration, ratio: u32) -> NxRecoveryWorker {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            gate: Mutex::new(()),
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now() + period;
            while !s.stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    // Short sleeps, so a stop is seen quickly.
                    std::thread::sleep((next - now).min(Duration::from_millis(20)));
                    continue;
                }
                next = now + period;
                let _g = s.gate.lock().unwrap_or_else(|e| e.into_inner());
                if !vm.nx_huge_pages() {
                    continue;
                }
                let t = Instant::now();
                let r = vm.recover_nx_huge_pages(ratio);
                let ns = t.elapsed().as_nanos() as u64;
                let mut p = s.progress.lock().unwrap_or_else(|e| e.into_inner());
                p.passes += 1;
                p.pass_ns.push(ns);
                let t = &mut p.totals;
                t.listed += r.listed;
                t.to_zap += r.to_zap;
                t.zapped += r.zapped;
                t.skipped_dirty_log += r.skipped_dirty_log;
                t.gone += r.gone;
                drop(p);
                s.changed.notify_all();
            }
        });
        NxRecoveryWorker {
            shared,
            thread: Some(thread),
        }
    }

    /// Keep the worker from starting a pass until the guard drops (a pass
    /// already running finishes first).
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        self.shared.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Passes run so far.
    pub fn passes(&self) -> u64 {
        self.lock_progress().passes
    }

    /// Wait until more than `after` passes have run; returns the count, or
    /// `None` after `timeout`.
    pub fn wait_for_pass(&self, after: u64, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut p = self.lock_progress();
        while p.passes <= after {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            p = self
                .shared
                .changed
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Some(p.passes)
    }

    /// What the worker has done so far.
    pub fn report(&self) -> NxWorkerReport {
        let p = self.lock_progress();
        NxWorkerReport {
            passes: p.passes,
            totals: p.totals,
            pass_ns: p.pass_ns.clone(),
        }
    }

    fn lock_progress(&self) -> MutexGuard<'_, Progress> {
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for NxRecoveryWorker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_recovery_period_follows_kvm() {
        assert_eq!(recovery_period(100, 1), Some(Duration::from_millis(100)));
        assert_eq!(recovery_period(100, 0), None, "ratio 0: off");
        assert_eq!(
            recovery_period(0, 60),
            Some(Duration::from_secs(60)),
            "an hour / 60"
        );
        assert_eq!(
            recovery_period(0, 100_000),
            Some(Duration::from_secs(1)),
            "never below a second"
        );
    }
}
