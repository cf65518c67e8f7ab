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

/// `shard` taken modulo the shards (a power of two outside the model
/// checker: a mask, and no bounds check on the array).
#[inline(always)]
fn shard_index(shard: usize) -> usize {
    #[cfg(not(loom))]
    {
        shard % SHARDS
    }
    #[cfg(loom)]
    {
        let _ = shard;
        0
    }
}

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

/// How long a yielding writer waits for a waiter that has not parked yet
/// to take the lock, before it takes the lock back (a fault holds it for
/// about a microsecond; a waiter that is not running by then is not helped
/// by a longer wait).
#[cfg(not(loom))]
const YIELD_HANDOFF: std::time::Duration = std::time::Duration::from_micros(5);

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
    /// An array, not a slice: indexing a shard by `id % SHARDS` then needs
    /// no length load or bounds check on the fault path.
    shards: [CachePadded<RwLock<()>>; SHARDS],
    waiters: CachePadded<AtomicUsize>,
}

/// Shared hold of [`MmuLock`]: of one shard, released by `drop`. (Outside
/// the model checker the shard is held without a guard object: a fault takes
/// and releases the lock on every call, and the guard's `Option`, kept so a
/// yield can hand it back, was a fifth of the cost.)
pub(crate) struct MmuReadGuard<'a> {
    lock: &'a MmuLock,
    shard: usize,
    #[cfg(loom)]
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
            shards: std::array::from_fn(|_| CachePadded::new(RwLock::new(()))),
            waiters: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    /// Hold `shard` shared until the returned guard is forgotten and
    /// released by [`MmuLock::unlock_shard`] (outside the model checker).
    /// The uncontended case is inlined into the fault; waiting is not.
    #[inline(always)]
    fn read_shard(&self, shard: usize, stats: &LockStats) -> RwLockReadGuard<'_, ()> {
        stats.read.fetch_add(1, Ordering::Relaxed);
        let lock = &self.shards[shard_index(shard)];
        #[cfg(not(loom))]
        if let Some(g) = lock.try_read() {
            return g;
        }
        #[cfg(loom)]
        if let Ok(g) = lock.try_read() {
            return g;
        }
        self.read_shard_slow(lock, stats)
    }

    /// [`MmuLock::read_shard`] when the shard is held or wanted exclusively.
    #[cold]
    #[inline(never)]
    fn read_shard_slow<'a>(
        &'a self,
        lock: &'a RwLock<()>,
        stats: &LockStats,
    ) -> RwLockReadGuard<'a, ()> {
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

    /// Take the lock shared, on the calling thread's shard.
    #[track_caller]
    pub(crate) fn read<'a>(&'a self, stats: &LockStats) -> MmuReadGuard<'a> {
        self.read_on(my_shard(), stats)
    }

    /// Take the lock shared on shard `shard` (taken modulo the shards): a
    /// vCPU names its own, by id, instead of looking up its thread's.
    #[track_caller]
    #[inline(always)]
    pub(crate) fn read_on<'a>(&'a self, shard: usize, stats: &LockStats) -> MmuReadGuard<'a> {
        let held = Held::acquire(LockClass::MmuLock, Location::caller());
        let shard = shard_index(shard);
        let g = self.read_shard(shard, stats);
        #[cfg(not(loom))]
        std::mem::forget(g);
        MmuReadGuard {
            lock: self,
            shard,
            #[cfg(loom)]
            guard: Some(g),
            _held: held,
        }
    }

    /// Release a shard held shared by a forgotten guard.
    ///
    /// # Safety
    /// The caller holds `shard` shared through a guard it forgot, and
    /// releases it once.
    #[cfg(not(loom))]
    #[inline]
    unsafe fn unlock_shard(&self, shard: usize, fair: bool) {
        let lock = &self.shards[shard_index(shard)];
        // SAFETY: as the function's contract: the read lock is held, through
        // no guard that would release it again.
        unsafe {
            if fair {
                lock.force_unlock_read_fair();
            } else {
                lock.force_unlock_read();
            }
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

    /// After a yield released the lock: give the `waiting` threads that were
    /// waiting for it (the reason for the yield) a moment to take it, if one
    /// is still spinning before it parks (a waiter leaves the count once it
    /// holds the lock). Whether it waited at all: not without waiters.
    #[cfg(not(loom))]
    fn let_waiters_in(&self, waiting: usize) -> bool {
        if waiting == 0 {
            return false;
        }
        let start = std::time::Instant::now();
        while self.waiters.load(Ordering::Relaxed) >= waiting && start.elapsed() < YIELD_HANDOFF {
            std::hint::spin_loop();
        }
        true
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
        {
            // Fair unlock hands the lock to a waiter before we can re-take it.
            // SAFETY: this guard holds its shard shared (taken in `read_on`,
            // or again below), and gives it back here once.
            unsafe { self.lock.unlock_shard(self.shard, true) };
            std::thread::yield_now();
            std::mem::forget(self.lock.read_shard(self.shard, stats));
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
        // Release every shard, then take them all again in order. The
        // threads that made the walk yield must get in first, as they do at
        // KVM's queued rwlock: a plain release let this writer take the
        // lock back before a woken reader ran, and the walk yielded to the
        // same reader again and again (and flushed before each yield).
        #[cfg(not(loom))]
        {
            let waiting = self.lock.waiters.load(Ordering::Relaxed);
            // Fair: a parked waiter is handed its shard before this returns.
            while let Some(g) = self.guards.pop() {
                RwLockWriteGuard::unlock_fair(g);
            }
            if !self.lock.let_waiters_in(waiting) {
                // A yield for the time slice (no one waits): offer the CPU
                // to whatever else would run here.
                std::thread::yield_now();
            }
        }
        #[cfg(loom)]
        self.guards.clear();
        self.guards = self.lock.write_all(stats);
    }
    fn needbreak(&self) -> bool {
        self.lock.has_waiters()
    }
}

impl Drop for MmuReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        #[cfg(not(loom))]
        // SAFETY: the guard holds its shard shared (`read_on`, `yield_lock`)
        // and this is its one release.
        unsafe {
            self.lock.unlock_shard(self.shard, false)
        };
        #[cfg(loom)]
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

    /// A yielding writer waits a while for a waiter that has not taken the
    /// lock yet, but not for ever, and not at all without waiters.
    #[test]
    fn test_a_write_yield_gives_a_waiter_time_to_get_in_but_not_for_ever() {
        let lock = MmuLock::new();
        let stats = LockStats::default();
        let mut w = lock.write(&stats);
        // A waiter that never takes the lock (counted by hand).
        lock.waiters.fetch_add(1, Ordering::Relaxed);
        let start = std::time::Instant::now();
        w.yield_lock(&stats);
        assert!(
            start.elapsed() >= YIELD_HANDOFF,
            "took the lock back without giving the waiter its moment"
        );
        // The wait itself, timed alone: the waiter never leaves the count.
        let start = std::time::Instant::now();
        assert!(lock.let_waiters_in(1));
        assert!(
            start.elapsed() >= YIELD_HANDOFF,
            "gave up on the waiter before its moment was over"
        );
        lock.waiters.fetch_sub(1, Ordering::Relaxed);
        assert!(!lock.let_waiters_in(0), "waited with no one waiting");
        drop(w);
        assert!(
            lock.shards.iter().all(|s| !s.is_locked()),
            "the yield left a shard held"
        );
    }

    /// A read hold named by a vCPU's shard (any number: taken modulo the
    /// shards) keeps writers out until it yields, lets a waiting writer in at
    /// the yield, holds again after it, and is released once by its drop.
    #[test]
    fn test_read_on_a_shard_yields_to_a_waiting_writer_and_releases_on_drop() {
        let lock = Arc::new(MmuLock::new());
        let stats = Arc::new(LockStats::default());
        let mut r = lock.read_on(SHARDS + 3, &stats);
        let wrote = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l2, s2, w2) = (lock.clone(), stats.clone(), wrote.clone());
        let t = std::thread::spawn(move || {
            let _w = l2.write(&s2);
            w2.store(true, Ordering::SeqCst);
        });
        while !lock.has_waiters() {
            std::thread::yield_now();
        }
        assert!(
            !wrote.load(Ordering::SeqCst),
            "a writer got in past a reader"
        );
        r.yield_lock(&stats);
        assert!(
            wrote.load(Ordering::SeqCst),
            "the yield did not let the writer in"
        );
        t.join().unwrap();
        // Held again after the yield: a writer must wait.
        let (l3, s3) = (lock.clone(), stats.clone());
        let t = std::thread::spawn(move || drop(l3.write(&s3)));
        while !lock.has_waiters() {
            std::thread::yield_now();
        }
        drop(r);
        t.join().unwrap();
        assert_eq!(
            stats.read.load(Ordering::Relaxed),
            2,
            "taken, and again at the yield"
        );
        // Released exactly once: the lock is free for a writer and a reader.
        drop(lock.write(&stats));
        drop(lock.read(&stats));
    }
}
