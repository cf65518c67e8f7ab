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
    /// Its file.
    pub file: Arc<GuestMemfd>,
    /// The file offset that backs the slot's first page.
    pub offset: u64,
}

impl GmemSlot {
    /// The part of `[gpa, end)` the slot covers, as (gpa, file offset, bytes).
    fn clip(&self, gpa: u64, end: u64) -> Option<(u64, u64, u64)> {
        let r = &self.region;
        let (lo, hi) = (
            gpa.max(r.guest_phys_addr),
            end.min(r.guest_phys_addr + r.memory_size),
        );
        (lo < hi).then(|| (lo, self.offset + (lo - r.guest_phys_addr), hi - lo))
    }
}

/// For a conversion at a gpa, the window of guest memory it may not touch
/// outside its own range (a vCPU's own chunk, when each vCPU converts only
/// its own): `(first gpa, end gpa)`.
pub type AuditWindow = Arc<dyn Fn(u64) -> (u64, u64) + Send + Sync>;

/// What the audit of conversions found.
#[derive(Debug, Default)]
pub struct AuditCounters {
    /// Attribute changes audited.
    pub audited: AtomicU64,
    /// Leaves the changes removed that intersect their range (huge leaves
    /// containing it included).
    pub zapped_in_range: AtomicU64,
    /// Leaves the changes removed outside their range, inside the window: a bug.
    pub zapped_outside: AtomicU64,
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
    /// Time spent in `set_memory_attributes` (the MMU's part of conversions).
    pub attributes_ns: AtomicU64,
}

/// The VMM: guest_memfd bindings and conversions. Shared by the vCPU threads
/// (which convert on their own exits) and the host threads.
pub struct Vmm {
    vm: Vm,
    host: Arc<HostMmu>,
    slots: RwLock<Vec<GmemSlot>>,
    /// Pages a conversion discarded, marked before and after (for guest
    /// programs that check contents while conversions run beside them).
    discarded: RwLock<Option<Arc<Discarded>>>,
    audit: RwLock<Option<AuditWindow>>,
    /// Conversions run one at a time, as a VMM runs them under its big lock
    /// (QEMU's BQL): each ends with the side it left discarded, so the side a
    /// conversion moves a range to is empty. Two interleaved conversions of one
    /// range break that: a vCPU's conversion to private could finish while a
    /// host conversion to shared had set the attributes but not yet punched the
    /// private pages, and the guest found its old private data on the "fresh"
    /// side (the 10-minute SNP soak found it).
    convert_lock: parking_lot::Mutex<()>,
    /// What conversions did.
    pub counters: ConversionCounters,
    /// What the audit of conversions found.
    pub audit_counters: AuditCounters,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("slots", &self.slots.read().len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    pub(crate) fn new(vm: Vm, host: Arc<HostMmu>) -> Vmm {
        Vmm {
            vm,
            host,
            slots: RwLock::new(Vec::new()),
            discarded: RwLock::new(None),
            audit: RwLock::new(None),
            convert_lock: parking_lot::Mutex::new(()),
            counters: ConversionCounters::default(),
            audit_counters: AuditCounters::default(),
        }
    }

    /// Create a guest_memfd the size of `region` and the memslot bound to it
    /// (`KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`, offset 0). The
    /// shared side stays at `region.userspace_addr`.
    pub fn create_gmem_slot(
        &self,
        region: UserMemoryRegion,
    ) -> Result<Arc<GuestMemfd>, GmemSlotError> {
        self.create_gmem_slot_with(region, 0)
    }

    /// As [`Vmm::create_gmem_slot`], the file created with `flags`
    /// (`GUEST_MEMFD_FLAG_MMAP` makes the slot gmem-only: its shared memory is
    /// the file's, reached by the host through [`Vmm::mmap_read_u64`] and
    /// [`Vmm::mmap_write_u64`]).
    pub fn create_gmem_slot_with(
        &self,
        region: UserMemoryRegion,
        flags: u64,
    ) -> Result<Arc<GuestMemfd>, GmemSlotError> {
        let file = Arc::new(self.vm.create_guest_memfd(region.memory_size, flags)?);
        self.bind_gmem_slot(region, file.clone(), 0)?;
        Ok(file)
    }

    /// The host reads the word at `offset` of `file` through its shared
    /// mapping of it (`mmap` of a guest_memfd created with MMAP): the page is
    /// allocated zeroed on first touch; SIGBUS (an error) where the file's
    /// memory is not shared or `offset` is past its end. The page is not
    /// pinned across the read: callers do not race punch-holes of it.
    pub fn mmap_read_u64(&self, file: &GuestMemfd, offset: u64) -> Result<u64, GmemError> {
        Ok(self.mmap_word(file, offset)?.load(Ordering::Relaxed))
    }

    /// The host writes the word at `offset` of `file` through its mapping.
    pub fn mmap_write_u64(&self, file: &GuestMemfd, offset: u64, v: u64) -> Result<(), GmemError> {
        self.mmap_word(file, offset)?.store(v, Ordering::Relaxed);
        Ok(())
    }

    /// The word at `offset` of `file`, reached through the host's mapping.
    fn mmap_word(
        &self,
        file: &GuestMemfd,
        offset: u64,
    ) -> Result<&std::sync::atomic::AtomicU64, GmemError> {
        let pfn = file.mmap_fault(offset & !(PAGE_SIZE - 1))?;
        Ok(&self.host.memory().page(pfn)[((offset & (PAGE_SIZE - 1)) / 8) as usize])
    }

    /// Create the memslot `region` bound to `file` at `offset`.
    pub fn bind_gmem_slot(
        &self,
        region: UserMemoryRegion,
        file: Arc<GuestMemfd>,
        offset: u64,
    ) -> Result<(), MemslotError> {
        let region = UserMemoryRegion {
            flags: region.flags | KVM_MEM_GUEST_MEMFD,
            ..region
        };
        self.vm
            .set_user_memory_region2(region, Some(&file), offset)?;
        let mut slots = self.slots.write();
        slots.retain(|s| s.region.slot != region.slot);
        slots.push(GmemSlot {
            region,
            file,
            offset,
        });
        Ok(())
    }

    /// Audit every attribute change from now on: the leaves it removes from
    /// `window(gpa)` outside its range are counted (they must be none).
    pub fn set_audit(&self, window: Option<AuditWindow>) {
        *self.audit.write() = window;
    }

    /// Present leaves (gfn, level, frame) of address space 0 in `[lo, hi)`.
    fn leaves_in(&self, lo: u64, hi: u64) -> std::collections::HashSet<(u64, u8, u64)> {
        let (lo, hi) = (lo / PAGE_SIZE, hi / PAGE_SIZE);
        self.vm
            .mappings(0)
            .into_iter()
            .filter(|(g, l, s)| s.is_shadow_present() && g.0 < hi && g.0 + l.pages() > lo)
            .map(|(g, l, s)| (g.0, l.get(), s.pfn().0))
            .collect()
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES`, audited when an audit window is set.
    fn set_attributes(&self, gpa: u64, size: u64, private: bool) -> Result<(), AttributeError> {
        let attrs = if private { MEMORY_ATTRIBUTE_PRIVATE } else { 0 };
        let window = self.audit.read().as_ref().map(|w| w(gpa));
        let before = window.map(|(lo, hi)| self.leaves_in(lo, hi));
        let t0 = std::time::Instant::now();
        let r = self.vm.set_memory_attributes(gpa, size, attrs, 0);
        self.counters
            .attributes_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let (Some((lo, hi)), Some(before), Ok(())) = (window, before, &r) {
            let after = self.leaves_in(lo, hi);
            let a = &self.audit_counters;
            a.audited.fetch_add(1, Ordering::Relaxed);
            let (first, end) = (gpa / PAGE_SIZE, (gpa + size) / PAGE_SIZE);
            for leaf @ (g, level, _) in before {
                if after.contains(&leaf) {
                    continue;
                }
                let pages = 1u64 << (9 * (level as u32 - 1));
                let counter = if g < end && g + pages > first {
                    &a.zapped_in_range
                } else {
                    &a.zapped_outside
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// Create `region`'s slot again after a delete: bound to the file it had if
    /// it was a guest_memfd slot (its private pages are still in the file), as
    /// a plain slot otherwise.
    pub fn recreate_slot(&self, region: UserMemoryRegion) -> Result<(), MemslotError> {
        let found = self
            .slots
            .read()
            .iter()
            .find(|s| s.region.slot == region.slot)
            .map(|s| (s.file.clone(), s.offset));
        match found {
            Some((file, offset)) => self.vm.set_user_memory_region2(
                UserMemoryRegion {
                    flags: region.flags | KVM_MEM_GUEST_MEMFD,
                    ..region
                },
                Some(&file),
                offset,
            ),
            None => self.vm.set_user_memory_region(region),
        }
    }

    /// `fallocate` the guest_memfd pages behind `[gpa, gpa + len)`: punch them
    /// out, or allocate them.
    fn fallocate(&self, gpa: u64, len: u64, punch: bool) -> Result<(), GmemError> {
        let mode = if punch {
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        } else {
            FALLOC_FL_KEEP_SIZE
        };
        for s in self.slots.read().iter() {
            if let Some((_, off, n)) = s.clip(gpa, gpa + len) {
                s.file.fallocate(mode, off, n)?;
                if punch {
                    self.counters
                        .private_pages_punched
                        .fetch_add(n / PAGE_SIZE, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Punch `[gpa, gpa + len)` out of the guest_memfd slots it covers.
    pub fn punch_hole(&self, gpa: u64, len: u64) -> Result<(), GmemError> {
        self.fallocate(gpa, len, true)
    }

    /// A guest's `KVM_HC_MAP_GPA_RANGE`, handled as `how` says.
    pub fn map_gpa_range(
        &self,
        gpa: u64,
        size: u64,
        private: bool,
        how: crate::guest::MapGpaHow,
    ) -> Result<(), ConvertError> {
        use crate::guest::MapGpaHow;
        match how {
            MapGpaHow::Convert => self.convert(gpa, size, private),
            MapGpaHow::Selftest {
                fallocate,
                set_attributes,
            } => {
                let _one_at_a_time = self.convert_lock.lock();
                if fallocate {
                    self.fallocate(gpa, size, !private)?;
                }
                if set_attributes {
                    if let Err(e) = self.set_attributes(gpa, size, private) {
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        return Err(e.into());
                    }
                    let counter = if private {
                        &self.counters.to_private
                    } else {
                        &self.counters.to_shared
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        }
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
        let _one_at_a_time = self.convert_lock.lock();
        let discarded = self.discarded.read().clone();
        let mark = |d: &Option<Arc<Discarded>>| {
            if let Some(d) = d {
                d.mark(Gpa(gpa), size / PAGE_SIZE);
            }
        };
        mark(&discarded);
        if let Err(e) = self.set_attributes(gpa, size, private) {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        let counter = if private {
            &self.counters.to_private
        } else {
            &self.counters.to_shared
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let parts: Vec<(GmemSlot, (u64, u64, u64))> = self
            .slots
            .read()
            .iter()
            .filter_map(|s| s.clip(gpa, gpa + size).map(|c| (s.clone(), c)))
            .collect();
        for (s, (lo, off, n)) in parts {
            if private {
                let hva = s.region.userspace_addr + (lo - s.region.guest_phys_addr);
                self.host
                    .madvise_dontneed(HvaRange::new(Hva(hva), Hva(hva + n)));
                self.counters
                    .shared_pages_discarded
                    .fetch_add(n / PAGE_SIZE, Ordering::Relaxed);
            } else {
                s.file
                    .fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)?;
                self.counters
                    .private_pages_punched
                    .fetch_add(n / PAGE_SIZE, Ordering::Relaxed);
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

    /// Drop every file reference the VMM holds (the files close when their
    /// last holder lets go).
    pub fn clear(&self) {
        self.slots.write().clear();
    }
}
