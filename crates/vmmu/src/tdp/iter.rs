//! The pre-order walker over one root's tables (KVM's `tdp_iter`).
//!
//! The walk visits every entry whose gfn range intersects `[start, end)`, parents
//! before children, never descending below `min_level`. It never trusts a cached
//! snapshot when descending: the entry is re-read, so a table that was zapped
//! concurrently is not entered. After a yield it restarts from the root towards
//! `next_last_level_gfn`, because tables may have been freed meanwhile.

use std::time::{Duration, Instant};

use super::tables::Tables;
use crate::host::Table;
use crate::spte::Spte;
use crate::sync::{AtomicU64, MmuGuard, Ordering};
use crate::types::{Gfn, Level, Pfn};

/// A position in a walk.
pub(crate) struct TdpIter<'t> {
    mem: &'t Tables,
    pt_path: [Option<&'t Table>; 6],
    root_level: Level,
    min_level: Level,
    next_last_level_gfn: Gfn,
    yielded_gfn: Gfn,
    end: Gfn,
    /// Level of the current entry.
    pub(crate) level: Level,
    /// First gfn mapped by the current entry.
    pub(crate) gfn: Gfn,
    /// The current entry as last read.
    pub(crate) old_spte: Spte,
    /// False once the walk has left the root.
    pub(crate) valid: bool,
}

impl<'t> TdpIter<'t> {
    /// Walk the tables under `root` for `[start, end)`.
    pub(crate) fn new(
        mem: &'t Tables,
        root: Pfn,
        root_level: Level,
        min_level: Level,
        start: Gfn,
        end: Gfn,
    ) -> Self {
        let mut pt_path = [None; 6];
        pt_path[root_level.get() as usize] = Some(mem.table(root));
        let mut it = TdpIter {
            mem,
            pt_path,
            root_level,
            min_level,
            next_last_level_gfn: start,
            yielded_gfn: start,
            end,
            level: root_level,
            gfn: start,
            old_spte: Spte::NONPRESENT,
            valid: true,
        };
        it.restart();
        it
    }

    /// Whether the current entry is inside the walk (the loop condition).
    pub(crate) fn in_range(&self) -> bool {
        self.valid && self.gfn < self.end
    }

    /// The current entry.
    pub(crate) fn sptep(&self) -> &'t AtomicU64 {
        let table = self.pt_path[self.level.get() as usize]
            .unwrap_or_else(|| unreachable!("no table at level"));
        &table[self.level.index(self.gfn)]
    }

    /// Re-read the current entry.
    pub(crate) fn refresh(&mut self) {
        // Acquire: a table linked by this entry was initialised before the link
        // was published with a Release compare-and-exchange.
        self.old_spte = Spte(self.sptep().load(Ordering::Acquire));
    }

    /// Go back to the root and walk down towards where the walk was heading.
    pub(crate) fn restart(&mut self) {
        self.yielded_gfn = self.next_last_level_gfn;
        self.level = self.root_level;
        self.gfn = self.next_last_level_gfn.align_down(self.level);
        self.valid = true;
        if self.gfn.0 >> (9 * self.root_level.get() as u32) != 0 {
            // Past the end of the address space this root covers.
            self.valid = false;
            return;
        }
        self.refresh();
    }

    /// Whether the walk has moved since it last (re)started: yielding before that
    /// could livelock.
    pub(crate) fn has_progressed(&self) -> bool {
        self.next_last_level_gfn != self.yielded_gfn
    }

    fn try_step_down(&mut self) -> bool {
        if self.level == self.min_level {
            return false;
        }
        self.refresh();
        if !self.old_spte.is_table(self.level) {
            return false;
        }
        let child = self.mem.table(self.old_spte.pfn());
        let Some(lower) = self.level.lower() else {
            return false;
        };
        self.level = lower;
        self.pt_path[lower.get() as usize] = Some(child);
        self.gfn = self.next_last_level_gfn.align_down(lower);
        self.refresh();
        true
    }

    fn try_step_side(&mut self) -> bool {
        if self.level.index(self.gfn) == 511 {
            return false;
        }
        self.gfn = Gfn(self.gfn.0 + self.level.pages());
        self.next_last_level_gfn = self.gfn;
        self.refresh();
        true
    }

    fn try_step_up(&mut self) -> bool {
        if self.level == self.root_level {
            return false;
        }
        let Some(upper) = self.level.upper() else {
            return false;
        };
        self.level = upper;
        self.gfn = self.gfn.align_down(upper);
        true
    }

    /// Advance in pre-order: into the child table if there is one, else to the
    /// next entry, climbing as needed.
    pub(crate) fn next(&mut self) {
        if self.try_step_down() {
            return;
        }
        loop {
            if self.try_step_side() {
                return;
            }
            if !self.try_step_up() {
                self.valid = false;
                return;
            }
        }
    }
}

/// A walk towards one gfn, top-down, for the fault path (KVM's fault walk is
/// `tdp_mmu_for_each_pte` over a one-page range, which never steps sideways):
/// the pre-order iterator's generality costs a fault three times what the
/// descent itself needs. Like [`TdpIter`], it re-reads an entry before
/// entering the table it links, so a table zapped meanwhile is not entered.
pub(crate) struct Descent<'t> {
    mem: &'t Tables,
    sptep: &'t AtomicU64,
    /// The table holding the current entry.
    pub(crate) table: Pfn,
    /// The gfn the walk heads for (not aligned).
    target: Gfn,
    /// Level of the current entry.
    pub(crate) level: Level,
    /// The current entry as last read.
    pub(crate) old_spte: Spte,
}

impl<'t> Descent<'t> {
    /// Start at the root's entry for `target`; `None` when `target` is past
    /// the address space the root covers.
    pub(crate) fn new(mem: &'t Tables, root: Pfn, root_level: Level, target: Gfn) -> Option<Self> {
        if target.0 >> (9 * root_level.get() as u32) != 0 {
            return None;
        }
        Some(Self::at(mem, root, root_level, target))
    }

    /// Start at the entry for `target` of `table`, whose entries are at
    /// `level` (a root, or a table the vCPU cached).
    #[inline(always)]
    pub(crate) fn at(mem: &'t Tables, table: Pfn, level: Level, target: Gfn) -> Self {
        let sptep = &mem.table(table)[level.index(target)];
        // Acquire: a table linked by this entry was initialised before the link
        // was published with a Release compare-and-exchange.
        let old_spte = Spte(sptep.load(Ordering::Acquire));
        Descent {
            mem,
            sptep,
            table,
            target,
            level,
            old_spte,
        }
    }

    /// The current entry.
    pub(crate) fn sptep(&self) -> &'t AtomicU64 {
        self.sptep
    }

    /// First gfn mapped by the current entry.
    pub(crate) fn gfn(&self) -> Gfn {
        self.target.align_down(self.level)
    }

    /// Re-read the current entry and, if it links a table, move to that
    /// table's entry for the target. False (and nothing moved) when the entry
    /// no longer links a table or the walk is at 4 KiB.
    pub(crate) fn step_down(&mut self) -> bool {
        self.old_spte = Spte(self.sptep.load(Ordering::Acquire));
        let Some(lower) = self.level.lower() else {
            return false;
        };
        if !self.old_spte.is_table(self.level) {
            return false;
        }
        self.table = self.old_spte.pfn();
        self.sptep = &self.mem.table(self.table)[lower.index(self.target)];
        self.level = lower;
        self.old_spte = Spte(self.sptep.load(Ordering::Acquire));
        true
    }
}

/// How long a walk may hold `mmu_lock` before it offers the CPU to others even
/// without waiters (standing in for the scheduler's "need resched").
const RESCHED_SLICE: Duration = Duration::from_millis(2);

/// How long a walk holds `mmu_lock` before it yields to a thread waiting for
/// it. Yielding at the first sign of a waiter (KVM's `rwlock_needbreak` on a
/// fully preemptible kernel) splits a short zap into many holds, each
/// flushed first and each making the next access of the waiting vCPU wait
/// again: under a stream of small invalidations one vCPU waited four times
/// per invalidation instead of once. A kernel that is not fully preemptible
/// never yields to waiters, only when its time slice is up. Between the two,
/// a waiter is let in once the walk has held the lock this long: a zap of a
/// few hundred pages finishes first, a long one still lets faults in every
/// few tens of microseconds. (The model checker has no clock: it yields at
/// once.)
const CONTENDED_HOLD: Duration = Duration::from_micros(20);

/// KVM's `tdp_mmu_iter_cond_resched` state for one long walk.
pub(crate) struct Resched {
    since: Instant,
    checks: u32,
    yields: u32,
    /// Test-only: yield after every step that made progress.
    always: bool,
    /// Test-only (`yield_without_progress`): skip the forward-progress rule.
    no_progress_rule: bool,
    /// Yields made without progress (bounded, so the broken rule livelocks
    /// only for a while).
    stalled: u32,
}

impl Resched {
    pub(crate) fn new(knobs: &crate::config::GuardKnobs) -> Self {
        Resched {
            since: Instant::now(),
            checks: 0,
            yields: 0,
            always: knobs.yield_every_step,
            no_progress_rule: knobs.yield_without_progress,
            stalled: 0,
        }
    }

    /// Whether the walk should yield now: only after forward progress, and only if
    /// someone waits for the lock or the walk has held it for a full slice.
    pub(crate) fn should_yield<G: MmuGuard>(&mut self, it: &TdpIter<'_>, guard: &G) -> bool {
        if !it.has_progressed() {
            if !self.no_progress_rule || self.stalled >= 1000 {
                return false;
            }
            self.stalled += 1;
        }
        if self.always {
            self.yields += 1;
            return true;
        }
        // Under the model checker the lock cannot hand over fairly, so a walk that
        // yields at every step to a waiter multiplies schedules without exploring
        // anything new: one yield per walk is modelled.
        if cfg!(loom) && self.yields > 0 {
            return false;
        }
        if guard.needbreak() && self.held_long_enough() {
            self.yields += 1;
            return true;
        }
        self.checks = self.checks.wrapping_add(1);
        // Under the model checker every decision must be deterministic: only
        // waiters count there.
        !cfg!(loom) && self.checks.is_multiple_of(64) && self.since.elapsed() >= RESCHED_SLICE
    }

    /// Whether the walk has held the lock for [`CONTENDED_HOLD`] (only asked
    /// when someone waits, so kept out of the walk's loop).
    #[cold]
    #[inline(never)]
    fn held_long_enough(&self) -> bool {
        cfg!(loom) || self.since.elapsed() >= CONTENDED_HOLD
    }

    /// Note that the lock was just re-taken.
    pub(crate) fn yielded(&mut self) {
        self.since = Instant::now();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::host::TableMemory;
    use crate::spte::LeafParams;
    use crate::sync::Arc;
    use crate::testing::TestMemory;

    /// Test memory, the tables over it, and an empty root table.
    fn empty_root() -> (Arc<TestMemory>, Tables, Pfn) {
        let mem = Arc::new(TestMemory::new());
        let tables = Tables::new(mem.clone());
        let root = mem.new_table();
        (mem, tables, root)
    }

    #[test]
    fn test_iter_visits_parents_before_children_in_range() {
        let (mem, tables, root) = empty_root();
        let l3 = mem.new_table();
        let l2 = mem.new_table();
        mem.table(root)[0].store(Spte::table(l3, true).0, Ordering::Relaxed);
        mem.table(l3)[1].store(Spte::table(l2, true).0, Ordering::Relaxed);
        let leaf = Spte::leaf(LeafParams {
            pfn: Pfn(0x1000),
            level: Level::M2,
            host_writable: true,
            prefetch: false,
            ad_enabled: true,
            executable: true,
        });
        mem.table(l2)[3].store(leaf.0, Ordering::Relaxed);
        let start = Gfn((1 << 18) + (3 << 9));
        let mut it = TdpIter::new(
            &tables,
            root,
            Level::L4,
            Level::K4,
            start,
            Gfn(start.0 + 512 * 2),
        );
        let mut seen = vec![];
        while it.in_range() {
            seen.push((it.level.get(), it.gfn.0, it.old_spte.is_shadow_present()));
            it.next();
        }
        assert_eq!(
            seen,
            vec![
                (4, 0, true),
                (3, 1 << 18, true),
                (2, start.0, true),
                (2, start.0 + 512, false)
            ]
        );
    }

    /// A lock whose waiter count says someone waits.
    struct Contended;
    impl MmuGuard for Contended {
        fn is_exclusive(&self) -> bool {
            true
        }
        fn yield_lock(&mut self, _: &crate::sync::LockStats) {}
        fn needbreak(&self) -> bool {
            true
        }
    }

    #[test]
    fn test_a_walk_yields_to_a_waiter_only_after_holding_the_lock_a_while() {
        let (_mem, tables, root) = empty_root();
        let mut it = TdpIter::new(&tables, root, Level::L4, Level::K4, Gfn(0), Gfn(1 << 30));
        it.next();
        assert!(it.has_progressed());
        let mut rs = Resched::new(&crate::config::GuardKnobs::default());
        // Just (re)taken: a short zap finishes before the waiter gets in.
        rs.since = Instant::now() + Duration::from_secs(3600);
        assert!(
            !rs.should_yield(&it, &Contended),
            "yielded as soon as someone waited"
        );
        // Held for longer than the hold: the waiter gets in.
        rs.since = Instant::now()
            .checked_sub(CONTENDED_HOLD)
            .expect("the clock is past its start");
        assert!(
            rs.should_yield(&it, &Contended),
            "never yielded to the waiter"
        );
    }

    #[test]
    fn test_descent_heads_for_its_gfn_and_rereads_before_entering() {
        let (mem, tables, root) = empty_root();
        let l3 = mem.new_table();
        let l2 = mem.new_table();
        let target = Gfn((2 << 27) + (5 << 18) + (7 << 9) + 3);
        mem.table(root)[2].store(Spte::table(l3, true).0, Ordering::Relaxed);
        mem.table(l3)[5].store(Spte::table(l2, true).0, Ordering::Relaxed);
        let mut d = Descent::new(&tables, root, Level::L4, target).expect("inside the root");
        assert_eq!((d.level, d.gfn()), (Level::L4, Gfn(2 << 27)));
        assert!(d.step_down());
        assert_eq!((d.level, d.gfn()), (Level::G1, Gfn((2 << 27) + (5 << 18))));
        assert!(std::ptr::eq(d.sptep(), &mem.table(l3)[5]));
        // The link is zapped after the walk read it: the walk must not enter
        // the table it linked.
        mem.table(l3)[5].store(Spte::NONPRESENT.0, Ordering::Relaxed);
        assert!(!d.step_down(), "entered a table unlinked after it was read");
        assert_eq!(d.level, Level::G1);
        assert!(!d.old_spte.is_shadow_present(), "the re-read value is kept");
        assert!(Descent::new(&tables, root, Level::L4, Gfn(1 << 36)).is_none());
    }

    #[test]
    fn test_iter_yield_rule_requires_progress() {
        let (_mem, tables, root) = empty_root();
        let mut it = TdpIter::new(&tables, root, Level::L4, Level::K4, Gfn(0), Gfn(1 << 30));
        assert!(!it.has_progressed());
        it.next();
        assert!(it.has_progressed());
        it.restart();
        assert!(!it.has_progressed(), "a restart resets the progress mark");
        assert_eq!(it.level, Level::L4);
        assert_eq!(it.gfn, Gfn(1 << 27));
    }

    #[test]
    fn test_iter_restart_resumes_where_it_was_heading() {
        let (_mem, tables, root) = empty_root();
        let mut it = TdpIter::new(&tables, root, Level::L4, Level::K4, Gfn(0), Gfn(3 << 27));
        it.next();
        it.next();
        let at = it.gfn;
        it.restart();
        assert_eq!(it.gfn, at);
        let mut n = 0;
        while it.in_range() {
            n += 1;
            it.next();
        }
        assert_eq!(n, 1, "only the third top-level entry remains");
    }
}
