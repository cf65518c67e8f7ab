//! NX huge pages in the TDP MMU (the iTLB multihit mitigation, KVM's
//! `possible_nx_huge_pages`).
//!
//! With the mitigation on, an instruction fetch never maps huge: the fault
//! maps its page at 4 KiB and leaves a table where a huge leaf could have
//! been. That table is marked in the link that points at it
//! ([`Spte::is_nx_disallowed`]) and put on a per-VM list. While it is there,
//! faults that would map its range huge go below it instead of replacing it
//! (otherwise every data access would undo the split and the next fetch would
//! split again). The recovery worker zaps a share of the listed tables now
//! and then, so that the range can become a huge leaf again.
//!
//! The mark lives in the link rather than in per-table metadata, because
//! the TDP MMU here keeps none: links never change except by being zapped or
//! replaced, so the mark is as stable as KVM's `nx_huge_page_disallowed`.
//! The list is the source of the `nx_lpage_splits` count.

use std::collections::{BTreeMap, HashMap};

use super::{Ctx, FlushBatch, Tdp};
use crate::root::Root;
use crate::spte::Spte;
use crate::stats::CounterSet;
use crate::sync::{Arc, AtomicU64, Ordering};
use crate::types::{Gfn, Level, Pfn};

/// One possible NX huge page: a table that a fetch made instead of a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NxPage {
    /// The table.
    pub(crate) table: Pfn,
    /// First gfn of the range the table maps (aligned to `level`).
    pub(crate) gfn: Gfn,
    /// Level of the entry that links the table: the huge page size that was
    /// not mapped.
    pub(crate) level: Level,
    /// The root the table hangs under.
    pub(crate) root_id: u64,
    /// That root's address space (where recovery looks up the memslot).
    pub(crate) as_id: u16,
}

/// The per-VM list, oldest first (recovery takes the oldest, as KVM's list
/// does). Guarded by `tdp_mmu_pages_lock`.
#[derive(Debug, Default)]
pub(crate) struct NxPages {
    next: u64,
    by_age: BTreeMap<u64, NxPage>,
    by_table: HashMap<Pfn, u64>,
}

impl NxPages {
    fn insert(&mut self, page: NxPage) -> bool {
        if self.by_table.contains_key(&page.table) {
            return false;
        }
        self.next += 1;
        self.by_age.insert(self.next, page);
        self.by_table.insert(page.table, self.next);
        true
    }

    fn remove(&mut self, table: Pfn) -> bool {
        match self.by_table.remove(&table) {
            Some(seq) => {
                self.by_age.remove(&seq);
                true
            }
            None => false,
        }
    }

    fn pop_oldest(&mut self) -> Option<NxPage> {
        let (_, page) = self.by_age.pop_first()?;
        self.by_table.remove(&page.table);
        Some(page)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_age.len()
    }

    /// Every listed page, oldest first (for checks).
    pub(crate) fn pages(&self) -> Vec<NxPage> {
        self.by_age.values().copied().collect()
    }
}

/// What recovery did with one listed page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NxOutcome {
    /// Zapped: the range may be mapped huge by the next fault.
    Zapped,
    /// Its slot logs dirty pages: left in place, unmarked (a huge leaf would
    /// only be split again; huge pages come back when logging stops).
    Unmarked,
    /// Already gone (zapped, replaced, or its root is invalid).
    Gone,
}

impl Tdp {
    /// Whether the mitigation is on now (it can be toggled at run time; the
    /// value only changes under `mmu_lock` held for write).
    pub(crate) fn nx_enabled(&self) -> bool {
        self.nx_huge_pages.load(Ordering::Relaxed)
    }

    /// Put the table `link` points at on the list, if the link is still in
    /// place. The link was published before this (a fault links first and
    /// lists after, as KVM does), so a walk under the read lock may already
    /// have replaced it, and its teardown found nothing to take off the list;
    /// listing it anyway would leave a table on the list that no longer
    /// exists. Checking under the list's lock closes the window: a teardown
    /// that comes later takes the lock after the check and finds the entry.
    /// The caller's RCU section keeps the table from being reused meanwhile.
    pub(crate) fn track_possible_nx(
        &self,
        ctx: &Ctx<'_>,
        sptep: &AtomicU64,
        link: Spte,
        page: NxPage,
    ) {
        let mut list = self.possible_nx.lock();
        // Acquire: pairs with the teardown's compare-and-exchange.
        if !self.knobs.nx_track_without_recheck && sptep.load(Ordering::Acquire) != link.0 {
            return;
        }
        if list.insert(page) {
            self.possible_nx_len
                .store(list.len() as u64, Ordering::Relaxed);
            CounterSet::inc(&ctx.stats.nx_pages_tracked);
        }
    }

    /// Take a torn-down table off the list (nothing if it is not there).
    pub(crate) fn untrack_possible_nx(&self, ctx: &Ctx<'_>, table: Pfn) {
        let mut list = self.possible_nx.lock();
        if list.remove(table) {
            self.possible_nx_len
                .store(list.len() as u64, Ordering::Relaxed);
            CounterSet::inc(&ctx.stats.nx_pages_untracked);
        }
    }

    /// Take the oldest page off the list.
    pub(crate) fn pop_possible_nx(&self, ctx: &Ctx<'_>) -> Option<NxPage> {
        let mut list = self.possible_nx.lock();
        let page = list.pop_oldest()?;
        self.possible_nx_len
            .store(list.len() as u64, Ordering::Relaxed);
        CounterSet::inc(&ctx.stats.nx_pages_untracked);
        Some(page)
    }

    /// Pages on the list now (kept beside the list so that reading it needs
    /// no lock, as KVM's `nx_lpage_splits` statistic).
    pub(crate) fn possible_nx_count(&self) -> usize {
        self.possible_nx_len.load(Ordering::Relaxed) as usize
    }

    /// The entry at `level` on the way from `root` to `gfn`, if the walk gets
    /// that far through tables.
    fn entry_at(&self, root: &Root, gfn: Gfn, level: Level) -> Option<(&AtomicU64, Spte)> {
        let mut table = self.table(root.pfn);
        let mut cur = self.root_level;
        loop {
            let sptep = &table[cur.index(gfn)];
            // Acquire: see the initialised contents of a table this links.
            let spte = Spte(sptep.load(Ordering::Acquire));
            if cur == level {
                return Some((sptep, spte));
            }
            if !spte.is_table(cur) {
                return None;
            }
            table = self.table(spte.pfn());
            cur = cur.lower()?;
        }
    }

    /// Recover one page taken off the list, under the read lock: zap the link
    /// to its table (or, in a dirty-logged slot, only drop the mark), if the
    /// link still points at that table. Anything else there (a leaf, another
    /// table, a frozen entry) means someone else already changed it. A zap is
    /// marked in `batch`: the caller flushes before it lets go of the lock.
    pub(crate) fn recover_nx_page(
        &self,
        ctx: &Ctx<'_>,
        page: &NxPage,
        dirty_logged: bool,
        batch: &mut FlushBatch,
    ) -> NxOutcome {
        let roots = self.roots_snapshot();
        let Some(root) = roots.iter().find(|r| r.id == page.root_id) else {
            return NxOutcome::Gone;
        };
        if root.is_invalid() || !self.get_root(root) {
            return NxOutcome::Gone;
        }
        let outcome = self.recover_in_root(ctx, root, page, dirty_logged, batch);
        self.put_root(ctx, root);
        outcome
    }

    fn recover_in_root(
        &self,
        ctx: &Ctx<'_>,
        root: &Arc<Root>,
        page: &NxPage,
        dirty_logged: bool,
        batch: &mut FlushBatch,
    ) -> NxOutcome {
        let Some((sptep, old)) = self.entry_at(root, page.gfn, page.level) else {
            return NxOutcome::Gone;
        };
        if !old.is_nx_disallowed(page.level) || old.pfn() != page.table {
            return NxOutcome::Gone;
        }
        let mut cur = old;
        if dirty_logged {
            let new = old.without_nx_disallowed();
            if self.try_set_spte_atomic(ctx, sptep, &mut cur, new, page.gfn, page.level) {
                return NxOutcome::Unmarked;
            }
            return NxOutcome::Gone;
        }
        if self.try_set_spte_atomic(ctx, sptep, &mut cur, Spte::NONPRESENT, page.gfn, page.level) {
            batch.mark();
            CounterSet::inc(&ctx.stats.nx_recovered);
            return NxOutcome::Zapped;
        }
        NxOutcome::Gone
    }

    /// Every listed page (for checks and tests).
    pub(crate) fn possible_nx_pages(&self) -> Vec<NxPage> {
        self.possible_nx.lock().pages()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn page(table: u64, gfn: u64) -> NxPage {
        NxPage {
            table: Pfn(table),
            gfn: Gfn(gfn),
            level: Level::M2,
            root_id: 1,
            as_id: 0,
        }
    }

    #[test]
    fn test_nx_pages_are_taken_oldest_first_and_removed_by_table() {
        let mut l = NxPages::default();
        assert!(l.insert(page(10, 0)));
        assert!(l.insert(page(11, 512)));
        assert!(l.insert(page(12, 1024)));
        assert!(!l.insert(page(11, 512)), "a table is listed once");
        assert_eq!(l.len(), 3);
        assert!(l.remove(Pfn(11)));
        assert!(!l.remove(Pfn(11)), "removing twice finds nothing");
        assert_eq!(l.pop_oldest(), Some(page(10, 0)));
        assert_eq!(l.pop_oldest(), Some(page(12, 1024)));
        assert_eq!(l.pop_oldest(), None);
        assert_eq!(l.len(), 0);
        assert!(l.by_table.is_empty());
    }
}
