//! The VMM's side of private memory: the guest_memfd files behind memslots,
//! and conversions between private and shared.
//!
//! A conversion is what a VMM does for a guest's `KVM_HC_MAP_GPA_RANGE` or a
//! memory-fault exit: set the memory attributes of the range (the MMU zaps what
//! it mapped there), then discard the side the range no longer uses so its
//! memory goes back to the host — the shared pages with `MADV_DONTNEED`, the
//! private ones with a punch-hole in the guest_memfd (QEMU's order). Either way
//! the range reads as zeros on its new side.

use std::sync::Arc;

use parking_lot::RwLock;
use vmmu::gmem::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE};
use vmmu::{
    AttributeError, GmemError, Gpa, GuestMemfd, Hva, HvaRange, MemslotError, UserMemoryRegion, Vm,
    MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE,
};

use crate::guest::Discarded;
use crate::primary_mmu::HostMmu;
use crate::sync::{AtomicU64, Ordering};

/// `KVM_MEM_GUEST_MEMFD`.
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;

/// One memslot whose private memory comes from a guest_memfd.
#[derive(Debug, Clone)]
pub struct GmemSlot {
    /// The slot as created.
    pub region: UserMemoryRegion,
    /// Its file (offset 0 backs the slot's first page).
    pub file: Arc<GuestMemfd>,
}

impl GmemSlot {
    fn contains(&self, gpa: u64) -> bool {
        let r = &self.region;
        gpa >= r.guest_phys_addr && gpa - r.guest_phys_addr < r.memory_size
    }
}

/// Why a conversion failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The attributes call refused the range.
    #[error(transparent)]
    Attributes(#[from] AttributeError),
    /// The punch-hole failed.
    #[error(transparent)]
    Gmem(#[from] GmemError),
}

impl ConvertError {
    /// The errno the VMM would see.
    pub fn errno(&self) -> i32 {
        match self {
            ConvertError::Attributes(e) => e.errno(),
            ConvertError::Gmem(e) => e.errno(),
        }
    }
}

/// Why a guest_memfd slot could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GmemSlotError {
    /// Creating the file.
    #[error(transparent)]
    Gmem(#[from] GmemError),
    /// Binding it.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
}

/// Conversions done, by direction, and what they discarded.
#[derive(Debug, Default)]
pub struct ConversionCounters {
    /// Conversions to private.
    pub to_private: AtomicU64,
    /// Conversions to shared.
    pub to_shared: AtomicU64,
    /// Shared pages discarded (`MADV_DONTNEED`).
    pub shared_pages_discarded: AtomicU64,
    /// Private pages punched out of a guest_memfd.
    pub private_pages_punched: AtomicU64,
    /// Conversions refused.
    pub failed: AtomicU64,
}

/// The VMM: guest_memfd bindings and conversions. Shared by the vCPU threads
/// (which convert on their own exits) and the host threads.
#[derive(Debug)]
pub struct Vmm {
    vm: Vm,
    host: Arc<HostMmu>,
    slots: RwLock<Vec<GmemSlot>>,
    /// Pages a conversion discarded, marked before and after (for guest
    /// programs that check contents while conversions run beside them).
    discarded: RwLock<Option<Arc<Discarded>>>,
    /// What conversions did.
    pub counters: ConversionCounters,
}

impl Vmm {
    pub(crate) fn new(vm: Vm, host: Arc<HostMmu>) -> Vmm {
        Vmm {
            vm,
            host,
            slots: RwLock::new(Vec::new()),
            discarded: RwLock::new(None),
            counters: ConversionCounters::default(),
        }
    }

    /// Create a guest_memfd the size of `region` and the memslot bound to it
    /// (`KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`, offset 0). The
    /// shared side stays at `region.userspace_addr`.
    pub fn create_gmem_slot(
        &self,
        region: UserMemoryRegion,
    ) -> Result<Arc<GuestMemfd>, GmemSlotError> {
        let file = Arc::new(self.vm.create_guest_memfd(region.memory_size, 0)?);
        let region = UserMemoryRegion {
            flags: region.flags | KVM_MEM_GUEST_MEMFD,
            ..region
        };
        self.vm.set_user_memory_region2(region, Some(&file), 0)?;
        let mut slots = self.slots.write();
        slots.retain(|s| s.region.slot != region.slot);
        slots.push(GmemSlot {
            region,
            file: file.clone(),
        });
        Ok(file)
    }

    /// Create `region`'s slot again after a delete: bound to the file it had if
    /// it was a guest_memfd slot (its private pages are still in the file), as
    /// a plain slot otherwise.
    pub fn recreate_slot(&self, region: UserMemoryRegion) -> Result<(), MemslotError> {
        let file = self
            .slots
            .read()
            .iter()
            .find(|s| s.region.slot == region.slot)
            .map(|s| s.file.clone());
        match file {
            Some(file) => self.vm.set_user_memory_region2(
                UserMemoryRegion {
                    flags: region.flags | KVM_MEM_GUEST_MEMFD,
                    ..region
                },
                Some(&file),
                0,
            ),
            None => self.vm.set_user_memory_region(region),
        }
    }

    /// Punch `[gpa, gpa + len)` out of the guest_memfd slots it covers.
    pub fn punch_hole(&self, gpa: u64, len: u64) -> Result<(), GmemError> {
        let end = gpa + len;
        for s in self.slots.read().iter() {
            let r = &s.region;
            let (lo, hi) = (
                gpa.max(r.guest_phys_addr),
                end.min(r.guest_phys_addr + r.memory_size),
            );
            if lo < hi {
                s.file.fallocate(
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    lo - r.guest_phys_addr,
                    hi - lo,
                )?;
            }
        }
        Ok(())
    }

    /// Forget a slot's file (after the slot was deleted); the file closes when
    /// its last holder drops it.
    pub fn forget_gmem_slot(&self, slot: u32) -> Option<GmemSlot> {
        let mut slots = self.slots.write();
        let i = slots.iter().position(|s| s.region.slot == slot)?;
        Some(slots.remove(i))
    }

    /// The guest_memfd slots.
    pub fn gmem_slots(&self) -> Vec<GmemSlot> {
        self.slots.read().clone()
    }

    /// Mark pages discarded by conversions in `d` (before and after each one).
    pub fn set_discarded(&self, d: Option<Arc<Discarded>>) {
        *self.discarded.write() = d;
    }

    /// Convert `[gpa, gpa + size)`: attributes first, then discard the side the
    /// range leaves (only where a guest_memfd slot covers it: elsewhere there
    /// is no private side and the attribute change is all there is).
    pub fn convert(&self, gpa: u64, size: u64, private: bool) -> Result<(), ConvertError> {
        let attrs = if private { MEMORY_ATTRIBUTE_PRIVATE } else { 0 };
        let discarded = self.discarded.read().clone();
        let mark = |d: &Option<Arc<Discarded>>| {
            if let Some(d) = d {
                d.mark(Gpa(gpa), size / PAGE_SIZE);
            }
        };
        mark(&discarded);
        if let Err(e) = self.vm.set_memory_attributes(gpa, size, attrs, 0) {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        let counter = if private {
            &self.counters.to_private
        } else {
            &self.counters.to_shared
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let end = gpa + size;
        for s in self.slots.read().iter() {
            let r = &s.region;
            let (lo, hi) = (
                gpa.max(r.guest_phys_addr),
                end.min(r.guest_phys_addr + r.memory_size),
            );
            if lo >= hi || !s.contains(lo) {
                continue;
            }
            let off = lo - r.guest_phys_addr;
            if private {
                let hva = r.userspace_addr + off;
                self.host
                    .madvise_dontneed(HvaRange::new(Hva(hva), Hva(hva + (hi - lo))));
                self.counters
                    .shared_pages_discarded
                    .fetch_add((hi - lo) / PAGE_SIZE, Ordering::Relaxed);
            } else {
                s.file
                    .fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, hi - lo)?;
                self.counters
                    .private_pages_punched
                    .fetch_add((hi - lo) / PAGE_SIZE, Ordering::Relaxed);
            }
        }
        mark(&discarded);
        Ok(())
    }

    /// Whether `[gpa, gpa + size)` is not yet entirely on the side asked for: a
    /// memory-fault exit for a range already there came from something a
    /// conversion cannot fix (its memslot is gone, or a conversion raced the
    /// fault), and the VMM runs the vCPU again instead.
    pub fn needs_conversion(&self, gpa: u64, size: u64, private: bool) -> bool {
        let want = if private { MEMORY_ATTRIBUTE_PRIVATE } else { 0 };
        (0..size / PAGE_SIZE)
            .any(|i| self.vm.memory_attributes(Gpa(gpa + i * PAGE_SIZE).gfn()) != want)
    }

    /// Drop every file reference the VMM holds.
    pub(crate) fn clear(&self) {
        self.slots.write().clear();
    }
}
