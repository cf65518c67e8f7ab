//! RCU for page-table pages: readers pin, writers defer frees until every reader
//! that might see the old memory has unpinned.
//!
//! Backed by one crossbeam-epoch `Collector` per VM, so destroying a VM runs every
//! deferred free of that VM (KVM's `rcu_barrier()` at teardown) without waiting on
//! unrelated VMs. Under loom, a deferred free runs when no read-side section
//! is open any more (a conservative grace period: it also waits for sections
//! that began after the free was deferred), so a model can catch a reader that
//! reaches memory it had no right to keep: the frame may be freed and handed
//! out again while the reader still uses it.

use std::marker::PhantomData;

/// Per-VM RCU domain.
pub(crate) struct Rcu {
    #[cfg(not(loom))]
    collector: crossbeam_epoch::Collector,
    /// Registered readers lent to threads without one of their own (notifiers,
    /// memslot updates): registering a participant allocates, and those paths run
    /// on every host event.
    #[cfg(not(loom))]
    pool: super::Mutex<Vec<RcuReader>>,
    #[cfg(loom)]
    deferred: super::Mutex<LoomGrace>,
}

/// The model checker's RCU state: sections open, frees waiting for them to end.
#[cfg(loom)]
#[derive(Default)]
pub(crate) struct LoomGrace {
    readers: usize,
    waiting: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Rcu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rcu")
    }
}

/// A long-lived reader registration, one per vCPU, so pinning on the fault path is
/// a couple of thread-local operations.
pub(crate) struct RcuReader {
    #[cfg(not(loom))]
    handle: crossbeam_epoch::LocalHandle,
}

impl std::fmt::Debug for RcuReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RcuReader")
    }
}

// SAFETY: a `LocalHandle` is `!Send` because its `Local` keeps per-thread state in
// `Cell`s. That state has no thread identity: it is only unsafe to touch from two
// threads at once. `RcuReader` is not `Sync`, every pin borrows it (or, for pooled
// readers, owns it inside one guard), and the guard is unpinned before the reader
// moves, so no guard exists while a reader changes threads; moving it (which
// synchronises) is then like handing a plain struct over.
unsafe impl Send for RcuReader {}

/// A read-side critical section. Memory retired while it is alive is not freed
/// before it ends.
pub(crate) struct RcuGuard<'a> {
    /// In a cell so a long writer can re-pin through the shared reference its
    /// callees hold ([`RcuGuard::repin`]); the guard is `!Sync`, so only its own
    /// thread ever borrows it, and never re-entrantly.
    #[cfg(not(loom))]
    guard: std::cell::RefCell<Option<crossbeam_epoch::Guard>>,
    #[cfg(loom)]
    rcu: &'a Rcu,
    _p: PhantomData<&'a Rcu>,
}

/// A read-side section through a reader lent from the VM's pool (threads
/// without one of their own): the section, then the reader back to the
/// pool. A type of its own so the vCPU's sections, one per fault, carry
/// nothing to give back.
pub(crate) struct PooledRcuGuard<'a> {
    guard: RcuGuard<'a>,
    #[cfg(not(loom))]
    lent: Option<(RcuReader, &'a Rcu)>,
}

impl<'a> std::ops::Deref for PooledRcuGuard<'a> {
    type Target = RcuGuard<'a>;
    fn deref(&self) -> &RcuGuard<'a> {
        &self.guard
    }
}

#[cfg(not(loom))]
impl Drop for PooledRcuGuard<'_> {
    fn drop(&mut self) {
        // Unpin before the reader goes back to the pool: no guard may exist
        // while a reader moves between threads.
        self.guard.guard.get_mut().take();
        if let Some((reader, rcu)) = self.lent.take() {
            rcu.pool.lock().push(reader);
        }
    }
}

impl Rcu {
    pub(crate) fn new() -> Self {
        Rcu {
            #[cfg(not(loom))]
            collector: crossbeam_epoch::Collector::new(),
            #[cfg(not(loom))]
            pool: super::Mutex::new(super::LockClass::Leaf, Vec::new()),
            #[cfg(loom)]
            deferred: super::Mutex::new(super::LockClass::Leaf, LoomGrace::default()),
        }
    }

    /// Under loom: a section opens.
    #[cfg(loom)]
    fn loom_enter(&self) {
        self.deferred.lock().readers += 1;
    }

    /// Register a long-lived reader (one per vCPU).
    pub(crate) fn register(&self) -> RcuReader {
        RcuReader {
            #[cfg(not(loom))]
            handle: self.collector.register(),
        }
    }

    /// Enter a read-side section from a thread without a registered reader.
    pub(crate) fn read_lock(&self) -> PooledRcuGuard<'_> {
        #[cfg(not(loom))]
        {
            let reader = self.pool.lock().pop().unwrap_or_else(|| self.register());
            let guard = reader.handle.pin();
            PooledRcuGuard {
                guard: RcuGuard {
                    guard: std::cell::RefCell::new(Some(guard)),
                    _p: PhantomData,
                },
                lent: Some((reader, self)),
            }
        }
        #[cfg(loom)]
        {
            self.loom_enter();
            PooledRcuGuard {
                guard: RcuGuard {
                    rcu: self,
                    _p: PhantomData,
                },
            }
        }
    }

    /// Enter a read-side section through a registered reader (inlined: the
    /// fault path enters one on every fault).
    #[inline]
    pub(crate) fn read_lock_with<'a>(&'a self, reader: &'a RcuReader) -> RcuGuard<'a> {
        #[cfg(not(loom))]
        {
            RcuGuard {
                guard: std::cell::RefCell::new(Some(reader.handle.pin())),
                _p: PhantomData,
            }
        }
        #[cfg(loom)]
        {
            let _ = reader;
            self.loom_enter();
            RcuGuard {
                rcu: self,
                _p: PhantomData,
            }
        }
    }
}

impl RcuGuard<'_> {
    /// Run `f` once every reader that could have seen the retired memory is gone.
    pub(crate) fn defer(&self, f: impl FnOnce() + Send + 'static) {
        #[cfg(not(loom))]
        if let Some(g) = self.guard.borrow().as_ref() {
            g.defer(f);
        }
        #[cfg(loom)]
        self.rcu.deferred.lock().waiting.push(Box::new(f));
    }

    /// Hand deferred work to the collector so it can run soon.
    pub(crate) fn flush(&self) {
        #[cfg(not(loom))]
        if let Some(g) = self.guard.borrow().as_ref() {
            g.flush();
        }
    }

    /// End the read-side section and start a new one (a writer that just
    /// yielded `mmu_lock` and restarts its walk from the root holds no pointer
    /// into tables it may have retired), then hand what it deferred to the
    /// collector. Without this a long zap would hold back every deferred free of
    /// the VM until it ends.
    pub(crate) fn repin(&self) {
        #[cfg(not(loom))]
        if let Some(g) = self.guard.borrow_mut().as_mut() {
            g.repin();
            g.flush();
        }
    }
}

/// Under loom: the last open section to end runs the frees deferred so far.
/// Taken under the same lock as the count, so a free deferred inside a section
/// that opened after the count reached zero is not run by this one.
#[cfg(loom)]
impl Drop for RcuGuard<'_> {
    fn drop(&mut self) {
        let ready = {
            let mut g = self.rcu.deferred.lock();
            g.readers -= 1;
            if g.readers == 0 {
                std::mem::take(&mut g.waiting)
            } else {
                Vec::new()
            }
        };
        for f in ready {
            f();
        }
    }
}

#[cfg(loom)]
impl Drop for Rcu {
    fn drop(&mut self) {
        let fs = std::mem::take(&mut self.deferred.lock().waiting);
        for f in fs {
            f();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::{Arc, AtomicU64, Ordering};

    #[test]
    fn test_rcu_deferred_free_runs_by_drop_at_latest() {
        let ran = Arc::new(AtomicU64::new(0));
        {
            let rcu = Rcu::new();
            let reader = rcu.register();
            for _ in 0..10 {
                let g = rcu.read_lock();
                let r = ran.clone();
                g.defer(move || {
                    r.fetch_add(1, Ordering::Relaxed);
                });
            }
            assert_eq!(
                rcu.pool.lock().len(),
                1,
                "one pooled reader serves sequential sections"
            );
            let g = rcu.read_lock_with(&reader);
            drop(g);
            drop(reader);
        }
        assert_eq!(ran.load(Ordering::Relaxed), 10);
    }
}
