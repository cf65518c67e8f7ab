//! The shadow MMU's page fault (KVM's `FNAME(page_fault)` and `FNAME(fetch)`).
//!
//! In order: walk the guest's tables (a guest-level fault goes back to the
//! guest as a #PF with the error code the walk made); resolve the frame with
//! the same pipeline the TDP MMU uses (invalidation snapshot, pre-check, host
//! fault-in, post-check); take `mmu_lock` for write; the stale checks; then
//! build the shadow path: one indirect page per guest table from the root
//! down to the guest's leaf (each new one write-protects its table, and the
//! guest entry read in it is re-read, now that it cannot change unseen),
//! direct pages below a guest huge page the host cannot map as large, and
//! the leaf with the guest's rights.

use crate::fault::{ErrorCode, FaultError, PageFault, RetPf};
use crate::memslot::{Memslot, MemslotSet};
use crate::spte::{Access, LeafParams, Spte};
use crate::stats::CounterSet;
use crate::sync::Ordering;
use crate::types::{Gfn, Gpa, Gva, Level};
use crate::vcpu::VcpuMmu;

use super::walk::{
    self, peek_gpte, Walk, WalkAccess, WalkError, ACC_ALL, ACC_EXEC, ACC_USER, ACC_WRITE,
};
use super::{entry, State, Zap};

/// What a shadow-paging fault asks of the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GvaFault {
    /// The MMU handled it (`Fixed`, `Spurious`, `Retry`): run the access again.
    Mmu(RetPf),
    /// The guest's own tables forbid the access: inject a #PF with this
    /// error code (CR2 = the faulting address).
    Inject(ErrorCode),
    /// Emulate the access at this guest physical address: MMIO (no memslot,
    /// or a write to a read-only one) when `mmio`, else a store to a guest
    /// page table, which [`VcpuMmu::emulate_write`] carries out.
    Emulate {
        /// Where the access goes.
        gpa: Gpa,
        /// No memory there to write.
        mmio: bool,
    },
}

fn index(gva: Gva, level: Level) -> u16 {
    ((gva.0 >> (12 + level.gfn_shift())) & 511) as u16
}

impl VcpuMmu {
    /// Handle a page fault of a shadow-paging guest at linear address `gva`
    /// (the processor's #PF, intercepted). `error_code` is the processor's
    /// (P, W, U, I/D); `ac` is EFLAGS.AC, which SMAP needs.
    #[track_caller]
    pub fn page_fault_gva(
        &mut self,
        gva: Gva,
        error_code: ErrorCode,
        ac: bool,
    ) -> Result<GvaFault, FaultError> {
        if self.vm.config.mmu != crate::config::MmuKind::Shadow {
            return Err(FaultError::WrongMmu(
                "guest-virtual faults need a shadow-MMU VM (this one runs TDP)",
            ));
        }
        let _m = crate::sync::lockdep::Held::acquire(
            crate::sync::LockClass::VcpuMutex,
            std::panic::Location::caller(),
        );
        let r = self.shadow_fault(gva, error_code, ac);
        let st = &self.shared.stats;
        CounterSet::inc(&st.faults);
        match r {
            Ok(GvaFault::Mmu(RetPf::Fixed)) => CounterSet::inc(&st.faults_fixed),
            Ok(GvaFault::Mmu(RetPf::Spurious)) => CounterSet::inc(&st.faults_spurious),
            Ok(GvaFault::Mmu(RetPf::Retry)) => CounterSet::inc(&st.faults_retry),
            Ok(GvaFault::Mmu(_)) => {}
            Ok(GvaFault::Inject(_)) => CounterSet::inc(&st.shadow_guest_faults),
            Ok(GvaFault::Emulate { mmio: true, .. }) => CounterSet::inc(&st.faults_emulate),
            Ok(GvaFault::Emulate { mmio: false, .. }) => {
                CounterSet::inc(&st.faults_write_protected)
            }
            Err(_) => CounterSet::inc(&st.faults_error),
        }
        r
    }

    fn shadow_fault(&mut self, gva: Gva, ec: ErrorCode, ac: bool) -> Result<GvaFault, FaultError> {
        let stats = &self.shared.stats;
        let Some(root) = self.shadow.root.clone() else {
            CounterSet::inc(&stats.no_root_retries);
            return Ok(GvaFault::Mmu(RetPf::Retry));
        };
        if root.invalid.load(Ordering::Acquire) {
            CounterSet::inc(&stats.stale_root_retries);
            return Ok(GvaFault::Mmu(RetPf::Retry));
        }
        let vm = self.vm.clone();
        let as_id = self.role.as_id();
        let _srcu = self.srcu.read_lock();
        let slots = vm.memslots[as_id as usize].load();
        let paging = self.shadow.paging;
        let acc = WalkAccess::from_error_code(ec, ac);
        let walk = if paging.paging {
            match walk::walk(&vm, &slots, self.shared.ring.as_ref(), &paging, gva, acc) {
                Ok(w) => Some(w),
                Err(WalkError::Guest(e)) => return Ok(GvaFault::Inject(e)),
                Err(WalkError::Host(e)) => return Err(e),
            }
        } else {
            None
        };
        let gfn = walk.as_ref().map_or(Gfn(gva.0 >> 12), |w| w.gfn);
        let gpa = Gpa(gfn.gpa().0 | (gva.0 & 0xfff));
        if gfn.0 >= vm.config.gfn_limit() {
            return Ok(GvaFault::Emulate { gpa, mmio: true });
        }
        let mut pte_access = walk.as_ref().map_or(ACC_ALL, |w| w.pte_access);
        // Guest paging off: direct pages, at most 2 MiB (KVM's nonpaging MMU).
        let guest_level = walk.as_ref().map_or(Level::M2, |w| w.level);
        let slot: Option<&Memslot> = slots.lookup(gfn).map(|s| &**s);
        let mut access = Access::READ;
        if acc.write {
            access |= Access::WRITE;
        }
        if acc.fetch {
            access = Access::EXEC;
        }
        let mut f = PageFault {
            gfn,
            write: acc.write,
            present: ec.contains(ErrorCode::PRESENT),
            rsvd: false,
            private: false,
            access,
            slot,
            max_level: guest_level.min(vm.config.max_level),
            goal_level: Level::K4,
            req_level: Level::K4,
            mmu_seq: 0,
            attr_private: None,
            from_gmem: false,
            ring: self.shared.ring.as_ref(),
            pfn: crate::types::Pfn(0),
            host_pfn: crate::types::Pfn(0),
            host_level: Level::K4,
            map_writable: false,
            mmio_gen: 0,
            huge_page_disallowed: acc.fetch && vm.tdp.nx_enabled(),
        };
        // The lockless fast path (a write to a write-protected but
        // MMU-writable entry, or an access-tracked one), on direct roots only,
        // as upstream: a direct entry's gfn follows from where it sits, which
        // the exchange pins, while an indirect one's came from a guest walk
        // the entry may no longer match (locking.rst's ABA: the exchange
        // would succeed on an entry that now maps another gfn and log the
        // wrong page).
        if (root.role.direct || vm.config.knobs.shadow_fast_path_indirect)
            && self.fault_can_be_fast(&f)
        {
            CounterSet::inc(&stats.fast_path_attempts);
            match self.shadow_fast_page_fault(root.pfn, gva, &f) {
                RetPf::Invalid => {}
                r => return Ok(GvaFault::Mmu(r)),
            }
        }
        // Up to one new page per level below the root, and the leaf's.
        self.cache.topup(&vm.tdp, 4)?;
        match self.faultin_pfn(&mut f)? {
            RetPf::Continue if f.slot.is_some() => {}
            // No memslot (MMIO) or a write to a read-only one: the shadow MMU
            // caches no MMIO entries; emulate.
            RetPf::Continue | RetPf::Emulate => return Ok(GvaFault::Emulate { gpa, mmio: true }),
            r => return Ok(GvaFault::Mmu(r)),
        }
        // CR0.WP=0: a supervisor write the guest allows on a read-only page
        // maps it writable but supervisor-only (and, with SMEP, not
        // executable), since the processor runs shadow tables with WP=1.
        if paging.paging && !paging.wp && acc.write && !acc.user && pte_access & ACC_WRITE == 0 {
            pte_access |= ACC_WRITE;
            pte_access &= !ACC_USER;
            if paging.smep {
                pte_access &= !ACC_EXEC;
            }
        }
        let result = {
            let _w = vm.mmu_lock.write(&stats.lock);
            if root.invalid.load(Ordering::Acquire) {
                CounterSet::inc(&stats.stale_root_retries);
                GvaFault::Mmu(RetPf::Retry)
            } else if !vm.config.knobs.skip_locked_retry && vm.inval.retry_gfn(f.mmu_seq, gfn) {
                CounterSet::inc(&stats.locked_retries);
                GvaFault::Mmu(RetPf::Retry)
            } else {
                self.hugepage_adjust(&mut f);
                let mut z = Zap::default();
                let r = {
                    let mut st = vm.shadow.lock();
                    let room = st.make_pages_available(&vm, stats, &mut z);
                    let mut cx = Fetch {
                        vm: &vm,
                        stats,
                        cache: &mut self.cache,
                        paging: &paging,
                        slots: &slots,
                        needs_sync: false,
                    };
                    let r = match room {
                        Ok(()) => cx.fetch(
                            &mut st,
                            root.pfn,
                            walk.as_ref(),
                            &f,
                            gva,
                            pte_access,
                            &mut z,
                        ),
                        Err(limit) => Err(FaultError::NoShadowPages { limit }),
                    };
                    self.shadow.sync_pending |= cx.needs_sync;
                    r
                };
                vm.shadow.commit(&vm, z);
                match r {
                    Ok(RetPf::WriteProtected) => GvaFault::Emulate { gpa, mmio: false },
                    Ok(r) => GvaFault::Mmu(r),
                    Err(e) => {
                        drop(_w);
                        vm.host.primary.release(f.host_pfn, false);
                        return Err(e);
                    }
                }
            }
        };
        let mapped_writable = f.map_writable && matches!(result, GvaFault::Mmu(RetPf::Fixed));
        vm.host.primary.release(f.host_pfn, mapped_writable);
        Ok(result)
    }
}

impl VcpuMmu {
    /// KVM's `fast_page_fault` on a shadow root: walk the shadow tables for
    /// `gva` without `mmu_lock`, announced as `READING_SHADOW_PAGE_TABLES`
    /// so no table page is freed under the walk (a zap's remote flush waits
    /// for it), then at most four exchanges on the last entry.
    fn shadow_fast_page_fault(
        &self,
        root: crate::types::Pfn,
        gva: Gva,
        f: &PageFault<'_>,
    ) -> RetPf {
        let mem = &*self.vm.host.memory;
        self.shared.begin_lockless_walk();
        let mut r = RetPf::Invalid;
        for _ in 0..4 {
            let (pos, spte, level) = last_shadow_spte(mem, root, gva);
            if let Some(done) = self.fast_fix(entry(mem, pos), spte, level, f) {
                r = done;
                break;
            }
        }
        self.shared.end_lockless_walk();
        r
    }
}

/// The last entry on `gva`'s shadow path below `root`: where it is, its
/// value, its level.
pub(crate) fn last_shadow_spte(
    mem: &dyn crate::host::TableMemory,
    root: crate::types::Pfn,
    gva: Gva,
) -> (super::rmap::SptePos, Spte, Level) {
    let mut sp = root;
    let mut level = Level::L4;
    loop {
        let pos = (sp, index(gva, level));
        let e = Spte(entry(mem, pos).load(Ordering::Acquire));
        match level.lower() {
            Some(lower) if e.is_shadow_present() && !e.is_leaf(level) => {
                sp = e.pfn();
                level = lower;
            }
            _ => return (pos, e, level),
        }
    }
}

/// What building a shadow path needs.
struct Fetch<'a> {
    vm: &'a crate::vm::VmInner,
    stats: &'a CounterSet,
    cache: &'a mut crate::tdp::TableCache,
    paging: &'a super::walk::GuestPaging,
    slots: &'a MemslotSet,
    /// A page reused from the hash has unsync pages below it, which the
    /// guest's flushes may have missed while it was unlinked: sync the root
    /// before the next entry (KVM's `KVM_REQ_MMU_SYNC` from the lookup).
    needs_sync: bool,
}

impl Fetch<'_> {
    /// Build the shadow path for the fault and install its leaf. Runs with
    /// `mmu_lock` held for write.
    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &mut self,
        st: &mut State,
        root: crate::types::Pfn,
        walk: Option<&Walk>,
        f: &PageFault<'_>,
        gva: Gva,
        pte_access: u8,
        z: &mut Zap,
    ) -> Result<RetPf, FaultError> {
        let vm = self.vm;
        let slots = self.slots;
        let mem = &*vm.host.memory;
        let stats = self.stats;
        let ad = vm.config.ad_enabled;
        let Some(root_sp) = st.pages.get(&root) else {
            return Ok(RetPf::Retry);
        };
        let as_id = root_sp.role.as_id;
        let mut sp = root;
        let mut level = Level::L4;
        if let Some(w) = walk {
            loop {
                // The entry read at this level lies in the table `sp`
                // shadows, write-protected since `sp` exists: if it still
                // holds what the walk read, it cannot change unseen.
                let l = level.get() as usize;
                if peek_gpte(vm, slots, w.pte_gpa[l]) != Some(w.ptes[l]) {
                    CounterSet::inc(&stats.map_retries);
                    return Ok(RetPf::Retry);
                }
                if let Some(p) = st.pages.get_mut(&sp) {
                    p.flood = 0;
                }
                if level == w.level {
                    break;
                }
                let pos = (sp, index(gva, level));
                let Some(lower) = level.lower() else { break };
                let child_gfn = w.table_gfn[lower.get() as usize];
                let role = st.pages[&sp].role.child(false, w.acc_through[l]);
                sp = self.child(st, pos, child_gfn, role, z)?;
                level = lower;
            }
        }
        // Below a guest huge page (or with paging off): direct pages down to
        // the largest size the host, the slot and the guest tables inside
        // allow.
        let mut goal = f.goal_level;
        while goal > Level::K4 && !st.huge_allowed(as_id, goal, f.gfn) {
            goal = goal.lower().unwrap_or(Level::K4);
        }
        while level > goal {
            let pos = (sp, index(gva, level));
            let Some(lower) = level.lower() else { break };
            let role = st.pages[&sp].role.child(true, pte_access);
            sp = self.child(st, pos, f.gfn.align_down(level), role, z)?;
            level = lower;
        }
        let pos = (sp, index(gva, level));
        // A store to a shadowed guest table: its 4 KiB pages go unsync, or
        // (shadowed higher up too) the leaf stays read-only and the store is
        // emulated.
        let write_ok = pte_access & ACC_WRITE != 0
            && f.map_writable
            && (level > Level::K4
                || st.try_unsync(&vm.shadow, stats, as_id, f.gfn, vm.config.shadow_unsync));
        let pfn = crate::types::Pfn(f.host_pfn.0 & !(level.pages() - 1));
        let new = Spte::shadow_leaf(
            LeafParams {
                pfn,
                level,
                host_writable: f.map_writable,
                prefetch: false,
                ad_enabled: ad,
                executable: !(vm.tdp.nx_enabled() && level > Level::K4),
            },
            write_ok,
            pte_access & ACC_USER != 0,
            pte_access & ACC_EXEC != 0,
        );
        let old = Spte(entry(mem, pos).load(Ordering::Acquire));
        let rights = |s: Spte| s.0 & !(crate::spte::ept::A | crate::spte::ept::D);
        let result = if old.is_shadow_present() && old.is_leaf(level) && rights(old) == rights(new)
        {
            RetPf::Spurious
        } else {
            st.set_leaf(mem, stats, pos, f.gfn.align_down(level), new, z);
            stats.leaf_mapped(level);
            if new.is_writable() {
                if let Some(slot) = f.slot {
                    crate::dirty_log::mark_page_dirty(slot, f.gfn, f.ring);
                }
            }
            RetPf::Fixed
        };
        if f.write && !new.is_writable() {
            return Ok(RetPf::WriteProtected);
        }
        Ok(result)
    }

    /// The child for (gfn, role) below the entry at `pos`: the one linked
    /// there, else one from the hash, else a new one; linked.
    fn child(
        &mut self,
        st: &mut State,
        pos: super::rmap::SptePos,
        gfn: Gfn,
        role: super::SpRole,
        z: &mut Zap,
    ) -> Result<crate::types::Pfn, FaultError> {
        let vm = self.vm;
        let mem = &*vm.host.memory;
        let stats = self.stats;
        let cur = Spte(entry(mem, pos).load(Ordering::Acquire));
        if cur.is_shadow_present() {
            let level = st.pages[&pos.0].role.level;
            if !cur.is_leaf(level) {
                if let Some(c) = st.pages.get(&cur.pfn()) {
                    if c.gfn == gfn && c.role == role {
                        return Ok(cur.pfn());
                    }
                }
            }
            // A huge leaf where a table goes, or a child for other rights
            // (KVM's validate_direct_spte): out, flushed before use.
            st.zap_entry(mem, stats, pos, z);
        }
        let child = match st.find(gfn, role) {
            Some(c) => {
                if !vm.config.knobs.reuse_skips_sync
                    && st.pages.get(&c).is_some_and(|sp| sp.unsync_children > 0)
                {
                    self.needs_sync = true;
                }
                if st.pages.get(&c).is_some_and(|sp| sp.unsync) {
                    // Reused while unsync: bring its entries up to date (it
                    // stays unsync, its table writable, until the guest
                    // flushes; KVM's lookup does the same).
                    let cx = super::unsync::SyncCx {
                        vm,
                        slots: self.slots,
                        paging: self.paging,
                        stats,
                    };
                    st.refresh_page(&cx, c, z);
                }
                c
            }
            None => {
                let table = self
                    .cache
                    .pop()
                    .ok_or(crate::host::TableMemoryError::OutOfMemory)?;
                st.create(&vm.shadow, mem, stats, gfn, role, table, z)
            }
        };
        // Creating the child write-protected its table; a vCPU may still hold
        // a writable translation of it until flushed, and the next entry is
        // read from that table.
        if z.flush {
            crate::tdp::RemoteFlush::flush_remote_tlbs(vm, &vm.stats);
            z.flush = false;
        }
        st.link(mem, vm.config.ad_enabled, pos, child);
        Ok(child)
    }
}
