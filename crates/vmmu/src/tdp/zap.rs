//! Zapping: removing mappings, with yields and batched TLB flushes.

use super::iter::Resched;
use super::{Ctx, FlushBatch, RemoteFlush, Tdp};
use crate::root::Root;
use crate::spte::Spte;
use crate::stats::CounterSet;
use crate::sync::{LockStats, MmuGuard, MmuWriteGuard};
use crate::types::{Gfn, GfnRange, Level};

impl Tdp {
    /// One past the last gfn this VM can map: the guest physical address width,
    /// which memslots cannot exceed (KVM's `tdp_mmu_max_gfn_exclusive`). Walks
    /// over "everything" stop here instead of visiting unreachable entries.
    pub(crate) fn max_gfn(&self) -> Gfn {
        Gfn(self
            .gfn_limit
            .min(1u64 << (9 * self.root_level.get() as u32)))
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
        let mut it = self.walk(root, Level::K4, range.start, range.end);
        let mut rs = Resched::new(&self.knobs);
        while it.in_range() {
            if rs.should_yield(&it, guard) {
                if !self.knobs.skip_flush_before_yield {
                    batch.flush(flusher, ctx.stats);
                }
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
            CounterSet::inc(&ctx.stats.leaves_zapped);
            if old.is_dirty() {
                CounterSet::inc(&ctx.stats.dirty_leaves_zapped);
            }
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
        let mut rs = Resched::new(&self.knobs);
        for zap_level in levels {
            let mut it = self.walk(root, zap_level, Gfn(0), self.max_gfn());
            while it.in_range() {
                if rs.should_yield(&it, guard) {
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
                    CounterSet::inc(&ctx.stats.leaves_zapped);
                }
                it.next();
            }
        }
    }
}
