//! Installing a mapping for a fault under the read-held `mmu_lock`
//! (KVM's `kvm_tdp_mmu_map`).

use super::iter::Descent;
use super::walk_cache::WalkCache;
use super::{Ctx, RemoteFlush, TableCache, Tdp};
use crate::fault::{PageFault, RetPf};
use crate::root::Root;
use crate::spte::{leaf_change_needs_flush, LeafParams, Spte};
use crate::stats::CounterSet;
use crate::sync::Ordering;
use crate::types::Level;

impl Tdp {
    /// Walk from `root` to the fault's goal level, linking tables from the vCPU's
    /// cache where entries are missing and splitting huge leaves above the goal,
    /// then install the leaf. Every change is a compare-and-exchange; losing a race
    /// returns [`RetPf::Retry`] and the vCPU faults again.
    ///
    /// A 4 KiB fault starts at the last-level table in `walk` when that is the
    /// one for its gfn, and leaves there the last-level table it reached.
    #[inline(always)]
    pub(crate) fn map(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        f: &PageFault<'_>,
        cache: &mut TableCache,
        walk: &std::cell::Cell<WalkCache>,
        flusher: &dyn RemoteFlush,
    ) -> RetPf {
        // Read before the walk: a table it finds is cached with this value.
        let removals = self.removals();
        if f.goal_level == Level::K4 {
            if let Some(table) = self.cached_table(&walk.get(), root, f.gfn, removals, ctx.rcu) {
                // The table of the gfn's region: its entry is the target,
                // with none of the walk's set-up. (The region's gfns are all
                // below `max_gfn`: one of them walked here.)
                CounterSet::inc(&ctx.stats.walk_cache_hits);
                let it = Descent::at(&self.mem, table, Level::K4, f.gfn);
                if it.old_spte.is_frozen() {
                    CounterSet::inc(&ctx.stats.map_retries);
                    return RetPf::Retry;
                }
                return self.map_target_level(ctx, &it, f, f.pfn, flusher);
            }
        }
        self.map_walk(ctx, root, f, cache, walk, flusher, removals)
    }

    /// [`Tdp::map`] from the root: the walk, linking and splitting on the way.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn map_walk(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        f: &PageFault<'_>,
        cache: &mut TableCache,
        walk: &std::cell::Cell<WalkCache>,
        flusher: &dyn RemoteFlush,
        removals: u64,
    ) -> RetPf {
        let mut goal = f.goal_level;
        let mut pfn = f.pfn;
        let start = if f.gfn >= self.max_gfn() {
            None
        } else {
            Descent::new(&self.mem, root.pfn, self.root_level, f.gfn)
        };
        let Some(mut it) = start else {
            CounterSet::inc(&ctx.stats.map_retries);
            return RetPf::Retry;
        };
        loop {
            if it.old_spte.is_frozen() {
                // Someone owns the entry for a multi-step change; don't bother
                // allocating, just come back.
                CounterSet::inc(&ctx.stats.map_retries);
                return RetPf::Retry;
            }
            if it.level == goal {
                match it.level.lower() {
                    Some(lower)
                        if it.old_spte.is_nx_disallowed(it.level)
                            && !self.knobs.nx_replace_disallowed_table =>
                    {
                        // A fetch split this range and NX recovery has not
                        // zapped it yet: map below the table instead of
                        // replacing it with a huge leaf (KVM's
                        // `disallowed_hugepage_adjust`). The frame gets back
                        // the address bits of the smaller page.
                        CounterSet::inc(&ctx.stats.nx_disallowed_adjusts);
                        pfn = crate::types::Pfn(
                            pfn.0 | (f.gfn.0 & (it.level.pages() - lower.pages())),
                        );
                        goal = lower;
                    }
                    _ => {
                        if it.level == Level::K4 {
                            Self::cache_table(walk, root, f.gfn, it.table, removals);
                        }
                        return self.map_target_level(ctx, &it, f, pfn, flusher);
                    }
                }
            }
            if !it.old_spte.is_table(it.level) {
                // Not present, or a huge leaf that must become a table.
                if let Err(r) = self.link_table(ctx, root, &it, f, cache) {
                    return r;
                }
            }
            // Into the table just linked or found (re-read: it may be gone).
            if !it.step_down() {
                CounterSet::inc(&ctx.stats.map_retries);
                return RetPf::Retry;
            }
        }
    }

    /// Link a table from the vCPU's cache at the walk's entry, which is not
    /// present or a huge leaf above the goal (split: the children inherit it).
    /// `Err(Retry)` when the cache is empty or the exchange lost a race.
    fn link_table(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        it: &Descent<'_>,
        f: &PageFault<'_>,
        cache: &mut TableCache,
    ) -> Result<(), RetPf> {
        let (Some(child), Some(child_level)) = (cache.pop(), it.level.lower()) else {
            CounterSet::inc(&ctx.stats.map_retries);
            return Err(RetPf::Retry);
        };
        let split = it.old_spte.is_leaf(it.level);
        if split {
            // Children inherit the huge leaf's permissions and A/D, so the
            // translation is unchanged and no flush is needed. 4 KiB children
            // get exec back: the NX mitigation only concerns huge leaves.
            let exec = child_level == Level::K4 && self.nx_enabled();
            for (i, e) in self.table(child).iter().enumerate() {
                let mut c = it.old_spte.split_child(child_level, i);
                if exec {
                    c = c.make_executable();
                }
                e.store(c.0, Ordering::Relaxed);
            }
        }
        // A fetch that could have mapped this range huge: the table stands
        // for a possible NX huge page (listed below, once linked).
        let nx = f.huge_page_disallowed && f.req_level >= it.level;
        let mut old = it.old_spte;
        let mut link = Spte::table(child, self.ad_enabled);
        if nx {
            link = link.with_nx_disallowed();
        }
        let gfn = it.gfn();
        if !self.try_set_spte_atomic(ctx, it.sptep(), &mut old, link, gfn, it.level) {
            if split {
                self.init_table(child);
            }
            cache.push_clean(child);
            CounterSet::inc(&ctx.stats.map_retries);
            return Err(RetPf::Retry);
        }
        self.linked_tables.fetch_add(1, Ordering::Relaxed);
        CounterSet::inc(&ctx.stats.tables_allocated);
        if split {
            CounterSet::inc(&ctx.stats.huge_splits);
            ctx.stats.leaf_added(child_level, 512);
        }
        if nx {
            let page = super::nx::NxPage {
                table: child,
                gfn,
                level: it.level,
                root_id: root.id,
                as_id: root.role.as_id(),
            };
            self.track_possible_nx(ctx, it.sptep(), link, page);
        }
        Ok(())
    }

    #[inline(always)]
    fn map_target_level(
        &self,
        ctx: &Ctx<'_>,
        it: &Descent<'_>,
        f: &PageFault<'_>,
        pfn: crate::types::Pfn,
        flusher: &dyn RemoteFlush,
    ) -> RetPf {
        let old = it.old_spte;
        let level = it.level;
        if old.is_leaf(level) && old.allows(f.access) {
            return RetPf::Spurious;
        }
        let new = match f.slot {
            None => Spte::mmio(f.gfn, f.mmio_gen),
            Some(_) => Spte::leaf(LeafParams {
                pfn,
                level,
                host_writable: f.map_writable,
                prefetch: false,
                ad_enabled: self.ad_enabled,
                // The iTLB-multihit mitigation: with it on, no huge leaf is ever
                // executable; an instruction fetch maps its page at 4 KiB
                // (`huge_page_disallowed` made the goal level 4 KiB).
                executable: !(self.nx_enabled() && level > Level::K4),
            }),
        };
        if new == old {
            // An MMIO entry already there still means "emulate" (KVM checks for
            // MMIO after the spurious check): the access must not be retried as
            // if memory had been mapped, and a pre-fault must see "no memslot".
            return if f.slot.is_none() {
                RetPf::Emulate
            } else {
                RetPf::Spurious
            };
        }
        let mut cur = old;
        if !self.try_set_spte_atomic(ctx, it.sptep(), &mut cur, new, it.gfn(), level) {
            CounterSet::inc(&ctx.stats.map_retries);
            return RetPf::Retry;
        }
        if old.is_leaf(level) && old.is_access_tracked() {
            CounterSet::inc(&ctx.stats.access_restored_slow);
        }
        // A table replaced by a huge leaf, or a present leaf replaced by something
        // that allows less (an MMIO entry from a fault that saw the memslots before
        // an update, another frame): translations the old entry gave must be gone
        // before anyone relies on the new one. Upgrades (more permissions, the
        // same frame) need no flush.
        if old.is_shadow_present() && (!old.is_leaf(level) || leaf_change_needs_flush(old, new)) {
            flusher.flush_remote_tlbs(ctx.stats);
        }
        match f.slot {
            None => {
                CounterSet::inc(&ctx.stats.mmio_sptes_created);
                RetPf::Emulate
            }
            Some(slot) => {
                ctx.stats.leaf_mapped(level);
                if new.is_writable() {
                    crate::dirty_log::mark_page_dirty(slot, f.gfn, f.ring);
                }
                if f.write && !new.is_writable() {
                    RetPf::WriteProtected
                } else {
                    RetPf::Fixed
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
pub(super) mod tests {
    use super::*;
    use crate::config::GuardKnobs;
    use crate::memslot::{classify, Change, Memslot, MemslotSet, UserMemoryRegion};
    use crate::root::Role;
    use crate::spte::Access;
    use crate::sync::{Arc, AtomicU64};

    // `tdp_mmu_pages_lock` is only taken under `mmu_lock`: the test holds it for
    // read, as a faulting vCPU does.
    use crate::testing::TestMemory;
    use crate::types::{Gfn, Pfn};

    #[derive(Default)]
    pub(in crate::tdp) struct CountingFlush(pub(in crate::tdp) AtomicU64);

    impl RemoteFlush for CountingFlush {
        fn flush_remote_tlbs(&self, _stats: &CounterSet) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(in crate::tdp) fn slot() -> Arc<Memslot> {
        let region = UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: 1 << 30,
        };
        match classify(&MemslotSet::new(0), &region, 1, 1 << 34) {
            Ok(Change::Create(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    pub(in crate::tdp) fn fault<'s>(
        gfn: Gfn,
        slot: Option<&'s Memslot>,
        pfn: Pfn,
        write: bool,
    ) -> PageFault<'s> {
        PageFault {
            gfn,
            write,
            present: false,
            rsvd: false,
            private: false,
            access: if write {
                Access::READ | Access::WRITE
            } else {
                Access::READ
            },
            slot,
            max_level: Level::K4,
            goal_level: Level::K4,
            req_level: Level::K4,
            mmu_seq: 0,
            attr_private: None,
            from_gmem: false,
            ring: None,
            pfn,
            host_pfn: pfn,
            host_level: Level::K4,
            map_writable: true,
            mmio_gen: 0,
            huge_page_disallowed: false,
        }
    }

    /// A 4-level TDP MMU over test memory, with `knobs`.
    pub(in crate::tdp) fn test_tdp(knobs: GuardKnobs) -> Tdp {
        Tdp::new(
            Arc::new(TestMemory::new()),
            Level::L4,
            1 << 34,
            true,
            false,
            knobs,
        )
    }

    /// What the map tests start from: a TDP MMU, its counters and lock, a
    /// topped-up table cache and one root (made under a read hold, as
    /// `tdp_mmu_pages_lock` is only taken under `mmu_lock`).
    pub(in crate::tdp) type Fixture =
        (Tdp, CounterSet, crate::sync::MmuLock, TableCache, Arc<Root>);

    pub(in crate::tdp) fn fixture(tdp: Tdp) -> Fixture {
        let stats = CounterSet::default();
        let lock = crate::sync::MmuLock::new();
        let mut cache = TableCache::default();
        cache.topup(&tdp, 8).unwrap();
        let root = {
            let _r = lock.read(&stats.lock);
            tdp.find_or_create_root(&stats, ROLE, &mut cache).unwrap()
        };
        (tdp, stats, lock, cache, root)
    }

    /// The role of `test_tdp`'s roots.
    pub(in crate::tdp) const ROLE: Role = Role {
        level: Level::L4,
        smm: false,
        guest_mode: false,
    };

    #[test]
    fn test_map_replacing_a_present_leaf_flushes_only_when_it_allows_less() {
        let (tdp, stats, lock, mut cache, root) = fixture(test_tdp(GuardKnobs::default()));
        let _r = lock.read(&stats.lock);
        let rcu = tdp.rcu.read_lock();
        let ctx = Ctx::new(&stats, &rcu);
        let flush = CountingFlush::default();
        let s = slot();
        let gfn = Gfn(5);
        // A read fault maps a read-only leaf (the host maps the page read-only);
        // a fresh map needs no flush.
        let mut f = fault(gfn, Some(&s), Pfn(0x1234), false);
        f.map_writable = false;
        assert_eq!(
            tdp.map(&ctx, &root, &f, &mut cache, &Default::default(), &flush),
            RetPf::Fixed
        );
        assert_eq!(flush.0.load(Ordering::Relaxed), 0);
        // A write fault that looked at the memslots before the slot existed
        // installs an MMIO entry over the leaf: vCPUs may hold the leaf in their
        // TLBs, and no later zap would find it to flush.
        let stale = fault(gfn, None, Pfn(0), true);
        cache.topup(&tdp, 8).unwrap();
        assert_eq!(
            tdp.map(&ctx, &root, &stale, &mut cache, &Default::default(), &flush),
            RetPf::Emulate
        );
        assert_eq!(
            flush.0.load(Ordering::Relaxed),
            1,
            "a present leaf was replaced without a TLB flush"
        );
        // Mapping the leaf again over the MMIO entry allows more: no flush.
        cache.topup(&tdp, 8).unwrap();
        assert_eq!(
            tdp.map(&ctx, &root, &f, &mut cache, &Default::default(), &flush),
            RetPf::Fixed
        );
        assert_eq!(flush.0.load(Ordering::Relaxed), 1);
        drop(rcu);
        cache.drain(&tdp);
    }

    /// The walk stops at the guest's physical address width, and with the NX
    /// mitigation on only huge leaves lose execute: a 4 KiB leaf keeps it.
    #[test]
    fn test_map_refuses_gfns_past_the_limit_and_keeps_4k_leaves_executable() {
        let limit = 1 << 20;
        let tdp = Tdp::new(
            Arc::new(TestMemory::new()),
            Level::L4,
            limit,
            true,
            true,
            GuardKnobs::default(),
        );
        let (tdp, stats, lock, mut cache, root) = fixture(tdp);
        let _r = lock.read(&stats.lock);
        let rcu = tdp.rcu.read_lock();
        let ctx = Ctx::new(&stats, &rcu);
        let flush = CountingFlush::default();
        let s = slot();
        // The first gfn past the limit: nothing walked, nothing mapped.
        let past = fault(Gfn(limit), Some(&s), Pfn(0x1234), false);
        assert_eq!(
            tdp.map(&ctx, &root, &past, &mut cache, &Default::default(), &flush),
            RetPf::Retry
        );
        assert_eq!(stats.tables_allocated.load(Ordering::Relaxed), 0);
        // The last gfn below it maps, executable at 4 KiB.
        let last = fault(Gfn(limit - 1), Some(&s), Pfn(0x1234), false);
        assert_eq!(
            tdp.map(&ctx, &root, &last, &mut cache, &Default::default(), &flush),
            RetPf::Fixed
        );
        let (_, spte, level) = tdp.last_spte(&root, Gfn(limit - 1));
        assert_eq!(level, Level::K4);
        assert!(spte.is_executable(), "a 4 KiB leaf lost execute: {spte:?}");
        drop(rcu);
        cache.drain(&tdp);
    }

    /// Walks end where the root's reach ends when the address width goes
    /// beyond it (a 4-level root maps 2^36 gfns; 52 bits would be 2^40).
    #[test]
    fn test_walks_stop_at_the_roots_reach_below_a_wider_limit() {
        let knobs = GuardKnobs::default();
        let tdp = Tdp::new(
            Arc::new(TestMemory::new()),
            Level::L4,
            1 << 40,
            true,
            false,
            knobs,
        );
        assert_eq!(tdp.max_gfn(), Gfn(1 << 36));
        assert_eq!(
            test_tdp(knobs).max_gfn(),
            Gfn(1 << 34),
            "the limit when less"
        );
    }
}
