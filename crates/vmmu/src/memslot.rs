//! Memslots: which guest frames are backed by which host virtual addresses.
//!
//! A [`MemslotSet`] is immutable once published. Readers (faults, notifiers) load
//! the active set without blocking; an update builds the next set and swaps it in.
//! Like KVM, two sets exist per address space: the update is applied to the
//! inactive one, that one is published, and the same update is then applied to the
//! set that was just retired (recycled once its last reader is gone). The
//! indexes are persistent trees, so applying an update, and copying a set
//! when the retired one is still held, cost O(log slots) (`memslot-perf`
//! measures it from 10 to 32764 slots).

mod classify;
mod last_used;
mod set;
mod slot_tree;

#[cfg(test)]
pub(crate) use classify::classify;
pub(crate) use classify::{classify_with, Change, GmemArg, Limits};
pub(crate) use last_used::LastUsedSlot;
pub use set::MemslotSet;
pub(crate) use set::SetOp;

use bitflags::bitflags;

use crate::gmem::{GmemFile, SlotGmem};
use crate::sync::{Arc, AtomicU32, AtomicU64, Ordering};
use crate::types::{Gfn, GfnRange, Hva, HvaRange, Level, PAGE_SIZE};

/// Slots per address space available to userspace (x86 `KVM_USER_MEM_SLOTS`).
pub const USER_MEM_SLOTS: u32 = 32764;
/// Largest slot in pages (`KVM_MEM_MAX_NR_PAGES`).
pub const MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;
/// One past the highest user-space address (x86-64, 4-level host paging).
pub const USER_ADDR_LIMIT: u64 = 0x7fff_ffff_f000;
/// Set in a generation while an update is being published.
pub const GEN_UPDATE_IN_PROGRESS: u64 = 1 << 63;

bitflags! {
    /// `kvm_userspace_memory_region.flags`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct MemFlags: u32 {
        /// `KVM_MEM_LOG_DIRTY_PAGES`: track writes in a dirty bitmap.
        const LOG_DIRTY_PAGES = 1 << 0;
        /// `KVM_MEM_READONLY`: guest writes exit to the VMM as MMIO.
        const READONLY = 1 << 1;
        /// `KVM_MEM_GUEST_MEMFD`: private memory from a guest_memfd.
        const GUEST_MEMFD = 1 << 2;
    }
}

/// Flags `KVM_SET_USER_MEMORY_REGION` accepts (the old call has no guest_memfd).
pub const SUPPORTED_FLAGS: MemFlags = MemFlags::LOG_DIRTY_PAGES.union(MemFlags::READONLY);

/// The argument of `KVM_SET_USER_MEMORY_REGION`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UserMemoryRegion {
    /// Slot number: address space in bits 31:16, slot id in bits 15:0.
    pub slot: u32,
    /// Raw flags (validated).
    pub flags: u32,
    /// First guest physical byte.
    pub guest_phys_addr: u64,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// First host virtual byte.
    pub userspace_addr: u64,
}

/// Why a memslot update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemslotError {
    /// Unknown or unsupported flag bits (EINVAL).
    #[error("Unsupported memslot flags {flags:#x} (supported: {supported:#x})")]
    InvalidFlags {
        /// The flags given.
        flags: u32,
        /// The flags accepted.
        supported: u32,
    },
    /// Slot id or address space out of range (EINVAL).
    #[error("Slot {slot:#x} out of range (address spaces {spaces}, {max} slots each)")]
    InvalidSlot {
        /// The slot number given.
        slot: u32,
        /// Address spaces configured.
        spaces: u16,
        /// Slots per address space.
        max: u32,
    },
    /// Size, guest address or host address not page aligned (EINVAL).
    #[error("Memslot {what} {value:#x} is not page aligned")]
    Unaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The range wraps, exceeds the guest physical or host address space, or is too
    /// large (EINVAL).
    #[error("Memslot range gpa {gpa:#x} size {size:#x} hva {hva:#x} is out of bounds")]
    OutOfRange {
        /// Guest physical base.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Host virtual base.
        hva: u64,
    },
    /// Deleting a slot that does not exist (EINVAL).
    #[error("Slot {slot:#x} does not exist")]
    NoSuchSlot {
        /// The slot number.
        slot: u32,
    },
    /// Changing the host address, the size or read-only-ness of a slot (EINVAL).
    #[error("Slot {slot:#x}: cannot change {what} of an existing slot")]
    IllegalChange {
        /// The slot number.
        slot: u32,
        /// What was changed.
        what: &'static str,
    },
    /// The guest_memfd binding is not valid (EINVAL): the file belongs to another
    /// VM, the offset is unaligned, the range passes the file's end or is bound
    /// to another slot already.
    #[error("Slot {slot:#x}: guest_memfd {what}")]
    GuestMemfd {
        /// The slot number.
        slot: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// The GUEST_MEMFD flag without a guest_memfd (EBADF).
    #[error("Slot {slot:#x}: the GUEST_MEMFD flag needs a guest_memfd")]
    NoGuestMemfd {
        /// The slot number.
        slot: u32,
    },
    /// The new range overlaps another slot (EEXIST).
    #[error("Slot {slot:#x} gfn range {start:#x}..{end:#x} overlaps slot {other:#x}")]
    Overlap {
        /// The slot number.
        slot: u32,
        /// First gfn.
        start: u64,
        /// One past the last gfn.
        end: u64,
        /// The slot it collides with.
        other: u32,
    },
}

impl MemslotError {
    /// The errno `KVM_SET_USER_MEMORY_REGION` returns for this refusal.
    pub fn errno(&self) -> i32 {
        match self {
            MemslotError::Overlap { .. } => crate::errno::EEXIST,
            MemslotError::NoGuestMemfd { .. } => crate::errno::EBADF,
            _ => crate::errno::EINVAL,
        }
    }
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, MemslotError>;

/// Set in a huge-page chunk's counter when its gfns do not all have the same
/// memory attributes.
const LPAGE_MIXED: u32 = 1 << 31;

/// Per-level huge-page disallow counters (KVM's `lpage_info`), for 2 MiB and 1 GiB.
/// Non-zero means: no huge mapping at that level for gfns in that chunk.
#[derive(Debug)]
pub(crate) struct LpageInfo {
    levels: [Box<[AtomicU32]>; 2],
}

impl LpageInfo {
    fn new(base: Gfn, npages: u64, hva: Hva) -> LpageInfo {
        let make = |level: Level| -> Box<[AtomicU32]> {
            let pages = level.pages();
            let first = base.0 >> level.gfn_shift();
            let last = (base.0 + npages - 1) >> level.gfn_shift();
            let n = (last - first + 1) as usize;
            let v: Box<[AtomicU32]> = (0..n).map(|_| AtomicU32::new(0)).collect();
            if base.0 & (pages - 1) != 0 {
                v[0].fetch_add(1, Ordering::Relaxed);
            }
            if (base.0 + npages) & (pages - 1) != 0 {
                v[n - 1].fetch_add(1, Ordering::Relaxed);
            }
            // If gfn and hva are not congruent modulo the huge size, no chunk can
            // be mapped huge: the host's huge page would straddle two guest ones.
            if (base.0 ^ (hva.0 >> 12)) & (pages - 1) != 0 {
                for c in v.iter() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            v
        };
        LpageInfo {
            levels: [make(Level::M2), make(Level::G1)],
        }
    }

    /// Mark the `level` chunk holding `gfn` as having mixed attributes (or not):
    /// KVM's `KVM_LPAGE_MIXED_FLAG`, a bit of its own beside the counters.
    fn set_mixed(&self, base: Gfn, gfn: Gfn, level: Level, mixed: bool) {
        let idx = ((gfn.0 >> level.gfn_shift()) - (base.0 >> level.gfn_shift())) as usize;
        if let Some(c) = self.levels[(level.get() - 2) as usize].get(idx) {
            // Relaxed: read by faults under the invalidation protocol, like the
            // counters; the attribute change that set it is ordered by mmu_lock.
            if mixed {
                c.fetch_or(LPAGE_MIXED, Ordering::Relaxed);
            } else {
                c.fetch_and(!LPAGE_MIXED, Ordering::Relaxed);
            }
        }
    }

    fn disallowed(&self, base: Gfn, gfn: Gfn, level: Level) -> bool {
        let idx = ((gfn.0 >> level.gfn_shift()) - (base.0 >> level.gfn_shift())) as usize;
        let arr = &self.levels[(level.get() - 2) as usize];
        arr.get(idx).is_none_or(|c| c.load(Ordering::Relaxed) != 0)
    }

    fn mixed(&self, base: Gfn, gfn: Gfn, level: Level) -> bool {
        let idx = ((gfn.0 >> level.gfn_shift()) - (base.0 >> level.gfn_shift())) as usize;
        let arr = &self.levels[(level.get() - 2) as usize];
        arr.get(idx)
            .is_some_and(|c| c.load(Ordering::Relaxed) & LPAGE_MIXED != 0)
    }
}

/// One memslot. Immutable once published; a change makes a new `Memslot`.
#[derive(Debug)]
pub struct Memslot {
    id: u16,
    as_id: u16,
    base_gfn: Gfn,
    npages: u64,
    userspace_addr: Hva,
    flags: MemFlags,
    /// Being deleted or moved (`KVM_MEMSLOT_INVALID`): faults retry.
    invalid: bool,
    lpage: Arc<LpageInfo>,
    dirty_bitmap: Option<Arc<DirtyBitmap>>,
    /// The guest_memfd private memory comes from, for GUEST_MEMFD slots.
    gmem: Option<SlotGmem>,
}

/// One bit per page, set when the page may have been written while dirty logging
/// is on.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    fn new(npages: u64) -> Self {
        DirtyBitmap {
            words: (0..npages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
    /// Mark page `rel` (relative to the slot) dirty.
    pub fn set(&self, rel: u64) {
        if let Some(w) = self.words.get((rel / 64) as usize) {
            // Release: the entry made writable before the page was marked is
            // seen by a harvest that takes the bit (its Acquire), so its
            // write-protection finds the entry writable. With Relaxed a harvest
            // could take the bit, read the entry's old value, protect nothing,
            // and leave a writable entry whose page is out of the log (the loom
            // model `loom_harvest_never_leaves_a_writable_page_unlogged`).
            w.fetch_or(1 << (rel % 64), Ordering::Release);
        }
    }
    /// Whether page `rel` is marked.
    pub fn test(&self, rel: u64) -> bool {
        self.words
            .get((rel / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (rel % 64)) != 0)
    }
    /// Every word, as it is now.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }
    /// Words in the bitmap.
    pub fn words(&self) -> usize {
        self.words.len()
    }
    /// Clear the bits of `mask` in word `i` and return those that were set
    /// (atomic, so a bit set meanwhile is either taken now or stays).
    pub(crate) fn take(&self, i: usize, mask: u64) -> u64 {
        // AcqRel: see `set`. A word with none of `mask` set is left alone
        // without a locked update (most of a mostly clean log): a bit set
        // after this load is simply taken by the next harvest.
        match self.words.get(i) {
            Some(w) if w.load(Ordering::Acquire) & mask == 0 => 0,
            Some(w) if mask == u64::MAX => w.swap(0, Ordering::AcqRel),
            Some(w) => w.fetch_and(!mask, Ordering::AcqRel) & mask,
            None => 0,
        }
    }
    /// A bitmap with every page of `npages` marked (`INITIALLY_SET`).
    fn all_set(npages: u64) -> Self {
        let b = DirtyBitmap::new(npages);
        for (i, w) in b.words.iter().enumerate() {
            let left = npages - i as u64 * 64;
            w.store(
                if left >= 64 {
                    u64::MAX
                } else {
                    (1u64 << left) - 1
                },
                Ordering::Relaxed,
            );
        }
        b
    }
    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

/// The gfns whose host addresses in `range` fall in a slot's host range
/// `[hva_start, hva_end)` that starts at gfn `base_gfn`, if any (what
/// [`Memslot::hva_range_to_gfns`] answers, from the three numbers alone).
pub(crate) fn hva_span_to_gfns(
    range: HvaRange,
    hva_start: u64,
    hva_end: u64,
    base_gfn: u64,
) -> Option<GfnRange> {
    let start = range.start.0.max(hva_start);
    let end = range.end.0.min(hva_end);
    if start >= end {
        return None;
    }
    let first = base_gfn + (start - hva_start) / PAGE_SIZE;
    let last = base_gfn + (end - hva_start).div_ceil(PAGE_SIZE);
    Some(GfnRange::new(Gfn(first), Gfn(last)))
}

impl Memslot {
    /// Slot id within its address space.
    pub fn id(&self) -> u16 {
        self.id
    }
    /// Address space (0, or 1 for SMM).
    pub fn as_id(&self) -> u16 {
        self.as_id
    }
    /// First gfn.
    pub fn base_gfn(&self) -> Gfn {
        self.base_gfn
    }
    /// Size in pages.
    pub fn npages(&self) -> u64 {
        self.npages
    }
    /// Host virtual address of the first page.
    pub fn userspace_addr(&self) -> Hva {
        self.userspace_addr
    }
    /// Flags.
    pub fn flags(&self) -> MemFlags {
        self.flags
    }
    /// Being deleted or moved.
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }
    /// Guest writes exit to the VMM.
    pub fn is_readonly(&self) -> bool {
        self.flags.contains(MemFlags::READONLY)
    }
    /// Dirty logging is enabled.
    pub fn dirty_logging(&self) -> bool {
        self.flags.contains(MemFlags::LOG_DIRTY_PAGES)
    }
    /// The dirty bitmap, when logging.
    pub fn dirty_bitmap(&self) -> Option<&DirtyBitmap> {
        self.dirty_bitmap.as_deref()
    }
    /// Whether private memory for the slot comes from a guest_memfd.
    pub fn has_guest_memfd(&self) -> bool {
        self.gmem.is_some()
    }
    /// What the slot's guest_memfd holds for `gfn` (which must lie in the slot)
    /// now, without allocating and without waiting for the file's lock: for
    /// checkers that must never block a running MMU (an oracle in guest mode).
    pub fn peek_private_page(&self, gfn: Gfn) -> crate::gmem::PrivatePage {
        match &self.gmem {
            None => crate::gmem::PrivatePage::Unbound,
            Some(b) => b.file.peek(b.pgoff + (gfn.0 - self.base_gfn.0)),
        }
    }
    /// The slot's guest_memfd binding.
    pub(crate) fn gmem(&self) -> Option<&SlotGmem> {
        self.gmem.as_ref()
    }
    /// Whether the slot is gmem-only: bound to a guest_memfd the host may map
    /// (`GUEST_MEMFD_FLAG_MMAP`), so its shared memory comes from the file too,
    /// not from `userspace_addr`.
    pub fn is_gmem_only(&self) -> bool {
        self.gmem.as_ref().is_some_and(|g| g.file.is_mappable())
    }
    /// The gfns of the slot.
    pub fn gfn_range(&self) -> GfnRange {
        GfnRange::new(self.base_gfn, self.base_gfn.add(self.npages))
    }
    /// Whether `gfn` lies in the slot.
    pub fn contains(&self, gfn: Gfn) -> bool {
        gfn.0 >= self.base_gfn.0 && gfn.0 - self.base_gfn.0 < self.npages
    }
    /// Host address of `gfn` (which must lie in the slot).
    pub fn gfn_to_hva(&self, gfn: Gfn) -> Hva {
        self.userspace_addr
            .add((gfn.0 - self.base_gfn.0) * PAGE_SIZE)
    }
    /// The uAPI slot number (address space in the upper half).
    pub fn slot_number(&self) -> u32 {
        ((self.as_id as u32) << 16) | self.id as u32
    }

    /// Largest level `gfn` may be mapped at, considering alignment, the slot's
    /// disallow counters and dirty logging (never above `max`).
    pub(crate) fn max_mapping_level(&self, gfn: Gfn, max: Level) -> Level {
        if self.dirty_logging() {
            return Level::K4;
        }
        let mut level = max.min(Level::MAX_HUGE);
        while level > Level::K4 {
            if !self.lpage.disallowed(self.base_gfn, gfn, level) {
                return level;
            }
            level = level.lower().unwrap_or(Level::K4);
        }
        Level::K4
    }

    /// Mark the `level` chunk holding `gfn` as mixing private and shared gfns, or
    /// not. Only chunks wholly inside the slot matter (the others are never
    /// huge: the edge counters already forbid them).
    pub(crate) fn set_mixed(&self, gfn: Gfn, level: Level, mixed: bool) {
        self.lpage.set_mixed(self.base_gfn, gfn, level, mixed);
    }

    /// Whether the `level` chunk holding `gfn` is marked as mixing private and
    /// shared gfns (KVM's `hugepage_test_mixed`).
    pub(crate) fn is_mixed(&self, gfn: Gfn, level: Level) -> bool {
        self.lpage.mixed(self.base_gfn, gfn, level)
    }

    /// Record that `gfn` was (or may be) written.
    pub(crate) fn mark_dirty(&self, gfn: Gfn) {
        if let Some(b) = &self.dirty_bitmap {
            b.set(gfn.0 - self.base_gfn.0);
        }
    }

    fn hva_end(&self) -> u64 {
        self.userspace_addr.0 + self.npages * PAGE_SIZE
    }

    /// The gfns whose host addresses intersect `range`, if any.
    pub fn hva_range_to_gfns(&self, range: HvaRange) -> Option<GfnRange> {
        hva_span_to_gfns(
            range,
            self.userspace_addr.0,
            self.hva_end(),
            self.base_gfn.0,
        )
    }

    fn invalid_copy(&self) -> Memslot {
        Memslot {
            invalid: true,
            ..self.clone_shallow()
        }
    }

    fn clone_shallow(&self) -> Memslot {
        Memslot {
            id: self.id,
            as_id: self.as_id,
            base_gfn: self.base_gfn,
            npages: self.npages,
            userspace_addr: self.userspace_addr,
            flags: self.flags,
            invalid: self.invalid,
            lpage: self.lpage.clone(),
            dirty_bitmap: self.dirty_bitmap.clone(),
            gmem: self.gmem.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_dirty_bitmap_set_test_take_and_the_initially_set_form() {
        let b = DirtyBitmap::new(130);
        assert_eq!(b.words(), 3);
        for p in [0, 63, 64, 129] {
            assert!(!b.test(p));
            b.set(p);
            assert!(b.test(p), "page {p}");
        }
        assert!(
            !b.test(1) && !b.test(65) && !b.test(128),
            "only what was set"
        );
        b.set(500); // past the slot: ignored
        assert_eq!(b.count(), 4);
        assert_eq!(b.snapshot(), vec![1 | 1 << 63, 1, 1 << 1]);
        // Take a masked part of word 0, then the rest; a clean word gives 0.
        assert_eq!(b.take(0, 1 << 63 | 1 << 5), 1 << 63);
        assert!(!b.test(63) && b.test(0));
        assert_eq!(b.take(0, u64::MAX), 1);
        assert_eq!(b.take(0, u64::MAX), 0);
        assert_eq!(b.take(9, u64::MAX), 0, "past the bitmap");
        assert_eq!(b.count(), 2);
        let all = DirtyBitmap::all_set(130);
        assert_eq!(all.count(), 130);
        assert_eq!(all.snapshot(), vec![u64::MAX, u64::MAX, 0b11]);
    }

    fn region(slot: u32, gpa: u64, size: u64, hva: u64) -> UserMemoryRegion {
        UserMemoryRegion {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        }
    }

    fn create(set: &mut MemslotSet, r: UserMemoryRegion) -> Result<()> {
        match classify(set, &r, 2, 1 << 34)? {
            Change::Create(s) => {
                set.apply(&SetOp::Insert(s));
                Ok(())
            }
            other => panic!("expected create, got {other:?}"),
        }
    }

    #[test]
    fn test_memslot_create_lookup_and_overlap_is_eexist() {
        let mut set = MemslotSet::new(0);
        create(&mut set, region(1, 0x10_0000, 0x20_0000, 0x4000_0000)).unwrap();
        create(&mut set, region(2, 0x40_0000, 0x1000, 0x5000_0000)).unwrap();
        assert_eq!(set.lookup(Gfn(0x100)).map(|s| s.id()), Some(1));
        assert_eq!(set.lookup(Gfn(0x2ff)).map(|s| s.id()), Some(1));
        assert!(set.lookup(Gfn(0x300)).is_none());
        assert_eq!(set.lookup(Gfn(0x400)).map(|s| s.id()), Some(2));
        assert_eq!(set.pages(), 0x200 + 1, "pages of all slots");
        let mut fewer = set.clone();
        fewer.apply(&SetOp::Remove(1));
        assert_eq!(fewer.pages(), 1);
        assert_eq!(set.pages(), 0x201, "a copy's change leaves the original");
        let err =
            classify(&set, &region(3, 0x1f_f000, 0x2000, 0x6000_0000), 2, 1 << 34).unwrap_err();
        assert!(
            matches!(err, MemslotError::Overlap { other: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn test_memslot_validation_errors() {
        let set = MemslotSet::new(0);
        let bad = |r: UserMemoryRegion| classify(&set, &r, 2, 1 << 34).unwrap_err();
        assert!(matches!(
            bad(region(1, 0x1001, 0x1000, 0)),
            MemslotError::Unaligned { .. }
        ));
        assert!(matches!(
            bad(region(1, 0, 0x1800, 0)),
            MemslotError::Unaligned { .. }
        ));
        assert!(matches!(
            bad(region(1, 0, 0x1000, 0x10)),
            MemslotError::Unaligned { .. }
        ));
        assert!(matches!(
            bad(region(40000, 0, 0x1000, 0)),
            MemslotError::InvalidSlot { .. }
        ));
        assert!(matches!(
            bad(region(2 << 16, 0, 0x1000, 0)),
            MemslotError::InvalidSlot { .. }
        ));
        assert!(matches!(
            bad(region(1, u64::MAX - 0xfff, 0x2000, 0)),
            MemslotError::OutOfRange { .. }
        ));
        assert!(matches!(
            bad(region(1, 1 << 46, 0x1000, 0)),
            MemslotError::OutOfRange { .. }
        ));
        assert!(matches!(
            bad(region(1, 0, 0, 0)),
            MemslotError::NoSuchSlot { .. }
        ));
        let mut r = region(1, 0, 0x1000, 0);
        r.flags = 1 << 7;
        assert!(matches!(bad(r), MemslotError::InvalidFlags { .. }));
        r.flags = MemFlags::GUEST_MEMFD.bits();
        assert!(matches!(bad(r), MemslotError::InvalidFlags { .. }));
    }

    #[test]
    fn test_memslot_modify_rules() {
        let mut set = MemslotSet::new(0);
        create(&mut set, region(1, 0x10_0000, 0x20_0000, 0x4000_0000)).unwrap();
        let c = |r: UserMemoryRegion| classify(&set, &r, 2, 1 << 34);
        assert!(matches!(
            c(region(1, 0x10_0000, 0x20_0000, 0x4000_0000)),
            Ok(Change::Nothing)
        ));
        assert!(matches!(
            c(region(1, 0x80_0000, 0x20_0000, 0x4000_0000)),
            Ok(Change::Move { .. })
        ));
        assert!(matches!(
            c(region(1, 0x10_0000, 0x20_0000, 0x5000_0000)),
            Err(MemslotError::IllegalChange { .. })
        ));
        assert!(matches!(
            c(region(1, 0x10_0000, 0x10_0000, 0x4000_0000)),
            Err(MemslotError::IllegalChange { .. })
        ));
        let mut r = region(1, 0x10_0000, 0x20_0000, 0x4000_0000);
        r.flags = MemFlags::READONLY.bits();
        assert!(matches!(c(r), Err(MemslotError::IllegalChange { .. })));
        r.flags = MemFlags::LOG_DIRTY_PAGES.bits();
        assert!(matches!(c(r), Ok(Change::FlagsOnly { .. })));
        // A move may overlap its own old range.
        assert!(matches!(
            c(region(1, 0x11_0000, 0x20_0000, 0x4000_0000)),
            Ok(Change::Move { .. })
        ));
    }

    #[test]
    fn test_memslot_huge_levels_follow_alignment() {
        let mut set = MemslotSet::new(0);
        // 4 MiB + 4 KiB at 2 MiB, hva congruent at 2M but not at 1G.
        create(&mut set, region(1, 0x20_0000, 0x40_1000, 0x7000_0020_0000)).unwrap();
        let s = set.by_id(1).unwrap().clone();
        assert_eq!(s.max_mapping_level(Gfn(0x200), Level::G1), Level::M2);
        assert_eq!(s.max_mapping_level(Gfn(0x400), Level::G1), Level::M2);
        assert_eq!(
            s.max_mapping_level(Gfn(0x600), Level::G1),
            Level::K4,
            "tail chunk partial"
        );
        // hva misaligned with gfn at 2M: no huge mappings anywhere.
        create(
            &mut set,
            region(2, 0x4000_0000, 0x40_0000, 0x7100_0000_1000),
        )
        .unwrap();
        let s2 = set.by_id(2).unwrap().clone();
        assert_eq!(s2.max_mapping_level(Gfn(0x40000), Level::G1), Level::K4);
    }

    #[test]
    fn test_memslot_hva_overlap_with_aliases() {
        let mut set = MemslotSet::new(0);
        create(&mut set, region(1, 0, 0x10_0000, 0x1000_0000)).unwrap();
        create(&mut set, region(2, 0x100_0000, 0x10_0000, 0x1000_0000)).unwrap();
        create(&mut set, region(3, 0x200_0000, 0x1000, 0x2000_0000)).unwrap();
        let mut hits = vec![];
        set.for_each_hva_overlap(HvaRange::new(Hva(0x1000_2000), Hva(0x1000_3001)), |s, g| {
            hits.push((s.id(), g))
        });
        hits.sort_by_key(|h| h.0);
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].1, GfnRange::new(Gfn(2), Gfn(4)));
        assert_eq!(hits[1].1, GfnRange::new(Gfn(0x1002), Gfn(0x1004)));
        let mut none = 0;
        set.for_each_hva_overlap(HvaRange::new(Hva(0x3000_0000), Hva(0x3000_1000)), |_, _| {
            none += 1
        });
        assert_eq!(none, 0);
        let any = |a: u64, b: u64| set.any_hva_overlap(HvaRange::new(Hva(a), Hva(b)));
        assert!(any(0x1000_2000, 0x1000_3001), "two aliases");
        assert!(any(0x2000_0fff, 0x2000_1000), "the last byte of slot 3");
        assert!(!any(0x2000_1000, 0x3000_1000), "past slot 3");
        assert!(!any(0x0fff_0000, 0x1000_0000), "just before slots 1 and 2");
        assert!(!any(0x1000_2000, 0x1000_2000), "an empty range");
    }
}
