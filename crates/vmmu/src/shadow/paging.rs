//! A vCPU's side of shadow paging: the guest paging state the MMU follows
//! (CR0/CR4/EFER bits and CR3, which exit to it), and the shadow root built
//! for it.
//!
//! A root is the shadow page of the guest's top-level table for (CR3, role),
//! shared by every vCPU with the same CR3 and mode, held by a count. Each
//! vCPU keeps its last three roots besides the current one (KVM's
//! `prev_roots`, most recent first): a CR3 switch to one of them is a hit
//! that loads nothing (`fast_pgd_switch`); on a miss the least recent falls
//! out and the next entry looks the new root up in the hash, building it if
//! needed. A zapped root goes invalid; "free obsolete roots" drops only the
//! slots naming invalid roots, the current one and each cached one judged
//! on its own (the 2022 fix), unless `VmConfig::legacy_root_reload` asks for
//! the behaviour before it (every slot dropped).

use crate::stats::CounterSet;
use crate::sync::{Arc, AtomicBool, Ordering};
use crate::types::{Gfn, Pfn};
use crate::vcpu::VcpuMmu;
use crate::vm::VmError;

use super::walk::{GuestPaging, ACC_ALL};
use super::{SpRole, Zap};

/// A vCPU's reference to a shadow root.
#[derive(Debug, Clone)]
pub(crate) struct ShadowRoot {
    pub(crate) pfn: Pfn,
    pub(crate) id: u64,
    pub(crate) invalid: Arc<AtomicBool>,
    /// The CR3 (PCID included) and role it was loaded for.
    pub(crate) pgd: u64,
    pub(crate) role: SpRole,
}

impl ShadowRoot {
    /// KVM's `is_root_usable`: the same CR3 (any, for a direct root) and
    /// role, and not zapped.
    fn usable(&self, pgd: u64, role: SpRole) -> bool {
        (role.direct || self.pgd == pgd) && self.role == role && !self.is_invalid()
    }

    fn is_invalid(&self) -> bool {
        self.invalid.load(Ordering::Acquire)
    }
}

/// A vCPU's shadow-paging state.
#[derive(Debug, Default)]
pub(crate) struct ShadowVcpu {
    pub(crate) paging: GuestPaging,
    pub(crate) root: Option<ShadowRoot>,
    /// Previous roots, most recently used first.
    pub(crate) prev: [Option<ShadowRoot>; crate::vcpu::NUM_PREV_ROOTS],
    /// The guest flushed the current PCID: sync the current root before the
    /// next entry (KVM's `KVM_REQ_MMU_SYNC`).
    pub(crate) sync_pending: bool,
}

/// CR3 bit 63 (with CR4.PCIDE): keep the PCID's translations.
pub const CR3_NOFLUSH: u64 = 1 << 63;

impl VcpuMmu {
    /// The guest paging state the MMU follows.
    pub fn guest_paging(&self) -> GuestPaging {
        self.shadow.paging
    }

    /// The guest changed CR0, CR4 or EFER (or CR3 with them): on a shadow
    /// VM a change of the bits the shadow pages depend on drops the root, so
    /// the next entry builds or finds the one for the new mode (KVM's
    /// `kvm_mmu_reset_context`). Refused, changing nothing, if CR3 has bits
    /// set above the guest's physical address width or bit 63 set. On a TDP
    /// VM the state is only recorded.
    pub fn set_guest_paging(&mut self, p: GuestPaging) -> Result<(), VmError> {
        // Bits from the physical address width up (bit 63 included: the
        // no-flush bit is an instruction's, not part of CR3).
        let reserved = !0u64 << self.vm.config.maxphyaddr;
        if p.cr3 & reserved != 0 {
            return Err(VmError::InvalidCr3 { cr3: p.cr3 });
        }
        let old = self.shadow.paging;
        self.shadow.paging = p;
        if self.vm.config.mmu != crate::config::MmuKind::Shadow {
            return Ok(());
        }
        let role = self.shadow_role(&p);
        if self.shadow_role(&old) != role {
            // Another mode: no root of the old one fits (KVM unloads them all).
            self.free_shadow_roots(|_| true);
        } else if pgd(&old) != pgd(&p) {
            self.fast_pgd_switch(pgd(&p), role);
        }
        Ok(())
    }

    /// Switch to the root for `pgd` from the cache if it is there (KVM's
    /// `fast_pgd_switch`). The current root moves to the front of the cache;
    /// on a miss the least recently used root falls out and the current slot
    /// stays empty, so the next entry loads one.
    fn fast_pgd_switch(&mut self, pgd: u64, role: SpRole) {
        let sh = &mut self.shadow;
        let hit = match sh.root.as_ref() {
            Some(r) if r.usable(pgd, role) => true,
            Some(_) => {
                // cached_root_find_and_keep_current: swap through the cache,
                // testing after each swap.
                let mut hit = false;
                for i in 0..sh.prev.len() {
                    std::mem::swap(&mut sh.root, &mut sh.prev[i]);
                    if sh.root.as_ref().is_some_and(|r| r.usable(pgd, role)) {
                        hit = true;
                        break;
                    }
                }
                hit
            }
            None => {
                // cached_root_find_without_current: the first usable one
                // becomes current, those after it move up.
                match sh
                    .prev
                    .iter()
                    .position(|r| r.as_ref().is_some_and(|r| r.usable(pgd, role)))
                {
                    Some(i) => {
                        sh.root = sh.prev[i].take();
                        sh.prev[i..].rotate_left(1);
                        true
                    }
                    None => false,
                }
            }
        };
        let stats = &self.shared.stats;
        if hit {
            CounterSet::inc(&stats.prev_root_hits);
        } else {
            CounterSet::inc(&stats.prev_root_misses);
            // The least recently used root ended up current: it goes.
            self.put_shadow_root();
        }
    }

    /// The guest loaded CR3 (KVM's `kvm_set_cr3`): switch to the root for
    /// the new table (from the cache if it is there); then, unless CR4.PCIDE
    /// is on and `value` carries the no-flush bit, the load flushes the new
    /// PCID, which resyncs the current root and, with PCIDs, drops the cached
    /// roots of that PCID. Refused like [`VcpuMmu::set_guest_paging`].
    pub fn load_cr3(&mut self, value: u64) -> Result<(), VmError> {
        let noflush = self.shadow.paging.pcide && value & CR3_NOFLUSH != 0;
        let p = GuestPaging {
            cr3: value & !CR3_NOFLUSH,
            ..self.shadow.paging
        };
        self.set_guest_paging(p)?;
        if !noflush && self.vm.config.mmu == crate::config::MmuKind::Shadow {
            self.invalidate_pcid(super::unsync::pcid_of(&p, p.cr3));
        }
        Ok(())
    }

    /// The role of the root for paging state `p` in the current address space.
    pub(crate) fn shadow_role(&self, p: &GuestPaging) -> SpRole {
        let paging = p.paging;
        SpRole {
            level: crate::types::Level::L4,
            direct: !paging,
            access: ACC_ALL,
            cr0_wp: paging && p.wp,
            smep_andnot_wp: paging && p.smep && !p.wp,
            smap_andnot_wp: paging && p.smap && !p.wp,
            as_id: self.role.as_id(),
        }
    }

    /// Find or build the root for the current paging state and hold it.
    pub(crate) fn load_shadow_root(&mut self) -> Result<(), VmError> {
        let vm = self.vm.clone();
        let p = self.shadow.paging;
        let role = self.shadow_role(&p);
        let gfn = root_gfn(&p);
        self.cache.topup(&vm.tdp, 1)?;
        let stats = &self.shared.stats;
        CounterSet::inc(&stats.shadow_root_loads);
        CounterSet::inc(&stats.root_loads);
        let _w = vm.mmu_lock.write(&stats.lock);
        let mut z = Zap::default();
        let root = {
            let mut st = vm.shadow.lock();
            let pfn = match st.find(gfn, role) {
                Some(pfn) => pfn,
                None => {
                    if let Err(limit) = st.make_pages_available(&vm, stats, &mut z) {
                        drop(st);
                        vm.shadow.commit(&vm, z);
                        return Err(VmError::NoShadowPages { limit });
                    }
                    let table = self
                        .cache
                        .pop()
                        .ok_or(crate::host::TableMemoryError::OutOfMemory)?;
                    st.create(
                        &vm.shadow,
                        &*vm.host.memory,
                        stats,
                        gfn,
                        role,
                        table,
                        &mut z,
                    )
                }
            };
            let (id, invalid) = st
                .get_root(pfn)
                .unwrap_or_else(|| unreachable!("the page was just found or made"));
            ShadowRoot {
                pfn,
                id,
                invalid,
                pgd: pgd(&p),
                role,
            }
        };
        vm.shadow.commit(&vm, z);
        if let Some(old) = self.shadow.root.replace(root) {
            self.release_root(old);
        }
        Ok(())
    }

    /// Drop the current root (it stays as an ordinary shadow page unless it
    /// was zapped).
    pub(crate) fn put_shadow_root(&mut self) {
        if let Some(r) = self.shadow.root.take() {
            self.release_root(r);
        }
    }

    /// Handle "free obsolete roots": drop each slot (current and cached,
    /// each judged on its own) whose root was zapped; keep the others. With
    /// `legacy_root_reload` (before the 2022 fix), drop every slot.
    pub(crate) fn free_obsolete_shadow_roots(&mut self) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        if self.vm.config.legacy_root_reload {
            let n = self.shadow_root_slots();
            CounterSet::add(&stats.roots_reloaded_legacy, n);
            self.free_shadow_roots(|_| true);
            return;
        }
        let dropped = if self.vm.config.knobs.free_obsolete_tests_current_root {
            let current = self.shadow.root.as_ref().is_some_and(|r| r.is_invalid());
            self.free_shadow_roots(|_| current)
        } else {
            self.free_shadow_roots(|r| r.is_invalid())
        };
        CounterSet::add(&stats.obsolete_roots_dropped, dropped);
        let kept = self.shadow.prev.iter().flatten().count() as u64;
        CounterSet::add(&stats.prev_roots_kept, kept);
    }

    /// Slots holding a root (current and cached).
    fn shadow_root_slots(&self) -> u64 {
        (self.shadow.root.is_some() as u64) + self.shadow.prev.iter().flatten().count() as u64
    }

    /// Drop the slots whose root `drop` picks, under one hold of `mmu_lock`;
    /// cached roots after a dropped one move up. Returns how many went.
    pub(crate) fn free_shadow_roots(&mut self, drop: impl Fn(&ShadowRoot) -> bool) -> u64 {
        self.free_root_slots(true, drop)
    }

    /// Drop the cached roots `drop` picks (the current one stays).
    pub(crate) fn free_cached_roots(&mut self, drop: impl Fn(&ShadowRoot) -> bool) -> u64 {
        self.free_root_slots(false, drop)
    }

    fn free_root_slots(&mut self, current: bool, drop: impl Fn(&ShadowRoot) -> bool) -> u64 {
        let sh = &mut self.shadow;
        let mut gone: Vec<ShadowRoot> = Vec::new();
        if current {
            if let Some(r) = sh.root.take_if(|r| drop(r)) {
                gone.push(r);
            }
        }
        for slot in sh.prev.iter_mut() {
            if let Some(r) = slot.take_if(|r| drop(r)) {
                gone.push(r);
            }
        }
        // Keep the cache dense, most recent first.
        let kept: Vec<ShadowRoot> = sh.prev.iter_mut().filter_map(Option::take).collect();
        let mut kept = kept.into_iter();
        for slot in sh.prev.iter_mut() {
            *slot = kept.next();
        }
        let n = gone.len() as u64;
        if n > 0 {
            let vm = &*self.vm;
            let _w = vm.mmu_lock.write(&self.shared.stats.lock);
            let mut z = Zap::default();
            {
                let mut st = vm.shadow.lock();
                for r in gone {
                    st.put_root(r.pfn, &mut z);
                }
            }
            vm.shadow.commit(vm, z);
        }
        n
    }

    fn release_root(&self, r: ShadowRoot) {
        let vm = &*self.vm;
        let _w = vm.mmu_lock.write(&self.shared.stats.lock);
        let mut z = Zap::default();
        vm.shadow.lock().put_root(r.pfn, &mut z);
        vm.shadow.commit(vm, z);
    }
}

/// The CR3 a root is cached under (0 with paging off: one direct root).
fn pgd(p: &GuestPaging) -> u64 {
    if p.paging {
        p.cr3
    } else {
        0
    }
}

/// The gfn a root for `p` shadows (0 for the direct root of paging off).
fn root_gfn(p: &GuestPaging) -> Gfn {
    if p.paging {
        p.root_gfn()
    } else {
        Gfn(0)
    }
}
