//! The TDP MMU: second-stage tables built from [`Spte`]s, shared by all vCPUs.
//!
//! Entries change in three ways, each with its own rule (kvm-mmu-reference §2.6):
//! - under `mmu_lock` held for read, only by compare-and-exchange from the value last
//!   observed, never over a frozen entry ([`Tdp::try_set_spte_atomic`]);
//! - under `mmu_lock` held for write, by a plain store, or an exchange when other
//!   agents may still change the entry without the lock ([`Tdp::write_spte_exclusive`]);
//! - without `mmu_lock` (fast page fault, aging), by compare-and-exchange inside an
//!   RCU read-side section.
//!
//! Every change goes through [`Tdp::handle_changed_spte`], which keeps the leaf
//! counts and tears down tables that a change disconnected. Disconnected tables are
//! frozen entry by entry and freed after an RCU grace period, so lockless walkers
//! that still hold a pointer into them read frozen entries, never reused memory.

pub(crate) mod iter;
pub(crate) mod map;
pub(crate) mod nx;
pub(crate) mod ops;
pub(crate) mod tables;
pub(crate) mod walk_cache;
pub(crate) mod zap;

use crate::config::GuardKnobs;
use crate::host::{Table, TableMemory, TableMemoryError};
use crate::root::Root;
use crate::spte::Spte;
use crate::stats::{CounterSet, LeafTally};
use crate::sync::{
    spin_wait, Arc, AtomicBool, AtomicU64, LockClass, Mutex, Ordering, Rcu, RcuGuard, Snapshot,
};
use crate::types::{Gfn, Level, Pfn};

/// State of the TDP MMU shared by a VM.
pub(crate) struct Tdp {
    pub(crate) mem: tables::Tables,
    pub(crate) rcu: Rcu,
    /// `tdp_mmu_roots`: changed under `tdp_mmu_pages_lock` (itself only taken
    /// under `mmu_lock`) and published whole, so lockless readers (aging, dumps)
    /// walk a snapshot, like KVM's RCU list.
    pub(crate) roots: Mutex<()>,
    pub(crate) roots_list: Snapshot<Vec<Arc<Root>>>,
    pub(crate) root_level: Level,
    /// One past the largest gfn memslots may contain.
    pub(crate) gfn_limit: u64,
    /// One past the largest gfn a root maps: the limit, or what the root
    /// level covers if less (kept, not computed: every fault checks it).
    max_gfn: Gfn,
    pub(crate) ad_enabled: bool,
    /// The iTLB-multihit mitigation: huge leaves are never executable. Changed
    /// at run time only under `mmu_lock` held for write ([`Tdp::nx_enabled`]).
    pub(crate) nx_huge_pages: AtomicBool,
    /// Tables an instruction fetch made where a huge leaf could have been
    /// (`possible_nx_huge_pages`, under `tdp_mmu_pages_lock`).
    pub(crate) possible_nx: Mutex<nx::NxPages>,
    /// Its length, readable without the lock.
    pub(crate) possible_nx_len: AtomicU64,
    pub(crate) knobs: GuardKnobs,
    pub(crate) next_root_id: AtomicU64,
    /// Non-root table pages currently linked (`tdp_mmu_pages`).
    pub(crate) linked_tables: AtomicU64,
    /// Table pages retired and waiting for their RCU grace period.
    pub(crate) pending_free: Arc<AtomicU64>,
    /// The most `pending_free` has been since the last reset.
    pub(crate) pending_free_peak: AtomicU64,
    /// Tables removed so far: the generation that tells a vCPU whether the
    /// last-level table it cached may still be used ([`walk_cache`]). On a
    /// line of its own: faults read it, only removals write it.
    tables_removed: crossbeam_utils::CachePadded<AtomicU64>,
}

impl std::fmt::Debug for Tdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tdp")
            .field("root_level", &self.root_level)
            .finish_non_exhaustive()
    }
}

/// What a change needs besides the tables: where to count, and the RCU section that
/// defers frees.
pub(crate) struct Ctx<'a> {
    pub(crate) stats: &'a CounterSet,
    pub(crate) rcu: &'a RcuGuard<'a>,
    /// Where a long walk counts the leaves it removes instead of `stats`.
    tally: Option<&'a LeafTally<'a>>,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(stats: &'a CounterSet, rcu: &'a RcuGuard<'a>) -> Self {
        Ctx {
            stats,
            rcu,
            tally: None,
        }
    }

    /// This context with leaf removals counted in `tally` (which adds them to
    /// the counters at its walk's yields and when dropped).
    pub(crate) fn tallied<'b>(&'b self, tally: &'b LeafTally<'b>) -> Ctx<'b> {
        Ctx {
            stats: self.stats,
            rcu: self.rcu,
            tally: Some(tally),
        }
    }

    /// Count a removed leaf of `level`.
    #[inline]
    pub(crate) fn leaf_removed(&self, level: Level) {
        match self.tally {
            Some(t) => t.removed(level),
            None => self.stats.leaf_removed(level, 1),
        }
    }
}

/// Pending remote TLB flush of a batch of changes (one flush per batch).
#[derive(Debug, Default)]
pub(crate) struct FlushBatch {
    pending: bool,
}

impl FlushBatch {
    pub(crate) fn mark(&mut self) {
        self.pending = true;
    }
    /// Flush if anything is pending.
    pub(crate) fn flush(&mut self, flusher: &dyn RemoteFlush, stats: &CounterSet) {
        if std::mem::take(&mut self.pending) {
            flusher.flush_remote_tlbs(stats);
        }
    }
}

/// Whoever can make every vCPU drop stale translations (the VM).
pub(crate) trait RemoteFlush {
    /// Request a TLB flush on every vCPU and wait until each vCPU that was running
    /// guest code has left guest mode.
    fn flush_remote_tlbs(&self, stats: &CounterSet);
}

/// Per-vCPU cache of initialised table pages, topped up before `mmu_lock` is taken
/// so that faults never allocate while holding it.
#[derive(Debug, Default)]
pub(crate) struct TableCache {
    pages: Vec<Pfn>,
}

impl TableCache {
    /// Ensure at least `min` pages are cached.
    pub(crate) fn topup(&mut self, tdp: &Tdp, min: usize) -> Result<(), TableMemoryError> {
        while self.pages.len() < min {
            let pfn = tdp.mem.alloc_table_page()?;
            tdp.init_table(pfn);
            self.pages.push(pfn);
        }
        Ok(())
    }

    pub(crate) fn pop(&mut self) -> Option<Pfn> {
        self.pages.pop()
    }

    /// Give back a page that was never made visible; it must hold only
    /// not-present entries again.
    pub(crate) fn push_clean(&mut self, pfn: Pfn) {
        self.pages.push(pfn);
    }

    /// Return every cached page to the host.
    pub(crate) fn drain(&mut self, tdp: &Tdp) {
        for pfn in self.pages.drain(..) {
            tdp.mem.free_table_page(pfn);
        }
    }
}

impl Tdp {
    pub(crate) fn new(
        mem: Arc<dyn TableMemory>,
        root_level: Level,
        gfn_limit: u64,
        ad_enabled: bool,
        nx_huge_pages: bool,
        knobs: GuardKnobs,
    ) -> Self {
        Tdp {
            mem: tables::Tables::new(mem),
            rcu: Rcu::new(),
            roots: Mutex::new(LockClass::TdpMmuPagesLock, ()),
            roots_list: Snapshot::new(Arc::new(Vec::new())),
            root_level,
            gfn_limit,
            max_gfn: Gfn(gfn_limit.min(1u64 << (9 * root_level.get() as u32))),
            ad_enabled,
            nx_huge_pages: AtomicBool::new(nx_huge_pages),
            possible_nx: Mutex::new(LockClass::TdpMmuPagesLock, nx::NxPages::default()),
            possible_nx_len: AtomicU64::new(0),
            knobs,
            next_root_id: AtomicU64::new(1),
            linked_tables: AtomicU64::new(0),
            pending_free: Arc::new(AtomicU64::new(0)),
            pending_free_peak: AtomicU64::new(0),
            tables_removed: crossbeam_utils::CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// Free a table page (or root) once every lockless walker that might still
    /// read it is gone.
    pub(crate) fn free_after_grace_period(&self, ctx: &Ctx<'_>, pfn: Pfn) {
        // Relaxed: a statistic.
        let n = self.pending_free.fetch_add(1, Ordering::Relaxed) + 1;
        self.pending_free_peak.fetch_max(n, Ordering::Relaxed);
        let mem = self.mem.clone();
        let pending = self.pending_free.clone();
        ctx.rcu.defer(move || {
            mem.free_table_page(pfn);
            pending.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// After a walk yielded `mmu_lock`: start a new RCU read-side section, so
    /// tables retired before the yield can be freed while the walk goes on.
    pub(crate) fn after_yield(&self, ctx: &Ctx<'_>) {
        if !self.knobs.rcu_pinned_across_yields {
            ctx.rcu.repin();
        }
    }

    /// A walk over `[start, end)` of `root` (clamped to the VM's gfn space),
    /// descending no lower than `min_level`.
    pub(crate) fn walk(
        &self,
        root: &Root,
        min_level: Level,
        start: Gfn,
        end: Gfn,
    ) -> iter::TdpIter<'_> {
        iter::TdpIter::new(
            &self.mem,
            root.pfn,
            self.root_level,
            min_level,
            start,
            end.min(self.max_gfn()),
        )
    }

    pub(crate) fn table(&self, pfn: Pfn) -> &Table {
        self.mem.table(pfn)
    }

    /// Fill a fresh table with the not-present value (KVM's memset64 of
    /// `SHADOW_NONPRESENT_VALUE`). Relaxed: the page becomes visible only through a
    /// Release link.
    pub(crate) fn init_table(&self, pfn: Pfn) {
        for e in self.table(pfn).iter() {
            e.store(Spte::NONPRESENT.0, Ordering::Relaxed);
        }
    }

    /// Replace an entry under the read lock: compare-and-exchange from `*old`.
    /// On failure `*old` is refreshed and false returned; the caller decides
    /// whether to retry. On success the change is accounted.
    #[inline]
    pub(crate) fn try_set_spte_atomic(
        &self,
        ctx: &Ctx<'_>,
        sptep: &AtomicU64,
        old: &mut Spte,
        new: Spte,
        gfn: Gfn,
        level: Level,
    ) -> bool {
        debug_assert!(
            !old.is_frozen(),
            "never overwrite a frozen entry under the read lock"
        );
        // AcqRel: Release publishes a child table's initialisation with the link;
        // Acquire makes the replaced value's history visible to the bookkeeping.
        match sptep.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) if !old.is_shadow_present() => {
                // Filling an empty entry (every fault's leaf, every linked
                // table): nothing was unlinked or removed, so of the
                // bookkeeping only a new leaf's rules and count are left,
                // kept here rather than in a call.
                if new.is_leaf(level) {
                    self.account_new_leaf(ctx, gfn, *old, new, level);
                }
                true
            }
            Ok(_) => {
                self.handle_changed_spte(ctx, gfn, *old, new, level, true);
                true
            }
            Err(cur) => {
                *old = Spte(cur);
                false
            }
        }
    }

    /// Replace an entry under the write lock, returning the value actually
    /// replaced. Leaves that hardware or the fast path may change without the lock
    /// are exchanged atomically so no Dirty bit is lost.
    pub(crate) fn write_spte_exclusive(
        &self,
        sptep: &AtomicU64,
        old: Spte,
        new: Spte,
        level: Level,
    ) -> Spte {
        // Under loom every leaf is exchanged: loom lets a plain store fall
        // between the read and the write of another thread's
        // compare-and-exchange on the same entry (tokio-rs/loom#254), which
        // neither the language's memory model nor any processor allows; a
        // lockless ager's exchange would then seem to undo this store. The
        // exchange gives the model exactly the atomicity real stores have.
        let exchange = old.is_leaf(level) && (cfg!(loom) || old.needs_atomic_update());
        if exchange && !self.knobs.nonatomic_zap {
            // AcqRel: we learn the final value (with any D set by hardware).
            Spte(sptep.swap(new.0, Ordering::AcqRel))
        } else {
            // Release: pairs with walkers' Acquire loads.
            sptep.store(new.0, Ordering::Release);
            old
        }
    }

    /// Bookkeeping after any change of an entry (KVM's `handle_changed_spte`):
    /// leaf counts, invariants, and teardown of a table the change disconnected.
    /// TLB flushing is the caller's job.
    ///
    /// Inlined into every change (a call with six arguments was a fifth of a
    /// zapped leaf's cost); what is rare (a broken invariant, an NX page, a
    /// disconnected table) stays out of line.
    #[inline]
    pub(crate) fn handle_changed_spte(
        &self,
        ctx: &Ctx<'_>,
        gfn: Gfn,
        old: Spte,
        new: Spte,
        level: Level,
        shared: bool,
    ) {
        if old == new {
            return;
        }
        let was_leaf = old.is_leaf(level);
        let is_leaf = new.is_leaf(level);
        // (A present leaf replaced by one of another frame also breaks the
        // rules: that takes a zap and a flush in between.)
        if is_leaf
            && (self.new_leaf_breaks_rules(new, level) || (was_leaf && old.pfn() != new.pfn()))
        {
            self.leaf_invariant_broken(ctx, gfn, old, new, level);
        }
        if was_leaf != is_leaf {
            if was_leaf {
                ctx.leaf_removed(level);
            }
            if is_leaf {
                ctx.stats.leaf_added(level, 1);
            }
        }
        if old.is_nx_disallowed(level) || old.is_table(level) {
            self.handle_changed_link(ctx, gfn, old, new, level, shared);
        }
    }

    /// A leaf `new` replaced the empty entry `old`: its rules, its count.
    #[inline(always)]
    fn account_new_leaf(&self, ctx: &Ctx<'_>, gfn: Gfn, old: Spte, new: Spte, level: Level) {
        if self.new_leaf_breaks_rules(new, level) {
            self.leaf_invariant_broken(ctx, gfn, old, new, level);
        }
        ctx.stats.leaf_added(level, 1);
    }

    /// Whether the leaf `new` breaks a rule every new leaf keeps: legal
    /// writable bits, and no executable huge leaf under the NX mitigation.
    #[inline(always)]
    fn new_leaf_breaks_rules(&self, new: Spte, level: Level) -> bool {
        !new.writable_bits_are_legal()
            || (level > Level::K4 && new.is_executable() && self.nx_enabled())
    }

    /// A new leaf breaks a rule: count it, and stop a debug build unless a
    /// test removed a guard on purpose. Then the count is the finding (the
    /// machine's oracle reports it as an MMU invariant violation), and
    /// which of the checkers sees the removed guard first is a race: a
    /// debug build stopping a vCPU thread here turned such a test's
    /// expected finding into a panic, about once in sixty runs under load.
    #[cold]
    #[inline(never)]
    fn leaf_invariant_broken(&self, ctx: &Ctx<'_>, gfn: Gfn, old: Spte, new: Spte, level: Level) {
        CounterSet::inc(&ctx.stats.invariant_violations);
        if self.knobs.removes_a_guard() {
            return;
        }
        let nx_huge_pages = self.nx_enabled();
        if !new.writable_bits_are_legal() {
            debug_assert!(false, "illegal writable bits in {new:?}");
        } else if level > Level::K4 && new.is_executable() && nx_huge_pages {
            // The mitigation's one promise: no executable huge leaf, ever.
            debug_assert!(
                false,
                "executable huge leaf {new:?} at {gfn:?} with NX huge pages on"
            );
        } else {
            // Remapping a gfn to another frame without zap + flush in between
            // would let stale TLB entries reach the old frame.
            debug_assert!(false, "present leaf {old:?} replaced by {new:?} at {gfn:?}");
        }
    }

    /// The changed entry was a table link or an NX huge page candidate: take
    /// it off the NX list, tear down the table it no longer links.
    #[inline(never)]
    fn handle_changed_link(
        &self,
        ctx: &Ctx<'_>,
        gfn: Gfn,
        old: Spte,
        new: Spte,
        level: Level,
        shared: bool,
    ) {
        if old.is_nx_disallowed(level) && !(new.is_nx_disallowed(level) && new.pfn() == old.pfn()) {
            // Zapped, replaced, or unmarked by recovery: off the list.
            self.untrack_possible_nx(ctx, old.pfn());
        }
        if old.is_table(level) && !(new.is_table(level) && new.pfn() == old.pfn()) {
            if let Some(child_level) = level.lower() {
                self.handle_removed_table(ctx, old.pfn(), child_level, gfn, shared);
            }
        }
    }

    /// Tear down a table that is no longer reachable from any root: freeze every
    /// entry (so nobody can install into it), account what it held, recurse into
    /// child tables, and free the page after an RCU grace period.
    pub(crate) fn handle_removed_table(
        &self,
        ctx: &Ctx<'_>,
        pfn: Pfn,
        level: Level,
        base: Gfn,
        shared: bool,
    ) {
        self.linked_tables.fetch_sub(1, Ordering::Relaxed);
        CounterSet::inc(&ctx.stats.tables_freed);
        // Before the free is deferred: a vCPU that cached this table must
        // see the new generation or hold back the free (see `walk_cache`).
        self.count_removal();
        let table = self.table(pfn);
        for (i, sptep) in table.iter().enumerate() {
            let gfn = Gfn(base.0 + i as u64 * level.pages());
            let old = if shared {
                // Another thread may own this entry for a moment (it froze it for a
                // multi-step change); wait for it to finish, then take it over.
                let mut spins = 0;
                loop {
                    let v = Spte(sptep.swap(Spte::FROZEN.0, Ordering::AcqRel));
                    if !v.is_frozen() {
                        break v;
                    }
                    spin_wait(&mut spins);
                }
            } else {
                let v = Spte(sptep.load(Ordering::Acquire));
                if !v.is_shadow_present() {
                    continue;
                }
                // Hardware may still set D through a stale walk into this table, so
                // volatile leaves are exchanged.
                self.write_spte_exclusive(sptep, v, Spte::FROZEN, level)
            };
            self.handle_changed_spte(ctx, gfn, old, Spte::FROZEN, level, shared);
        }
        self.free_after_grace_period(ctx, pfn);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::spte::{ept, LeafParams};
    use crate::testing::TestMemory;

    fn leaf(pfn: u64, level: Level, host_writable: bool, executable: bool) -> Spte {
        Spte::leaf(LeafParams {
            pfn: Pfn(pfn),
            level,
            host_writable,
            prefetch: false,
            ad_enabled: true,
            executable,
        })
    }

    /// A 4-level TDP MMU with A/D bits and the NX huge page mitigation on.
    fn nx_tdp() -> Tdp {
        Tdp::new(
            Arc::new(TestMemory::new()),
            Level::L4,
            1 << 34,
            true,
            true,
            GuardKnobs::default(),
        )
    }

    /// Each rule a new leaf must keep is checked on its own: a change that
    /// breaks exactly one of them is counted (and stops a debug build), a
    /// change that breaks none is not.
    #[test]
    fn test_handle_changed_spte_counts_each_broken_leaf_rule() {
        let tdp = nx_tdp();
        let stats = CounterSet::default();
        let rcu = tdp.rcu.read_lock();
        let ctx = Ctx::new(&stats, &rcu);
        let violations = || stats.invariant_violations.load(Ordering::Relaxed);
        // Whether the change stopped a debug build, and with what message.
        let said = std::cell::RefCell::new(String::new());
        let change = |old: Spte, new: Spte, level: Level| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tdp.handle_changed_spte(&ctx, Gfn(0), old, new, level, false)
            }));
            *said.borrow_mut() = match &r {
                Err(p) => p.downcast_ref::<String>().cloned().unwrap_or_default(),
                Ok(()) => String::new(),
            };
            r.is_err()
        };
        let said = || said.borrow().clone();
        let none = Spte::NONPRESENT;
        // Legal: a writable 4 KiB leaf, a non-executable huge leaf with NX
        // huge pages on, a leaf that becomes writable over the same frame.
        let w = leaf(0x100, Level::K4, true, true).make_writable();
        assert!(!change(none, w, Level::K4));
        assert!(!change(
            none,
            leaf(0x200, Level::M2, true, false),
            Level::M2
        ));
        assert!(!change(leaf(0x100, Level::K4, true, true), w, Level::K4));
        assert_eq!(violations(), 0, "a legal change was counted");
        // Writable without being host-writable.
        let illegal = Spte(leaf(0x100, Level::K4, false, true).0 | ept::W);
        assert_eq!(change(none, illegal, Level::K4), cfg!(debug_assertions));
        assert_eq!(violations(), 1, "illegal writable bits were not caught");
        assert!(
            !cfg!(debug_assertions) || said().contains("illegal writable bits"),
            "{}",
            said()
        );
        // An executable huge leaf under the NX mitigation.
        let exec_huge = leaf(0x200, Level::M2, true, true);
        assert_eq!(change(none, exec_huge, Level::M2), cfg!(debug_assertions));
        assert_eq!(violations(), 2, "an executable huge leaf was not caught");
        assert!(
            !cfg!(debug_assertions) || said().contains("executable huge leaf"),
            "{}",
            said()
        );
        // A present leaf replaced by a leaf of another frame.
        let other = leaf(0x300, Level::K4, true, true);
        assert_eq!(change(w, other, Level::K4), cfg!(debug_assertions));
        assert_eq!(violations(), 3, "a remap without a zap was not caught");
        assert!(
            !cfg!(debug_assertions) || said().contains("replaced by"),
            "{}",
            said()
        );
        // The same leaf through zap and map again is two legal changes.
        assert!(!change(w, none, Level::K4) && !change(none, other, Level::K4));
        assert_eq!(violations(), 3);
        // Leaf counts move only when an entry becomes or stops being a leaf
        // (a debug build stops at a broken rule before counting that leaf).
        let counts = |c: &crate::sync::AtomicU64| c.load(Ordering::Relaxed);
        let stopped = u64::from(cfg!(debug_assertions));
        assert_eq!(counts(&stats.present_4k_added), 3 - stopped);
        assert_eq!(counts(&stats.present_4k_removed), 1);
        assert_eq!(counts(&stats.present_2m_added), 2 - stopped);
    }

    /// With a guard removed on purpose, a broken leaf rule is counted and
    /// never stops the build: the count is what the test looks for, and the
    /// vCPU must go on for the other checkers to see the rest.
    #[test]
    fn test_a_broken_leaf_rule_with_a_guard_removed_is_counted_not_stopped() {
        let knobs = GuardKnobs {
            skip_locked_retry: true,
            ..GuardKnobs::default()
        };
        assert!(knobs.removes_a_guard() && !GuardKnobs::default().removes_a_guard());
        let tdp = Tdp::new(
            Arc::new(TestMemory::new()),
            Level::L4,
            1 << 34,
            true,
            true,
            knobs,
        );
        let stats = CounterSet::default();
        let rcu = tdp.rcu.read_lock();
        let ctx = Ctx::new(&stats, &rcu);
        let w = leaf(0x100, Level::K4, true, true);
        let illegal = Spte(leaf(0x100, Level::K4, false, true).0 | ept::W);
        for (old, new, level) in [
            (w, leaf(0x300, Level::K4, true, true), Level::K4),
            (Spte::NONPRESENT, illegal, Level::K4),
            (
                Spte::NONPRESENT,
                leaf(0x200, Level::M2, true, true),
                Level::M2,
            ),
        ] {
            tdp.handle_changed_spte(&ctx, Gfn(0), old, new, level, false);
        }
        assert_eq!(stats.invariant_violations.load(Ordering::Relaxed), 3);
    }

    /// A changed table link: off the NX list unless it stays a marked link
    /// to the same table; its table torn down unless it still links it.
    #[test]
    fn test_handle_changed_spte_untracks_and_tears_down_only_what_it_unlinks() {
        let tdp = nx_tdp();
        let stats = CounterSet::default();
        // The NX list's lock is only taken under `mmu_lock`.
        let lock = crate::sync::MmuLock::new();
        let _r = lock.read(&stats.lock);
        let rcu = tdp.rcu.read_lock();
        let ctx = Ctx::new(&stats, &rcu);
        let level = Level::M2;
        let new_table = || {
            let t = tdp.mem.alloc_table_page().expect("table page");
            tdp.init_table(t);
            t
        };
        let tracked = |t: Pfn| {
            let link = Spte::table(t, true).with_nx_disallowed();
            let page = nx::NxPage {
                table: t,
                gfn: Gfn(0),
                level,
                root_id: 0,
                as_id: 0,
            };
            tdp.track_possible_nx(&ctx, &AtomicU64::new(link.0), link, page);
            link
        };
        let listed = || tdp.possible_nx_len.load(Ordering::Relaxed);
        let freed = || stats.tables_freed.load(Ordering::Relaxed);
        let change =
            |old: Spte, new: Spte| tdp.handle_changed_spte(&ctx, Gfn(0), old, new, level, false);
        // Still a marked link to the same table (only A changed): kept.
        let t = new_table();
        let link = tracked(t);
        change(link, Spte(link.0 & !ept::A));
        assert_eq!((listed(), freed()), (1, 0), "a marked link kept its table");
        // Unmarked (recovery's "not a huge page after all"): off the list, the
        // table stays.
        change(link, link.without_nx_disallowed());
        assert_eq!(
            (listed(), freed()),
            (0, 0),
            "an unmarked link stayed listed"
        );
        // Zapped: off the list and torn down.
        let t2 = new_table();
        let link2 = tracked(t2);
        change(link2, Spte::NONPRESENT);
        assert_eq!((listed(), freed()), (0, 1), "a zapped marked link");
        // A marked link to another table: the old one is off the list and
        // torn down, whether or not the new link is marked.
        let (t3, t4) = (new_table(), new_table());
        let link3 = tracked(t3);
        change(link3, Spte::table(t4, true).with_nx_disallowed());
        assert_eq!(
            (listed(), freed()),
            (0, 2),
            "a marked link replaced by another table"
        );
        // A plain link to the same table gaining the mark: nothing unlinked.
        let plain = Spte::table(t4, true);
        change(plain, plain.with_nx_disallowed());
        assert_eq!((listed(), freed()), (0, 2));
        // A plain link zapped: torn down, nothing to untrack.
        change(plain, Spte::NONPRESENT);
        assert_eq!((listed(), freed()), (0, 3));
        assert_eq!(stats.nx_pages_untracked.load(Ordering::Relaxed), 3);
        drop(rcu);
        tdp.mem.free_table_page(t);
    }
}
