//! Zapping: removing mappings, with yields and batched TLB flushes.

use super::iter::Resched;
use super::{Ctx, FlushBatch, RemoteFlush, Tdp};
use crate::root::Root;
use crate::spte::Spte;
use crate::stats::{CounterSet, LeafTally};
use crate::sync::{LockStats, MmuGuard, MmuWriteGuard};
use crate::types::{Gfn, GfnRange, Level};

impl Tdp {
    /// One past the last gfn this VM can map: the guest physical address width,
    /// which memslots cannot exceed (KVM's `tdp_mmu_max_gfn_exclusive`). Walks
    /// over "everything" stop here instead of visiting unreachable entries.
    pub(crate) fn max_gfn(&self) -> Gfn {
        self.max_gfn
    }

    /// Zap every leaf of `root` in `range` (KVM's `tdp_mmu_zap_leafs`), holding
    /// `mmu_lock` for write. Tables are left in place (empty), so nothing waits for
    /// RCU. A flush is needed unless the root is invalid: vCPUs were kicked off
    /// invalid roots before they were invalidated and flush when loading a new one.
    /// When the walk yields, pending flushes are done first so no vCPU can use a
    /// zapped translation while the lock is free.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn zap_leafs(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        range: GfnRange,
        guard: &mut MmuWriteGuard<'_>,
        lock_stats: &LockStats,
        batch: &mut FlushBatch,
        flusher: &dyn RemoteFlush,
    ) {
        let tally = LeafTally::new(ctx.stats);
        let ctx = &ctx.tallied(&tally);
        let mut it = self.walk(root, Level::K4, range.start, range.end);
        let mut rs = Resched::new(&self.knobs);
        while it.in_range() {
            if rs.should_yield(&it, guard) {
                if !self.knobs.skip_flush_before_yield {
                    batch.flush(flusher, ctx.stats);
                }
                tally.flush();
                guard.yield_lock(lock_stats);
                self.after_yield(ctx);
                CounterSet::inc(&ctx.stats.yields);
                rs.yielded();
                if root.is_freed() {
                    // Only possible if the caller walks without a reference.
                    CounterSet::inc(&ctx.stats.invariant_violations);
                    return;
                }
                it.restart();
                continue;
            }
            if !it.old_spte.is_leaf(it.level) {
                it.next();
                continue;
            }
            let old =
                self.write_spte_exclusive(it.sptep(), it.old_spte, Spte::NONPRESENT, it.level);
            self.handle_changed_spte(ctx, it.gfn, old, Spte::NONPRESENT, it.level, false);
            tally.zapped(old.is_dirty());
            if !root.is_invalid() && !self.knobs.skip_flush_after_zap {
                batch.mark();
            }
            it.next();
        }
    }

    /// Zap a whole root (KVM's `tdp_mmu_zap_root`) in passes of growing level, so
    /// each unit of work between yield points stays small: first the 4 KiB leaves,
    /// then 2 MiB entries (freeing the now-empty 4 KiB tables), then 1 GiB, then the
    /// root's own entries. With `shared` the lock is held for read and every change
    /// is a compare-and-exchange. The root must be invalid (no flush is done).
    pub(crate) fn zap_root<G: MmuGuard>(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        guard: &mut G,
        lock_stats: &LockStats,
        shared: bool,
    ) {
        let mut levels = vec![Level::K4, Level::M2, Level::G1];
        levels.retain(|l| *l < self.root_level && !self.knobs.zap_root_one_pass);
        levels.push(self.root_level);
        let tally = LeafTally::new(ctx.stats);
        let ctx = &ctx.tallied(&tally);
        let mut rs = Resched::new(&self.knobs);
        for zap_level in levels {
            let mut it = self.walk(root, zap_level, Gfn(0), self.max_gfn());
            while it.in_range() {
                if rs.should_yield(&it, guard) {
                    tally.flush();
                    guard.yield_lock(lock_stats);
                    self.after_yield(ctx);
                    CounterSet::inc(&ctx.stats.yields);
                    rs.yielded();
                    it.restart();
                    continue;
                }
                if !it.old_spte.is_shadow_present() || it.level > zap_level {
                    it.next();
                    continue;
                }
                let was_leaf = it.old_spte.is_leaf(it.level);
                if shared {
                    let mut old = it.old_spte;
                    if !self.try_set_spte_atomic(
                        ctx,
                        it.sptep(),
                        &mut old,
                        Spte::NONPRESENT,
                        it.gfn,
                        it.level,
                    ) {
                        // Lost a race (hardware set A/D): look again at the same
                        // entry. A frozen entry belongs to whoever is tearing its
                        // table down; leave it to them.
                        if old.is_frozen() {
                            it.next();
                        } else {
                            it.old_spte = old;
                        }
                        continue;
                    }
                } else {
                    let old = self.write_spte_exclusive(
                        it.sptep(),
                        it.old_spte,
                        Spte::NONPRESENT,
                        it.level,
                    );
                    self.handle_changed_spte(ctx, it.gfn, old, Spte::NONPRESENT, it.level, false);
                }
                if was_leaf {
                    tally.zapped(false);
                }
                it.next();
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::super::map::tests::{fault, slot, test_tdp, CountingFlush, ROLE};
    use super::*;
    use crate::config::GuardKnobs;
    use crate::root::RootFilter;
    use crate::sync::MmuLock;
    use crate::tdp::TableCache;
    use crate::types::Pfn;
    use crate::RetPf;

    const LEAVES: u64 = 256;

    /// Leaves counted present (added minus removed).
    fn counted(stats: &CounterSet) -> u64 {
        stats.present_4k_added.load(Ordering::Relaxed)
            - stats.present_4k_removed.load(Ordering::Relaxed)
    }

    /// Which zap the yield test drives.
    #[derive(Clone, Copy)]
    enum Zap {
        Leafs,
        Root,
    }

    /// A zap that yields keeps its counts in a tally: whoever takes the lock
    /// at one of its yields must find the counters agreeing with the tables
    /// (the tally is added at every yield, not only at the end).
    fn counts_agree_at_every_yield(zap: Zap) {
        let knobs = GuardKnobs {
            yield_every_step: true,
            ..GuardKnobs::default()
        };
        let tdp = test_tdp(knobs);
        let stats = CounterSet::default();
        let lock = MmuLock::new();
        let s = slot();
        let mut cache = TableCache::default();
        let flush = CountingFlush::default();
        let (mid_zap, disagreed) = (AtomicU64::new(0), AtomicU64::new(0));
        for _round in 0..50 {
            cache.topup(&tdp, 8).unwrap();
            // A zapped root is invalid: each round maps into a new one.
            let root = {
                let _r = lock.read(&stats.lock);
                tdp.find_or_create_root(&stats, ROLE, &mut cache).unwrap()
            };
            {
                let _r = lock.read(&stats.lock);
                let rcu = tdp.rcu.read_lock();
                let ctx = Ctx::new(&stats, &rcu);
                for g in 0..LEAVES {
                    cache.topup(&tdp, 8).unwrap();
                    let f = fault(Gfn(g), Some(&s), Pfn(0x1000 + g), true);
                    assert_eq!(
                        tdp.map(&ctx, &root, &f, &mut cache, &Default::default(), &flush),
                        RetPf::Fixed
                    );
                }
            }
            assert_eq!(counted(&stats), LEAVES);
            let done = AtomicBool::new(false);
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    while !done.load(Ordering::Acquire) {
                        let _r = lock.read(&stats.lock);
                        let _rcu = tdp.rcu.read_lock();
                        let present = (0..LEAVES)
                            .filter(|g| tdp.last_spte(&root, Gfn(*g)).1.is_shadow_present())
                            .count() as u64;
                        if present != counted(&stats) {
                            disagreed.fetch_add(1, Ordering::Relaxed);
                        }
                        if present > 0 && present < LEAVES {
                            mid_zap.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                let rcu = tdp.rcu.read_lock();
                let ctx = Ctx::new(&stats, &rcu);
                let mut w = lock.write(&stats.lock);
                match zap {
                    Zap::Leafs => {
                        let mut batch = FlushBatch::default();
                        let range = GfnRange::new(Gfn(0), Gfn(LEAVES));
                        tdp.zap_leafs(&ctx, &root, range, &mut w, &stats.lock, &mut batch, &flush);
                    }
                    Zap::Root => {
                        tdp.invalidate_roots(&stats, RootFilter::All);
                        // The root stays allocated (this test holds a reference).
                        tdp.zap_root(&ctx, &root, &mut w, &stats.lock, false);
                    }
                }
                drop(w);
                done.store(true, Ordering::Release);
            });
            assert_eq!(counted(&stats), 0);
            if mid_zap.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
        assert!(
            mid_zap.load(Ordering::Relaxed) > 0,
            "the lock was never taken in the middle of a zap"
        );
        assert_eq!(
            disagreed.load(Ordering::Relaxed),
            0,
            "counts behind the tables at a yield"
        );
        cache.drain(&tdp);
    }

    #[test]
    fn test_a_yielding_leaf_zap_has_counted_what_it_zapped_whenever_the_lock_is_free() {
        counts_agree_at_every_yield(Zap::Leafs);
    }

    #[test]
    fn test_a_yielding_root_zap_has_counted_what_it_zapped_whenever_the_lock_is_free() {
        counts_agree_at_every_yield(Zap::Root);
    }
}
