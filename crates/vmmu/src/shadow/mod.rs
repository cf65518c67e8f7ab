//! The shadow MMU (KVM's `mmu.c` with `paging_tmpl.h`, for `tdp=off`).
//!
//! The guest's page tables map guest virtual to guest physical addresses;
//! the processor runs on *shadow* tables that map guest virtual straight to
//! host frames. A shadow page shadows one guest table (or, when `direct`, a
//! range of guest frames with no table behind it: paging off, or a guest huge
//! page mapped with smaller pages) and is found by (gfn, role) in a hash.
//! Every leaf is listed in an rmap by the gfn it maps, which is how
//! invalidations, write protection and dirty logging find it. The guest's
//! tables are write-protected while shadowed, so a guest store to one exits
//! and is emulated (`track`), and a huge mapping never covers one.
//!
//! Everything here changes with `mmu_lock` held for write (the shadow MMU
//! handles no fault in parallel, as upstream). The state sits behind a mutex
//! taken only inside that write hold, which is how Rust is shown what the
//! lock already guarantees.
//!
//! Zapping is two-phase as in KVM: pages are unlinked and collected in a
//! [`Zap`], then [`ShadowMmu::commit`] makes every vCPU drop obsolete roots,
//! flushes remote TLBs (which waits for vCPUs in guest mode) and only then
//! hands the table pages back.

pub(crate) mod fault;
pub(crate) mod limit;
pub(crate) mod paging;
pub(crate) mod rmap;
pub(crate) mod track;
pub(crate) mod unsync;
pub(crate) mod walk;

use std::collections::{BTreeMap, HashMap};

use crate::host::TableMemory;
use crate::request::REQ_FREE_OBSOLETE_ROOTS;
use crate::spte::{ept, Spte};
use crate::stats::CounterSet;
use crate::sync::{Arc, AtomicBool, AtomicU64, LockClass, Mutex, MutexGuard, Ordering};
use crate::types::{Gfn, Level, Pfn};
use crate::vm::VmInner;

use rmap::{Rmap, SptePos};

/// The role of a shadow page (KVM's `kvm_mmu_page_role`, the fields a 64-bit
/// guest on a 64-bit host can differ in). Two pages for one gfn coexist when
/// their roles differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SpRole {
    pub(crate) level: Level,
    /// No guest table behind the page: it maps `gfn + index << (9 · (level − 1))`.
    pub(crate) direct: bool,
    /// The rights of the guest entries on the way down (`ACC_*`), which every
    /// leaf below is built with.
    pub(crate) access: u8,
    pub(crate) cr0_wp: bool,
    pub(crate) smep_andnot_wp: bool,
    pub(crate) smap_andnot_wp: bool,
    /// Address space (SMM).
    pub(crate) as_id: u16,
}

impl SpRole {
    /// The role of a child one level down.
    pub(crate) fn child(self, direct: bool, access: u8) -> SpRole {
        SpRole {
            level: self.level.lower().unwrap_or(Level::K4),
            direct,
            access,
            ..self
        }
    }
}

/// One shadow page (KVM's `struct kvm_mmu_page`).
#[derive(Debug)]
pub(crate) struct Sp {
    pub(crate) id: u64,
    pub(crate) gfn: Gfn,
    pub(crate) role: SpRole,
    pub(crate) pfn: Pfn,
    /// The gfn each leaf entry maps (indirect pages: the guest decided it;
    /// KVM's `shadowed_translation`).
    gfns: Vec<u64>,
    /// Non-leaf entries pointing at this page.
    pub(crate) parents: Vec<SptePos>,
    /// vCPU root slots naming this page.
    pub(crate) root_count: u32,
    /// Zapped while a root: never entered again, freed at the last put.
    pub(crate) invalid: Arc<AtomicBool>,
    /// Emulated writes since a fault last walked through the page.
    pub(crate) flood: u8,
    /// A 4 KiB page whose guest table the guest may write without an exit:
    /// its entries may be stale until the next sync (see [`unsync`]).
    pub(crate) unsync: bool,
    /// Entries whose child is unsync or has unsync children below it
    /// (KVM's `unsync_child_bitmap`; bits may be stale, a walk clears them).
    pub(crate) unsync_child: [u64; 8],
    /// Bits set in `unsync_child`.
    pub(crate) unsync_children: u16,
}

impl Sp {
    /// The gfn the entry at `idx` maps (for a leaf there).
    pub(crate) fn leaf_gfn(&self, idx: usize) -> Gfn {
        if self.role.direct {
            Gfn(self.gfn.0 + ((idx as u64) << self.role.level.gfn_shift()))
        } else {
            Gfn(self.gfns[idx])
        }
    }

    fn is_invalid(&self) -> bool {
        self.invalid.load(Ordering::Relaxed)
    }
}

/// The shadow MMU's size now (see [`crate::Vm::shadow_info`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowInfo {
    /// Shadow pages not yet freed (invalid roots still held included).
    pub pages: u64,
    /// Zapped roots some vCPU still holds (freed when the last lets go).
    pub invalid_roots: u64,
    /// Valid pages that shadow a guest table (`indirect_shadow_pages`).
    pub indirect: u64,
    /// Guest frames write-protected because they hold a shadowed table.
    pub tracked_gfns: u64,
    /// Present leaves (entries in the rmaps).
    pub leaves: u64,
    /// The longest rmap (`max_mmu_rmap_size`, as of now).
    pub longest_rmap: u64,
    /// Pages unsync now (`mmu_unsync`).
    pub unsync: u64,
    /// The page limit in force (`n_max_mmu_pages`).
    pub max_pages: u64,
}

/// Pages zapped but not yet committed.
#[derive(Debug, Default)]
pub(crate) struct Zap {
    /// Table pages to free after the flush.
    free: Vec<Pfn>,
    /// Something reachable changed: flush remote TLBs.
    pub(crate) flush: bool,
    /// A root in use went invalid: every vCPU must drop its obsolete roots.
    roots_invalidated: bool,
}

/// The shadow MMU of a VM.
pub(crate) struct ShadowMmu {
    state: Mutex<State>,
    /// Valid pages that shadow a guest table (KVM's `indirect_shadow_pages`):
    /// emulated writes skip the lock while it is 0.
    pub(crate) indirect_pages: AtomicU64,
    /// Unsync pages now: syncs skip the lock while it is 0.
    pub(crate) unsync_pages: AtomicU64,
    /// The page limit set with [`crate::Vm::set_nr_mmu_pages`] (0: the
    /// default, from the memslots' size).
    pub(crate) max_pages: AtomicU64,
    next_id: AtomicU64,
    /// `GuardKnobs::unsync_cleared_early` (a test-only broken order).
    pub(crate) unsync_cleared_early: bool,
}

impl std::fmt::Debug for ShadowMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowMmu").finish_non_exhaustive()
    }
}

/// Pages, hash, rmaps and write tracking.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Every page not yet freed, by table frame (KVM's `sptep_to_sp`).
    pub(crate) pages: HashMap<Pfn, Sp>,
    /// Valid pages by (gfn, role).
    hash: HashMap<(Gfn, SpRole), Pfn>,
    /// Valid pages that shadow the guest table at (address space, gfn).
    by_gfn: HashMap<(u16, Gfn), Vec<Pfn>>,
    pub(crate) rmap: Rmap,
    /// Write-track counts (KVM's `gfn_write_track`): pages shadowing the gfn.
    tracked: HashMap<(u16, Gfn), u32>,
    /// Huge pages disallowed over a chunk (KVM's `disallow_lpage`), by
    /// (address space, level, chunk's first gfn).
    disallow: HashMap<(u16, u8, u64), u32>,
    /// Valid pages by age, oldest first (KVM's `active_mmu_pages` read from
    /// its tail): the page limit recycles from the front.
    pub(crate) active: BTreeMap<u64, Pfn>,
}

impl ShadowMmu {
    pub(crate) fn new(unsync_cleared_early: bool) -> Self {
        ShadowMmu {
            unsync_cleared_early,
            state: Mutex::new(LockClass::ShadowPages, State::default()),
            indirect_pages: AtomicU64::new(0),
            unsync_pages: AtomicU64::new(0),
            max_pages: AtomicU64::new(0),
            next_id: AtomicU64::new(1 << 48),
        }
    }

    /// The state. Callers hold `mmu_lock` for write.
    #[track_caller]
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Hand zapped pages over: drop obsolete roots everywhere, flush, free.
    /// Called with `mmu_lock` held for write and the state unlocked.
    pub(crate) fn commit(&self, vm: &VmInner, z: Zap) {
        if z.roots_invalidated {
            vm.make_all_vcpus_request(REQ_FREE_OBSOLETE_ROOTS, true);
        }
        if (z.flush || !z.free.is_empty()) && !vm.config.knobs.skip_flush_after_zap {
            crate::tdp::RemoteFlush::flush_remote_tlbs(vm, &vm.stats);
        }
        for pfn in z.free {
            vm.host.memory.free_table_page(pfn);
            CounterSet::inc(&vm.stats.tables_freed);
        }
    }
}

/// VM-wide operations over the rmaps. Callers hold `mmu_lock` for write.
impl ShadowMmu {
    /// Zap every leaf that maps a gfn of `range` (invalidations,
    /// `zap_gfn_range`). Shadow pages stay: their tables are still
    /// write-protected and the next fault rebuilds the leaves.
    pub(crate) fn unmap_range(&self, vm: &VmInner, as_id: u16, range: crate::types::GfnRange) {
        let mem = &*vm.host.memory;
        let mut z = Zap::default();
        {
            let mut st = self.lock();
            for level in [Level::K4, Level::M2, Level::G1] {
                for pos in st.rmap.in_range(as_id, level, range) {
                    st.drop_leaf(mem, &vm.stats, pos, &mut z);
                }
            }
        }
        self.commit(vm, z);
    }

    /// Zap every page of the address spaces `filter` names (memslot delete
    /// or move, `invalidate_roots`, VM teardown). Roots in use go invalid and
    /// every vCPU drops them before it enters again.
    pub(crate) fn zap_everything(&self, vm: &VmInner, filter: crate::root::RootFilter) {
        let mut z = Zap::default();
        self.lock()
            .zap_all(self, &*vm.host.memory, &vm.stats, filter, &mut z);
        self.commit(vm, z);
    }

    /// Clear W on every leaf of `range` (dirty logging's write protection;
    /// huge leaves are zapped, so logged writes fault page by page).
    /// Returns whether anything changed (the caller flushes).
    pub(crate) fn write_protect_range(
        &self,
        vm: &VmInner,
        as_id: u16,
        range: crate::types::GfnRange,
    ) -> bool {
        let mem = &*vm.host.memory;
        let mut z = Zap::default();
        let mut changed = false;
        {
            let mut st = self.lock();
            for pos in st.rmap.in_range(as_id, Level::K4, range) {
                let old = entry(mem, pos)
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                        Some(Spte(v).write_protect().0)
                    })
                    .unwrap_or_else(|v| v);
                if Spte(old).is_writable() {
                    CounterSet::inc(&vm.stats.entries_write_protected);
                    changed = true;
                }
            }
            for level in [Level::M2, Level::G1] {
                for pos in st.rmap.in_range(as_id, level, range) {
                    st.drop_leaf(mem, &vm.stats, pos, &mut z);
                }
            }
        }
        changed |= z.flush;
        z.flush = false;
        self.commit(vm, z);
        changed
    }

    /// Clear the Dirty bits of the 4 KiB leaves of `range`; how many were set.
    pub(crate) fn clear_dirty_range(
        &self,
        vm: &VmInner,
        as_id: u16,
        range: crate::types::GfnRange,
    ) -> u64 {
        let mem = &*vm.host.memory;
        let st = self.lock();
        let mut n = 0;
        for pos in st.rmap.in_range(as_id, Level::K4, range) {
            let old = entry(mem, pos).fetch_and(!ept::D, Ordering::AcqRel);
            if Spte(old).is_shadow_present() && old & ept::D != 0 {
                n += 1;
            }
        }
        CounterSet::add(&vm.stats.dirty_bits_harvested, n);
        n
    }

    /// Whether any leaf of `range` was accessed; with `clear`, make them old.
    pub(crate) fn age_range(
        &self,
        vm: &VmInner,
        as_id: u16,
        range: crate::types::GfnRange,
        clear: bool,
    ) -> bool {
        let mem = &*vm.host.memory;
        let st = self.lock();
        let mut young = false;
        for level in [Level::K4, Level::M2, Level::G1] {
            for pos in st.rmap.in_range(as_id, level, range) {
                let e = entry(mem, pos);
                let v = if clear {
                    e.fetch_and(!ept::A, Ordering::AcqRel)
                } else {
                    e.load(Ordering::Acquire)
                };
                if v & ept::A != 0 {
                    young = true;
                    if clear {
                        CounterSet::inc(&vm.stats.entries_aged);
                    }
                }
            }
        }
        young
    }

    /// Every present leaf of `as_id`: (gfn, level, entry).
    pub(crate) fn leaves_of(&self, vm: &VmInner, as_id: u16) -> Vec<(Gfn, Level, Spte)> {
        let mem = &*vm.host.memory;
        let st = self.lock();
        let mut out = Vec::new();
        for sp in st.pages.values() {
            if sp.role.as_id != as_id || sp.is_invalid() {
                continue;
            }
            for i in 0..512 {
                let v = Spte(entry(mem, (sp.pfn, i as u16)).load(Ordering::Acquire));
                if v.is_shadow_present() && v.is_leaf(sp.role.level) {
                    out.push((sp.leaf_gfn(i), sp.role.level, v));
                }
            }
        }
        out
    }

    /// Shadow pages not yet freed.
    pub(crate) fn page_count(&self) -> u64 {
        self.lock().pages.len() as u64
    }
}

/// The entry at `pos`.
pub(crate) fn entry(mem: &dyn TableMemory, pos: SptePos) -> &crate::sync::AtomicU64 {
    &mem.table(pos.0)[pos.1 as usize]
}

impl State {
    /// The valid page for (gfn, role), if any.
    pub(crate) fn find(&self, gfn: Gfn, role: SpRole) -> Option<Pfn> {
        self.hash.get(&(gfn, role)).copied()
    }

    /// Whether a huge leaf of `level` may cover `gfn` (no guest table inside).
    pub(crate) fn huge_allowed(&self, as_id: u16, level: Level, gfn: Gfn) -> bool {
        !self
            .disallow
            .contains_key(&(as_id, level.get(), gfn.align_down(level).0))
    }

    /// Pages shadowing the guest table at `gfn`.
    pub(crate) fn pages_at(&self, as_id: u16, gfn: Gfn) -> Vec<Pfn> {
        self.by_gfn.get(&(as_id, gfn)).cloned().unwrap_or_default()
    }

    /// Create the page for (gfn, role) from `table` (a clean page, all
    /// entries not present). A page with a guest table behind it
    /// write-protects that table: existing leaves mapping the gfn lose W (huge
    /// ones are zapped, as no huge leaf may cover a shadowed table).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create(
        &mut self,
        sh: &ShadowMmu,
        mem: &dyn TableMemory,
        stats: &CounterSet,
        gfn: Gfn,
        role: SpRole,
        table: Pfn,
        z: &mut Zap,
    ) -> Pfn {
        if !role.direct && role.level > Level::K4 {
            // The guest reuses the frame of a 4 KiB table as an upper-level
            // one (a process's table freed, the frame given to another):
            // the unsync pages there go, as the new page keeps the frame
            // write-protected for good (KVM zaps them in the hash lookup).
            for pfn in self.pages_at(role.as_id, gfn) {
                if self.pages.get(&pfn).is_some_and(|sp| sp.unsync) {
                    self.zap_page(sh, mem, stats, pfn, z);
                }
            }
        }
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let sp = Sp {
            id,
            gfn,
            role,
            pfn: table,
            gfns: if role.direct {
                Vec::new()
            } else {
                vec![0; 512]
            },
            parents: Vec::new(),
            root_count: 0,
            invalid: Arc::new(AtomicBool::new(false)),
            flood: 0,
            unsync: false,
            unsync_child: [0; 8],
            unsync_children: 0,
        };
        self.pages.insert(table, sp);
        self.active.insert(id, table);
        self.hash.insert((gfn, role), table);
        CounterSet::inc(&stats.shadow_pages_created);
        CounterSet::inc(&stats.tables_allocated);
        if !role.direct {
            self.by_gfn
                .entry((role.as_id, gfn))
                .or_default()
                .push(table);
            sh.indirect_pages.fetch_add(1, Ordering::SeqCst);
            self.track(mem, stats, role.as_id, gfn, z);
        }
        table
    }

    /// Write-track `gfn` (KVM's `account_shadowed`).
    fn track(
        &mut self,
        mem: &dyn TableMemory,
        stats: &CounterSet,
        as_id: u16,
        gfn: Gfn,
        z: &mut Zap,
    ) {
        let n = self.tracked.entry((as_id, gfn)).or_insert(0);
        *n += 1;
        if *n == 1 {
            for level in [Level::M2, Level::G1] {
                *self
                    .disallow
                    .entry((as_id, level.get(), gfn.align_down(level).0))
                    .or_insert(0) += 1;
                for pos in self.rmap.get(as_id, level, gfn) {
                    self.drop_leaf(mem, stats, pos, z);
                }
            }
        }
        // Even when the gfn was tracked already: its other pages may be
        // unsync, their table mapped writable, and this new page is not.
        self.write_protect_gfn(mem, stats, as_id, gfn, z);
    }

    /// Take W away from every 4 KiB leaf that maps `gfn` (KVM's
    /// `kvm_vcpu_write_protect_gfn`); `z.flush` if one had it.
    pub(crate) fn write_protect_gfn(
        &mut self,
        mem: &dyn TableMemory,
        stats: &CounterSet,
        as_id: u16,
        gfn: Gfn,
        z: &mut Zap,
    ) {
        for pos in self.rmap.get(as_id, Level::K4, gfn) {
            let e = entry(mem, pos);
            // The processor may set A/D meanwhile: update, never overwrite.
            let old = e
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(Spte(v).write_protect_mmu().0)
                })
                .unwrap_or_else(|v| v);
            if Spte(old).is_writable() {
                CounterSet::inc(&stats.entries_write_protected);
                z.flush = true;
            }
        }
    }

    fn untrack(&mut self, as_id: u16, gfn: Gfn) {
        let Some(n) = self.tracked.get_mut(&(as_id, gfn)) else {
            debug_assert!(false, "untrack of an untracked gfn");
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.tracked.remove(&(as_id, gfn));
        for level in [Level::M2, Level::G1] {
            let key = (as_id, level.get(), gfn.align_down(level).0);
            if let Some(c) = self.disallow.get_mut(&key) {
                *c -= 1;
                if *c == 0 {
                    self.disallow.remove(&key);
                }
            }
        }
    }

    /// Install the leaf `new` at `pos` (of a page of level `level`) mapping
    /// `gfn`, listing it in the rmap. Whatever was there goes first.
    pub(crate) fn set_leaf(
        &mut self,
        mem: &dyn TableMemory,
        stats: &CounterSet,
        pos: SptePos,
        gfn: Gfn,
        new: Spte,
        z: &mut Zap,
    ) {
        let Some(sp) = self.pages.get(&pos.0) else {
            return;
        };
        let (level, as_id) = (sp.role.level, sp.role.as_id);
        let old = Spte(entry(mem, pos).load(Ordering::Acquire));
        if old.is_shadow_present() {
            if old.is_leaf(level) && old.pfn() == new.pfn() && sp.leaf_gfn(pos.1 as usize) == gfn {
                // Same frame, other rights: change in place, keeping the A/D
                // bits the processor set; a lost write right must be flushed.
                let keep = ept::A | ept::D;
                let prev = entry(mem, pos).swap(new.0 | (old.0 & keep), Ordering::AcqRel);
                if Spte(prev).is_writable() && !new.is_writable() {
                    z.flush = true;
                }
                return;
            }
            self.zap_entry(mem, stats, pos, z);
        }
        if let Some(sp) = self.pages.get_mut(&pos.0) {
            if !sp.role.direct {
                sp.gfns[pos.1 as usize] = gfn.0;
            }
        }
        entry(mem, pos).store(new.0, Ordering::Release);
        self.rmap.add(as_id, level, gfn, pos);
        stats.leaf_added(level, 1);
    }

    /// Link `child` below the entry at `pos`.
    pub(crate) fn link(&mut self, mem: &dyn TableMemory, ad: bool, pos: SptePos, child: Pfn) {
        entry(mem, pos).store(Spte::shadow_table(child, ad).0, Ordering::Release);
        let Some(c) = self.pages.get_mut(&child) else {
            return;
        };
        c.parents.push(pos);
        // The new parent must lead a sync to whatever is unsync below.
        if c.unsync || c.unsync_children > 0 {
            self.mark_unsync(pos);
        }
    }

    /// Clear the entry at `pos`: a leaf leaves its rmap, a link leaves its
    /// child's parent list (the child stays, unlinked).
    pub(crate) fn zap_entry(
        &mut self,
        mem: &dyn TableMemory,
        stats: &CounterSet,
        pos: SptePos,
        z: &mut Zap,
    ) {
        let Some(sp) = self.pages.get(&pos.0) else {
            return;
        };
        let level = sp.role.level;
        let old = Spte(entry(mem, pos).load(Ordering::Acquire));
        if !old.is_shadow_present() {
            return;
        }
        if old.is_leaf(level) {
            self.drop_leaf(mem, stats, pos, z);
        } else {
            entry(mem, pos).store(Spte::NONPRESENT.0, Ordering::Release);
            if let Some(c) = self.pages.get_mut(&old.pfn()) {
                c.parents.retain(|p| *p != pos);
            }
            z.flush = true;
        }
    }

    /// Remove the leaf at `pos` (KVM's `drop_spte`).
    pub(crate) fn drop_leaf(
        &mut self,
        mem: &dyn TableMemory,
        stats: &CounterSet,
        pos: SptePos,
        z: &mut Zap,
    ) {
        let Some(sp) = self.pages.get(&pos.0) else {
            return;
        };
        let (level, as_id) = (sp.role.level, sp.role.as_id);
        let gfn = sp.leaf_gfn(pos.1 as usize);
        // An exchange: the processor may be setting A/D on it right now.
        let old = Spte(entry(mem, pos).swap(Spte::NONPRESENT.0, Ordering::AcqRel));
        if !old.is_shadow_present() {
            return;
        }
        let listed = self.rmap.remove(as_id, level, gfn, pos);
        debug_assert!(listed, "leaf {pos:?} for {gfn:?} was not in its rmap");
        CounterSet::inc(&stats.leaves_zapped);
        if old.is_dirty() {
            CounterSet::inc(&stats.dirty_leaves_zapped);
        }
        stats.leaf_removed(level, 1);
        z.flush = true;
    }

    /// Zap a page (KVM's `__kvm_mmu_prepare_zap_page`): clear its entries,
    /// unlink it from its parents, stop write-tracking its gfn. A page that
    /// is some vCPU's root stays until its last holder drops it, marked
    /// invalid; any other page is freed at commit.
    pub(crate) fn zap_page(
        &mut self,
        sh: &ShadowMmu,
        mem: &dyn TableMemory,
        stats: &CounterSet,
        pfn: Pfn,
        z: &mut Zap,
    ) {
        let Some(sp) = self.pages.get(&pfn) else {
            return;
        };
        if sp.is_invalid() {
            return;
        }
        let (gfn, role, id) = (sp.gfn, sp.role, sp.id);
        if sp.unsync_children > 0 {
            // What is unsync below goes too (KVM's mmu_zap_unsync_children):
            // no sync would reach it through this page any more.
            for child in self.unsync_below(mem, pfn) {
                self.zap_page(sh, mem, stats, child, z);
            }
        }
        CounterSet::inc(&stats.shadow_pages_zapped);
        self.active.remove(&id);
        let early = sh.unsync_cleared_early;
        if early {
            self.clear_unsync(sh, pfn);
        }
        for i in 0..512u16 {
            self.zap_entry(mem, stats, (pfn, i), z);
        }
        let parents = self
            .pages
            .get_mut(&pfn)
            .map(|sp| std::mem::take(&mut sp.parents))
            .unwrap_or_default();
        for p in parents {
            entry(mem, p).store(Spte::NONPRESENT.0, Ordering::Release);
            z.flush = true;
        }
        // Only now that no entry of the page is left: a vCPU that finds
        // nothing unsync skips the lock for its INVLPG or CR3 flush, and
        // must not then walk into this page's stale entries (KVM unlinks
        // the page before it clears `unsync`).
        if !early {
            self.clear_unsync(sh, pfn);
        }
        if self.hash.get(&(gfn, role)) == Some(&pfn) {
            self.hash.remove(&(gfn, role));
        }
        if !role.direct {
            if let Some(v) = self.by_gfn.get_mut(&(role.as_id, gfn)) {
                v.retain(|p| *p != pfn);
                if v.is_empty() {
                    self.by_gfn.remove(&(role.as_id, gfn));
                }
            }
            self.untrack(role.as_id, gfn);
            sh.indirect_pages.fetch_sub(1, Ordering::SeqCst);
        }
        let Some(sp) = self.pages.get(&pfn) else {
            return;
        };
        // Invalid before any vCPU is asked to look (the request is sent at
        // commit, after this store).
        sp.invalid.store(true, Ordering::Release);
        if sp.root_count > 0 {
            z.roots_invalidated = true;
        } else {
            self.pages.remove(&pfn);
            z.free.push(pfn);
        }
    }

    /// Zap every page of the address spaces `filter` names (KVM's
    /// `kvm_mmu_zap_all`).
    pub(crate) fn zap_all(
        &mut self,
        sh: &ShadowMmu,
        mem: &dyn TableMemory,
        stats: &CounterSet,
        filter: crate::root::RootFilter,
        z: &mut Zap,
    ) {
        let all: Vec<Pfn> = self
            .pages
            .values()
            .filter(|sp| filter.covers(sp.role.as_id))
            .map(|sp| sp.pfn)
            .collect();
        for pfn in all {
            self.zap_page(sh, mem, stats, pfn, z);
        }
    }

    /// A root slot takes a reference.
    pub(crate) fn get_root(&mut self, pfn: Pfn) -> Option<(u64, Arc<AtomicBool>)> {
        let sp = self.pages.get_mut(&pfn)?;
        sp.root_count += 1;
        Some((sp.id, sp.invalid.clone()))
    }

    /// A root slot drops its reference; an invalid root is freed with the
    /// last one (its entries were cleared when it was zapped).
    pub(crate) fn put_root(&mut self, pfn: Pfn, z: &mut Zap) {
        let Some(sp) = self.pages.get_mut(&pfn) else {
            debug_assert!(false, "put of a freed root");
            return;
        };
        sp.root_count -= 1;
        if sp.root_count == 0 && sp.is_invalid() {
            self.pages.remove(&pfn);
            z.free.push(pfn);
        }
    }

    /// A summary for reports and checks.
    pub(crate) fn info(&self) -> ShadowInfo {
        ShadowInfo {
            pages: self.pages.len() as u64,
            invalid_roots: self.pages.values().filter(|sp| sp.is_invalid()).count() as u64,
            indirect: self.by_gfn.values().map(|v| v.len() as u64).sum(),
            tracked_gfns: self.tracked.len() as u64,
            leaves: self.rmap.len() as u64,
            longest_rmap: self.rmap.longest() as u64,
            // Filled in by `Vm::shadow_info` from the running counts.
            unsync: 0,
            max_pages: 0,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
