//! The shadow-page limit (KVM's `n_max_mmu_pages`,
//! `make_mmu_pages_available`, `kvm_mmu_zap_oldest_mmu_pages` and
//! `KVM_SET_NR_MMU_PAGES`).
//!
//! Shadow pages are never freed just because nothing points at them any
//! more: a table the guest stopped using keeps its page (and, if unsync,
//! stays unsync) until it is reused, zapped by a guest store, or recycled
//! here. Before a fault or a root load may create pages, fewer than
//! [`MIN_FREE_PAGES`] left below the limit makes the oldest pages that are
//! no root go until [`REFILL_PAGES`] are free again. The limit is soft: a
//! fault may go a few pages over it.

use crate::stats::CounterSet;
use crate::sync::Ordering;
use crate::vm::{VmError, VmInner};

use super::{ShadowMmu, State, Zap};

/// The smallest limit `set_nr_mmu_pages` takes (`KVM_MIN_ALLOC_MMU_PAGES`).
pub const MIN_ALLOC_PAGES: u64 = 64;
/// Free pages below the limit under which pages are recycled
/// (`KVM_MIN_FREE_MMU_PAGES`).
pub const MIN_FREE_PAGES: u64 = 5;
/// Free pages a recycling pass makes room for (`KVM_REFILL_PAGES`).
pub const REFILL_PAGES: u64 = 25;
/// The default limit is the memslots' pages divided by this (2 %,
/// `KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO`).
pub const MEMSLOT_PAGES_PER_MMU_PAGE: u64 = 50;

impl ShadowMmu {
    /// The limit in force: the one set, else 2 % of the pages of every
    /// memslot, at least [`MIN_ALLOC_PAGES`].
    pub(crate) fn limit(&self, vm: &VmInner) -> u64 {
        let set = self.max_pages.load(Ordering::Relaxed);
        if set > 0 {
            return set;
        }
        let pages: u64 = vm.memslots.iter().map(|s| s.load().pages()).sum();
        (pages / MEMSLOT_PAGES_PER_MMU_PAGE).max(MIN_ALLOC_PAGES)
    }
}

impl State {
    /// Make room before pages may be created (KVM's
    /// `make_mmu_pages_available`). Callers hold `mmu_lock` for write.
    pub(crate) fn make_pages_available(
        &mut self,
        vm: &VmInner,
        stats: &CounterSet,
        z: &mut Zap,
    ) -> Result<(), u64> {
        let limit = vm.shadow.limit(vm);
        let used = self.pages.len() as u64;
        if used + MIN_FREE_PAGES <= limit {
            return Ok(());
        }
        self.zap_oldest(vm, stats, limit.saturating_sub(REFILL_PAGES), z);
        if self.pages.len() as u64 >= limit {
            return Err(limit);
        }
        Ok(())
    }

    /// Zap the oldest pages that are no root until at most `goal` pages are
    /// left (KVM's `kvm_mmu_zap_oldest_mmu_pages`); how many went.
    pub(crate) fn zap_oldest(
        &mut self,
        vm: &VmInner,
        stats: &CounterSet,
        goal: u64,
        z: &mut Zap,
    ) -> u64 {
        let mem = &*vm.host.memory;
        let before = self.pages.len() as u64;
        while self.pages.len() as u64 > goal {
            let victim = self
                .active
                .values()
                .copied()
                .find(|p| self.pages.get(p).is_some_and(|sp| sp.root_count == 0));
            let Some(pfn) = victim else { break };
            self.zap_page(&vm.shadow, mem, stats, pfn, z);
        }
        let n = before.saturating_sub(self.pages.len() as u64);
        CounterSet::add(&stats.shadow_recycled, n);
        n
    }
}

impl crate::vm::Vm {
    /// Set the shadow MMU's page limit (`KVM_SET_NR_MMU_PAGES`): at least
    /// [`MIN_ALLOC_PAGES`] (else `InvalidNrMmuPages`, nothing changed). Pages
    /// over a lower limit are recycled at once. On a TDP VM the value is
    /// only recorded, as KVM does.
    pub fn set_nr_mmu_pages(&self, pages: u64) -> Result<(), VmError> {
        if pages < MIN_ALLOC_PAGES {
            return Err(VmError::InvalidNrMmuPages {
                pages,
                min: MIN_ALLOC_PAGES,
            });
        }
        let vm = &*self.inner;
        vm.shadow.max_pages.store(pages, Ordering::Relaxed);
        if vm.config.mmu != crate::config::MmuKind::Shadow {
            return Ok(());
        }
        let _w = vm.mmu_lock.write(&vm.stats.lock);
        let mut z = Zap::default();
        vm.shadow.lock().zap_oldest(vm, &vm.stats, pages, &mut z);
        vm.shadow.commit(vm, z);
        Ok(())
    }

    /// The shadow MMU's page limit in force (the one set, else the default
    /// from the memslots' size).
    pub fn nr_mmu_pages(&self) -> u64 {
        self.inner.shadow.limit(&self.inner)
    }
}
