//! SRCU for memslot readers: `synchronize` returns only after every read-side
//! section that began before it has ended.
//!
//! Each reader (a vCPU) owns a section counter on its own cache line, odd
//! while a section is open: entering adds one and issues a full fence, leaving
//! adds one more. Only the reader writes its counter, so neither side is a
//! read-modify-write, and a reader never waits. `synchronize` issues a full
//! fence and reads every counter once; for each odd one it waits until that
//! counter moves on, which ends the section it saw. Sections that open later
//! are no concern: the two fences order each of them after the writer's
//! publication, so they read the new value (the reader's "odd, fence, read
//! the value" against the writer's "publish, fence, read the counter", the
//! store-buffering pattern that two full fences forbid).
//!
//! This is the counting of KVM's SRCU with one counter per reader instead of
//! per CPU, and no flip of an index: a counter that only grows tells the
//! writer that the section it saw is over, whatever sections came after it.

use std::panic::Location;

use crossbeam_utils::CachePadded;

use super::lockdep::{Held, LockClass};
use super::snapshot::{Snapshot, SnapshotGuard};
use super::{fence, Arc, AtomicU64, Mutex, Ordering, Weak};

/// One reader's section counter, alone on its cache lines: a vCPU writes it
/// twice on every fault, and sharing a line with another vCPU's would make
/// their faults contend.
type ReaderCount = CachePadded<AtomicU64>;

/// The SRCU domain.
#[derive(Debug)]
pub(crate) struct Srcu {
    readers: Mutex<Vec<Weak<ReaderCount>>>,
    /// Under loom: leave out the reader's fence (the model's twin shows the
    /// writer then frees what a section still reads).
    #[cfg(loom)]
    unfenced: bool,
}

/// One registered reader.
#[derive(Debug)]
pub(crate) struct SrcuReader {
    count: Arc<ReaderCount>,
    #[cfg(loom)]
    unfenced: bool,
}

/// An open read-side section.
pub(crate) struct SrcuReadGuard<'a> {
    count: &'a AtomicU64,
    /// The counter's value once this section ends.
    end: u64,
    _held: Held,
}

impl Srcu {
    pub(crate) fn new() -> Self {
        Srcu {
            readers: Mutex::new(LockClass::Leaf, Vec::new()),
            #[cfg(loom)]
            unfenced: false,
        }
    }

    /// Under loom: a domain whose readers skip the fence on entry.
    #[cfg(all(test, loom))]
    fn new_unfenced() -> Self {
        Srcu {
            unfenced: true,
            ..Srcu::new()
        }
    }

    pub(crate) fn register(&self) -> SrcuReader {
        let count = Arc::new(CachePadded::new(AtomicU64::new(0)));
        let mut readers = self.readers.lock();
        readers.retain(|w| w.strong_count() > 0);
        readers.push(Arc::downgrade(&count));
        SrcuReader {
            count,
            #[cfg(loom)]
            unfenced: self.unfenced,
        }
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
        // Pairs with the fence a reader issues on entry: whatever the caller
        // published before this point, a section that this reading of its
        // counter misses reads it.
        fence(Ordering::SeqCst);
        for r in readers {
            // Acquire (here and in the wait): the section's reads happen
            // before what the caller does with the old value.
            let seen = r.load(Ordering::Acquire);
            if seen % 2 == 1 {
                wait_out(&r, seen);
            }
        }
    }
}

/// How long [`wait_out`] spins before it yields the CPU, and yields before
/// it sleeps.
#[cfg(not(loom))]
const SPIN_LIMIT: std::time::Duration = std::time::Duration::from_micros(20);
#[cfg(not(loom))]
const YIELD_LIMIT: std::time::Duration = std::time::Duration::from_micros(500);

/// Wait until a reader's counter has moved on from `seen` (odd): the section
/// open when the writer looked has ended.
///
/// A read section is one fault (a microsecond or two), so this first spins
/// for about ten of them. Sleeping at once costs far more than the wait: in
/// `vmmu run memslot-perf`'s move loops, waits that slept were a third of
/// the CPU time at 32k slots, where faults take longer (docs/PERFORMANCE.md).
/// A section that outlasts the spin (its reader was preempted, maybe by
/// this thread) is waited for with the CPU given away, first by yielding
/// (the reader may be next on this CPU) and after half a millisecond in
/// sleeps that double up to a millisecond, as SRCU's own grace periods
/// wait; the reader itself never waits for the writer.
fn wait_out(count: &AtomicU64, seen: u64) {
    #[cfg(not(loom))]
    {
        let start = std::time::Instant::now();
        while start.elapsed() < SPIN_LIMIT {
            for _ in 0..32 {
                std::hint::spin_loop();
                if count.load(Ordering::Acquire) != seen {
                    return;
                }
            }
        }
        // Then give the CPU away: the reader may be waiting for this one.
        while start.elapsed() < YIELD_LIMIT {
            std::thread::yield_now();
            if count.load(Ordering::Acquire) != seen {
                return;
            }
        }
        let mut nap = std::time::Duration::from_micros(50);
        while count.load(Ordering::Acquire) == seen {
            std::thread::sleep(nap);
            nap = (nap * 2).min(std::time::Duration::from_millis(1));
        }
    }
    #[cfg(loom)]
    while count.load(Ordering::Acquire) == seen {
        loom::thread::yield_now();
    }
}

impl SrcuReader {
    /// Open a read-side section: the counter goes odd, then a full fence
    /// orders that store before every read the section makes.
    #[track_caller]
    #[inline]
    pub(crate) fn read_lock(&self) -> SrcuReadGuard<'_> {
        let held = Held::acquire(LockClass::SrcuRead, Location::caller());
        let count: &AtomicU64 = &self.count;
        // Relaxed: only this reader writes its counter. (Sections of one
        // reader do not nest: the lock-order checker reports a second one
        // opened inside the first.)
        let now = count.load(Ordering::Relaxed);
        // Release (a plain store on x86, like Relaxed): a writer that finds
        // the counter already odd again reads this store, not the previous
        // section's end, and must still be ordered after that section.
        count.store(now + 1, Ordering::Release);
        #[cfg(loom)]
        let fenced = !self.unfenced;
        #[cfg(not(loom))]
        let fenced = true;
        if fenced {
            fence(Ordering::SeqCst);
        }
        SrcuReadGuard {
            count,
            end: now + 2,
            _held: held,
        }
    }
}

impl Drop for SrcuReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: the section's reads happen before a writer that sees
        // the counter move on frees what they read.
        self.count.store(self.end, Ordering::Release);
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

    #[test]
    fn test_each_section_moves_the_counter_on_by_two_and_is_odd_while_open() {
        // A writer takes any change of an odd counter for the end of the
        // section it saw: the counter must only grow.
        let srcu = Srcu::new();
        let reader = srcu.register();
        for n in 0..3u64 {
            assert_eq!(reader.count.load(Ordering::Relaxed), 2 * n);
            let section = reader.read_lock();
            assert_eq!(reader.count.load(Ordering::Relaxed), 2 * n + 1);
            drop(section);
        }
        assert_eq!(reader.count.load(Ordering::Relaxed), 6);
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

/// The grace period under the model checker: a writer publishes a new value,
/// waits for a grace period and then overwrites the old one (the free), while
/// a reader reads whichever value is published, in two sections. The old
/// value is published as an index, with the orderings `SrcuSnapshot` uses for
/// its address (a release store, an acquire load), and kept in loom cells:
/// loom reports the free as a data race when it is not ordered after every
/// read of the old value.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::AtomicUsize;

    const FREED: u64 = u64::MAX;

    fn model(srcu: fn() -> Srcu) {
        loom::model(move || {
            let srcu = loom::sync::Arc::new(srcu());
            let reader = srcu.register();
            let values = loom::sync::Arc::new([UnsafeCell::new(1u64), UnsafeCell::new(2)]);
            let current = loom::sync::Arc::new(AtomicUsize::new(0));
            let writer = {
                let (srcu, values, current) = (srcu.clone(), values.clone(), current.clone());
                loom::thread::spawn(move || {
                    current.store(1, Ordering::Release);
                    srcu.synchronize();
                    // SAFETY: loom checks this write against every read.
                    values[0].with_mut(|v| unsafe { *v = FREED });
                })
            };
            for _ in 0..2 {
                let section = reader.read_lock();
                let i = current.load(Ordering::Acquire);
                // SAFETY: as above.
                let v = values[i].with(|v| unsafe { *v });
                assert_ne!(v, FREED, "a section read a freed value");
                drop(section);
            }
            writer.join().expect("writer");
        });
    }

    #[test]
    fn loom_srcu_never_frees_what_an_open_section_reads() {
        model(Srcu::new);
    }

    #[test]
    #[should_panic]
    fn loom_srcu_without_the_reader_fence_frees_what_a_section_reads() {
        model(Srcu::new_unfenced);
    }
}
