//! A vCPU's side of shadow paging: the guest paging state the MMU follows
//! (CR0/CR4/EFER bits and CR3, which exit to it), and the shadow root built
//! for it.
//!
//! A root is the shadow page of the guest's top-level table for (CR3, role),
//! shared by every vCPU with the same CR3 and mode, held by a count. This
//! step has no previous-roots cache: a CR3 switch drops the current root
//! (it stays as an ordinary page while no vCPU holds it) and the next entry
//! looks its successor up in the hash, building it if needed.

use crate::stats::CounterSet;
use crate::sync::{Arc, AtomicBool, Ordering};
use crate::types::{Gfn, Gva, Pfn};
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
}

/// A vCPU's shadow-paging state.
#[derive(Debug, Default)]
pub(crate) struct ShadowVcpu {
    pub(crate) paging: GuestPaging,
    pub(crate) root: Option<ShadowRoot>,
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
        if self.vm.config.mmu == crate::config::MmuKind::Shadow
            && (self.shadow_role(&old) != self.shadow_role(&p) || root_gfn(&old) != root_gfn(&p))
        {
            self.put_shadow_root();
        }
        Ok(())
    }

    /// The guest loaded CR3 (`value` may carry the no-flush bit, which the
    /// MMU has nothing to keep for without unsync pages). A new table drops
    /// the current root; the next entry loads the new one.
    pub fn load_cr3(&mut self, value: u64) -> Result<(), VmError> {
        let p = GuestPaging {
            cr3: value & !CR3_NOFLUSH,
            ..self.shadow.paging
        };
        self.set_guest_paging(p)
    }

    /// The guest ran INVLPG (or INVPCID for one address). Shadow pages are
    /// never out of sync with the guest's tables in this step (every
    /// shadowed table is write-protected), so there is nothing to resync:
    /// the processor's own flush of the address is all it takes.
    pub fn invlpg(&mut self, gva: Gva) {
        let _ = gva;
        if self.vm.config.mmu == crate::config::MmuKind::Shadow {
            CounterSet::inc(&self.shared.stats.shadow_invlpg);
        }
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
            ShadowRoot { pfn, id, invalid }
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

    /// Drop the current root if it is obsolete (zapped while held).
    pub(crate) fn free_obsolete_shadow_root(&mut self) {
        if self
            .shadow
            .root
            .as_ref()
            .is_some_and(|r| r.invalid.load(Ordering::Acquire))
        {
            CounterSet::inc(&self.shared.stats.obsolete_roots_dropped);
            self.put_shadow_root();
        }
    }

    fn release_root(&self, r: ShadowRoot) {
        let vm = &*self.vm;
        let _w = vm.mmu_lock.write(&self.shared.stats.lock);
        let mut z = Zap::default();
        vm.shadow.lock().put_root(r.pfn, &mut z);
        vm.shadow.commit(vm, z);
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
