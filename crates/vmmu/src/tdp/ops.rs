//! Operations on present leaves other than zapping: lockless lookup for the fast
//! page-fault path, aging, and write-protection for dirty logging.

use super::{Ctx, Tdp};
use crate::root::Root;
use crate::spte::Spte;
use crate::stats::CounterSet;
use crate::sync::{AtomicU64, Ordering};
use crate::types::{Gfn, GfnRange, Level};

impl Tdp {
    /// Walk from `root` towards `gfn` and return the last entry reached: a leaf, or
    /// the first entry that is not a table. Lockless: the caller is inside an RCU
    /// read-side section, so tables it walks through stay allocated.
    pub(crate) fn last_spte(&self, root: &Root, gfn: Gfn) -> (&AtomicU64, Spte, Level) {
        self.last_spte_from(root.pfn, self.root_level, gfn)
    }

    /// [`Tdp::last_spte`] from the table at `table_pfn`, whose entries are at
    /// `level`.
    pub(super) fn last_spte_from(
        &self,
        table_pfn: crate::types::Pfn,
        level: Level,
        gfn: Gfn,
    ) -> (&AtomicU64, Spte, Level) {
        let (sptep, spte, level, _) = self.walk_to_last(table_pfn, level, gfn);
        (sptep, spte, level)
    }

    /// The walk of [`Tdp::last_spte_from`], also giving the table that holds
    /// the last entry.
    #[inline]
    pub(super) fn walk_to_last(
        &self,
        table_pfn: crate::types::Pfn,
        level: Level,
        gfn: Gfn,
    ) -> (&AtomicU64, Spte, Level, crate::types::Pfn) {
        let mut pfn = table_pfn;
        let mut level = level;
        loop {
            let sptep = &self.table(pfn)[level.index(gfn)];
            // Acquire: see the initialised contents of any table this links.
            let spte = Spte(sptep.load(Ordering::Acquire));
            match level.lower() {
                Some(lower) if spte.is_table(level) => {
                    pfn = spte.pfn();
                    level = lower;
                }
                _ => return (sptep, spte, level, pfn),
            }
        }
    }

    /// Age the leaves of `root` in `range` without `mmu_lock` (KVM ≥ 6.15). With
    /// `clear`, young entries are made old; a lost race leaves an entry young, which
    /// only makes a page look used. Returns whether any entry was young.
    ///
    /// Deviation: the Accessed bit is cleared by compare-and-exchange rather than an
    /// atomic AND, so an entry that was frozen or replaced meanwhile is never
    /// modified (the frozen sentinel has the A bit set).
    pub(crate) fn age_range(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        range: GfnRange,
        clear: bool,
    ) -> bool {
        let mut it = self.walk(root, Level::K4, range.start, range.end);
        let mut young = false;
        while it.in_range() {
            let old = it.old_spte;
            if old.is_leaf(it.level) && old.is_accessed() {
                young = true;
                if clear {
                    let new = old.mark_old();
                    if self.knobs.aging_plain_store {
                        // The bug the knob stands for: whatever happened to
                        // the entry since it was read is overwritten.
                        it.sptep().store(new.0, Ordering::Release);
                        CounterSet::inc(&ctx.stats.entries_aged);
                    } else if it
                        .sptep()
                        // AcqRel: like every lockless change of a live entry.
                        .compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        CounterSet::inc(&ctx.stats.entries_aged);
                    }
                }
            }
            it.next();
        }
        young
    }

    /// Make the next write to every page of `range` visible to dirty logging,
    /// under the read lock. With `pml` a 4 KiB leaf with A/D bits only loses
    /// its Dirty bit (the processor logs the write that sets it again); every
    /// other writable leaf, and every leaf without `pml`, is write-protected.
    /// Huge leaves are always write-protected: one Dirty bit cannot say which
    /// of their pages a write touched. Every change is a compare-and-exchange,
    /// so a Dirty bit the processor sets meanwhile makes it look again rather
    /// than be lost. Returns whether anything changed (the caller flushes once:
    /// a translation cached dirty would let writes skip setting D).
    pub(crate) fn dirty_log_protect_range(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        range: GfnRange,
        pml: bool,
    ) -> bool {
        let mut it = self.walk(root, Level::K4, range.start, range.end);
        let mut changed = false;
        let (mut cleared, mut protected) = (0, 0);
        while it.in_range() {
            let mut old = it.old_spte;
            let clear_d = pml && it.level == Level::K4 && old.ad_enabled();
            let new = if !old.is_leaf(it.level) {
                None
            } else if clear_d {
                old.is_dirty().then_some(Spte(old.0 & !crate::spte::ept::D))
            } else {
                old.is_writable().then(|| old.write_protect())
            };
            let Some(new) = new else {
                it.next();
                continue;
            };
            if !self.try_set_spte_atomic(ctx, it.sptep(), &mut old, new, it.gfn, it.level) {
                if self.knobs.write_protect_skips_lost_race {
                    it.next();
                    continue;
                }
                // Someone (the processor setting D, the fast path) changed the
                // entry: look at its new value again.
                it.old_spte = old;
                continue;
            }
            // Counted here and added once: a shared counter bumped per entry
            // cost a locked update per page of a fully dirty slot.
            if clear_d {
                cleared += 1;
            } else {
                protected += 1;
            }
            changed = true;
            it.next();
        }
        CounterSet::add(&ctx.stats.dirty_bits_harvested, cleared);
        CounterSet::add(&ctx.stats.entries_write_protected, protected);
        changed
    }

    /// Eager page splitting (KVM's `tdp_mmu_split_huge_pages_root`): replace
    /// every huge leaf of `root` in `range` by a table of children with the
    /// same permissions and A/D bits, in one pre-order walk (a 1 GiB leaf
    /// becomes 2 MiB leaves, which the walk then splits to 4 KiB), holding
    /// `mmu_lock` for read and linking with compare-and-exchange. The
    /// translation is unchanged, so no flush is needed here (the write
    /// protection that follows flushes). Table pages come from `cache`, topped
    /// up as it goes (KVM drops the lock to allocate; table memory here never
    /// sleeps); when they run out splitting stops, best effort. Returns the
    /// leaves split and whether memory ran out.
    pub(crate) fn split_huge_range(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        range: GfnRange,
        cache: &mut super::TableCache,
    ) -> (u64, bool) {
        let mut it = self.walk(root, Level::K4, range.start, range.end);
        let mut split = 0;
        while it.in_range() {
            let old = it.old_spte;
            let Some(child_level) = it.level.lower() else {
                it.next();
                continue;
            };
            if !old.is_leaf(it.level) || old.is_frozen() {
                it.next();
                continue;
            }
            if cache.topup(self, 1).is_err() {
                return (split, true);
            }
            let Some(child) = cache.pop() else {
                return (split, true);
            };
            let exec = child_level == Level::K4 && self.nx_enabled();
            for (i, e) in self.table(child).iter().enumerate() {
                let mut c = old.split_child(child_level, i);
                if exec {
                    c = c.make_executable();
                }
                e.store(c.0, Ordering::Relaxed);
            }
            let mut cur = old;
            let link = Spte::table(child, self.ad_enabled);
            if !self.try_set_spte_atomic(ctx, it.sptep(), &mut cur, link, it.gfn, it.level) {
                // Changed under us (zapped, aged): look at it again.
                self.init_table(child);
                cache.push_clean(child);
                it.old_spte = cur;
                continue;
            }
            self.linked_tables.fetch_add(1, Ordering::Relaxed);
            CounterSet::inc(&ctx.stats.tables_allocated);
            CounterSet::inc(&ctx.stats.huge_splits);
            CounterSet::inc(&ctx.stats.eager_splits);
            ctx.stats.leaf_added(child_level, 512);
            split += 1;
            // The walk steps down into the new table next (pre-order).
            it.next();
        }
        (split, false)
    }

    /// Recover huge pages in place (KVM ≥ 6.13's `kvm_tdp_mmu_recover_huge_pages`,
    /// after dirty logging is turned off): every table of `root` in `range` at
    /// a level `allowed` permits (the memslot's and the host's mapping level for
    /// its first gfn) is replaced, with compare-and-exchange under the read
    /// lock, by a huge leaf built from its first present leaf, instead of being
    /// zapped and refaulted. The old tables go through RCU; one flush covers the
    /// whole walk (`batch`). Returns the huge leaves made.
    pub(crate) fn recover_huge_range(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        range: GfnRange,
        allowed: &dyn Fn(Gfn) -> Level,
        batch: &mut super::FlushBatch,
    ) -> u64 {
        let mut made = 0;
        for level in [Level::G1, Level::M2] {
            let mut it = self.walk(root, level, range.start, range.end);
            while it.in_range() {
                let old = it.old_spte;
                let whole = self.knobs.recover_huge_outside_slot
                    || (it.gfn.0 >= range.start.0 && it.gfn.0 + level.pages() <= range.end.0);
                if it.level != level || !old.is_table(level) || !whole || allowed(it.gfn) < level {
                    it.next();
                    continue;
                }
                // The first gfn's leaf gives the frame; it must be aligned for
                // the huge page (the host's level promises contiguity).
                let (_, child, child_level) =
                    self.last_spte_from(old.pfn(), level.lower().unwrap_or(Level::K4), it.gfn);
                if !child.is_leaf(child_level) || child.pfn().0 & (level.pages() - 1) != 0 {
                    it.next();
                    continue;
                }
                let mut new = child.huge_from_child(level);
                if self.nx_enabled() {
                    new = new.make_non_executable();
                }
                let mut cur = old;
                if !self.try_set_spte_atomic(ctx, it.sptep(), &mut cur, new, it.gfn, level) {
                    it.old_spte = cur;
                    continue;
                }
                batch.mark();
                CounterSet::inc(&ctx.stats.huge_recovered);
                made += 1;
                it.next();
            }
        }
        made
    }

    /// Clear the Dirty bit of every leaf of `root` in `range` (dirty logging with
    /// D-bit harvesting; KVM's `clear_dirty_pt_masked`), holding `mmu_lock` for
    /// write. Entries the processor may still dirty are cleared with an atomic AND,
    /// so a D set concurrently is either reported now or survives for the next
    /// harvest. An entry made without A/D bits has no D to clear: it counts as
    /// dirty while writable and is write-protected instead (as KVM does for
    /// roots that need write protection), so its next write faults. Returns how
    /// many entries were dirty and whether any was write-protected (the caller
    /// must flush before relying on it).
    pub(crate) fn clear_dirty_range(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        range: GfnRange,
    ) -> (u64, bool) {
        let mut it = self.walk(root, Level::K4, range.start, range.end);
        let mut dirty = 0;
        let mut protected = false;
        while it.in_range() {
            let mut old = it.old_spte;
            if old.is_leaf(it.level) && !old.ad_enabled() {
                if old.is_writable() {
                    let new = old.write_protect();
                    if !self.try_set_spte_atomic(ctx, it.sptep(), &mut old, new, it.gfn, it.level) {
                        // The fast path changed it: look again.
                        it.old_spte = old;
                        continue;
                    }
                    CounterSet::inc(&ctx.stats.entries_write_protected);
                    dirty += 1;
                    protected = true;
                }
                it.next();
                continue;
            }
            if old.is_leaf(it.level) && old.is_dirty() {
                let cleared = Spte(old.0 & !crate::spte::ept::D);
                let real = if old.needs_atomic_update() && !self.knobs.nonatomic_zap {
                    // AcqRel: learn the final value, including a D set by hardware.
                    Spte(it.sptep().fetch_and(!crate::spte::ept::D, Ordering::AcqRel))
                } else {
                    it.sptep().store(cleared.0, Ordering::Release);
                    old
                };
                if real.is_dirty() {
                    dirty += 1;
                }
            }
            it.next();
        }
        CounterSet::add(&ctx.stats.dirty_bits_harvested, dirty);
        (dirty, protected)
    }

    /// Visit every present leaf of `root` (tests, oracles, dumps). Lockless.
    pub(crate) fn for_each_leaf(&self, root: &Root, mut f: impl FnMut(Gfn, Level, Spte)) {
        let mut it = self.walk(root, Level::K4, Gfn(0), self.max_gfn());
        while it.in_range() {
            if it.old_spte.is_leaf(it.level) {
                f(it.gfn, it.level, it.old_spte);
            }
            it.next();
        }
    }

    /// Count the tables reachable from `root` (excluding the root).
    pub(crate) fn count_tables(&self, root: &Root) -> u64 {
        let mut n = 0;
        let mut it = self.walk(root, Level::K4, Gfn(0), self.max_gfn());
        while it.in_range() {
            if it.old_spte.is_table(it.level) {
                n += 1;
            }
            it.next();
        }
        n
    }
}
