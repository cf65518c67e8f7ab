//! Emulated stores to shadowed guest tables (KVM's emulator write followed
//! by `kvm_mmu_track_write`).
//!
//! Every guest table the shadow MMU shadows is write-protected, so a guest
//! store to one exits ([`super::fault::GvaFault::Emulate`] with `mmio:
//! false`). The store is carried out through the host's mapping, logged for
//! dirty logging, and the shadow entries it made stale are zapped (never
//! updated in place: the next fault rebuilds them from the new entry).
//!
//! Write flooding: a page the guest keeps writing without any fault walking
//! through it in between is probably no page table any more (a process
//! exited and the kernel reuses or clears the page). The third such write
//! zaps the whole page, which stops the write protection. It applies to
//! upper-level pages only: a 4 KiB table goes unsync at the first store
//! instead (see [`super::unsync`]), so its stores are emulated only while
//! the gfn is shadowed higher up too. With `VmConfig::shadow_unsync` off,
//! every page counts.

use crate::fault::FaultError;
use crate::stats::CounterSet;
use crate::sync::{fence, Ordering};
use crate::types::Gpa;
use crate::vcpu::VcpuMmu;

use super::walk::gpte;
use super::Zap;

/// Emulated writes to a page since a fault last walked through it, at which
/// the page is zapped.
pub const FLOOD_WRITES: u8 = 3;

impl VcpuMmu {
    /// Carry out a guest store of the 8 bytes `value` at `gpa` that the MMU
    /// intercepted (a write to a shadowed guest table): store it through
    /// the host's mapping, log it, and zap the shadow entries it makes
    /// stale. A misaligned `gpa` (not a whole guest entry) zaps every
    /// shadow page of the table, as upstream does for writes it cannot map
    /// to one entry. A store outside memory (MMIO) or to a read-only slot
    /// is dropped.
    pub fn emulate_write(&mut self, gpa: Gpa, value: u64) -> Result<(), FaultError> {
        let vm = self.vm.clone();
        let stats = &self.shared.stats;
        let as_id = self.role.as_id();
        let _srcu = self.srcu.read_lock();
        let slots = vm.memslots[as_id as usize].load();
        let gfn = gpa.gfn();
        let Some(slot) = slots.lookup(gfn).filter(|s| !s.is_invalid()) else {
            return Ok(());
        };
        if slot.is_readonly() {
            return Ok(());
        }
        let aligned = gpa.0.is_multiple_of(8);
        let hva = slot.gfn_to_hva(gfn).add(gpa.0 & 0xff8);
        if aligned {
            vm.host
                .primary
                .write_u64(hva, value)
                .map_err(|cause| FaultError::Host { gpa, hva, cause })?;
        }
        crate::dirty_log::mark_page_dirty(slot, gfn, self.shared.ring.as_ref());
        // Pairs with the fence after a page is counted: either this sees a
        // page created before the store, or that page's fault re-reads the
        // entry after the store (KVM's smp_mb in kvm_mmu_track_write).
        fence(Ordering::SeqCst);
        if vm.shadow.indirect_pages.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let _w = vm.mmu_lock.write(&stats.lock);
        let mem = &*vm.host.memory;
        let mut z = Zap::default();
        {
            let mut st = vm.shadow.lock();
            let pages = st.pages_at(as_id, gfn);
            if !pages.is_empty() {
                CounterSet::inc(&stats.shadow_pte_writes);
            }
            let idx = ((gpa.0 & 0xfff) / 8) as u16;
            for pfn in pages {
                let Some(sp) = st.pages.get_mut(&pfn) else {
                    continue;
                };
                let level = sp.role.level;
                if level > crate::types::Level::K4 || !vm.config.shadow_unsync {
                    sp.flood = sp.flood.saturating_add(1);
                }
                if !aligned || sp.flood >= FLOOD_WRITES {
                    CounterSet::inc(&stats.shadow_flooded);
                    st.zap_page(&vm.shadow, mem, stats, pfn, &mut z);
                    continue;
                }
                if level > crate::types::Level::K4 && value & gpte::P != 0 {
                    CounterSet::inc(&stats.shadow_pde_zapped);
                }
                st.zap_entry(mem, stats, (pfn, idx), &mut z);
            }
        }
        vm.shadow.commit(&vm, z);
        Ok(())
    }
}
