//! The physical CPUs the vCPUs share, when there are more vCPUs than CPUs.
//!
//! On real hardware a vCPU thread runs on a physical CPU until the host
//! scheduler takes it off at a preemption point, and it can only be taken off
//! outside guest mode: the timer interrupt is a VM exit first. So a requester
//! that waits for every vCPU in guest mode to leave it (a remote TLB flush,
//! the freeing of obsolete roots) waits only for vCPUs that are running, at
//! most one per other CPU, each within an exit's time; and a vCPU's fault
//! runs on its CPU without being taken off for another vCPU in the middle.
//!
//! A vCPU thread of the model is an ordinary thread: with 64 of them on two
//! cores, the host kernel preempts one anywhere, in guest mode too, and it
//! may wait tens of milliseconds for its next slice. Every flush waits with
//! it: a zap that yields (and flushes) thousands of times holds its
//! invalidation open for seconds, and vCPUs faulting in the range retry as
//! long (the soak's 20-second "stuck" check caught it). [`Pcpus`] restores
//! the hardware's rule: a vCPU thread runs only while it holds one of the
//! machine's CPUs, and gives it up only at an entry point outside guest mode,
//! holding no lock, once it has run a time slice and another vCPU waits (as
//! KVM's run loop reschedules before an entry when its slice is over), or
//! while it sleeps. The vCPUs that wait are outside guest mode, where
//! requesters do not wait for them, and hold nothing anyone waits for.
//!
//! A CPU given up goes to the vCPU that has waited longest (first come,
//! first served), not to whoever asks next: a vCPU giving it up and asking at
//! once would otherwise keep it, and the waiting ones would starve, the
//! failure the pool is there to prevent.
//!
//! std and parking_lot have no semaphore; the crates that do are async
//! (tokio's) or hand a freed permit to whoever asks first. This one is a
//! mutex-protected queue and a park flag per waiter.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::sync::{AtomicBool, Ordering};

/// A set of physical CPUs handed to vCPUs first come, first served.
#[derive(Debug)]
pub struct Pcpus {
    state: Mutex<State>,
    /// The queue's length, read without the lock at every entry.
    waiters: AtomicUsize,
}

/// How long a vCPU runs before it gives its CPU to a waiting one (the order
/// of a host scheduler's slice).
pub const SLICE: Duration = Duration::from_millis(1);

#[derive(Debug)]
struct State {
    free: usize,
    waiting: VecDeque<Arc<Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    thread: Thread,
    granted: AtomicBool,
}

/// One CPU held: given back (to the longest waiter, if any) when dropped.
/// Without a pool it holds nothing and never waits.
#[derive(Debug)]
#[must_use = "the CPU is given back when this is dropped"]
pub struct Pcpu<'a> {
    pool: Option<&'a Pcpus>,
    since: Instant,
}

impl Pcpus {
    /// A pool of `cpus` CPUs (at least one).
    pub fn new(cpus: usize) -> Self {
        Pcpus {
            state: Mutex::new(State {
                free: cpus.max(1),
                waiting: VecDeque::new(),
            }),
            waiters: AtomicUsize::new(0),
        }
    }

    /// The pool a run of `vcpus` vCPUs needs on a machine with `cpus` CPUs:
    /// none when every vCPU can have its own.
    pub fn for_run(vcpus: usize, cpus: usize) -> Option<Self> {
        (vcpus > cpus).then(|| Pcpus::new(cpus))
    }

    /// Take a CPU from `pool`, waiting behind the vCPUs that asked first;
    /// without a pool, at once.
    pub fn take(pool: Option<&Pcpus>) -> Pcpu<'_> {
        if let Some(p) = pool {
            p.acquire();
        }
        Pcpu {
            pool,
            since: Instant::now(),
        }
    }

    fn acquire(&self) {
        let w = {
            let mut s = self.state.lock();
            // A free CPU goes to a newcomer only when nobody waits: a waiter
            // already granted one is no longer in the queue.
            if s.free > 0 && s.waiting.is_empty() {
                s.free -= 1;
                return;
            }
            let w = Arc::new(Waiter {
                thread: std::thread::current(),
                granted: AtomicBool::new(false),
            });
            s.waiting.push_back(w.clone());
            self.waiters.store(s.waiting.len(), Ordering::Relaxed);
            w
        };
        // Acquire: pairs with the Release store of the thread that handed
        // the CPU over, after everything it did while holding it.
        while !w.granted.load(Ordering::Acquire) {
            std::thread::park();
        }
    }

    fn release(&self) {
        let mut s = self.state.lock();
        let next = s.waiting.pop_front();
        self.waiters.store(s.waiting.len(), Ordering::Relaxed);
        match next {
            // Handed over directly: the CPU never becomes free, so no thread
            // that comes later can take it before this waiter runs.
            Some(w) => {
                w.granted.store(true, Ordering::Release);
                w.thread.unpark();
            }
            None => s.free += 1,
        }
    }

    /// vCPUs waiting for a CPU now.
    pub fn waiting(&self) -> usize {
        self.state.lock().waiting.len()
    }
}

impl Pcpu<'_> {
    /// An entry point: once this vCPU has run its slice and another waits,
    /// give the CPU to the longest waiter and queue behind the others.
    /// The caller is outside guest mode and holds no lock. Returns whether
    /// it gave the CPU up.
    pub fn reschedule(&mut self) -> bool {
        let Some(p) = self.pool else { return false };
        if p.waiters.load(Ordering::Relaxed) == 0 || self.since.elapsed() < SLICE {
            return false;
        }
        p.release();
        p.acquire();
        self.since = Instant::now();
        true
    }

    /// Run `f` (a sleep, a wait for another thread) without the CPU.
    pub fn off_cpu<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let Some(p) = self.pool else { return f() };
        p.release();
        let r = f();
        p.acquire();
        self.since = Instant::now();
        r
    }
}

impl Drop for Pcpu<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pool {
            p.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    #[test]
    fn no_pool_when_every_vcpu_has_a_cpu() {
        assert!(Pcpus::for_run(2, 2).is_none());
        assert!(Pcpus::for_run(3, 2).is_some());
        // Without a pool a take never waits.
        let a = Pcpus::take(None);
        let b = Pcpus::take(None);
        drop((a, b));
    }

    /// Never more holders than CPUs, and every CPU given back.
    #[test]
    fn at_most_as_many_holders_as_cpus() {
        let pool = Pcpus::new(2);
        let inside = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        let cpu = Pcpus::take(Some(&pool));
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::hint::spin_loop();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(cpu);
                    }
                });
            }
        });
        // At most two at once (how often both were in depends on the host).
        let most = most.load(Ordering::SeqCst);
        assert!((1..=2).contains(&most), "{most} holders at once");
        assert_eq!(pool.waiting(), 0);
        // Both CPUs are free again.
        assert_eq!(pool.state.lock().free, 2);
    }

    /// A CPU given back goes to the vCPU that waited, even when the one
    /// giving it back asks again at once (without the hand-over it gets the
    /// CPU back before the woken waiter runs).
    #[test]
    fn a_waiter_is_served_before_a_later_asker() {
        let pool = Pcpus::new(1);
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let held = Pcpus::take(Some(&pool));
            s.spawn(|| {
                let cpu = Pcpus::take(Some(&pool));
                order.lock().push("waiter");
                std::thread::sleep(Duration::from_millis(20));
                drop(cpu);
            });
            let t0 = Instant::now();
            while pool.waiting() == 0 {
                assert!(t0.elapsed() < Duration::from_secs(10), "never queued");
                std::thread::yield_now();
            }
            drop(held);
            let cpu = Pcpus::take(Some(&pool));
            order.lock().push("again");
            drop(cpu);
        });
        assert_eq!(*order.lock(), ["waiter", "again"]);
    }

    /// A vCPU gives its CPU up at an entry only when its slice is over and
    /// another waits; the waiter runs before the vCPU gets it back.
    #[test]
    fn reschedule_only_after_the_slice_and_for_a_waiter() {
        let pool = Pcpus::new(1);
        let mut cpu = Pcpus::take(Some(&pool));
        std::thread::sleep(SLICE);
        assert!(!cpu.reschedule(), "nobody waits: keep the CPU");
        drop(cpu);

        let pool = Pcpus::new(1);
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let mut cpu = Pcpus::take(Some(&pool));
            s.spawn(|| {
                let c = Pcpus::take(Some(&pool));
                order.lock().push("waiter");
                drop(c);
            });
            let t0 = Instant::now();
            while pool.waiting() == 0 {
                assert!(t0.elapsed() < Duration::from_secs(10), "never queued");
                std::thread::yield_now();
            }
            // A waiter, but the slice has just begun: keep the CPU.
            cpu.since = Instant::now();
            assert!(!cpu.reschedule(), "the slice is not over");
            std::thread::sleep(SLICE);
            assert!(cpu.reschedule(), "slice over and a waiter: give it up");
            order.lock().push("again");
            drop(cpu);
        });
        assert_eq!(*order.lock(), ["waiter", "again"]);
    }

    /// A vCPU that sleeps lets another run meanwhile.
    #[test]
    fn off_cpu_lets_another_run() {
        let pool = Pcpus::new(1);
        let mut cpu = Pcpus::take(Some(&pool));
        let ran = cpu.off_cpu(|| {
            std::thread::scope(|s| s.spawn(|| drop(Pcpus::take(Some(&pool)))).join().is_ok())
        });
        assert!(ran);
        drop(cpu);
    }
}
