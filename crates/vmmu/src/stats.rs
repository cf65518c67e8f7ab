//! Counters, per VM and per vCPU.
//!
//! Every counter exists once in [`CounterSet`] (atomics, bumped with relaxed
//! increments by whoever does the work) and once in [`Stats`] (a plain snapshot).
//! Faults count into their vCPU's set, VM-wide work (notifiers, memslot changes,
//! fast zaps) into the VM's set, so hot counters never share a cache line between
//! vCPUs. A VM-level snapshot is the sum of all sets.

use crate::sync::{AtomicU64, LockStats, Ordering};
use crate::types::Level;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Live counters (atomics).
        #[derive(Debug, Default)]
        pub struct CounterSet {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// `mmu_lock` acquisitions made by this set's owner.
            pub lock: LockStats,
        }

        /// A snapshot of counters.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Stats {
            $($(#[doc = $doc])* pub $name: u64,)*
            /// `mmu_lock` taken for read.
            pub mmu_lock_read: u64,
            /// `mmu_lock` taken for write.
            pub mmu_lock_write: u64,
            /// Read acquisitions that had to wait.
            pub mmu_lock_read_contended: u64,
            /// Write acquisitions that had to wait.
            pub mmu_lock_write_contended: u64,
        }

        impl CounterSet {
            /// Add this set's values into `s`.
            pub fn accumulate(&self, s: &mut Stats) {
                $(s.$name += self.$name.load(Ordering::Relaxed);)*
                s.mmu_lock_read += self.lock.read.load(Ordering::Relaxed);
                s.mmu_lock_write += self.lock.write.load(Ordering::Relaxed);
                s.mmu_lock_read_contended += self.lock.read_contended.load(Ordering::Relaxed);
                s.mmu_lock_write_contended += self.lock.write_contended.load(Ordering::Relaxed);
            }

            /// Add a snapshot's values into this set (a departing vCPU's counts).
            pub fn absorb(&self, s: &Stats) {
                $(Self::add(&self.$name, s.$name);)*
                Self::add(&self.lock.read, s.mmu_lock_read);
                Self::add(&self.lock.write, s.mmu_lock_write);
                Self::add(&self.lock.read_contended, s.mmu_lock_read_contended);
                Self::add(&self.lock.write_contended, s.mmu_lock_write_contended);
            }
        }

        impl Stats {
            /// Every counter by name, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![
                    $((stringify!($name), self.$name),)*
                    ("mmu_lock_read", self.mmu_lock_read),
                    ("mmu_lock_write", self.mmu_lock_write),
                    ("mmu_lock_read_contended", self.mmu_lock_read_contended),
                    ("mmu_lock_write_contended", self.mmu_lock_write_contended),
                ]
            }

            /// `self - earlier`, counter by counter (saturating).
            pub fn since(&self, earlier: &Stats) -> Stats {
                Stats {
                    $($name: self.$name.saturating_sub(earlier.$name),)*
                    mmu_lock_read: self.mmu_lock_read.saturating_sub(earlier.mmu_lock_read),
                    mmu_lock_write: self.mmu_lock_write.saturating_sub(earlier.mmu_lock_write),
                    mmu_lock_read_contended: self.mmu_lock_read_contended.saturating_sub(earlier.mmu_lock_read_contended),
                    mmu_lock_write_contended: self.mmu_lock_write_contended.saturating_sub(earlier.mmu_lock_write_contended),
                }
            }
        }
    };
}

counters! {
    /// Page faults handled (`pf_taken`).
    faults,
    /// Faults that installed a mapping (`pf_fixed`), including fast-path fixes.
    faults_fixed,
    /// Faults that found the access already allowed (`pf_spurious`).
    faults_spurious,
    /// Faults that asked the vCPU to retry.
    faults_retry,
    /// Faults sent to emulation: MMIO or writes to read-only memslots (`pf_emulate`).
    faults_emulate,
    /// Write faults on write-protected gfns.
    faults_write_protected,
    /// Faults that ended in an error returned to the VMM (memory fault, EFAULT).
    faults_error,
    /// Faults fixed by the lockless fast path (`pf_fast`).
    fast_path_fixed,
    /// Fault walks that started at the vCPU's cached last-level table instead
    /// of the root (vmmu's paging-structure cache; not in KVM).
    walk_cache_hits,
    /// Faults that tried the lockless fast path (KVM's `page_fault_can_be_fast`).
    fast_path_attempts,
    /// Faults the fast path found already fixed.
    fast_path_spurious,
    /// Retries decided by the pre-check, before the host was asked for the pfn.
    precheck_retries,
    /// Retries decided by the unlocked check after the host returned the pfn.
    postcheck_retries,
    /// Retries decided by the locked invalidation check (sequence or range).
    locked_retries,
    /// Retries because the root had become obsolete.
    stale_root_retries,
    /// Retries because a compare-and-exchange on an entry lost a race.
    map_retries,
    /// Retries because the memslot was being deleted or moved.
    invalid_slot_retries,
    /// Faults on a vCPU with no root loaded (it must enter first).
    no_root_retries,
    /// Misconfiguration faults whose entry was no longer an MMIO entry.
    mmio_changed_retries,
    /// MMIO entries created.
    mmio_sptes_created,
    /// Faults answered from a cached MMIO entry.
    mmio_fast_hits,
    /// Yields of `mmu_lock` by long walks.
    yields,
    /// Local TLB flushes requested (root loads, flush requests processed).
    tlb_flush_local,
    /// Remote TLB flush requests issued (each kicks and waits for all vCPUs).
    tlb_flush_remote,
    /// Page-table pages linked into tables (roots excluded).
    tables_allocated,
    /// Page-table pages unlinked and handed to RCU for freeing (roots excluded).
    tables_freed,
    /// Roots created.
    roots_created,
    /// Root loads at guest entry (a vCPU had no usable current root).
    root_loads,
    /// Roots invalidated.
    roots_invalidated,
    /// Roots freed (last reference dropped).
    roots_freed,
    /// Obsolete roots a vCPU dropped while handling "free obsolete roots".
    obsolete_roots_dropped,
    /// Cached previous roots that were still valid and kept.
    prev_roots_kept,
    /// Root switches satisfied from the previous-roots cache.
    prev_root_hits,
    /// Shadow CR3 switches the previous-roots cache could not satisfy (a
    /// root looked up or built at the next entry; `mmu_cache_miss` counts
    /// only the builds).
    prev_root_misses,
    /// Root slots dropped by "free obsolete roots" under
    /// `legacy_root_reload` (every slot, obsolete or not).
    roots_reloaded_legacy,
    /// Leaf entries installed by faults at 4 KiB.
    leaves_mapped_4k,
    /// Leaf entries installed by faults at 2 MiB.
    leaves_mapped_2m,
    /// Leaf entries installed by faults at 1 GiB.
    leaves_mapped_1g,
    /// Present 4 KiB leaves created (by faults or splits).
    present_4k_added,
    /// Present 4 KiB leaves removed.
    present_4k_removed,
    /// Present 2 MiB leaves created.
    present_2m_added,
    /// Present 2 MiB leaves removed.
    present_2m_removed,
    /// Present 1 GiB leaves created.
    present_1g_added,
    /// Present 1 GiB leaves removed.
    present_1g_removed,
    /// Huge leaves split into tables by faults.
    huge_splits,
    /// Leaf entries zapped.
    leaves_zapped,
    /// Leaves that were dirty when zapped (the final value, read atomically).
    dirty_leaves_zapped,
    /// Dirty bits cleared (and reported) by dirty-bit harvesting.
    dirty_bits_harvested,
    /// `invalidate_range_start` calls.
    invalidations,
    /// Invalidations that overlapped a memslot (and took `mmu_lock`).
    invalidations_with_slots,
    /// Aging callbacks (clear/test young).
    aging_calls,
    /// Entries aged (made old).
    entries_aged,
    /// Aging callbacks that took `mmu_lock` (locked aging, before KVM 6.15).
    aging_locked,
    /// Access-tracked entries given back their permissions by the fast path.
    access_restored_fast,
    /// Access-tracked entries replaced by the slow path (should stay 0: the
    /// fast path restores them).
    access_restored_slow,
    /// Tables put on the possible-NX-huge-page list (a fetch kept a range
    /// from being mapped huge).
    nx_pages_tracked,
    /// Tables taken off that list (zapped, replaced, or by recovery).
    nx_pages_untracked,
    /// Faults that went below a listed table instead of mapping huge
    /// (`disallowed_hugepage_adjust`).
    nx_disallowed_adjusts,
    /// NX recovery passes.
    nx_recovery_passes,
    /// Listed tables NX recovery zapped.
    nx_recovered,
    /// Listed tables NX recovery left in place because their slot logs
    /// dirty pages.
    nx_recovery_skipped,
    /// Entries write-protected.
    entries_write_protected,
    /// Memslot updates published.
    memslot_updates,
    /// Memory attribute changes that changed something.
    attribute_changes,
    /// guest_memfd invalidations (hole punches, failures, releases that hit a
    /// bound slot): one per file and call.
    gmem_invalidations,
    /// PML-full exits: a vCPU's page-modification log filled up.
    pml_full_exits,
    /// Page-modification log entries drained into dirty bitmaps or rings.
    pml_entries_flushed,
    /// Huge leaves split eagerly (dirty logging turned on, or a first clear).
    eager_splits,
    /// Tables replaced in place by huge leaves when dirty logging was turned off.
    huge_recovered,
    /// Private faults served from a guest_memfd.
    private_faults,
    /// Shared faults served from a guest_memfd (gmem-only slots: the file was
    /// created with MMAP).
    gmem_shared_faults,
    /// `pre_fault_memory` calls that made progress.
    pre_fault_calls,
    /// Bytes mapped by `pre_fault_memory`.
    pre_faulted_bytes,
    /// Fast zaps of all roots.
    fast_zaps,
    /// Shadow pages created: a lookup found no page to reuse (`mmu_cache_miss`).
    shadow_pages_created,
    /// Shadow pages zapped (`mmu_shadow_zapped`).
    shadow_pages_zapped,
    /// Guest stores to shadowed tables emulated (`mmu_pte_write`).
    shadow_pte_writes,
    /// Shadow pages zapped because the guest kept writing to their table
    /// without a walk through them in between (`mmu_flooded`).
    shadow_flooded,
    /// Entries of upper-level shadow pages zapped by an emulated write of a
    /// present guest entry (`mmu_pde_zapped`).
    shadow_pde_zapped,
    /// Page faults the shadow MMU gave back to the guest: its own tables
    /// forbid the access (an injected #PF).
    shadow_guest_faults,
    /// Shadow roots loaded (a root per guest CR3 and role).
    shadow_root_loads,
    /// Guest INVLPGs that exited to the shadow MMU (`invlpg`).
    shadow_invlpg,
    /// Shadow pages that went unsync: a guest store to their 4 KiB table
    /// made it writable instead of being emulated (`mmu_unsync` counts the
    /// ones unsync now; see `ShadowInfo::unsync`).
    shadow_unsynced,
    /// Unsync shadow pages synced again with their guest table (a guest TLB
    /// flush, a root load, a lookup that reused the page).
    shadow_synced,
    /// Entries of unsync pages resynced one at a time (INVLPG, INVPCID of an
    /// address).
    shadow_entries_synced,
    /// Shadow pages zapped to stay under the page limit (`mmu_recycled`).
    shadow_recycled,
    /// Internal invariant violations detected (a present leaf replaced by another
    /// frame without a zap, an illegal writable combination). Always a bug.
    invariant_violations,
}

impl Stats {
    /// Retries by cause, named as in the counters; they add up to
    /// `faults_retry`.
    pub fn retries_by_cause(&self) -> [(&'static str, u64); 8] {
        [
            ("precheck", self.precheck_retries),
            ("postcheck", self.postcheck_retries),
            ("locked", self.locked_retries),
            ("stale_root", self.stale_root_retries),
            ("invalid_slot", self.invalid_slot_retries),
            ("map_race", self.map_retries),
            ("no_root", self.no_root_retries),
            ("mmio_changed", self.mmio_changed_retries),
        ]
    }

    /// Possible NX huge pages now listed (KVM's `nx_lpage_splits`).
    pub fn nx_lpage_splits(&self) -> u64 {
        self.nx_pages_tracked
            .saturating_sub(self.nx_pages_untracked)
    }

    /// Present leaves currently mapped at `level`.
    pub fn present(&self, level: Level) -> u64 {
        match level.get() {
            1 => self
                .present_4k_added
                .saturating_sub(self.present_4k_removed),
            2 => self
                .present_2m_added
                .saturating_sub(self.present_2m_removed),
            _ => self
                .present_1g_added
                .saturating_sub(self.present_1g_removed),
        }
    }
}

/// The leaf counts of one long walk (a zap), kept in plain cells and added
/// to the counters in one go: at the walk's yields, so anything that reads
/// the counters while the lock is free sees them current, and when dropped.
///
/// A delete of a populated 1 GiB slot zaps 262,144 leaves, and the two
/// atomic adds per leaf to the VM's counters (removed at its level, zapped)
/// were 40 % of its time here (5.1 → 3.1 ms without them, same binary
/// otherwise; docs/PERFORMANCE.md).
pub(crate) struct LeafTally<'a> {
    stats: &'a CounterSet,
    /// By level - 1 (4 KiB, 2 MiB, 1 GiB; the two upper ones stay 0): indexed
    /// without a clamp, since a level is always 1..=5.
    removed: [std::cell::Cell<u64>; 5],
    zapped: std::cell::Cell<u64>,
    dirty_zapped: std::cell::Cell<u64>,
}

impl<'a> LeafTally<'a> {
    pub(crate) fn new(stats: &'a CounterSet) -> Self {
        LeafTally {
            stats,
            removed: Default::default(),
            zapped: Default::default(),
            dirty_zapped: Default::default(),
        }
    }

    fn bump(c: &std::cell::Cell<u64>) {
        c.set(c.get() + 1);
    }

    /// A leaf of `level` stopped being present.
    pub(crate) fn removed(&self, level: Level) {
        Self::bump(&self.removed[level.get() as usize - 1]);
    }

    /// The walk zapped a leaf (`dirty`: with its Dirty bit set).
    pub(crate) fn zapped(&self, dirty: bool) {
        Self::bump(&self.zapped);
        let d = &self.dirty_zapped;
        d.set(d.get() + u64::from(dirty));
    }

    /// Add what was counted so far to the counters.
    pub(crate) fn flush(&self) {
        let s = self.stats;
        for (level, c) in [Level::K4, Level::M2, Level::G1, Level::L4, Level::L5]
            .into_iter()
            .zip(&self.removed)
        {
            // Above 1 GiB (never a leaf) the counters count as 1 GiB.
            s.leaf_removed(level, c.take());
        }
        CounterSet::add(&s.leaves_zapped, self.zapped.take());
        CounterSet::add(&s.dirty_leaves_zapped, self.dirty_zapped.take());
    }
}

impl Drop for LeafTally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

impl CounterSet {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn leaf_added(&self, level: Level, n: u64) {
        match level.get() {
            1 => Self::add(&self.present_4k_added, n),
            2 => Self::add(&self.present_2m_added, n),
            _ => Self::add(&self.present_1g_added, n),
        }
    }

    pub(crate) fn leaf_removed(&self, level: Level, n: u64) {
        match level.get() {
            1 => Self::add(&self.present_4k_removed, n),
            2 => Self::add(&self.present_2m_removed, n),
            _ => Self::add(&self.present_1g_removed, n),
        }
    }

    pub(crate) fn leaf_mapped(&self, level: Level) {
        match level.get() {
            1 => Self::inc(&self.leaves_mapped_4k),
            2 => Self::inc(&self.leaves_mapped_2m),
            _ => Self::inc(&self.leaves_mapped_1g),
        }
    }
}
