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
use super::snapshot::{Snapshot, SnapshotGuard};
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
            wait_out(&r);
            #[cfg(loom)]
            drop(r.write().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

/// How long [`wait_out`] spins before it parks.
#[cfg(not(loom))]
const SPIN_LIMIT: std::time::Duration = std::time::Duration::from_micros(20);

/// Wait until `lock` has no reader, then let the reader go on: the open
/// section, if any, has ended.
///
/// A read section is one fault (a microsecond or two), so this first spins
/// for about ten of them, trying the lock without setting any waiting bit.
/// Parking at once costs far more than the wait: the writer's futex sleep,
/// the reader's futex wake on unlock, and the reader's own sleep if its next
/// fault comes while the writer still waits (a parked writer holds off new
/// readers). In `vmmu run memslot-perf`'s move loops that was a third of the
/// CPU time at 32k slots, where faults take longer (docs/PERFORMANCE.md).
/// If the section outlasts the spin (the reader was preempted), it parks as
/// before; the blocking write has writer preference, so a reader that keeps
/// starting sections cannot hold it off for ever.
#[cfg(not(loom))]
fn wait_out(lock: &RwLock<()>) {
    if lock.try_write().is_some() {
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < SPIN_LIMIT {
        for _ in 0..32 {
            std::hint::spin_loop();
            if lock.try_write().is_some() {
                return;
            }
        }
    }
    drop(lock.write());
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

/// A value published for SRCU readers, swapped whole by a writer (KVM's
/// `kvm->memslots` read with `srcu_dereference`): inside a read-side section
/// a reader takes a plain reference, with no reference count or debt to
/// settle, because the writer keeps every value it replaces until the
/// readers that could have seen it are gone. Outside a section readers use
/// [`SrcuSnapshot::load`], as with a [`Snapshot`].
pub(crate) struct SrcuSnapshot<T> {
    snap: Snapshot<T>,
    /// The published value's address (its allocation is owned by `snap`,
    /// then by the [`Retired`] of the swap that replaced it).
    #[cfg(not(loom))]
    raw: std::sync::atomic::AtomicPtr<T>,
}

/// What [`SrcuSnapshot::read`] gives: a reference for the section, or under
/// the model checker (which has no raw pointers to check) a counted one.
#[cfg(not(loom))]
pub(crate) type SrcuRef<'a, T> = &'a T;
#[cfg(loom)]
pub(crate) type SrcuRef<'a, T> = SnapshotGuard<T>;

/// A value replaced by [`SrcuSnapshot::swap`]: readers inside a section may
/// still use it, so it is handed back only after an SRCU grace period
/// ([`Retired::synchronize`]), and dropping it waits for one too.
pub(crate) struct Retired<'s, T> {
    value: Option<Arc<T>>,
    srcu: &'s Srcu,
}

impl<T> std::fmt::Debug for SrcuSnapshot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SrcuSnapshot")
    }
}

impl<T> SrcuSnapshot<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        SrcuSnapshot {
            #[cfg(not(loom))]
            raw: std::sync::atomic::AtomicPtr::new(Arc::as_ptr(&value).cast_mut()),
            snap: Snapshot::new(value),
        }
    }

    /// A guard that keeps the current value alive without a read section.
    ///
    /// Only a value that is also the one sections read: between a swap's two
    /// stores (the address, then the arc-swap) the guard would be older than
    /// what a fault already uses, and a fault could complete on a memslot
    /// that this reader (the VMM, the oracle) does not see yet. So the
    /// address is the one publication point, and a guard read in that window
    /// waits for the arc-swap to catch up (the writer is one store away).
    pub(crate) fn load(&self) -> SnapshotGuard<T> {
        #[cfg(not(loom))]
        {
            let mut spins = 0;
            loop {
                let g = self.snap.load();
                let current = self.raw.load(std::sync::atomic::Ordering::Acquire);
                if std::ptr::eq(Arc::as_ptr(&g), current) {
                    return g;
                }
                super::spin_wait(&mut spins);
            }
        }
        #[cfg(loom)]
        {
            self.snap.load()
        }
    }

    /// A full reference, for holding across long operations (the value
    /// [`SrcuSnapshot::load`] gives).
    pub(crate) fn load_full(&self) -> Arc<T> {
        #[cfg(not(loom))]
        {
            arc_swap::Guard::into_inner(self.load())
        }
        #[cfg(loom)]
        {
            self.load()
        }
    }

    /// The current value, for as long as the caller's read-side section.
    ///
    /// # Safety
    /// `section` must be a section of the domain that every [`SrcuSnapshot::swap`]
    /// of this value is given (the VM's): a grace period of another domain does
    /// not wait for it.
    pub(crate) unsafe fn read<'a>(&'a self, section: &'a SrcuReadGuard<'_>) -> SrcuRef<'a, T> {
        let _ = section;
        #[cfg(not(loom))]
        {
            // Acquire: the value was built before its address was published.
            let p = self.raw.load(std::sync::atomic::Ordering::Acquire);
            // SAFETY: `p` is the address of a value that was published here
            // while the caller's section was open, or that was current when it
            // opened. The allocation stays alive while it is published (`snap`
            // owns it) and, once replaced, in the `Retired` returned by `swap`,
            // which neither frees nor hands it back (to be changed) before a
            // grace period of the caller's domain (the function's contract)
            // has waited for every section open at the time, this one
            // included: the reference cannot outlive the section's borrow.
            // Nothing writes through it: it is only ever shared.
            unsafe { &*p }
        }
        #[cfg(loom)]
        {
            self.snap.load()
        }
    }

    /// Publish `value`; the replaced one comes back as a [`Retired`] tied to
    /// `srcu`, the domain every [`SrcuSnapshot::read`] of this value is made in.
    pub(crate) fn swap<'s>(&self, value: Arc<T>, srcu: &'s Srcu) -> Retired<'s, T> {
        // The address is the publication point: `load` hands out only a value
        // the address holds too, so sections and guards see one sequence of
        // values whichever of the two stores comes first (the tests below fail
        // only with that check gone). Release: readers that see the address
        // see the value built.
        #[cfg(not(loom))]
        self.raw.store(
            Arc::as_ptr(&value).cast_mut(),
            std::sync::atomic::Ordering::Release,
        );
        let old = self.snap.swap(value);
        Retired {
            value: Some(old),
            srcu,
        }
    }
}

impl<T> Retired<'_, T> {
    /// Wait for an SRCU grace period, then hand the replaced value back (no
    /// reader in a section holds a reference to it any more).
    #[track_caller]
    pub(crate) fn synchronize(mut self) -> Arc<T> {
        self.srcu.synchronize();
        self.value
            .take()
            .unwrap_or_else(|| unreachable!("a retired value is handed back once"))
    }
}

impl<T> Drop for Retired<'_, T> {
    fn drop(&mut self) {
        if self.value.is_some() {
            self.srcu.synchronize();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn test_swapped_value_is_handed_back_only_after_open_sections_end() {
        let srcu = Srcu::new();
        let reader = srcu.register();
        let snap = SrcuSnapshot::new(Arc::new(1u32));
        let handed_back = AtomicBool::new(false);
        std::thread::scope(|s| {
            let section = reader.read_lock();
            // SAFETY: `reader` is of the domain every swap in `while_swapping` gets.
            let seen = unsafe { snap.read(&section) };
            let writer = s.spawn(|| {
                let old = snap.swap(Arc::new(2), &srcu).synchronize();
                handed_back.store(true, Ordering::SeqCst);
                *old
            });
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !handed_back.load(Ordering::SeqCst),
                "the replaced value came back while a section could still read it"
            );
            assert_eq!(*seen, 1);
            drop(section);
            assert_eq!(writer.join().expect("writer"), 1);
        });
        let section = reader.read_lock();
        // SAFETY: as above.
        let now = unsafe { snap.read(&section) };
        assert_eq!(*now, 2, "a new section reads the new value");
        assert_eq!(**snap.load(), 2);
    }

    #[test]
    fn test_dropping_a_retired_value_waits_for_open_sections() {
        let srcu = Srcu::new();
        let reader = srcu.register();
        let snap = SrcuSnapshot::new(Arc::new(1u32));
        let dropped = AtomicBool::new(false);
        std::thread::scope(|s| {
            let section = reader.read_lock();
            let writer = s.spawn(|| {
                drop(snap.swap(Arc::new(2), &srcu));
                dropped.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !dropped.load(Ordering::SeqCst),
                "dropped under an open section"
            );
            drop(section);
            writer.join().expect("writer");
        });
        assert!(dropped.load(Ordering::SeqCst));
    }

    /// Run `check` over and over (at least once) while another thread swaps
    /// in 1, 2, ... 20000, each swap waiting for its grace period.
    fn while_swapping(check: impl Fn(&SrcuSnapshot<u64>, &SrcuReader)) {
        let srcu = Srcu::new();
        let reader = srcu.register();
        let snap = SrcuSnapshot::new(Arc::new(0u64));
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for v in 1..=20_000u64 {
                    drop(snap.swap(Arc::new(v), &srcu).synchronize());
                }
                stop.store(true, Ordering::SeqCst);
            });
            loop {
                check(&snap, &reader);
                if stop.load(Ordering::SeqCst) {
                    break;
                }
            }
        });
    }

    #[test]
    fn test_a_section_never_reads_older_than_a_guard_read_before_it() {
        // A vCPU loads the memslots at entry through a guard and faults on them
        // in a section afterwards: the fault must not see an older set.
        while_swapping(|snap, reader| {
            let before = **snap.load();
            let section = reader.read_lock();
            // SAFETY: `reader` is of the domain every swap in `while_swapping` gets.
            let seen = *unsafe { snap.read(&section) };
            assert!(
                seen >= before,
                "a section read {seen} after a guard read {before}"
            );
        });
    }

    #[test]
    fn test_a_guard_never_reads_older_than_a_section_read_before_it() {
        // A fault maps a page from a memslot read in its section; the VMM (or
        // the oracle) then reads the memslots through a guard: it must see
        // that memslot too.
        while_swapping(|snap, reader| {
            let section = reader.read_lock();
            // SAFETY: `reader` is of the domain every swap in `while_swapping` gets.
            let seen = *unsafe { snap.read(&section) };
            drop(section);
            let after = **snap.load();
            assert!(
                after >= seen,
                "a guard read {after} after a section read {seen}"
            );
            assert!(*snap.load_full() >= seen);
        });
    }
}
