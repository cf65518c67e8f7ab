//! The host's own MMU ("primary MMU"): the VMM process's address space.
//!
//! Regions of host virtual addresses map to frames of the [`HostMemory`] arena
//! through one entry per 4 KiB page, protected by per-2 MiB "page-table locks" (as
//! Linux splits its PTL). Every host event that changes or removes a mapping is
//! bracketed by `invalidate_range_start` / `invalidate_range_end` on every
//! registered secondary MMU, in Linux's order: start, change the entries, free
//! the old frames, end. Frames are freed only after start has returned, so a
//! secondary MMU that still used one would read poison.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use vmmu::{FaultinRequest, HostFaultError, HostPfn, Hva, HvaRange, Level, Pfn, PrimaryMmu};

use crate::host_memory::{HostMemory, Order, PageState, PAGE};
use crate::sync::{AtomicU64, Ordering};

mod events;
mod region;
use region::Region;

/// How a region is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backing {
    /// Private anonymous memory, 4 KiB pages.
    Anonymous,
    /// Anonymous memory with transparent huge pages: 2 MiB when a whole aligned
    /// chunk is populated at once, split and collapsed by host events.
    AnonymousThp,
    /// hugetlbfs, 2 MiB pages.
    Hugetlb2M,
    /// hugetlbfs, 1 GiB pages.
    Hugetlb1G,
    /// Shared memory (shmem/memfd), 4 KiB pages.
    Shmem,
}

impl Backing {
    /// The selftests' name (`-s`).
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::AnonymousThp => "anonymous_thp",
            Backing::Hugetlb2M => "anonymous_hugetlb_2mb",
            Backing::Hugetlb1G => "anonymous_hugetlb_1gb",
            Backing::Shmem => "shmem",
        }
    }

    /// Parse a selftest backing name.
    pub fn parse(s: &str) -> Option<Backing> {
        Some(match s {
            "anonymous" => Backing::Anonymous,
            "anonymous_thp" => Backing::AnonymousThp,
            // The selftests' anonymous_hugetlb is the default huge page size
            // (2 MiB on x86); shared_hugetlb is a hugetlb memfd, which the
            // machine models like an anonymous hugetlb mapping.
            "hugetlb2m" | "anonymous_hugetlb" | "anonymous_hugetlb_2mb" | "shared_hugetlb" => {
                Backing::Hugetlb2M
            }
            "hugetlb1g" | "anonymous_hugetlb_1gb" => Backing::Hugetlb1G,
            "shmem" | "shared" => Backing::Shmem,
            _ => return None,
        })
    }

    /// Alignment a region of this backing needs.
    pub fn alignment(self) -> u64 {
        match self {
            Backing::Hugetlb1G => 1 << 30,
            Backing::Hugetlb2M | Backing::AnonymousThp => 2 << 20,
            _ => PAGE,
        }
    }
}

/// Receives the primary MMU's notifications (an mmu_notifier subscriber).
pub trait SecondaryMmu: Send + Sync {
    /// Mappings of `range` are about to change. Ending the returned invalidation
    /// says the change is complete (`invalidate_range_end`).
    fn invalidate_range_start(&self, range: HvaRange) -> vmmu::Invalidation;
    /// Clear accessed state, report if any page was young.
    fn clear_young(&self, range: HvaRange) -> bool;
    /// Report whether a page is young.
    fn test_young(&self, hva: Hva) -> bool;
}

impl SecondaryMmu for vmmu::Vm {
    fn invalidate_range_start(&self, range: HvaRange) -> vmmu::Invalidation {
        vmmu::Vm::invalidate_range_start(self, range)
    }
    fn clear_young(&self, range: HvaRange) -> bool {
        vmmu::Vm::clear_young(self, range)
    }
    fn test_young(&self, hva: Hva) -> bool {
        vmmu::Vm::test_young(self, hva)
    }
}

// Entry bits (one entry per 4 KiB of a region).
const PRESENT: u64 = 1 << 63;
const WRITE: u64 = 1 << 62;
const PROT_RO: u64 = 1 << 61;
const KSM: u64 = 1 << 60;
const SWAPPED: u64 = 1 << 59;
const HUGE_2M: u64 = 1 << 58;
const HUGE_1G: u64 = 1 << 57;
const FRAME: u64 = (1 << 48) - 1;

/// Errors of host operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The range is not page aligned or is empty.
    #[error("Host range {start:#x}+{len:#x} is not aligned to {align:#x}")]
    Unaligned {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
        /// Required alignment.
        align: u64,
    },
    /// The range overlaps an existing region.
    #[error("Host range {start:#x}+{len:#x} overlaps an existing mapping")]
    Overlap {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
    },
}

/// Counters of the host's own activity.
#[derive(Debug, Default)]
pub struct HostStats {
    /// Faults that populated a page.
    pub populated: AtomicU64,
    /// Copy-on-write breaks (KSM pages written).
    pub cow_breaks: AtomicU64,
    /// Pages migrated.
    pub migrated: AtomicU64,
    /// Pages swapped out.
    pub swapped_out: AtomicU64,
    /// Pages swapped in.
    pub swapped_in: AtomicU64,
    /// Pages merged by KSM.
    pub ksm_merged: AtomicU64,
    /// Huge pages split.
    pub thp_splits: AtomicU64,
    /// Huge pages collapsed.
    pub thp_collapses: AtomicU64,
    /// Pages unmapped.
    pub unmapped: AtomicU64,
    /// Protection changes.
    pub mprotects: AtomicU64,
    /// Notifier start/end pairs issued.
    pub invalidations: AtomicU64,
    /// Aging calls.
    pub aging: AtomicU64,
    /// Migrations skipped because the page was pinned (an extra reference).
    pub migrate_busy: AtomicU64,
}

/// The host MMU.
pub struct HostMmu {
    mem: Arc<HostMemory>,
    regions: ArcSwap<Vec<Arc<Region>>>,
    /// Bumped after every change of `regions` (the per-thread cache's key).
    regions_gen: AtomicU64,
    /// This host's identity for the per-thread cache (never reused).
    id: u64,
    regions_update: Mutex<()>,
    secondaries: ArcSwap<Vec<Arc<dyn SecondaryMmu>>>,
    swap: Mutex<HashMap<u64, Box<[u64]>>>,
    next_swap: AtomicU64,
    ksm: Mutex<HashMap<Vec<u64>, Pfn>>,
    /// Counters.
    pub stats: HostStats,
}

impl std::fmt::Debug for HostMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMmu")
            .field("regions", &self.regions.load().len())
            .finish_non_exhaustive()
    }
}

/// What the host currently maps at an address (for the oracle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMapping {
    /// The 4 KiB frame.
    pub pfn: Pfn,
    /// Writes are allowed without a fault.
    pub writable: bool,
}

impl HostMmu {
    /// An empty address space over `mem`.
    pub fn new(mem: Arc<HostMemory>) -> Self {
        HostMmu {
            mem,
            regions: ArcSwap::new(Arc::new(Vec::new())),
            regions_gen: AtomicU64::new(0),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            regions_update: Mutex::new(()),
            secondaries: ArcSwap::new(Arc::new(Vec::new())),
            swap: Mutex::new(HashMap::new()),
            next_swap: AtomicU64::new(1),
            ksm: Mutex::new(HashMap::new()),
            stats: HostStats::default(),
        }
    }

    /// The arena.
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.mem
    }

    /// Subscribe a secondary MMU to invalidations.
    pub fn register(&self, s: Arc<dyn SecondaryMmu>) {
        let mut v: Vec<_> = (**self.secondaries.load()).clone();
        v.push(s);
        self.secondaries.store(Arc::new(v));
    }

    /// Drop every subscriber (before tearing the secondary MMUs down).
    pub fn unregister_all(&self) {
        self.secondaries.store(Arc::new(Vec::new()));
    }

    /// What the host maps at `hva` now (lock-free read of the entry).
    pub fn translate(&self, hva: Hva) -> Option<HostMapping> {
        let r = self.region(hva.0)?;
        let e = r.entries[r.idx(hva.0)].load(Ordering::Acquire);
        (e & PRESENT != 0).then_some(HostMapping {
            pfn: Pfn(e & FRAME),
            writable: e & WRITE != 0 && e & PROT_RO == 0,
        })
    }

    /// Run `f` between `invalidate_range_start` and `invalidate_range_end` on every
    /// secondary MMU. The notified range is grown to whole huge pages: changing
    /// part of a huge page (splitting it, moving it) changes how all of it is
    /// mapped, and Linux invalidates the whole folio or PMD range in that case.
    fn bracket<R>(&self, range: HvaRange, f: impl FnOnce() -> R) -> R {
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        let notified = self.huge_aligned(range);
        let subs = self.secondaries.load_full();
        let started: Vec<vmmu::Invalidation> = subs
            .iter()
            .map(|s| s.invalidate_range_start(notified))
            .collect();
        let r = f();
        // End in the order they started.
        for inv in started {
            inv.end();
        }
        r
    }

    fn populate(&self, r: &Region, idx: usize, write: bool) -> Result<u64, HostFaultError> {
        let alloc = |order| {
            self.mem
                .alloc(order, PageState::Data)
                .map_err(|_| HostFaultError::OutOfMemory)
        };
        let prot = |i: usize| r.entries[i].load(Ordering::Relaxed) & PROT_RO;
        let entry = |pfn: u64, i: usize, huge: u64| {
            let ro = prot(i);
            PRESENT | huge | pfn | if ro != 0 { 0 } else { WRITE } | ro
        };
        match r.backing {
            Backing::Hugetlb1G | Backing::Hugetlb2M | Backing::AnonymousThp => {
                let (n, order, bit) = if r.backing == Backing::Hugetlb1G {
                    (512 * 512, Order::G1, HUGE_1G)
                } else {
                    (512, Order::M2, HUGE_2M)
                };
                let first = idx & !(n - 1);
                // A huge page needs the whole range empty and under one
                // protection: Linux only allocates one inside a single VMA, and the
                // MMU maps a huge page with one write permission for all of it.
                let prot0 = r.entries[first].load(Ordering::Relaxed) & PROT_RO;
                let empty = (first..first + n).all(|i| {
                    let e = r.entries[i].load(Ordering::Relaxed);
                    e & (PRESENT | SWAPPED) == 0 && e & PROT_RO == prot0
                });
                if empty {
                    let pfn = alloc(order)?;
                    for k in 0..n {
                        r.entries[first + k]
                            .store(entry(pfn.0 + k as u64, first + k, bit), Ordering::Release);
                    }
                } else {
                    let pfn = alloc(Order::K4)?;
                    r.entries[idx].store(entry(pfn.0, idx, 0), Ordering::Release);
                }
            }
            Backing::Anonymous | Backing::Shmem => {
                let pfn = alloc(Order::K4)?;
                r.entries[idx].store(entry(pfn.0, idx, 0), Ordering::Release);
            }
        }
        let _ = write;
        self.stats.populated.fetch_add(1, Ordering::Relaxed);
        Ok(r.entries[idx].load(Ordering::Relaxed))
    }

    fn swap_in(&self, r: &Region, idx: usize, e: u64) -> Result<u64, HostFaultError> {
        let pfn = self
            .mem
            .alloc(Order::K4, PageState::Data)
            .map_err(|_| HostFaultError::OutOfMemory)?;
        if let Some(data) = self.swap.lock().remove(&(e & FRAME)) {
            for (w, v) in self.mem.page(pfn).iter().zip(data.iter()) {
                w.store(*v, Ordering::Relaxed);
            }
        }
        let ro = e & PROT_RO;
        let new = PRESENT | pfn.0 | ro | if ro != 0 { 0 } else { WRITE };
        r.entries[idx].store(new, Ordering::Release);
        self.stats.swapped_in.fetch_add(1, Ordering::Relaxed);
        Ok(new)
    }

    /// Give a written KSM page its own copy (Linux's `wp_page_copy`), bracketed by
    /// an invalidation of that page.
    fn break_cow(&self, r: &Region, idx: usize) -> Result<(), HostFaultError> {
        let hva = r.start + idx as u64 * PAGE;
        let range = HvaRange::new(Hva(hva), Hva(hva + PAGE));
        self.bracket(range, || {
            // Reshape first, like every other host event on the region.
            let _s = r.reshape.lock();
            let _l = r.lock(idx);
            let e = r.entries[idx].load(Ordering::Acquire);
            if e & PRESENT == 0 || e & KSM == 0 {
                return Ok(());
            }
            let new = self
                .mem
                .alloc(Order::K4, PageState::Data)
                .map_err(|_| HostFaultError::OutOfMemory)?;
            self.mem.copy_page(Pfn(e & FRAME), new);
            r.entries[idx].store(PRESENT | WRITE | new.0 | (e & PROT_RO), Ordering::Release);
            self.mem.put(Pfn(e & FRAME));
            self.stats.cow_breaks.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Host-side touch of every page (the VMM pre-faulting its memory): each page
    /// is faulted in for write and written.
    pub fn prefault(&self, range: HvaRange) -> Result<(), HostFaultError> {
        let mut hva = range.start.0;
        while hva < range.end.0 {
            let p = self.faultin(Hva(hva), FaultinRequest { write: true })?;
            // Touch the page as the VMM's own write would: a fresh arena frame is
            // only committed by the kernel when first written.
            self.mem.commit(p.pfn);
            self.release(p.pfn, true);
            hva += PAGE;
        }
        Ok(())
    }

    /// The VMM reads the word at `hva` through its own mapping (faulting the
    /// page in as a read would).
    pub fn read_u64(&self, hva: Hva) -> Result<u64, HostFaultError> {
        self.with_word(hva, false, |w| w.load(Ordering::Acquire))
    }

    /// The VMM reads the whole 4 KiB page at `hva` through its own mapping (a
    /// migration sending a page).
    pub fn read_page(&self, hva: Hva) -> Result<Box<[u64]>, HostFaultError> {
        let p = self.faultin(Hva(hva.0 & !(PAGE - 1)), FaultinRequest { write: false })?;
        let data = self
            .mem
            .page(p.pfn)
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        self.release(p.pfn, false);
        Ok(data)
    }

    /// The VMM writes the whole 4 KiB page at `hva` (a migration receiving a
    /// page); `data` shorter than a page leaves the rest as it was.
    pub fn write_page(&self, hva: Hva, data: &[u64]) -> Result<(), HostFaultError> {
        let p = self.faultin(Hva(hva.0 & !(PAGE - 1)), FaultinRequest { write: true })?;
        self.mem.commit(p.pfn);
        for (w, v) in self.mem.page(p.pfn).iter().zip(data) {
            w.store(*v, Ordering::Relaxed);
        }
        self.release(p.pfn, true);
        Ok(())
    }

    /// The VMM writes the word at `hva` through its own mapping (a store made
    /// while the host moves the page is never lost: see `with_word`).
    pub fn write_u64(&self, hva: Hva, v: u64) -> Result<(), HostFaultError> {
        self.with_word(hva, true, |w| w.store(v, Ordering::Release))
    }

    /// Inside a bracket: split the huge pages `range` cuts through (a change to
    /// part of one changes how all of it is mapped), then run `f` on every page of
    /// `range`, holding its page-table lock. The region's reshape lock is held
    /// throughout, so no other host event (migration, collapse, KSM) works on
    /// entries of the range between its checks and its changes.
    fn for_each_page_locked(&self, range: HvaRange, mut f: impl FnMut(&Region, usize)) {
        self.with_regions(range, |r| {
            let _s = r.reshape.lock();
            self.split_range(r, range);
            let mut hva = range.start.0.max(r.start) & !(PAGE - 1);
            let end = range.end.0.min(r.start + r.pages * PAGE);
            while hva < end {
                let i = r.idx(hva);
                let _l = r.lock(i);
                f(r, i);
                hva += PAGE;
            }
        });
    }

    /// Turn the huge mapping containing entry `idx` into 4 KiB mappings of the
    /// same frames (caller holds the reshape lock and is inside a bracket).
    fn split_at(&self, r: &Region, idx: usize) {
        let e = r.entries[idx].load(Ordering::Acquire);
        let (n, bit) = if e & HUGE_1G != 0 {
            (512 * 512, HUGE_1G)
        } else if e & HUGE_2M != 0 {
            (512, HUGE_2M)
        } else {
            return;
        };
        let first = idx & !(n - 1);
        for i in first..first + n {
            let _l = r.lock(i);
            r.entries[i].fetch_and(!bit, Ordering::AcqRel);
        }
        self.stats.thp_splits.fetch_add(1, Ordering::Relaxed);
    }

    fn split_range(&self, r: &Region, range: HvaRange) {
        for hva in [range.start.0, range.end.0.saturating_sub(PAGE)] {
            if r.contains(hva) {
                self.split_at(r, r.idx(hva));
            }
        }
    }

    /// `MADV_DONTNEED`: drop the pages of `range`; later accesses see zeroes.
    pub fn madvise_dontneed(&self, range: HvaRange) {
        self.bracket(range, || {
            self.for_each_page_locked(range, |r, i| {
                let e = r.entries[i].load(Ordering::Acquire);
                // Entries never touched stay unwritten (their page of the
                // host page table is never committed for a sparse guest).
                if e & !PROT_RO != 0 {
                    r.entries[i].store(e & PROT_RO, Ordering::Release);
                }
                if e & PRESENT != 0 {
                    self.mem.put(Pfn(e & FRAME));
                    self.stats.unmapped.fetch_add(1, Ordering::Relaxed);
                } else if e & SWAPPED != 0 {
                    self.swap.lock().remove(&(e & FRAME));
                }
            });
        });
    }

    /// Grow `range` to whole huge pages of the regions it touches: an operation
    /// on part of a huge page (migration, split, collapse) changes all of it, so the
    /// invalidation must cover all of it, as Linux invalidates a whole folio.
    fn huge_aligned(&self, range: HvaRange) -> HvaRange {
        let (mut start, mut end) = (range.start.0, range.end.0);
        self.with_regions(range, |r| {
            // Regions are aligned to their page size, so this stays inside them.
            let a = r.backing.alignment();
            start = start.min(range.start.0 & !(a - 1));
            end = end.max(range.end.0.div_ceil(a) * a);
        });
        HvaRange::new(Hva(start), Hva(end))
    }

    fn with_regions(&self, range: HvaRange, mut f: impl FnMut(&Region)) {
        for r in self.regions.load().iter() {
            if r.start < range.end.0 && range.start.0 < r.start + r.pages * PAGE {
                f(r);
            }
        }
    }

    /// Start addresses of all regions.
    pub fn region_starts(&self) -> Vec<u64> {
        self.regions.load().iter().map(|r| r.start).collect()
    }

    /// Pages currently mapped (present) in all regions.
    pub fn resident_pages(&self) -> u64 {
        self.regions
            .load()
            .iter()
            .map(|r| {
                r.entries
                    .iter()
                    .filter(|e| e.load(Ordering::Relaxed) & PRESENT != 0)
                    .count() as u64
            })
            .sum()
    }

    /// Whether the page of `hva` is mapped to a frame now (neither
    /// unpopulated nor swapped out).
    pub fn is_resident(&self, hva: Hva) -> bool {
        self.region(hva.0)
            .is_some_and(|r| r.entries[r.idx(hva.0)].load(Ordering::Relaxed) & PRESENT != 0)
    }

    /// Pages of `range` mapped to frames now.
    pub fn resident_in(&self, range: HvaRange) -> u64 {
        let mut n = 0;
        let mut hva = range.start.0 & !(PAGE - 1);
        while hva < range.end.0 {
            match self.region(hva) {
                Some(r) => {
                    let end = range.end.0.min(r.start + r.pages * PAGE);
                    let (a, b) = (r.idx(hva), r.idx(end - 1) + 1);
                    n += r.entries[a..b]
                        .iter()
                        .filter(|e| e.load(Ordering::Relaxed) & PRESENT != 0)
                        .count() as u64;
                    hva = end;
                }
                None => hva += PAGE,
            }
        }
        n
    }

    /// Swap slots in use.
    pub fn swap_slots(&self) -> usize {
        self.swap.lock().len()
    }
}

/// The 8-byte word of its page `hva` falls in.
fn word_index(hva: Hva) -> usize {
    ((hva.0 & 0xfff) / 8) as usize
}

impl HostMmu {
    /// [`PrimaryMmu::faultin`] in region `r`.
    fn faultin_in(
        &self,
        r: &Region,
        hva: Hva,
        req: FaultinRequest,
    ) -> Result<HostPfn, HostFaultError> {
        let idx = r.idx(hva.0);
        loop {
            let guard = r.lock(idx);
            let mut e = r.entries[idx].load(Ordering::Acquire);
            if req.write && e & PROT_RO != 0 {
                return Err(HostFaultError::ReadOnly);
            }
            if e & PRESENT == 0 {
                if r.backing == Backing::Hugetlb1G
                    || matches!(r.backing, Backing::Hugetlb2M | Backing::AnonymousThp)
                {
                    // Whole-chunk population takes the reshape lock first.
                    drop(guard);
                    let _s = r.reshape.lock();
                    let _g = r.lock(idx);
                    let e2 = r.entries[idx].load(Ordering::Acquire);
                    if e2 & PRESENT == 0 {
                        if e2 & SWAPPED != 0 {
                            self.swap_in(r, idx, e2)?;
                        } else {
                            self.populate(r, idx, req.write)?;
                        }
                    }
                    continue;
                }
                e = if e & SWAPPED != 0 {
                    self.swap_in(r, idx, e)?
                } else {
                    self.populate(r, idx, req.write)?
                };
            }
            if req.write && e & WRITE == 0 {
                if e & KSM != 0 {
                    drop(guard);
                    self.break_cow(r, idx)?;
                    continue;
                }
                // An exclusive page made read-only by mprotect and writable again:
                // reuse it (no new frame, so no invalidation). A huge page has one
                // write bit for all of it.
                e |= WRITE;
                let n = if e & HUGE_1G != 0 {
                    512 * 512
                } else if e & HUGE_2M != 0 {
                    512
                } else {
                    1
                };
                let first = idx & !(n - 1);
                for i in first..first + n {
                    r.entries[i].fetch_or(WRITE, Ordering::AcqRel);
                }
            }
            let pfn = Pfn(e & FRAME);
            self.mem.get(pfn);
            return Ok(HostPfn {
                pfn,
                writable: e & WRITE != 0 && e & PROT_RO == 0,
                level: entry_level(e),
            });
        }
    }

    /// The word at `hva` if the page is mapped now, read holding the page's
    /// lock (no fault-in; the mapping and the frame's contents are one state).
    pub fn peek_word(&self, hva: Hva) -> Option<u64> {
        let r = self.region(hva.0)?;
        let idx = r.idx(hva.0);
        let _l = r.lock(idx);
        let e = r.entries[idx].load(Ordering::Acquire);
        let pfn = Pfn(e & FRAME);
        (e & PRESENT != 0 && self.mem.contains(pfn))
            .then(|| self.mem.page(pfn)[word_index(hva)].load(Ordering::Acquire))
    }

    /// Access the word at `hva` as a user-space load or store does: through
    /// the host's mapping, faulting it in. The access is made holding the
    /// page's lock, after checking the mapping still names the frame the
    /// fault-in returned: every change of a mapping (migration, swap-out,
    /// KSM, collapse) copies and switches under that lock, so the access
    /// lands before the copy or goes to the new frame, never to a frame
    /// that was already copied (a write there would be lost, as a store
    /// through a stale mapping would).
    fn with_word<R>(
        &self,
        hva: Hva,
        write: bool,
        f: impl Fn(&crate::sync::AtomicU64) -> R,
    ) -> Result<R, HostFaultError> {
        loop {
            let h = self.faultin(hva, FaultinRequest { write })?;
            let r = self.region(hva.0).ok_or(HostFaultError::NotMapped)?;
            let idx = r.idx(hva.0);
            let out = {
                let _l = r.lock(idx);
                let e = r.entries[idx].load(Ordering::Acquire);
                let still = e & PRESENT != 0
                    && Pfn(e & FRAME) == h.pfn
                    && (!write || (e & WRITE != 0 && e & PROT_RO == 0));
                still.then(|| f(&self.mem.page(h.pfn)[word_index(hva)]))
            };
            self.release(h.pfn, write);
            if let Some(v) = out {
                return Ok(v);
            }
        }
    }
}

impl PrimaryMmu for HostMmu {
    fn faultin(&self, hva: Hva, req: FaultinRequest) -> Result<HostPfn, HostFaultError> {
        self.with_region(hva.0, |r| self.faultin_in(r, hva, req))
            .ok_or(HostFaultError::NotMapped)?
    }

    fn release(&self, pfn: Pfn, _mapped_writable: bool) {
        self.mem.put(pfn);
    }

    fn read_u64(&self, hva: Hva) -> Result<u64, HostFaultError> {
        HostMmu::read_u64(self, hva)
    }

    fn peek_u64(&self, hva: Hva) -> Option<u64> {
        self.peek_word(hva)
    }

    fn cmpxchg_u64(
        &self,
        hva: Hva,
        old: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, HostFaultError> {
        self.with_word(hva, true, |w| {
            w.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
        })
    }

    fn write_u64(&self, hva: Hva, value: u64) -> Result<(), HostFaultError> {
        HostMmu::write_u64(self, hva, value)
    }

    fn mapping_level(&self, hva: Hva) -> Level {
        self.with_region(hva.0, |r| {
            entry_level(r.entries[r.idx(hva.0)].load(Ordering::Acquire))
        })
        .unwrap_or(Level::K4)
    }
}

/// The size of the host mapping an entry belongs to (4 KiB when not present).
fn entry_level(e: u64) -> Level {
    if e & PRESENT == 0 {
        Level::K4
    } else if e & HUGE_1G != 0 {
        Level::G1
    } else if e & HUGE_2M != 0 {
        Level::M2
    } else {
        Level::K4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::Rng;

    /// Only a present entry maps anything: size bits on an entry that is
    /// not present (stale, or a swap entry whose slot number reaches them)
    /// say 4 KiB, the level of a fault that will populate it.
    #[test]
    fn test_entry_level_is_the_size_of_present_entries_only() {
        assert_eq!(entry_level(PRESENT), Level::K4);
        assert_eq!(entry_level(PRESENT | HUGE_2M), Level::M2);
        assert_eq!(entry_level(PRESENT | HUGE_1G), Level::G1);
        for bits in [HUGE_2M, HUGE_1G, SWAPPED | HUGE_2M | HUGE_1G] {
            assert_eq!(entry_level(bits), Level::K4, "{bits:#x}");
        }
    }

    const BASE: u64 = 0x10_0000_0000;

    /// Every present entry points at an allocated frame whose reference count
    /// equals the number of entries mapping it (plus KSM's own reference).
    fn check(h: &HostMmu) {
        let mut maps: HashMap<u64, u32> = HashMap::new();
        for r in h.regions.load().iter() {
            for e in r.entries.iter() {
                let e = e.load(Ordering::Relaxed);
                if e & PRESENT != 0 {
                    *maps.entry(e & FRAME).or_default() += 1;
                }
            }
        }
        for pfn in h.ksm.lock().values() {
            *maps.entry(pfn.0).or_default() += 1;
        }
        // A huge page is one mapping: one protection for all of its pages.
        for r in h.regions.load().iter() {
            for (i, e) in r.entries.iter().enumerate() {
                let e = e.load(Ordering::Relaxed);
                if e & (HUGE_2M | HUGE_1G) != 0 {
                    let n = if e & HUGE_1G != 0 { 512 * 512 } else { 512 };
                    let first = r.entries[i & !(n - 1)].load(Ordering::Relaxed);
                    assert_eq!(
                        e & PROT_RO,
                        first & PROT_RO,
                        "huge page at entry {i:#x} mixes protections"
                    );
                }
            }
        }
        for (pfn, n) in &maps {
            assert_eq!(
                h.mem.state(Pfn(*pfn)),
                PageState::Data,
                "{pfn:#x} mapped but free"
            );
            assert_eq!(h.mem.refcount(Pfn(*pfn)), *n, "refcount of {pfn:#x}");
        }
        assert_eq!(
            h.mem.data_pages(),
            maps.len() as u64,
            "frames allocated but unmapped"
        );
        assert_eq!(h.mem.violations.double_frees.load(Ordering::Relaxed), 0);
        assert_eq!(h.mem.violations.bad_puts.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn test_host_thp_collapse_refuses_a_chunk_with_mixed_protections() {
        // Two host threads: one mprotects half a chunk read-only while another
        // runs khugepaged over it. A collapse then would make one huge page with
        // two protections, which the MMU would map with one.
        let mem = Arc::new(HostMemory::new(1 << 30, true).unwrap());
        let h = HostMmu::new(mem);
        h.map_region(Hva(BASE), 2 << 20, Backing::AnonymousThp)
            .unwrap();
        let all = HvaRange::new(Hva(BASE), Hva(BASE + (2 << 20)));
        h.prefault(all).unwrap();
        h.thp_split(all);
        h.mprotect(HvaRange::new(Hva(BASE), Hva(BASE + (1 << 20))), false);
        assert_eq!(h.thp_collapse(all), 0, "collapsed over two protections");
        check(&h);
        h.mprotect(all, true);
        assert_eq!(h.thp_collapse(all), 1, "one protection again: collapses");
        check(&h);
        h.unmap_region(Hva(BASE));
    }

    /// The per-thread region cache never answers with a region the host no
    /// longer has, nor with another host's region.
    #[test]
    fn test_host_region_cache_follows_region_changes_and_hosts() {
        let mem = Arc::new(HostMemory::new(1 << 30, true).unwrap());
        let w = FaultinRequest { write: true };
        let touch = |h: &HostMmu, hva: u64| {
            h.faultin(Hva(hva), w).map(|p| {
                h.release(p.pfn, true);
                p.pfn
            })
        };
        let h = HostMmu::new(mem.clone());
        h.map_region(Hva(BASE), 2 << 20, Backing::Anonymous)
            .unwrap();
        touch(&h, BASE).unwrap(); // this thread now caches the region
        assert!(h.unmap_region(Hva(BASE)));
        assert_eq!(
            touch(&h, BASE),
            Err(HostFaultError::NotMapped),
            "a region gone"
        );
        assert_eq!(h.mapping_level(Hva(BASE)), Level::K4);
        h.map_region(Hva(BASE), 2 << 20, Backing::Anonymous)
            .unwrap();
        touch(&h, BASE).unwrap();
        assert!(h.is_resident(Hva(BASE)), "the new region's own page");
        // A second region of the same list: the cached first one does not
        // hold its address.
        h.map_region(Hva(BASE + (8 << 20)), 2 << 20, Backing::Anonymous)
            .unwrap();
        touch(&h, BASE).unwrap();
        touch(&h, BASE + (8 << 20)).unwrap();
        assert!(h.is_resident(Hva(BASE + (8 << 20))));
        assert!(h.unmap_region(Hva(BASE + (8 << 20))));
        assert!(h.unmap_region(Hva(BASE)));
        // Two hosts whose lists are at the same generation: the one without
        // a region at the address must not find the other's.
        let a = HostMmu::new(mem.clone());
        let b = HostMmu::new(mem.clone());
        a.map_region(Hva(BASE), 2 << 20, Backing::Anonymous)
            .unwrap();
        b.map_region(Hva(BASE + (4 << 30)), 2 << 20, Backing::Anonymous)
            .unwrap();
        touch(&a, BASE).unwrap();
        assert_eq!(
            touch(&b, BASE),
            Err(HostFaultError::NotMapped),
            "another host's region"
        );
        a.unmap_region(Hva(BASE));
        b.unmap_region(Hva(BASE + (4 << 30)));
        check(&h);
    }

    fn random_ops(backing: Backing, seed: u64) {
        let mem = Arc::new(HostMemory::new(1 << 30, true).unwrap());
        let h = HostMmu::new(mem);
        let len = 8 << 20;
        h.map_region(Hva(BASE), len, backing).unwrap();
        let pages = len / PAGE;
        let mut rng = Rng::new(seed);
        for step in 0..3000 {
            let p = rng.below(pages);
            let n = 1 + rng.below(1500.min(pages - p));
            let range = HvaRange::new(Hva(BASE + p * PAGE), Hva(BASE + (p + n) * PAGE));
            match rng.below(11) {
                10 => {
                    let _ = h.prefault(range);
                }
                0..=2 => {
                    let write = rng.below(2) == 0;
                    if let Ok(x) = h.faultin(Hva(BASE + p * PAGE), FaultinRequest { write }) {
                        h.release(x.pfn, write);
                    }
                }
                3 => {
                    h.migrate(range);
                }
                4 => {
                    h.swap_out(range);
                }
                5 => {
                    h.ksm_merge(range);
                }
                6 => h.thp_split(range),
                7 => {
                    h.thp_collapse(range);
                }
                8 => h.mprotect(range, rng.below(2) == 0),
                _ => h.madvise_dontneed(range),
            }
            check(&h);
            let _ = step;
        }
        h.ksm_release();
        h.unmap_region(Hva(BASE));
        assert_eq!(h.mem.data_pages(), 0);
    }

    #[test]
    fn test_host_random_ops_keep_refcounts_exact_anonymous() {
        random_ops(Backing::Anonymous, 1);
    }

    #[test]
    fn test_host_random_ops_keep_refcounts_exact_thp() {
        for seed in 1..4 {
            random_ops(Backing::AnonymousThp, seed);
        }
    }

    #[test]
    fn test_host_random_ops_keep_refcounts_exact_hugetlb() {
        random_ops(Backing::Hugetlb2M, 5);
    }
}
