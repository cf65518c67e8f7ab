//! Installing a mapping for a fault under the read-held `mmu_lock`
//! (KVM's `kvm_tdp_mmu_map`).

use super::iter::TdpIter;
use super::{Ctx, RemoteFlush, TableCache, Tdp};
use crate::fault::{PageFault, RetPf};
use crate::root::Root;
use crate::spte::{LeafParams, Spte};
use crate::stats::CounterSet;
use crate::sync::Ordering;
use crate::types::Level;

impl Tdp {
    /// Walk from `root` to the fault's goal level, linking tables from the vCPU's
    /// cache where entries are missing and splitting huge leaves above the goal,
    /// then install the leaf. Every change is a compare-and-exchange; losing a race
    /// returns [`RetPf::Retry`] and the vCPU faults again.
    pub(crate) fn map(
        &self,
        ctx: &Ctx<'_>,
        root: &Root,
        f: &PageFault<'_>,
        cache: &mut TableCache,
        flusher: &dyn RemoteFlush,
    ) -> RetPf {
        let mut it = self.walk(root, f.goal_level, f.gfn, f.gfn.add(1));
        while it.in_range() {
            if it.old_spte.is_frozen() {
                // Someone owns the entry for a multi-step change; don't bother
                // allocating, just come back.
                CounterSet::inc(&ctx.stats.map_retries);
                return RetPf::Retry;
            }
            if it.level == f.goal_level {
                return self.map_target_level(ctx, &mut it, f, flusher);
            }
            if it.old_spte.is_table(it.level) {
                it.next();
                continue;
            }
            // Not present, or a huge leaf that must become a table.
            let (Some(child), Some(child_level)) = (cache.pop(), it.level.lower()) else {
                return RetPf::Retry;
            };
            let split = it.old_spte.is_leaf(it.level);
            if split {
                // Children inherit the huge leaf's permissions and A/D, so the
                // translation is unchanged and no flush is needed. 4 KiB children
                // get exec back: the NX mitigation only concerns huge leaves.
                let exec = child_level == Level::K4 && self.nx_huge_pages;
                for (i, e) in self.table(child).iter().enumerate() {
                    let mut c = it.old_spte.split_child(child_level, i);
                    if exec {
                        c = c.make_executable();
                    }
                    e.store(c.0, Ordering::Relaxed);
                }
            }
            let mut old = it.old_spte;
            let link = Spte::table(child, self.ad_enabled);
            if !self.try_set_spte_atomic(ctx, it.sptep(), &mut old, link, it.gfn, it.level) {
                if split {
                    self.init_table(child);
                }
                cache.push_clean(child);
                CounterSet::inc(&ctx.stats.map_retries);
                return RetPf::Retry;
            }
            self.linked_tables.fetch_add(1, Ordering::Relaxed);
            CounterSet::inc(&ctx.stats.tables_allocated);
            if split {
                CounterSet::inc(&ctx.stats.huge_splits);
                ctx.stats.leaf_added(child_level, 512);
            }
            it.next();
        }
        CounterSet::inc(&ctx.stats.map_retries);
        RetPf::Retry
    }

    fn map_target_level(
        &self,
        ctx: &Ctx<'_>,
        it: &mut TdpIter<'_>,
        f: &PageFault<'_>,
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
                pfn: f.pfn,
                level,
                host_writable: f.map_writable,
                prefetch: false,
                ad_enabled: self.ad_enabled,
                // The iTLB-multihit mitigation: with it on, no huge leaf is ever
                // executable; an instruction fetch maps its page at 4 KiB
                // (`huge_page_disallowed` made the goal level 4 KiB).
                executable: !(self.nx_huge_pages && level > Level::K4),
            }),
        };
        if new == old {
            return RetPf::Spurious;
        }
        let mut cur = old;
        if !self.try_set_spte_atomic(ctx, it.sptep(), &mut cur, new, it.gfn, level) {
            CounterSet::inc(&ctx.stats.map_retries);
            return RetPf::Retry;
        }
        if old.is_table(level) {
            // A table was replaced by a huge leaf: translations through the old
            // table must go before anyone relies on the new mapping.
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
                    slot.mark_dirty(f.gfn);
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
