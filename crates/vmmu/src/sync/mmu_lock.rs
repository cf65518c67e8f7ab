//! `mmu_lock`: a reader-writer lock that can tell whether anyone is waiting.
//!
//! Long walks under `mmu_lock` must yield when another thread wants the lock
//! (KVM's `rwlock_needbreak`). parking_lot does not expose "has waiters", so this
//! wrapper counts threads that failed the fast path and are blocking; that count
//! is also the "contended wait" statistic. Like KVM's queued rwlock, parking_lot's
//! rwlock makes new readers wait behind a waiting writer, so a zapping writer is
//! not starved by a stream of faults.

use std::panic::Location;

use super::lockdep::{Held, LockClass};
use super::{AtomicU64, AtomicUsize, Ordering};

#[cfg(not(loom))]
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(loom)]
use loom::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

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
    lock: RwLock<()>,
    waiters: AtomicUsize,
}

/// Shared hold of [`MmuLock`].
pub(crate) struct MmuReadGuard<'a> {
    lock: &'a MmuLock,
    guard: Option<RwLockReadGuard<'a, ()>>,
    _held: Held,
}

/// Exclusive hold of [`MmuLock`].
pub(crate) struct MmuWriteGuard<'a> {
    lock: &'a MmuLock,
    guard: Option<RwLockWriteGuard<'a, ()>>,
    _held: Held,
}

impl MmuLock {
    pub(crate) fn new() -> Self {
        MmuLock {
            lock: RwLock::new(()),
            waiters: AtomicUsize::new(0),
        }
    }

    fn read_inner(&self, stats: &LockStats) -> RwLockReadGuard<'_, ()> {
        stats.read.fetch_add(1, Ordering::Relaxed);
        #[cfg(not(loom))]
        if let Some(g) = self.lock.try_read() {
            return g;
        }
        #[cfg(loom)]
        if let Ok(g) = self.lock.try_read() {
            return g;
        }
        stats.read_contended.fetch_add(1, Ordering::Relaxed);
        // Relaxed: the count is a hint for yielding, not a synchronisation edge.
        self.waiters.fetch_add(1, Ordering::Relaxed);
        #[cfg(not(loom))]
        let g = self.lock.read();
        #[cfg(loom)]
        let g = self.lock.read().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    fn write_inner(&self, stats: &LockStats) -> RwLockWriteGuard<'_, ()> {
        stats.write.fetch_add(1, Ordering::Relaxed);
        #[cfg(not(loom))]
        if let Some(g) = self.lock.try_write() {
            return g;
        }
        #[cfg(loom)]
        if let Ok(g) = self.lock.try_write() {
            return g;
        }
        stats.write_contended.fetch_add(1, Ordering::Relaxed);
        self.waiters.fetch_add(1, Ordering::Relaxed);
        #[cfg(not(loom))]
        let g = self.lock.write();
        #[cfg(loom)]
        let g = self.lock.write().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        g
    }

    /// Take the lock shared.
    #[track_caller]
    pub(crate) fn read<'a>(&'a self, stats: &LockStats) -> MmuReadGuard<'a> {
        let held = Held::acquire(LockClass::MmuLock, Location::caller());
        MmuReadGuard {
            lock: self,
            guard: Some(self.read_inner(stats)),
            _held: held,
        }
    }

    /// Take the lock exclusively.
    #[track_caller]
    pub(crate) fn write<'a>(&'a self, stats: &LockStats) -> MmuWriteGuard<'a> {
        let held = Held::acquire(LockClass::MmuLock, Location::caller());
        MmuWriteGuard {
            lock: self,
            guard: Some(self.write_inner(stats)),
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
            self.guard = Some(self.lock.read_inner(stats));
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
        #[cfg(not(loom))]
        if let Some(g) = self.guard.as_mut() {
            RwLockWriteGuard::unlocked_fair(g, std::thread::yield_now);
            stats.write.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(loom)]
        {
            self.guard = None;
            self.guard = Some(self.lock.write_inner(stats));
        }
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
        self.guard.take();
    }
}
