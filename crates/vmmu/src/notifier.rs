//! Invalidation state: the sequence count, the in-progress count and the merged
//! range that let a fault detect that the frame it looked up may be stale.
//!
//! Writers (`begin`, `range_add`, `end`) run with `mmu_lock` held for write.
//! Readers use either the locked check (under `mmu_lock`, exact) or the unlocked
//! check (lock-free, may err either way, used to retry early and always followed by
//! the locked one).
//!
//! Why the locked check is enough (proof sketch). A fault snapshots `seq` (Acquire)
//! before it asks the host for a frame. The host changes a mapping only after
//! `invalidate_range_start` for it returned, and that call ran `begin` and
//! `range_add` under the write lock. When the fault later takes `mmu_lock`, either
//! (1) its critical section precedes the invalidation's: whatever it installs is
//! then zapped by that invalidation; or (2) it follows `begin`: if `end` has not run,
//! `in_progress > 0` and the range covers the gfn; if `end` has run, `seq` was
//! incremented under the same lock and differs from the snapshot. Either way it
//! retries instead of installing the old frame.

use std::panic::Location;

use crate::stats::CounterSet;
use crate::tdp::{Ctx, FlushBatch};
use crate::types::{Hva, HvaRange};
use crate::vm::Vm;

use crate::sync::lockdep::{Held, LockClass};
use crate::sync::{AtomicI64, AtomicU64, Condvar, MmuWriteGuard, Mutex, Ordering};
use crate::types::{Gfn, GfnRange};

/// "No range recorded".
const INVALID_GFN: u64 = u64::MAX;

/// `mmu_invalidate_seq`, `mmu_invalidate_in_progress` and the merged range.
#[derive(Debug)]
pub(crate) struct InvalidateState {
    seq: AtomicU64,
    in_progress: AtomicI64,
    range_start: AtomicU64,
    range_end: AtomicU64,
    /// begin/end pairs that never recorded a range (KVM warns about these).
    empty_pairs: AtomicU64,
    range_added: AtomicU64,
    /// Test-only: bump the sequence with a Relaxed store (the bug the loom model
    /// of a lockless host catches).
    relaxed_seq_bump: bool,
}

impl InvalidateState {
    pub(crate) fn new(relaxed_seq_bump: bool) -> Self {
        InvalidateState {
            relaxed_seq_bump,
            seq: AtomicU64::new(0),
            in_progress: AtomicI64::new(0),
            range_start: AtomicU64::new(INVALID_GFN),
            range_end: AtomicU64::new(INVALID_GFN),
            empty_pairs: AtomicU64::new(0),
            range_added: AtomicU64::new(0),
        }
    }

    /// Snapshot the sequence for a fault. Acquire: pairs with the Release bump
    /// in [`InvalidateState::end`], so a fault that sees an invalidation's bump
    /// also sees every change the host made before ending it, even in host page
    /// tables it reads without locks; and loads that follow (the host's page
    /// tables) cannot be satisfied before this one.
    pub(crate) fn snapshot(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Start an invalidation (`kvm_mmu_invalidate_begin`).
    pub(crate) fn begin(&self, _lock: &MmuWriteGuard<'_>) {
        // Relaxed everywhere on the writer side: the write lock orders these
        // stores against locked readers; unlocked readers only need `end`'s edge.
        let n = self.in_progress.load(Ordering::Relaxed) + 1;
        self.in_progress.store(n, Ordering::Relaxed);
        if n == 1 {
            self.range_start.store(INVALID_GFN, Ordering::Relaxed);
            self.range_end.store(INVALID_GFN, Ordering::Relaxed);
            self.range_added.store(0, Ordering::Relaxed);
        }
    }

    /// Widen the in-progress range to cover `range` (`kvm_mmu_invalidate_range_add`).
    /// Ranges only grow until every concurrent invalidation has ended: a deliberate
    /// over-approximation.
    pub(crate) fn range_add(&self, range: GfnRange, _lock: &MmuWriteGuard<'_>) {
        debug_assert!(self.in_progress.load(Ordering::Relaxed) > 0);
        let start = self.range_start.load(Ordering::Relaxed);
        if start == INVALID_GFN {
            self.range_start.store(range.start.0, Ordering::Relaxed);
            self.range_end.store(range.end.0, Ordering::Relaxed);
        } else {
            self.range_start
                .store(start.min(range.start.0), Ordering::Relaxed);
            let end = self.range_end.load(Ordering::Relaxed);
            self.range_end
                .store(end.max(range.end.0), Ordering::Relaxed);
        }
        self.range_added.store(1, Ordering::Relaxed);
    }

    /// End an invalidation (`kvm_mmu_invalidate_end`): bump the sequence, then drop
    /// the in-progress count.
    pub(crate) fn end(&self, _lock: &MmuWriteGuard<'_>) {
        if self.range_added.load(Ordering::Relaxed) == 0 {
            self.empty_pairs.fetch_add(1, Ordering::Relaxed);
        }
        // Release: the host changed its mapping before ending the invalidation, so
        // a fault whose snapshot reads this bump must also read the new mapping;
        // pairs with the Acquire in `snapshot`. mmu_lock does not provide that
        // edge: the fault reads the host's tables before it takes the lock.
        let bump = if self.relaxed_seq_bump {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        self.seq.fetch_add(1, bump);
        // Release: an unlocked reader that sees the decremented count also sees the
        // incremented sequence (KVM's smp_wmb); pairs with the Acquire load in
        // `retry_gfn_unsafe`.
        let prev = self.in_progress.fetch_sub(1, Ordering::Release);
        debug_assert!(prev > 0, "invalidate end without begin");
    }

    /// The exact check, `mmu_lock` held (read or write): must the fault that took
    /// snapshot `seq` for `gfn` retry?
    pub(crate) fn retry_gfn(&self, seq: u64, gfn: Gfn) -> bool {
        // Relaxed: mmu_lock orders these loads after every writer's stores.
        if self.in_progress.load(Ordering::Relaxed) != 0 {
            let start = self.range_start.load(Ordering::Relaxed);
            let end = self.range_end.load(Ordering::Relaxed);
            // No range yet means a begin is still in progress: retry to be safe.
            if start == INVALID_GFN || (gfn.0 >= start && gfn.0 < end) {
                return true;
            }
        }
        self.seq.load(Ordering::Relaxed) != seq
    }

    /// The lock-free check (`mmu_invalidate_retry_gfn_unsafe`). May say "retry" when
    /// the locked check would not, and may miss an invalidation that is starting;
    /// never a substitute for [`InvalidateState::retry_gfn`].
    pub(crate) fn retry_gfn_unsafe(&self, seq: u64, gfn: Gfn) -> bool {
        // Acquire: pairs with the Release in `end`, so seeing the count drop means
        // the sequence load below sees the bump.
        if self.in_progress.load(Ordering::Acquire) != 0 {
            // The range may be stale; a stale range only costs a spurious retry or
            // defers the decision to the locked check.
            let start = self.range_start.load(Ordering::Relaxed);
            let end = self.range_end.load(Ordering::Relaxed);
            if gfn.0 >= start && gfn.0 < end {
                return true;
            }
        }
        self.seq.load(Ordering::Relaxed) != seq
    }

    /// Number of invalidations currently in progress.
    pub(crate) fn in_progress(&self) -> i64 {
        self.in_progress.load(Ordering::Acquire)
    }

    /// begin/end pairs that recorded no range.
    pub(crate) fn empty_pairs(&self) -> u64 {
        self.empty_pairs.load(Ordering::Relaxed)
    }
}

/// `mn_active_invalidate_count`: notifier invalidations between start and end.
/// Memslot installs wait for it to be zero, because start and end must see the same
/// memslots to take and release `mmu_lock` (and the in-progress count) in pairs.
#[derive(Debug)]
pub(crate) struct ActiveInvalidations {
    count: Mutex<u64>,
    idle: Condvar,
}

impl ActiveInvalidations {
    pub(crate) fn new() -> Self {
        ActiveInvalidations {
            count: Mutex::new(LockClass::MnInvalidateLock, 0),
            idle: Condvar::new(),
        }
    }

    /// A notifier invalidation starts.
    #[track_caller]
    pub(crate) fn inc(&self) {
        *self.count.lock() += 1;
    }

    /// A notifier invalidation ended; wake the installer if it was the last.
    #[track_caller]
    pub(crate) fn dec(&self) {
        let mut c = self.count.lock();
        debug_assert!(*c > 0);
        *c = c.saturating_sub(1);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    /// Wait until no notifier invalidation is active, then run `publish` while
    /// still holding the lock, so no new one can start in between. Like KVM's open
    /// coded wait, this is unfair: a stream of notifiers can delay the installer.
    #[track_caller]
    pub(crate) fn publish_when_idle<R>(&self, skip_wait: bool, publish: impl FnOnce() -> R) -> R {
        let mut c = self.count.lock();
        while *c != 0 && !skip_wait {
            self.idle.wait(&mut c);
        }
        publish()
    }
}

/// Pseudo-lock marking "inside an mmu_notifier callback" for the order checker.
#[track_caller]
pub(crate) fn notifier_section() -> Held {
    Held::acquire(LockClass::NotifierCallback, Location::caller())
}

impl crate::vm::VmInner {
    /// Whether any slot maps part of `range`.
    pub(crate) fn any_overlap(&self, range: HvaRange) -> bool {
        self.memslots
            .iter()
            .any(|set| set.load().any_hva_overlap(range))
    }

    /// The gfns the slots map for `range`, by address space, with ranges of
    /// slots that follow each other in gfn merged into one. KVM calls its
    /// handlers slot by slot; the handlers here (zap, age, the invalidation's
    /// range) only use the gfns and the address space, so a merged range does
    /// the same work in one walk: a 2 MiB invalidation over 128 slots of
    /// 16 KiB (memslot-perf at 32k slots) is one descent from each root, not
    /// 128.
    pub(crate) fn overlapping_gfns(&self, range: HvaRange) -> Vec<(u16, GfnRange)> {
        let mut hits: Vec<(u16, GfnRange)> = Vec::new();
        for (as_id, set) in self.memslots.iter().enumerate() {
            set.load().for_each_hva_overlap(range, |_, g| {
                // Slots come in host-address order, which for the usual
                // layout is gfn order too: most merge as they come.
                push_merged(&mut hits, as_id as u16, g)
            });
        }
        // Whatever the visit order left apart.
        coalesce_gfn_ranges(hits)
    }
}

/// Sort `hits` by address space and gfn and merge ranges that touch or
/// overlap within one address space (two slots never share a gfn, but two
/// may map the same host pages, and an empty range would merge harmlessly).
pub(crate) fn coalesce_gfn_ranges(mut hits: Vec<(u16, GfnRange)>) -> Vec<(u16, GfnRange)> {
    hits.sort_unstable_by_key(|(a, g)| (*a, g.start.0));
    let mut out: Vec<(u16, GfnRange)> = Vec::with_capacity(hits.len());
    for (a, g) in hits {
        push_merged(&mut out, a, g);
    }
    out
}

/// Append `(a, g)`, or extend the last range when `g` starts inside it or
/// where it ends (in the same address space).
fn push_merged(out: &mut Vec<(u16, GfnRange)>, a: u16, g: GfnRange) {
    match out.last_mut() {
        Some((la, lg)) if *la == a && lg.start.0 <= g.start.0 && g.start.0 <= lg.end.0 => {
            lg.end = Gfn(lg.end.0.max(g.end.0));
        }
        _ => out.push((a, g)),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::stats::CounterSet;
    use crate::sync::MmuLock;

    #[test]
    fn test_invalidate_retry_inside_range_until_end_then_seq() {
        let lock = MmuLock::new();
        let st = CounterSet::default();
        let inv = InvalidateState::new(false);
        let seq = inv.snapshot();
        assert!(!inv.retry_gfn(seq, Gfn(5)));
        {
            let w = lock.write(&st.lock);
            inv.begin(&w);
            inv.range_add(GfnRange::new(Gfn(4), Gfn(8)), &w);
        }
        assert!(inv.retry_gfn(seq, Gfn(5)));
        assert!(inv.retry_gfn_unsafe(seq, Gfn(5)));
        assert!(!inv.retry_gfn(seq, Gfn(8)), "outside the range, same seq");
        {
            let w = lock.write(&st.lock);
            inv.end(&w);
        }
        assert!(inv.retry_gfn(seq, Gfn(100)), "seq moved");
        let seq2 = inv.snapshot();
        assert!(!inv.retry_gfn(seq2, Gfn(5)));
    }

    fn r(a: u64, b: u64) -> GfnRange {
        GfnRange::new(Gfn(a), Gfn(b))
    }

    #[test]
    fn test_coalesce_merges_touching_ranges_of_one_address_space_only() {
        let hits = vec![
            (0, r(8, 12)),
            (1, r(4, 8)),
            (0, r(0, 4)),
            (0, r(4, 8)),
            (0, r(13, 14)),
        ];
        assert_eq!(
            coalesce_gfn_ranges(hits),
            vec![(0, r(0, 12)), (0, r(13, 14)), (1, r(4, 8))],
            "sorted, touching ranges merged, a gap or another address space kept apart"
        );
        // Two slots mapping the same host pages may give overlapping ranges.
        assert_eq!(
            coalesce_gfn_ranges(vec![(0, r(0, 8)), (0, r(2, 4))]),
            vec![(0, r(0, 8))]
        );
        assert_eq!(coalesce_gfn_ranges(Vec::new()), Vec::new());
        // As the host-range visit pushes them, unsorted: a range before the
        // last one is not swallowed by it.
        let mut out = vec![(0, r(8, 12))];
        push_merged(&mut out, 0, r(0, 4));
        push_merged(&mut out, 0, r(12, 16));
        assert_eq!(out, vec![(0, r(8, 12)), (0, r(0, 4)), (0, r(12, 16))]);
        push_merged(&mut out, 0, r(16, 20));
        assert_eq!(out[2], (0, r(12, 20)));
    }

    #[test]
    fn test_invalidate_concurrent_ranges_merge_until_all_end() {
        let lock = MmuLock::new();
        let st = CounterSet::default();
        let inv = InvalidateState::new(false);
        let seq = inv.snapshot();
        let w = lock.write(&st.lock);
        inv.begin(&w);
        inv.range_add(GfnRange::new(Gfn(10), Gfn(20)), &w);
        inv.begin(&w);
        inv.range_add(GfnRange::new(Gfn(30), Gfn(40)), &w);
        inv.end(&w);
        // One still in progress: the merged range [10, 40) still covers 25.
        assert_eq!(inv.in_progress(), 1);
        assert!(inv.retry_gfn(inv.snapshot(), Gfn(25)));
        inv.end(&w);
        assert_eq!(inv.in_progress(), 0);
        assert!(inv.retry_gfn(seq, Gfn(25)));
        assert!(!inv.retry_gfn(inv.snapshot(), Gfn(25)));
    }
}

impl crate::vm::Vm {
    /// mmu_notifier `invalidate_range_start`: the host is about to change the
    /// mappings of `range`. On return no vCPU can use a translation of that range.
    ///
    /// The returned [`Invalidation`] is the matching `invalidate_range_end`:
    /// ending it (or dropping it) is the only way to end the invalidation, so a
    /// start and its end always pair up and the in-progress count can never be
    /// unbalanced. An empty or inverted range overlaps nothing.
    pub fn invalidate_range_start(&self, range: HvaRange) -> Invalidation {
        let vm = &*self.inner;
        let _n = notifier_section();
        CounterSet::inc(&vm.stats.invalidations);
        vm.active_inval.inc();
        let token = Invalidation {
            vm: self.clone(),
            range,
        };
        let hits = vm.overlapping_gfns(range);
        if hits.is_empty() {
            return token;
        }
        CounterSet::inc(&vm.stats.invalidations_with_slots);
        let rcu = vm.tdp.rcu.read_lock();
        let ctx = Ctx::new(&vm.stats, &rcu);
        let mut w = vm.mmu_lock.write(&vm.stats.lock);
        vm.inval.begin(&w);
        let mut batch = FlushBatch::default();
        for (as_id, g) in hits {
            vm.inval.range_add(g, &w);
            vm.unmap_gfn_range(&ctx, &mut w, as_id, g, &mut batch);
        }
        batch.flush(vm, &vm.stats);
        token
    }

    /// mmu_notifier `invalidate_range_end`, reached only through
    /// [`Invalidation`]. Like KVM it looks at the memslots again: installs wait
    /// for every active invalidation, so start and end see the same slots.
    fn invalidate_range_end(&self, range: HvaRange) {
        let vm = &*self.inner;
        let _n = notifier_section();
        if vm.any_overlap(range) {
            let w = vm.mmu_lock.write(&vm.stats.lock);
            vm.inval.end(&w);
        }
        vm.active_inval.dec();
    }

    fn age(&self, range: HvaRange, clear: bool) -> bool {
        let vm = &*self.inner;
        let _n = notifier_section();
        CounterSet::inc(&vm.stats.aging_calls);
        let hits = vm.overlapping_gfns(range);
        if hits.is_empty() {
            return false;
        }
        let rcu = vm.tdp.rcu.read_lock();
        let ctx = Ctx::new(&vm.stats, &rcu);
        let mut young = false;
        // Before 6.15 every aging callback took mmu_lock for write.
        let _w = (!vm.config.lockless_aging).then(|| {
            CounterSet::inc(&vm.stats.aging_locked);
            vm.mmu_lock.write(&vm.stats.lock)
        });
        if vm.is_shadow() {
            // The shadow MMU ages under the write lock (lockless aging of
            // shadow entries is not modelled).
            let _w = vm.mmu_lock.write(&vm.stats.lock);
            for (as_id, g) in &hits {
                young |= vm.shadow.age_range(vm, *as_id, *g, clear);
            }
        }
        for root in vm.tdp.roots_snapshot().iter() {
            if root.is_invalid() {
                continue;
            }
            for (as_id, g) in &hits {
                if root.role.as_id() == *as_id {
                    young |= vm.tdp.age_range(&ctx, root, *g, clear);
                }
            }
        }
        young
    }

    /// mmu_notifier `clear_flush_young`: make the range old, report if it was
    /// young. Like x86 since 6.13, no TLB flush: a stale TLB entry only makes a
    /// page look old.
    pub fn clear_flush_young(&self, range: HvaRange) -> bool {
        self.age(range, true)
    }

    /// mmu_notifier `clear_young`.
    pub fn clear_young(&self, range: HvaRange) -> bool {
        self.age(range, true)
    }

    /// mmu_notifier `test_young`.
    pub fn test_young(&self, hva: Hva) -> bool {
        self.age(HvaRange::new(hva, hva.add(crate::types::PAGE_SIZE)), false)
    }
}

/// An invalidation between `invalidate_range_start` and `invalidate_range_end`
/// (see [`Vm::invalidate_range_start`]). Ending it is the end call; dropping it
/// without calling [`Invalidation::end`] ends it too. There is no other way to
/// end an invalidation, so an end without its start cannot be written:
///
/// ```compile_fail
/// # use vmmu::{testing::TestHost, Hva, HvaRange, Vm, VmConfig};
/// let host = TestHost::new();
/// let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
/// let inv = vm.invalidate_range_start(HvaRange::new(Hva(0), Hva(4096)));
/// inv.end();
/// inv.end(); // error: `inv` was moved by the first end
/// ```
#[must_use = "the invalidation lasts until this is ended or dropped"]
#[derive(Debug)]
pub struct Invalidation {
    vm: Vm,
    range: HvaRange,
}

impl Invalidation {
    /// The host range being invalidated.
    pub fn range(&self) -> HvaRange {
        self.range
    }

    /// mmu_notifier `invalidate_range_end`: the host has finished changing the
    /// range.
    pub fn end(self) {
        drop(self);
    }
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        self.vm.invalidate_range_end(self.range);
    }
}
