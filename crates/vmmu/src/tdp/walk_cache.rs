//! The vCPU's paging-structure cache: the last-level table its previous fault
//! walked to, so the next 4 KiB fault in the same 2 MiB region starts its walk
//! there instead of at the root (what a processor's PDE cache does for its own
//! walks). A fault that touches pages in order — demand paging, a guest zeroing
//! its memory — skips three of the four levels on 511 of every 512 faults.
//!
//! Deviation from KVM, which walks from the root on every fault: a walk in
//! vmmu costs a third of the MMU's own instructions per fault, in KVM a small
//! part of a much longer fault.
//!
//! # Why a cached table may be used
//!
//! The cache holds a frame number, not a reference: the table may have been
//! unlinked and freed since it was cached, and its frame handed out again as
//! another table. Every table's removal counts in [`Tdp`]'s removal
//! generation, *before* its free is deferred to RCU
//! ([`Tdp::handle_removed_table`]). A fault uses its cached table only inside
//! an RCU read-side section and only when the generation it reads there is the
//! one read before the walk that found the table. Both are sequentially
//! consistent, as are the section's start (crossbeam's pin fences) and the
//! grace period's check of the readers. So either the removal's increment
//! precedes the section's start, and the fault reads the new generation and
//! walks from the root; or the section started first, and the grace period
//! that frees the table waits for it. The table the fault writes into is then
//! at worst unlinked and being torn down, where every entry is (or is about to
//! be) frozen: exactly the race a walker from the root has with a concurrent
//! zap, which loses its exchange or has its new leaf taken by the teardown.
//!
//! The generation is written only when tables are removed (zaps, huge pages
//! replacing tables), never by faults, so vCPUs faulting in parallel only read
//! its cache line.

use std::cell::Cell;

use super::Tdp;
use crate::root::Root;
use crate::sync::{Ordering, RcuGuard};
use crate::types::{Gfn, Level, Pfn};

/// Gfns covered by one last-level table (2 MiB).
const REGION_SHIFT: u32 = 9;

/// A vCPU's cached last-level table (empty when `root_id` is 0: root ids start
/// at 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WalkCache {
    root_id: u64,
    /// `gfn >> 9` of the gfns the table maps.
    region: u64,
    table: Pfn,
    /// The removal generation read before the walk that found the table.
    removals: u64,
}

impl Tdp {
    /// The removal generation, read before a walk whose last-level table may
    /// be cached (see the module comment for the ordering).
    #[inline]
    pub(crate) fn removals(&self) -> u64 {
        self.tables_removed.load(Ordering::SeqCst)
    }

    /// Count a table's removal: before its free is deferred.
    pub(crate) fn count_removal(&self) {
        self.tables_removed.fetch_add(1, Ordering::SeqCst);
    }

    /// The last-level table of `root` for `gfn` if `cache` holds it and no
    /// table was removed since: `removals` is [`Tdp::removals`] read inside
    /// the section `_rcu` (the section is what keeps the table's memory).
    #[inline]
    pub(crate) fn cached_table(
        &self,
        cache: &WalkCache,
        root: &Root,
        gfn: Gfn,
        removals: u64,
        _rcu: &RcuGuard<'_>,
    ) -> Option<Pfn> {
        let hit = cache.root_id == root.id
            && cache.region == gfn.0 >> REGION_SHIFT
            && (cache.removals == removals || self.knobs.walk_cache_unchecked);
        hit.then_some(cache.table)
    }

    /// Remember `table`, the last-level table of `root` for `gfn` that a
    /// walk begun after reading `removals` found linked.
    #[inline]
    pub(crate) fn cache_table(
        cache: &Cell<WalkCache>,
        root: &Root,
        gfn: Gfn,
        table: Pfn,
        removals: u64,
    ) {
        cache.set(WalkCache {
            root_id: root.id,
            region: gfn.0 >> REGION_SHIFT,
            table,
            removals,
        });
    }

    /// [`Tdp::last_spte`] for the fast path: from the cached last-level table
    /// when `cache` holds the one for `gfn`, else from the root, caching the
    /// last-level table the walk reaches (a vCPU whose faults are all fixed
    /// by the fast path, as in a dirty-logging pass, never maps to fill it).
    pub(crate) fn last_spte_cached<'t>(
        &'t self,
        root: &Root,
        gfn: Gfn,
        cache: &Cell<WalkCache>,
        rcu: &RcuGuard<'_>,
    ) -> (&'t crate::sync::AtomicU64, crate::spte::Spte, Level) {
        let removals = self.removals();
        if let Some(table) = self.cached_table(&cache.get(), root, gfn, removals, rcu) {
            return self.last_spte_from(table, Level::K4, gfn);
        }
        let (sptep, spte, level, table) = self.walk_to_last(root.pfn, self.root_level, gfn);
        if level == Level::K4 {
            Self::cache_table(cache, root, gfn, table, removals);
        }
        (sptep, spte, level)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::config::GuardKnobs;
    use crate::fault::RetPf;
    use crate::stats::CounterSet;
    use crate::tdp::map::tests::{fault, fixture, slot, test_tdp, CountingFlush, ROLE};
    use crate::tdp::Ctx;

    fn hits(stats: &CounterSet) -> u64 {
        stats.walk_cache_hits.load(Ordering::Relaxed)
    }

    /// Faults in one 2 MiB region after the first start at the cached table
    /// and map what a walk from the root would; another region, another
    /// root or a huge goal level walks from the root.
    #[test]
    fn test_faults_in_the_cached_region_start_at_its_table_and_map_the_same() {
        let (tdp, stats, lock, mut cache, root) = fixture(test_tdp(GuardKnobs::default()));
        let _r = lock.read(&stats.lock);
        let other = tdp
            .find_or_create_root(&stats, crate::root::Role { smm: true, ..ROLE }, &mut cache)
            .unwrap();
        let rcu = tdp.rcu.read_lock();
        let ctx = Ctx::new(&stats, &rcu);
        let flush = CountingFlush::default();
        let s = slot();
        let walk = Cell::new(WalkCache::default());
        let mut map = |root: &Root, gfn: u64, walk: &Cell<WalkCache>| {
            cache.topup(&tdp, 8).unwrap();
            let f = fault(Gfn(gfn), Some(&s), Pfn(0x10_0000 + gfn), true);
            tdp.map(&ctx, root, &f, &mut cache, walk, &flush)
        };
        assert_eq!(map(&root, 3, &walk), RetPf::Fixed);
        assert_eq!(hits(&stats), 0, "nothing cached yet");
        for g in [4, 511, 0] {
            assert_eq!(map(&root, g, &walk), RetPf::Fixed);
        }
        assert_eq!(hits(&stats), 3);
        // The next region, then the other root: walks from the root, which
        // cache their own tables.
        assert_eq!(map(&root, 512, &walk), RetPf::Fixed);
        assert_eq!(map(&other, 513, &walk), RetPf::Fixed);
        assert_eq!(hits(&stats), 3);
        assert_eq!(map(&other, 514, &walk), RetPf::Fixed);
        assert_eq!(hits(&stats), 4);
        for g in [0, 3, 4, 511, 512] {
            let (_, spte, level) = tdp.last_spte(&root, Gfn(g));
            assert_eq!(
                (spte.pfn(), level),
                (Pfn(0x10_0000 + g), Level::K4),
                "gfn {g}"
            );
            // The fast path's cached walk finds the same entry.
            let (_, cached, _) = tdp.last_spte_cached(&root, Gfn(g), &walk, &rcu);
            assert_eq!(cached, spte);
        }
        assert!(!tdp.last_spte(&other, Gfn(3)).1.is_shadow_present());
        // The fast path's walk from the root caches the table it reaches,
        // the one a map of the region cached.
        let fast = Cell::new(WalkCache::default());
        let (_, spte, _) = tdp.last_spte_cached(&root, Gfn(4), &fast, &rcu);
        assert_eq!(spte.pfn(), Pfn(0x10_0004));
        let mapped = Cell::new(WalkCache::default());
        assert_eq!(map(&root, 5, &mapped), RetPf::Fixed);
        assert_eq!(fast.get(), mapped.get());
        assert_ne!(fast.get(), WalkCache::default());
        // A 2 MiB goal never starts low, even in the cached region.
        cache.topup(&tdp, 8).unwrap();
        let mut huge = fault(Gfn(1024), Some(&s), Pfn(0x20_0000), true);
        huge.goal_level = Level::M2;
        Tdp::cache_table(&walk, &root, Gfn(1024), Pfn(0x77), tdp.removals());
        assert_eq!(
            tdp.map(&ctx, &root, &huge, &mut cache, &walk, &flush),
            RetPf::Fixed
        );
        assert_eq!(hits(&stats), 4);
        assert_eq!(tdp.last_spte(&root, Gfn(1024)).2, Level::M2);
        cache.drain(&tdp);
    }

    /// A table removed after it was cached is not used: a huge leaf replaces
    /// the region's table, and the next 4 KiB fault there walks from the root,
    /// splits the huge leaf and finds its page mapped (spurious). Used anyway
    /// (the check removed), the fault finds the removed table's frozen
    /// entries and never gets mapped.
    fn fault_after_the_cached_table_is_removed(knobs: GuardKnobs) -> (RetPf, u64) {
        let (tdp, stats, lock, mut cache, root) = fixture(test_tdp(knobs));
        let _r = lock.read(&stats.lock);
        let rcu = tdp.rcu.read_lock();
        let ctx = Ctx::new(&stats, &rcu);
        let flush = CountingFlush::default();
        let s = slot();
        let walk = Cell::new(WalkCache::default());
        let f = fault(Gfn(7), Some(&s), Pfn(0x10_0007), true);
        assert_eq!(
            tdp.map(&ctx, &root, &f, &mut cache, &walk, &flush),
            RetPf::Fixed
        );
        let before = tdp.removals();
        // Another vCPU maps the region huge (its own, empty, walk cache).
        cache.topup(&tdp, 8).unwrap();
        let mut huge = fault(Gfn(0), Some(&s), Pfn(0x20_0000), true);
        huge.goal_level = Level::M2;
        assert_eq!(
            tdp.map(&ctx, &root, &huge, &mut cache, &Default::default(), &flush),
            RetPf::Fixed
        );
        assert_eq!(
            tdp.removals(),
            before + 1,
            "the table's removal was counted"
        );
        cache.topup(&tdp, 8).unwrap();
        let f = fault(Gfn(9), Some(&s), Pfn(0x20_0009), true);
        let r = tdp.map(&ctx, &root, &f, &mut cache, &walk, &flush);
        let (_, spte, level) = tdp.last_spte(&root, Gfn(9));
        cache.drain(&tdp);
        (r, if level == Level::K4 { spte.pfn().0 } else { 0 })
    }

    #[test]
    fn test_a_table_removed_after_it_was_cached_is_not_used() {
        let (r, pfn) = fault_after_the_cached_table_is_removed(GuardKnobs::default());
        assert_eq!((r, pfn), (RetPf::Spurious, 0x20_0009));
    }

    #[test]
    fn test_a_cached_table_used_without_the_check_is_the_removed_one() {
        // The check above must be able to fail: without it the fault goes to
        // the removed table and the gfn stays mapped only by the split.
        let knobs = GuardKnobs {
            walk_cache_unchecked: true,
            ..GuardKnobs::default()
        };
        let (r, pfn) = fault_after_the_cached_table_is_removed(knobs);
        assert_eq!(r, RetPf::Retry);
        assert_ne!(pfn, 0x20_0009);
    }
}
