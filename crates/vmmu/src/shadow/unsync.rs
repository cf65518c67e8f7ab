//! Unsync shadow pages and their synchronisation (KVM's
//! `mmu_try_to_unsync_pages`, `mmu_sync_children`, `kvm_sync_page`,
//! `kvm_mmu_invalidate_addr`).
//!
//! Write-protecting every shadowed guest table costs an exit and an
//! emulation per guest store, and a kernel writes its processes' 4 KiB page
//! tables all the time. So a 4 KiB table is only write-protected until the
//! guest's first store to it: that fault makes its shadow page *unsync* and
//! maps the table writable; the guest then writes its entries freely and the
//! shadow entries may go stale. That is allowed, because a processor may go
//! on using a cached translation until the guest flushes it: the guest's
//! flush is where the page is *synced* (every entry checked against the
//! guest entry, and the table write-protected again first).
//!
//! Which flush syncs what (KVM's rules):
//! - INVLPG, and INVPCID of one address: that address's entry in the unsync
//!   pages on its path, in the current root and in each cached root (of
//!   that PCID, for INVPCID);
//! - a CR3 load that flushes its PCID, and INVPCID of a context: the current
//!   root (at the next entry, `REQ_MMU_SYNC`) if it carries that PCID; with
//!   PCIDs, cached roots of that PCID are dropped, not synced;
//! - a flush of everything (INVPCID all, a mode change): the current root,
//!   and every cached root that has unsync pages below it is dropped;
//! - a root load, and a lookup that reuses an unsync page.
//!
//! Only 4 KiB pages go unsync. A gfn that is also shadowed as an upper-level
//! table stays write-tracked (every store emulated), since a stale upper
//! entry would point a whole subtree at the wrong table.
//!
//! Each page records, per entry, whether an unsync page lies below it
//! (`unsync_child`), so a sync visits only the paths that lead to one.

use crate::memslot::MemslotSet;
use crate::spte::{ept, Spte};
use crate::stats::CounterSet;
use crate::sync::Ordering;
use crate::types::{Gpa, Gva, Level, Pfn};
use crate::vcpu::VcpuMmu;
use crate::vm::VmInner;

use super::paging::ShadowRoot;
use super::rmap::SptePos;
use super::walk::{peek_gpte, sync_gpte, GuestPaging, ACC_EXEC, ACC_USER, ACC_WRITE};
use super::{entry, ShadowMmu, State, Zap};

/// What a sync reads the guest's entries with.
pub(crate) struct SyncCx<'a> {
    pub(crate) vm: &'a VmInner,
    pub(crate) slots: &'a MemslotSet,
    pub(crate) paging: &'a GuestPaging,
    pub(crate) stats: &'a CounterSet,
}

impl State {
    /// A writable leaf is about to map `gfn` (KVM's
    /// `mmu_try_to_unsync_pages`): whether it may be writable. Not shadowed:
    /// yes. Shadowed as an upper-level table, or with unsync off: no (the
    /// store is emulated). Else every 4 KiB page of that table goes unsync.
    pub(crate) fn try_unsync(
        &mut self,
        sh: &ShadowMmu,
        stats: &CounterSet,
        as_id: u16,
        gfn: crate::types::Gfn,
        enabled: bool,
    ) -> bool {
        let pages = self.pages_at(as_id, gfn);
        if pages.is_empty() {
            return true;
        }
        if !enabled
            || pages.iter().any(|p| {
                self.pages
                    .get(p)
                    .is_some_and(|sp| sp.role.level > Level::K4)
            })
        {
            return false;
        }
        for pfn in pages {
            let Some(sp) = self.pages.get_mut(&pfn) else {
                continue;
            };
            if sp.unsync {
                continue;
            }
            sp.unsync = true;
            CounterSet::inc(&stats.shadow_unsynced);
            // Before the leaf becomes writable: a sync that finds the count
            // at 0 must not have missed this page (pairs with the Acquire in
            // `VcpuMmu::sync_shadow_root`, both under `mmu_lock` here anyway).
            sh.unsync_pages.fetch_add(1, Ordering::Release);
            let parents = sp.parents.clone();
            for p in parents {
                self.mark_unsync(p);
            }
        }
        true
    }

    /// Record that an unsync page lies below the entry at `pos`, and so on
    /// upwards while this is the page's first (KVM's `mark_unsync`).
    pub(crate) fn mark_unsync(&mut self, pos: SptePos) {
        let Some(sp) = self.pages.get_mut(&pos.0) else {
            return;
        };
        let (word, bit) = (pos.1 as usize / 64, 1u64 << (pos.1 % 64));
        if sp.unsync_child[word] & bit != 0 {
            return;
        }
        sp.unsync_child[word] |= bit;
        sp.unsync_children += 1;
        if sp.unsync_children > 1 {
            return;
        }
        let parents = sp.parents.clone();
        for p in parents {
            self.mark_unsync(p);
        }
    }

    fn clear_unsync_child(&mut self, pos: SptePos) {
        if let Some(sp) = self.pages.get_mut(&pos.0) {
            let (word, bit) = (pos.1 as usize / 64, 1u64 << (pos.1 % 64));
            if sp.unsync_child[word] & bit != 0 {
                sp.unsync_child[word] &= !bit;
                sp.unsync_children -= 1;
            }
        }
    }

    /// The page is no longer unsync (synced, or zapped).
    pub(crate) fn clear_unsync(&mut self, sh: &ShadowMmu, pfn: Pfn) {
        if let Some(sp) = self.pages.get_mut(&pfn) {
            if sp.unsync {
                sp.unsync = false;
                sh.unsync_pages.fetch_sub(1, Ordering::Release);
            }
        }
    }

    /// The unsync pages below `pfn`, each once; stale `unsync_child` bits met
    /// on the way are cleared (KVM's `mmu_unsync_walk`).
    pub(crate) fn unsync_below(
        &mut self,
        mem: &dyn crate::host::TableMemory,
        pfn: Pfn,
    ) -> Vec<Pfn> {
        let mut out = Vec::new();
        self.unsync_walk(mem, pfn, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Returns how many unsync pages lie below `pfn` (duplicates counted).
    fn unsync_walk(
        &mut self,
        mem: &dyn crate::host::TableMemory,
        pfn: Pfn,
        out: &mut Vec<Pfn>,
    ) -> usize {
        let Some(sp) = self.pages.get(&pfn) else {
            return 0;
        };
        let (bits, level) = (sp.unsync_child, sp.role.level);
        let mut n = 0;
        for (w, mut word) in bits.into_iter().enumerate() {
            while word != 0 {
                let i = (w * 64 + word.trailing_zeros() as usize) as u16;
                word &= word - 1;
                let pos = (pfn, i);
                let e = Spte(entry(mem, pos).load(Ordering::Acquire));
                let child = (e.is_shadow_present() && !e.is_leaf(level))
                    .then(|| e.pfn())
                    .and_then(|c| {
                        self.pages
                            .get(&c)
                            .map(|sp| (c, sp.unsync, sp.unsync_children))
                    });
                match child {
                    Some((c, _, k)) if k > 0 => {
                        let found = self.unsync_walk(mem, c, out);
                        if found == 0 {
                            self.clear_unsync_child(pos);
                        }
                        n += found;
                    }
                    Some((c, true, _)) => {
                        out.push(c);
                        n += 1;
                    }
                    _ => self.clear_unsync_child(pos),
                }
            }
        }
        n
    }

    /// Sync every unsync page below `root` (KVM's `mmu_sync_children`):
    /// write-protect their tables again and flush, so no store can slip past
    /// what is read next, then check each entry against the guest's.
    pub(crate) fn sync_children(&mut self, cx: &SyncCx<'_>, root: Pfn, z: &mut Zap) {
        let mem = &*cx.vm.host.memory;
        let pages = self.unsync_below(mem, root);
        if pages.is_empty() {
            return;
        }
        if !cx.vm.config.knobs.sync_without_write_protect {
            for pfn in &pages {
                if let Some(sp) = self.pages.get(pfn) {
                    let (as_id, gfn) = (sp.role.as_id, sp.gfn);
                    self.write_protect_gfn(mem, cx.stats, as_id, gfn, z);
                }
            }
            if z.flush {
                crate::tdp::RemoteFlush::flush_remote_tlbs(cx.vm, &cx.vm.stats);
                z.flush = false;
            }
        }
        for pfn in pages {
            self.sync_page(cx, pfn, z);
        }
        // Every bit on the way now leads to synced pages: clear them.
        self.unsync_below(mem, root);
    }

    /// Make one unsync page sync again (KVM's `kvm_sync_page`). Its table is
    /// write-protected already.
    pub(crate) fn sync_page(&mut self, cx: &SyncCx<'_>, pfn: Pfn, z: &mut Zap) {
        let early = cx.vm.shadow.unsync_cleared_early;
        if early {
            self.clear_unsync(&cx.vm.shadow, pfn);
        }
        self.refresh_page(cx, pfn, z);
        // After its entries are right: until then a flush on another vCPU
        // must take the lock and wait for this sync (see `zap_page`).
        if !early {
            self.clear_unsync(&cx.vm.shadow, pfn);
        }
    }

    /// Check every entry of an unsync page that is being reused by a
    /// lookup, leaving it unsync.
    pub(crate) fn refresh_page(&mut self, cx: &SyncCx<'_>, pfn: Pfn, z: &mut Zap) {
        CounterSet::inc(&cx.stats.shadow_synced);
        for i in 0..512u16 {
            self.sync_entry(cx, (pfn, i), z);
        }
    }

    /// Bring one entry of an indirect 4 KiB page in line with its guest
    /// entry (KVM's `FNAME(sync_spte)`): drop it if the guest entry maps
    /// nothing or another gfn now, narrow (or widen, but never to W) its
    /// rights if they changed, else leave it.
    pub(crate) fn sync_entry(&mut self, cx: &SyncCx<'_>, pos: SptePos, z: &mut Zap) {
        let mem = &*cx.vm.host.memory;
        let Some(sp) = self.pages.get(&pos.0) else {
            return;
        };
        if sp.role.direct || sp.role.level != Level::K4 {
            return;
        }
        let e = entry(mem, pos);
        let old = Spte(e.load(Ordering::Acquire));
        if !old.is_shadow_present() {
            return;
        }
        let gpa = Gpa(sp.gfn.gpa().0 + pos.1 as u64 * 8);
        let now = peek_gpte(cx.vm, cx.slots, gpa)
            .and_then(|g| sync_gpte(cx.vm.config.maxphyaddr, cx.paging, g, sp.role.access));
        let Some((_, access)) = now.filter(|(gfn, _)| *gfn == sp.leaf_gfn(pos.1 as usize)) else {
            self.drop_leaf(mem, cx.stats, pos, z);
            return;
        };
        let new = old.with_shadow_rights(
            access & ACC_WRITE != 0,
            access & ACC_USER != 0,
            access & ACC_EXEC != 0,
        );
        let rights = |s: Spte| s.0 & !(ept::A | ept::D);
        if rights(new) == rights(old) {
            return;
        }
        // Keep whatever A/D the processor sets meanwhile.
        let prev = e
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(rights(new) | (v & (ept::A | ept::D)))
            })
            .unwrap_or_else(|v| v);
        let lost = |bit: u64| prev & bit != 0 && new.0 & bit == 0;
        if lost(ept::W) || lost(ept::USER) || lost(ept::X) {
            z.flush = true;
        }
    }

    /// The entry for `gva` in each unsync page on its path below `root`,
    /// synced (KVM's `__kvm_mmu_invalidate_addr`).
    pub(crate) fn sync_gva(&mut self, cx: &SyncCx<'_>, root: Pfn, gva: Gva, z: &mut Zap) {
        let mem = &*cx.vm.host.memory;
        let mut sp = root;
        let mut level = Level::L4;
        loop {
            let Some(page) = self.pages.get(&sp) else {
                return;
            };
            let pos = (sp, ((gva.0 >> (12 + level.gfn_shift())) & 511) as u16);
            if page.unsync {
                CounterSet::inc(&cx.stats.shadow_entries_synced);
                self.sync_entry(cx, pos, z);
            }
            if self.pages.get(&sp).is_none_or(|p| p.unsync_children == 0) {
                return;
            }
            let e = Spte(entry(mem, pos).load(Ordering::Acquire));
            let Some(lower) = level.lower() else { return };
            if !e.is_shadow_present() || e.is_leaf(level) {
                return;
            }
            sp = e.pfn();
            level = lower;
        }
    }
}

/// The PCID a root was loaded for (0 without PCIDs).
pub(crate) fn pcid_of(paging: &GuestPaging, pgd: u64) -> u64 {
    if paging.pcide {
        pgd & 0xfff
    } else {
        0
    }
}

impl VcpuMmu {
    fn is_shadow(&self) -> bool {
        self.vm.config.mmu == crate::config::MmuKind::Shadow
    }

    /// Run `f` on the shadow state with a sync context, under `mmu_lock`.
    fn with_sync<R>(&mut self, f: impl FnOnce(&mut State, &SyncCx<'_>, &mut Zap) -> R) -> R {
        let vm = self.vm.clone();
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let _srcu = self.srcu.read_lock();
        let slots = vm.memslots[self.role.as_id() as usize].load();
        let paging = self.shadow.paging;
        let _w = vm.mmu_lock.write(&stats.lock);
        let mut z = Zap::default();
        let r = {
            let mut st = vm.shadow.lock();
            let cx = SyncCx {
                vm: &vm,
                slots: &slots,
                paging: &paging,
                stats,
            };
            f(&mut st, &cx, &mut z)
        };
        vm.shadow.commit(&vm, z);
        r
    }

    /// Sync every unsync page below the current root (KVM's
    /// `kvm_mmu_sync_roots`). Skips the lock when nothing is unsync.
    pub(crate) fn sync_shadow_root(&mut self) {
        let Some(root) = self.shadow.root.as_ref().map(|r| r.pfn) else {
            return;
        };
        if self.vm.shadow.unsync_pages.load(Ordering::Acquire) == 0 {
            return;
        }
        self.with_sync(|st, cx, z| st.sync_children(cx, root, z));
    }

    /// The cached roots with an unsync page below them.
    fn unsync_cached_roots(&self) -> Vec<u64> {
        let vm = &*self.vm;
        let _w = vm.mmu_lock.write(&self.shared.stats.lock);
        let st = vm.shadow.lock();
        self.shadow
            .prev
            .iter()
            .flatten()
            .filter(|r: &&ShadowRoot| {
                st.pages
                    .get(&r.pfn)
                    .is_some_and(|sp| sp.unsync_children > 0)
            })
            .map(|r| r.id)
            .collect()
    }

    /// The guest ran INVLPG: sync that address's entry in every root the
    /// vCPU holds (KVM's `kvm_mmu_invlpg`), besides the processor's own
    /// flush of the address.
    pub fn invlpg(&mut self, gva: Gva) {
        if !self.is_shadow() {
            return;
        }
        CounterSet::inc(&self.shared.stats.shadow_invlpg);
        self.invalidate_gva(gva, None);
    }

    /// The guest ran INVPCID for one address of `pcid`: as INVLPG, for the
    /// roots loaded with that PCID.
    pub fn invpcid_address(&mut self, pcid: u16, gva: Gva) {
        if !self.is_shadow() {
            return;
        }
        CounterSet::inc(&self.shared.stats.shadow_invlpg);
        self.invalidate_gva(gva, Some(pcid as u64));
    }

    /// The guest ran INVPCID for a whole context: resync the current root if
    /// it carries `pcid`; drop cached roots that do (KVM's
    /// `kvm_invalidate_pcid`).
    pub fn invpcid_context(&mut self, pcid: u16) {
        if self.is_shadow() {
            self.invalidate_pcid(pcid as u64);
        }
    }

    /// The guest flushed every translation (INVPCID of all contexts, a mode
    /// change): resync the current root, drop cached roots that have unsync
    /// pages below them (KVM's `kvm_vcpu_flush_tlb_guest`).
    pub fn flush_guest_tlb(&mut self) {
        if !self.is_shadow() {
            return;
        }
        self.sync_shadow_root();
        if self.vm.shadow.unsync_pages.load(Ordering::Acquire) == 0 {
            return;
        }
        let unsync = self.unsync_cached_roots();
        if !unsync.is_empty() {
            self.free_cached_roots(|r| unsync.contains(&r.id));
        }
    }

    /// A flush of `pcid`'s translations (KVM's `kvm_invalidate_pcid`).
    pub(crate) fn invalidate_pcid(&mut self, pcid: u64) {
        let paging = self.shadow.paging;
        let active = self.shadow.root.as_ref().map(|r| pcid_of(&paging, r.pgd));
        if active.is_none_or(|a| a == pcid) && !self.vm.config.knobs.cr3_flush_skips_sync {
            self.shadow.sync_pending = true;
        }
        if paging.pcide {
            self.free_cached_roots(|r| pcid_of(&paging, r.pgd) == pcid);
        }
    }

    /// Sync `gva`'s entry below the current root and each cached root (of
    /// `pcid` only, if given).
    fn invalidate_gva(&mut self, gva: Gva, pcid: Option<u64>) {
        if self.vm.config.knobs.invlpg_skips_sync
            || self.vm.shadow.unsync_pages.load(Ordering::Acquire) == 0
        {
            return;
        }
        let paging = self.shadow.paging;
        let roots: Vec<Pfn> = self
            .shadow
            .root
            .iter()
            .chain(self.shadow.prev.iter().flatten())
            .filter(|r| pcid.is_none_or(|p| pcid_of(&paging, r.pgd) == p))
            .map(|r| r.pfn)
            .collect();
        self.with_sync(|st, cx, z| {
            for root in roots {
                st.sync_gva(cx, root, gva, z);
            }
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
