//! `mmu_lock`: a reader-writer lock whose readers scale and that can tell whether
//! anyone is waiting.
//!
//! Long walks under `mmu_lock` must yield when another thread wants the lock
//! (KVM's `rwlock_needbreak`). parking_lot does not expose "has waiters", so this
//! lock counts threads that failed the fast path and are blocking; that count is
//! also the "contended wait" statistic.
//!
//! Deviation from KVM (which uses one queued rwlock): the lock is split into
//! shards, one reader-writer lock per cache line. A reader takes only the shard of
//! its thread, so vCPUs faulting in parallel never write a shared cache line; a
//! writer takes every shard, in order. A fault in vmmu costs a few hundred
//! nanoseconds, so the two shared read-modify-writes of a single rwlock word were a
//! large part of it with two vCPUs (KVM's faults cost microseconds, where they are
//! noise). Fairness is kept per shard: parking_lot's rwlock makes new readers wait
//! behind a waiting writer, so a zapping writer is not starved by a stream of
//! faults, and writers queue on shard 0 first, so they cannot deadlock.

use std::panic::Location;

use crossbeam_utils::CachePadded;

use super::lockdep::{Held, LockClass};
use super::{AtomicU64, AtomicUsize, Ordering};

#[cfg(not(loom))]
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(loom)]
use loom::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Reader shards (one under the model checker, to keep the state space small).
#[cfg(not(loom))]
const SHARDS: usize = 8;
#[cfg(loom)]
const SHARDS: usize = 1;

#[cfg(not(loom))]
fn my_shard() -> usize {
    thread_local! {
        static SHARD: usize = {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS
        };
    }
    SHARD.with(|s| *s)
}

#[cfg(loom)]
fn my_shard() -> usize {
    0
}

/// Counters kept by whoever takes the lock (per vCPU or per VM).
#[derive(Debug, Default)]
pub struct LockStats {
    /// Read acquisitions.
    pub read: AtomicU64,
    /// Write acquisitions.
    pub write: AtomicU64,
    /// Read acquisitions that had to wait.
    pub read_contended: AtomicU64,
    /// Write acquisitions that had to wait.
    pub write_contended: AtomicU64,
}

/// The reader-writer `mmu_lock`.
#[derive(Debug)]
pub(crate) struct MmuLock {
    shards: Box<[CachePadded<RwLock<()>>]>,
    waiters: CachePadded<AtomicUsize>,
}

/// Shared hold of [`MmuLock`].
pub(crate) struct MmuReadGuard<'a> {
    lock: &'a MmuLock,
    #[cfg_attr(not(loom), allow(dead_code))]
    shard: usize,
    guard: Option<RwLockReadGuard<'a, ()>>,
    _held: Held,
}

/// Exclusive hold of [`MmuLock`].
pub(crate) struct MmuWriteGuard<'a> {
    lock: &'a MmuLock,
    guards: Vec<RwLockWriteGuard<'a, ()>>,
    _held: Held,
}

impl MmuLock {
    pub(crate) fn new() -> Self {
        MmuLock {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(RwLock::new(())))
                .collect(),
            waiters: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    fn read_shard(&self, shard: usize, stats: &LockStats) -> RwLockReadGuard<'_, ()> {
        stats.read.fetch_add(1, Ordering::Relaxed);
        let lock = &self.shards[shard];
        #[cfg(not(loom))]
        if let Some(g) = lock.try_read() {
            return g;
        }
        #[cfg(loom)]
        if let Ok(g) = lock.try_read() {
            return g;
        }
        stats.read_contended.fetch_add(1, Ordering::Relaxed);
        // Relaxed: the count is a hint for yielding, not a synchronisation edge.
        self.waiters.fetch_add(1, Ordering::Relaxed);
        #[cfg(not(loom))]
        let g = lock.read();
        #[cfg(loom)]
        let g = lock.read().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    fn write_all(&self, stats: &LockStats) -> Vec<RwLockWriteGuard<'_, ()>> {
        stats.write.fetch_add(1, Ordering::Relaxed);
        let mut guards = Vec::with_capacity(SHARDS);
        let mut waited = false;
        for lock in self.shards.iter() {
            #[cfg(not(loom))]
            let fast = lock.try_write();
            #[cfg(loom)]
            let fast = lock.try_write().ok();
            let g = match fast {
                Some(g) => g,
                None => {
                    waited = true;
                    self.waiters.fetch_add(1, Ordering::Relaxed);
                    #[cfg(not(loom))]
                    let g = lock.write();
                    #[cfg(loom)]
                    let g = lock.write().unwrap_or_else(|e| e.into_inner());
                    self.waiters.fetch_sub(1, Ordering::Relaxed);
                    g
                }
            };
            guards.push(g);
        }
        if waited {
            stats.write_contended.fetch_add(1, Ordering::Relaxed);
        }
        guards
    }

    /// Take the lock shared.
    #[track_caller]
    pub(crate) fn read<'a>(&'a self, stats: &LockStats) -> MmuReadGuard<'a> {
        let held = Held::acquire(LockClass::MmuLock, Location::caller());
        let shard = my_shard();
        MmuReadGuard {
            lock: self,
            shard,
            guard: Some(self.read_shard(shard, stats)),
            _held: held,
        }
    }

    /// Take the lock exclusively.
    #[track_caller]
    pub(crate) fn write<'a>(&'a self, stats: &LockStats) -> MmuWriteGuard<'a> {
        let held = Held::acquire(LockClass::MmuLock, Location::caller());
        MmuWriteGuard {
            lock: self,
            guards: self.write_all(stats),
            _held: held,
        }
    }

    /// Whether some thread is blocked waiting for the lock.
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiters.load(Ordering::Relaxed) != 0
    }
}

/// Either kind of hold; walkers that may yield are generic over the mode.
pub(crate) trait MmuGuard {
    /// Whether the lock is held exclusively.
    fn is_exclusive(&self) -> bool;
    /// Drop and re-take the lock in the same mode, letting waiters in first.
    fn yield_lock(&mut self, stats: &LockStats);
    /// Whether someone waits for the lock.
    fn needbreak(&self) -> bool;
}

impl MmuGuard for MmuReadGuard<'_> {
    fn is_exclusive(&self) -> bool {
        false
    }
    fn yield_lock(&mut self, stats: &LockStats) {
        #[cfg(not(loom))]
        if let Some(g) = self.guard.as_mut() {
            // Fair unlock hands the lock to a waiter before we can re-take it.
            RwLockReadGuard::unlocked_fair(g, std::thread::yield_now);
            stats.read.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(loom)]
        {
            // Releasing and re-taking are scheduling points of their own; an
            // explicit yield would only multiply the explored schedules.
            self.guard = None;
            self.guard = Some(self.lock.read_shard(self.shard, stats));
        }
    }
    fn needbreak(&self) -> bool {
        self.lock.has_waiters()
    }
}

impl MmuGuard for MmuWriteGuard<'_> {
    fn is_exclusive(&self) -> bool {
        true
    }
    fn yield_lock(&mut self, stats: &LockStats) {
        // Release every shard (readers blocked on any of them get in), then take
        // them all again in order.
        self.guards.clear();
        #[cfg(not(loom))]
        std::thread::yield_now();
        self.guards = self.lock.write_all(stats);
    }
    fn needbreak(&self) -> bool {
        self.lock.has_waiters()
    }
}

impl Drop for MmuReadGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
    }
}

impl Drop for MmuWriteGuard<'_> {
    fn drop(&mut self) {
        // Release in reverse order of acquisition.
        while self.guards.pop().is_some() {}
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::Arc;

    #[test]
    fn test_mmu_lock_writer_excludes_readers_of_every_shard() {
        let lock = Arc::new(MmuLock::new());
        let stats = Arc::new(LockStats::default());
        let w = lock.write(&stats);
        let (l2, s2) = (lock.clone(), stats.clone());
        let t = std::thread::spawn(move || {
            let _r = l2.read(&s2);
        });
        while !lock.has_waiters() {
            std::thread::yield_now();
        }
        assert!(w.needbreak());
        drop(w);
        t.join().unwrap();
        assert_eq!(stats.read_contended.load(Ordering::Relaxed), 1);
    }
}
