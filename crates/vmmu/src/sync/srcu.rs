//! SRCU for memslot readers: `synchronize` returns only after every read-side
//! section that began before it has ended.
//!
//! Each reader (a vCPU) owns a reader-writer lock that it takes shared for a
//! read-side section, so readers never share a cache line. `synchronize` takes each
//! reader's lock exclusively once, in turn: when it has passed all of them, every
//! section that was open when it started has closed. Like
//! `synchronize_srcu_expedited`, it briefly holds off new sections of the reader it
//! is passing.

use std::panic::Location;

use crossbeam_utils::CachePadded;

use super::lockdep::{Held, LockClass};
use super::{Arc, Mutex, Weak};

#[cfg(loom)]
use loom::sync::{RwLock, RwLockReadGuard};
#[cfg(not(loom))]
use parking_lot::{RwLock, RwLockReadGuard};

/// One reader's lock, alone on its cache lines: a vCPU takes it on every fault,
/// and sharing a line with another vCPU's would make their faults contend.
type ReaderLock = CachePadded<RwLock<()>>;

/// The SRCU domain.
#[derive(Debug)]
pub(crate) struct Srcu {
    readers: Mutex<Vec<Weak<ReaderLock>>>,
}

/// One registered reader.
#[derive(Debug)]
pub(crate) struct SrcuReader {
    lock: Arc<ReaderLock>,
}

/// An open read-side section.
pub(crate) struct SrcuReadGuard<'a> {
    _g: RwLockReadGuard<'a, ()>,
    _held: Held,
}

impl Srcu {
    pub(crate) fn new() -> Self {
        Srcu {
            readers: Mutex::new(LockClass::Leaf, Vec::new()),
        }
    }

    pub(crate) fn register(&self) -> SrcuReader {
        let lock = Arc::new(CachePadded::new(RwLock::new(())));
        let mut readers = self.readers.lock();
        readers.retain(|w| w.strong_count() > 0);
        readers.push(Arc::downgrade(&lock));
        SrcuReader { lock }
    }

    /// Wait for every read-side section open at the time of the call to end.
    /// Checked by the lock-order checker like taking the read side exclusively:
    /// called inside a read section, under `mmu_lock`, `slots_arch_lock` or in a
    /// notifier it would wait for itself (or for a reader waiting for what the
    /// caller holds), so it is reported instead of hanging.
    #[track_caller]
    pub(crate) fn synchronize(&self) {
        let _held = Held::acquire(LockClass::SrcuSync, Location::caller());
        let readers: Vec<_> = self
            .readers
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for r in readers {
            #[cfg(not(loom))]
            drop(r.write());
            #[cfg(loom)]
            drop(r.write().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

impl SrcuReader {
    #[track_caller]
    pub(crate) fn read_lock(&self) -> SrcuReadGuard<'_> {
        let held = Held::acquire(LockClass::SrcuRead, Location::caller());
        #[cfg(not(loom))]
        let g = self.lock.read();
        #[cfg(loom)]
        let g = self.lock.read().unwrap_or_else(|e| e.into_inner());
        SrcuReadGuard { _g: g, _held: held }
    }
}
