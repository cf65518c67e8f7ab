//! The dirty ring (KVM's `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`): instead of a bitmap
//! per memslot, each vCPU pushes the pages its writes dirty into its own ring
//! of `{flags, slot, offset}` entries, which the VMM reads (as from the mmap of
//! the vCPU's ring) and hands back with `reset_dirty_rings`.
//!
//! The protocol, one ring: the vCPU fills an entry's slot and offset, then
//! publishes it by storing `DIRTY` with Release; the VMM reads entries in order
//! while they are `DIRTY` (Acquire), records them and marks each `RESET`
//! (Release); `reset_dirty_rings` walks the entries marked `RESET`, clears them
//! (the entry is free again) and write-protects their pages, so the next write
//! to each is pushed again. A vCPU whose ring holds `size - RESERVED` entries
//! not yet reset exits (`KVM_EXIT_DIRTY_RING_FULL`) before it enters the guest
//! again; the reserve covers the pushes of the fault it was handling.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Entry flag: the page is dirty, not yet collected.
pub const DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// Entry flag: collected by the VMM, to be reset.
pub const DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// Entries kept in reserve below the ring's size (KVM's
/// `KVM_DIRTY_RING_RSVD_ENTRIES`).
pub const RESERVED_ENTRIES: u32 = 64;
/// Smallest ring: one page of 16-byte entries.
pub const MIN_ENTRIES: u32 = 256;
/// Largest ring (KVM's `KVM_DIRTY_RING_MAX_ENTRIES`).
pub const MAX_ENTRIES: u32 = 65536;

#[derive(Debug, Default)]
struct RingEntry {
    flags: AtomicU32,
    /// Address space in bits 16 and up, slot id below.
    slot: AtomicU32,
    offset: AtomicU64,
}

/// One vCPU's ring.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    entries: Box<[RingEntry]>,
    /// Entries pushed (the vCPU's producer index).
    dirty_index: AtomicU32,
    /// Entries reset (the VM's consumer index, under `slots_lock`).
    reset_index: AtomicU32,
    /// Pushes that found the ring full: pages lost to the log. Never expected;
    /// counted rather than hidden.
    pub(crate) overflows: AtomicU64,
}

impl DirtyRing {
    pub(crate) fn new(size: u32) -> DirtyRing {
        DirtyRing {
            entries: (0..size).map(|_| RingEntry::default()).collect(),
            dirty_index: AtomicU32::new(0),
            reset_index: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
        }
    }

    fn mask(&self) -> u32 {
        self.entries.len() as u32 - 1
    }

    /// Entries pushed and not yet reset.
    pub(crate) fn used(&self) -> u32 {
        // A reset may free an entry whose push has not yet advanced the
        // producer index, putting the reset index one ahead for a moment;
        // only the ring's own vCPU asks (between its pushes), so it never
        // sees that moment.
        self.dirty_index
            .load(Ordering::Acquire)
            .wrapping_sub(self.reset_index.load(Ordering::Acquire))
    }

    /// Whether the vCPU must exit before it enters again.
    pub(crate) fn soft_full(&self) -> bool {
        self.used() >= self.entries.len() as u32 - RESERVED_ENTRIES
    }

    /// Record that page `offset` of slot `slot` (as_id << 16 | id) was
    /// dirtied. Only the ring's vCPU pushes.
    pub(crate) fn push(&self, slot: u32, offset: u64) {
        let i = self.dirty_index.load(Ordering::Relaxed);
        let e = &self.entries[(i & self.mask()) as usize];
        if e.flags.load(Ordering::Acquire) != 0 {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return;
        }
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        // Release: the VMM that sees DIRTY sees the slot and offset.
        e.flags.store(DIRTY_GFN_F_DIRTY, Ordering::Release);
        self.dirty_index.store(i.wrapping_add(1), Ordering::Release);
    }

    /// The VMM's read of the ring from `*fetch`: every entry marked DIRTY in
    /// order, each handed to `f` and marked RESET. Returns how many.
    pub(crate) fn collect(&self, fetch: &mut u32, mut f: impl FnMut(u32, u64)) -> u64 {
        let mut n = 0;
        loop {
            let e = &self.entries[(*fetch & self.mask()) as usize];
            if e.flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                return n;
            }
            f(
                e.slot.load(Ordering::Relaxed),
                e.offset.load(Ordering::Relaxed),
            );
            e.flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
            *fetch = fetch.wrapping_add(1);
            n += 1;
        }
    }

    /// `reset_dirty_rings` for this ring: free every entry the VMM marked
    /// RESET, in order, handing each (slot, offset) to `protect`. Returns how
    /// many entries were reset.
    pub(crate) fn reset(&self, mut protect: impl FnMut(u32, u64)) -> u64 {
        let mut n = 0;
        // The flags alone say what was collected (as KVM's reset reads them):
        // the VMM can collect an entry whose push has stored DIRTY but not yet
        // advanced the producer index, and that entry must be reset (its page
        // protected) like any other. Each reset entry goes back to 0, so the
        // walk ends within one lap.
        for _ in 0..self.entries.len() {
            let r = self.reset_index.load(Ordering::Relaxed);
            let e = &self.entries[(r & self.mask()) as usize];
            if e.flags.load(Ordering::Acquire) & DIRTY_GFN_F_RESET == 0 {
                return n;
            }
            protect(
                e.slot.load(Ordering::Relaxed),
                e.offset.load(Ordering::Relaxed),
            );
            e.flags.store(0, Ordering::Release);
            self.reset_index.store(r.wrapping_add(1), Ordering::Release);
            n += 1;
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn test_ring_push_collect_reset_and_soft_full() {
        let r = DirtyRing::new(MIN_ENTRIES);
        for i in 0..(MIN_ENTRIES - RESERVED_ENTRIES - 1) {
            r.push(1, i as u64);
        }
        assert!(!r.soft_full());
        r.push(1, 999);
        assert!(r.soft_full(), "size - reserve entries used");
        let mut fetch = 0;
        let mut seen = Vec::new();
        assert_eq!(r.collect(&mut fetch, |s, o| seen.push((s, o))), 192);
        assert_eq!(seen[0], (1, 0));
        assert_eq!(seen[191], (1, 999));
        assert!(r.soft_full(), "collected but not yet reset");
        let mut reset = 0;
        assert_eq!(r.reset(|_, _| reset += 1), 192);
        assert_eq!(reset, 192);
        assert!(!r.soft_full());
        assert_eq!(r.used(), 0);
        // Nothing collected: reset frees nothing.
        r.push(2, 5);
        assert_eq!(r.reset(|_, _| {}), 0);
        assert_eq!(r.collect(&mut fetch, |_, _| {}), 1);
        assert_eq!(r.reset(|_, _| {}), 1);
    }

    #[test]
    fn test_ring_overflow_is_counted_not_hidden() {
        let r = DirtyRing::new(MIN_ENTRIES);
        for i in 0..MIN_ENTRIES + 3 {
            r.push(1, i as u64);
        }
        assert_eq!(r.overflows.load(Ordering::Relaxed), 3);
    }
}
