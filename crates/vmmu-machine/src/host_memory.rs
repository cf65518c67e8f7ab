//! Host physical memory: a pfn arena over one large anonymous mapping.
//!
//! The arena is reserved with `MAP_NORESERVE`, so sizes of tens of GiB cost
//! nothing until pages are touched. Frame numbers are page indices offset by
//! [`PFN_BASE`] (so frame 0 is never valid, and every block is aligned in frame
//! numbers for the largest page the arena hands out). Every 4 KiB frame carries a state
//! (free, data, table) and a reference count; allocation zeroes, freeing poisons,
//! so a stale access through a translation that should have been gone reads
//! [`POISON`] and is caught by the oracle's data checks.
//!
//! All accesses to arena memory are atomic (relaxed where no ordering is needed),
//! because the MMU, the page walker and guest accesses touch the same words from
//! different threads; a correct run never races on data, a buggy one must still be
//! memory safe.

use std::ptr::NonNull;

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use vmmu::{Pfn, Table, TableMemory, TableMemoryError};

use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// First valid frame number: 1 GiB in frames, so a 1 GiB block that is aligned
/// inside the arena also has a 1 GiB-aligned frame number. The MMU maps a huge
/// page only where gfn and pfn agree modulo its size; a base aligned for 2 MiB only
/// would make every 1 GiB host page fall back to 2 MiB mappings.
pub const PFN_BASE: u64 = 1 << 18;
/// Value written over every word of a freed page.
pub const POISON: u64 = 0xdead_beef_dead_beef;
/// 4 KiB.
pub const PAGE: u64 = 4096;
const WORDS: usize = 512;

/// Allocation sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Order {
    /// 4 KiB.
    K4,
    /// 2 MiB, 2 MiB aligned.
    M2,
    /// 1 GiB, 1 GiB aligned.
    G1,
}

impl Order {
    /// 4 KiB frames in a block.
    pub const fn pages(self) -> u64 {
        match self {
            Order::K4 => 1,
            Order::M2 => 512,
            Order::G1 => 512 * 512,
        }
    }
}

/// What a frame is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Never allocated: still the kernel's zero-filled, untouched memory.
    Fresh = 0,
    /// Guest or host data.
    Data = 1,
    /// An MMU page-table page.
    Table = 2,
    /// Freed (and poisoned) before; zeroed again when reallocated.
    Free = 3,
    /// A guest_memfd page: guest-private, mapped by no host region.
    Private = 4,
    /// A page of a guest_memfd whose memory is shared (`MMAP | INIT_SHARED`):
    /// the host reaches it through its mapping of the file, not a host region.
    GmemShared = 5,
}

/// Errors of the arena.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// The arena could not be reserved.
    #[error("Cannot reserve {bytes} bytes of host memory: {reason}")]
    Reserve {
        /// Requested size.
        bytes: u64,
        /// What mmap said.
        reason: String,
    },
    /// No free block of the requested size.
    #[error("Host memory exhausted allocating a {0:?} block")]
    Exhausted(Order),
}

/// Number of 4 KiB free-list shards; threads spread over them so concurrent
/// faults do not serialise on one lock.
const SHARDS: usize = 8;

/// Violations of the arena's own rules (freeing twice, freeing a page of the
/// wrong kind). Always bugs of the code above it.
#[derive(Debug, Default)]
pub struct ArenaViolations {
    /// Frees of free pages.
    pub double_frees: AtomicU64,
    /// References dropped on free pages.
    pub bad_puts: AtomicU64,
}

/// The arena.
pub struct HostMemory {
    base: NonNull<AtomicU64>,
    npages: u64,
    state: Box<[AtomicU8]>,
    refs: Box<[AtomicU32]>,
    small: [CachePadded<Mutex<Vec<u32>>>; SHARDS],
    medium: Mutex<Vec<u32>>,
    large: Mutex<Vec<u32>>,
    bump: AtomicU64,
    /// Per-shard signed counts of allocated frames, [data, table]: threads update
    /// their own shard so concurrent faults do not bounce one cache line.
    counts: [CachePadded<[std::sync::atomic::AtomicI64; 2]>; SHARDS],
    poison_on_free: bool,
    /// Rule violations seen.
    pub violations: ArenaViolations,
}

// SAFETY: the arena memory is only ever accessed through `AtomicU64`s, which are
// `Sync`; the raw pointer is just the base of that array and never changes.
unsafe impl Send for HostMemory {}
// SAFETY: as above; all shared state is atomics or mutexes.
unsafe impl Sync for HostMemory {}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMemory")
            .field("pages", &self.npages)
            .field("data", &self.data_pages())
            .field("tables", &self.table_pages())
            .finish()
    }
}

/// A boxed slice of atomics, zero-initialised by the allocator (lazily committed
/// by the kernel for large sizes).
pub(crate) fn zeroed_atomics<T: Default>(n: usize) -> Box<[T]> {
    // All integer atomics are valid when zeroed, and `Default` is zero for them.
    let layout =
        std::alloc::Layout::array::<T>(n.max(1)).unwrap_or_else(|_| std::alloc::Layout::new::<T>());
    // SAFETY: layout has non-zero size (n.max(1) elements of a non-zero-size type).
    let p = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if p.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `p` points to `n.max(1)` zeroed `T`s allocated with the global
    // allocator with exactly this layout; the all-zero pattern is a valid atomic
    // integer (callers only use atomic integer types).
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n.max(1))) }
}

thread_local! {
    static SHARD: usize = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS
    };
}

impl HostMemory {
    /// Reserve `bytes` (rounded up to 1 GiB) of host memory.
    pub fn new(bytes: u64, poison_on_free: bool) -> Result<HostMemory, MemoryError> {
        let gib = 1u64 << 30;
        let bytes = bytes.div_ceil(gib).max(1) * gib;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Reserve {
                bytes,
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        // Keep the host's own THP out of the picture: the machine models huge
        // pages itself, and first-touch costs must be comparable to a plain 4 KiB
        // baseline.
        // SAFETY: advising the mapping we just created.
        unsafe { libc::madvise(p, bytes as usize, libc::MADV_NOHUGEPAGE) };
        let npages = bytes / PAGE;
        Ok(HostMemory {
            base: NonNull::new(p as *mut AtomicU64).ok_or(MemoryError::Exhausted(Order::G1))?,
            npages,
            state: zeroed_atomics(npages as usize),
            refs: zeroed_atomics(npages as usize),
            small: std::array::from_fn(|_| CachePadded::new(Mutex::new(Vec::new()))),
            medium: Mutex::new(Vec::new()),
            large: Mutex::new(Vec::new()),
            bump: AtomicU64::new(0),
            counts: std::array::from_fn(|_| CachePadded::new(Default::default())),
            poison_on_free,
            violations: ArenaViolations::default(),
        })
    }

    /// Have the kernel commit the arena's memory for the frames allocated so
    /// far and the next `ahead` bytes (contents stay zero, states stay
    /// fresh). Frames are handed out in ascending order (each thread's free
    /// list a 2 MiB block at a time), so this covers what a run allocates
    /// next: a benchmark that pre-touches its host memory also wants the
    /// frames the MMU's tables will come from committed, as a kernel's page
    /// allocator hands out memory that is already there. Returns the bytes
    /// committed from the arena's start.
    pub fn commit_ahead(&self, ahead: u64) -> u64 {
        let used = (self.data_pages() + self.table_pages()) * PAGE;
        let bytes = used
            .saturating_add(ahead)
            .saturating_add(SHARDS as u64 * Order::M2.pages() * PAGE)
            .min(self.npages * PAGE);
        // SAFETY: advising a range inside the arena's own mapping; populating
        // writes nothing a reader could see (the pages read as zero before and
        // after).
        let r = unsafe {
            libc::madvise(
                self.base.as_ptr() as *mut libc::c_void,
                bytes as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            // Kernels before 5.14: touch each page (adding zero changes
            // nothing, but is a write the kernel must commit a page for).
            for i in 0..(bytes / PAGE) as usize {
                // SAFETY: i < npages: inside the mapping, accessed atomically.
                let w = unsafe { &*self.base.as_ptr().add(i * WORDS) };
                w.fetch_add(0, Ordering::Relaxed);
            }
        }
        bytes
    }

    /// Total frames.
    pub fn capacity_pages(&self) -> u64 {
        self.npages
    }

    fn index(&self, pfn: Pfn) -> Option<usize> {
        let i = pfn.0.checked_sub(PFN_BASE)?;
        (i < self.npages).then_some(i as usize)
    }

    /// The 512 words of frame `pfn`. Panics on a frame outside the arena (an MMU
    /// or model bug, never input).
    pub fn page(&self, pfn: Pfn) -> &[AtomicU64; WORDS] {
        let i = self
            .index(pfn)
            .unwrap_or_else(|| panic!("{pfn:?} outside the host arena"));
        // SAFETY: `i < npages`, so the page lies inside the mapping, which lives as
        // long as `self`; the memory is 4 KiB aligned and only accessed atomically.
        unsafe { &*(self.base.as_ptr().add(i * WORDS) as *const [AtomicU64; WORDS]) }
    }

    /// Whether `pfn` is inside the arena.
    pub fn contains(&self, pfn: Pfn) -> bool {
        self.index(pfn).is_some()
    }

    /// State of a frame.
    pub fn state(&self, pfn: Pfn) -> PageState {
        match self
            .index(pfn)
            .map(|i| self.state[i].load(Ordering::Acquire))
        {
            Some(1) => PageState::Data,
            Some(2) => PageState::Table,
            Some(4) => PageState::Private,
            Some(5) => PageState::GmemShared,
            Some(0) => PageState::Fresh,
            _ => PageState::Free,
        }
    }

    fn pop_block(&self, order: Order) -> Result<u64, MemoryError> {
        match order {
            Order::K4 => {
                let shard = SHARD.with(|s| *s);
                if let Some(i) = self.small[shard].lock().pop() {
                    return Ok(i as u64);
                }
                // Refill this shard from a 2 MiB block; when the arena has no
                // block left, take frames other threads freed (the host frees what
                // vCPUs allocated), so long runs reuse memory instead of failing.
                let block = match self.pop_block(Order::M2) {
                    Ok(b) => b,
                    Err(e) => {
                        for k in 1..SHARDS {
                            let mut list = self.small[(shard + k) % SHARDS].lock();
                            if let Some(i) = list.pop() {
                                let take = list.len().min(63);
                                let at = list.len() - take;
                                let batch: Vec<u32> = list.drain(at..).collect();
                                drop(list);
                                self.small[shard].lock().extend(batch);
                                return Ok(i as u64);
                            }
                        }
                        return Err(e);
                    }
                };
                let mut list = self.small[shard].lock();
                list.extend((block + 1..block + 512).rev().map(|i| i as u32));
                Ok(block)
            }
            Order::M2 => {
                if let Some(i) = self.medium.lock().pop() {
                    return Ok(i as u64);
                }
                let block = self.pop_block(Order::G1)?;
                let mut list = self.medium.lock();
                list.extend((1..512).rev().map(|k| (block + k * 512) as u32));
                Ok(block)
            }
            Order::G1 => {
                if let Some(i) = self.large.lock().pop() {
                    return Ok(i as u64);
                }
                let i = self.bump.fetch_add(Order::G1.pages(), Ordering::Relaxed);
                if i + Order::G1.pages() > self.npages {
                    return Err(MemoryError::Exhausted(Order::G1));
                }
                Ok(i)
            }
        }
    }

    /// Allocate a zeroed block; every 4 KiB frame in it gets `state` and a
    /// reference count of 1.
    pub fn alloc(&self, order: Order, state: PageState) -> Result<Pfn, MemoryError> {
        let i = self
            .pop_block(order)
            .map_err(|_| MemoryError::Exhausted(order))?;
        for k in i..i + order.pages() {
            let k = k as usize;
            self.refs[k].store(1, Ordering::Relaxed);
            // Never-used frames are still the kernel's zero pages (and stay
            // uncommitted until first written, as a host's fresh pages do); reused
            // ones were poisoned and are zeroed with atomic stores (plain movs).
            if self.state[k].load(Ordering::Relaxed) != PageState::Fresh as u8 {
                // SAFETY: k < npages (the block lies inside the arena).
                let words =
                    unsafe { &*(self.base.as_ptr().add(k * WORDS) as *const [AtomicU64; WORDS]) };
                for w in words.iter() {
                    w.store(0, Ordering::Relaxed);
                }
            }
            // Release: the zeroed contents are visible to whoever sees the state.
            self.state[k].store(state as u8, Ordering::Release);
        }
        self.count(state == PageState::Table, order.pages() as i64);
        Ok(Pfn(PFN_BASE + i))
    }

    /// Take another reference on a frame.
    pub fn get(&self, pfn: Pfn) {
        if let Some(i) = self.index(pfn) {
            self.refs[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drop a reference; the last one frees the frame (poisoned, back on a 4 KiB
    /// free list). Returns whether it was freed.
    pub fn put(&self, pfn: Pfn) -> bool {
        let Some(i) = self.index(pfn) else {
            return false;
        };
        let prev =
            self.refs[i].fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        match prev {
            Ok(1) => {
                self.release_frame(i);
                true
            }
            Ok(_) => false,
            Err(_) => {
                self.violations.bad_puts.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn release_frame(&self, i: usize) {
        let prev = self.state[i].swap(PageState::Free as u8, Ordering::AcqRel);
        if prev == PageState::Free as u8 || prev == PageState::Fresh as u8 {
            self.violations.double_frees.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.count(prev == PageState::Table as u8, -1);
        if self.poison_on_free {
            // SAFETY: i < npages.
            let words =
                unsafe { &*(self.base.as_ptr().add(i * WORDS) as *const [AtomicU64; WORDS]) };
            for w in words.iter() {
                w.store(POISON, Ordering::Relaxed);
            }
        }
        let shard = SHARD.with(|s| *s);
        self.small[shard].lock().push(i as u32);
    }

    /// Make the kernel back a frame with real memory now, without changing its
    /// contents (MADV_POPULATE_WRITE). A load-then-store would first map the
    /// kernel's zero page and then copy it on write, two faults and a TLB
    /// shootdown that interrupts every other thread of the process.
    pub fn commit(&self, pfn: Pfn) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let page = self.page(pfn);
        // SAFETY: the range is one page of our own mapping; populating does not
        // change its contents.
        let r = unsafe {
            libc::madvise(
                page.as_ptr() as *mut libc::c_void,
                PAGE as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            // Older kernels: a real store of the current value.
            let w = &page[0];
            let v = w.load(Ordering::Relaxed);
            w.store(v, Ordering::Relaxed);
        }
    }

    /// Reference count of a frame.
    pub fn refcount(&self, pfn: Pfn) -> u32 {
        self.index(pfn)
            .map_or(0, |i| self.refs[i].load(Ordering::Acquire))
    }

    /// Data frames allocated.
    pub fn data_pages(&self) -> u64 {
        self.total(0)
    }

    fn count(&self, table: bool, n: i64) {
        let shard = SHARD.with(|s| *s);
        self.counts[shard][table as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn total(&self, which: usize) -> u64 {
        self.counts
            .iter()
            .map(|c| c[which].load(Ordering::Relaxed))
            .sum::<i64>()
            .max(0) as u64
    }

    /// Table frames allocated.
    pub fn table_pages(&self) -> u64 {
        self.total(1)
    }

    /// Copy one frame's contents to another.
    pub fn copy_page(&self, from: Pfn, to: Pfn) {
        let (a, b) = (self.page(from), self.page(to));
        for (s, d) in a.iter().zip(b.iter()) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no references to
        // it can outlive `self`.
        unsafe {
            libc::munmap(
                self.base.as_ptr() as *mut libc::c_void,
                (self.npages * PAGE) as usize,
            )
        };
    }
}

impl TableMemory for HostMemory {
    fn alloc_table_page(&self) -> Result<Pfn, TableMemoryError> {
        self.alloc(Order::K4, PageState::Table)
            .map_err(|_| TableMemoryError::OutOfMemory)
    }

    fn free_table_page(&self, pfn: Pfn) {
        if self.state(pfn) != PageState::Table {
            self.violations.double_frees.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.put(pfn);
    }

    fn table(&self, pfn: Pfn) -> &Table {
        self.page(pfn)
    }

    /// The whole arena, as the kernel's direct map covers all memory.
    fn linear(&self) -> Option<vmmu::LinearTables> {
        // SAFETY: the arena is `npages` consecutive 4 KiB frames from `base`
        // (aligned, frame `PFN_BASE + i` at index `i`, as `page` computes),
        // mapped until `self` drops and only accessed through atomics.
        Some(unsafe { vmmu::LinearTables::new(self.base.cast(), Pfn(PFN_BASE), self.npages) })
    }
}

/// guest_memfd pages: frames of the arena that no host region maps, so they are
/// reachable only through the VM's own mappings. Their state says private (the
/// oracle tells the two sides apart by it); they count as data pages (a leak
/// check at teardown covers them) and a double free is caught like any.
impl vmmu::PrivateMemory for HostMemory {
    fn alloc_private(&self) -> Result<Pfn, vmmu::HostFaultError> {
        self.alloc(Order::K4, PageState::Private)
            .map_err(|_| vmmu::HostFaultError::OutOfMemory)
    }

    fn alloc_shared(&self) -> Result<Pfn, vmmu::HostFaultError> {
        self.alloc(Order::K4, PageState::GmemShared)
            .map_err(|_| vmmu::HostFaultError::OutOfMemory)
    }

    fn free_private(&self, pfn: Pfn) {
        // A guest_memfd page is freed exactly once, and only such a page.
        if !matches!(self.state(pfn), PageState::Private | PageState::GmemShared) {
            self.violations.double_frees.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.put(pfn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident 4 KiB pages among the arena's first `pages` (mincore).
    fn resident(mem: &HostMemory, pages: usize) -> usize {
        let mut v = vec![0u8; pages];
        // SAFETY: the range lies inside the arena's mapping; `v` holds one
        // byte per page of it.
        let r = unsafe {
            libc::mincore(
                mem.base.as_ptr() as *mut libc::c_void,
                pages * PAGE as usize,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        v.iter().filter(|b| **b & 1 != 0).count()
    }

    #[test]
    fn test_commit_ahead_commits_what_is_used_and_what_comes_next_only() {
        let mem = HostMemory::new(1 << 30, true).unwrap();
        let _p = mem.alloc(Order::K4, PageState::Data).unwrap();
        assert_eq!(resident(&mem, 16 << 8), 0, "fresh frames are not committed");
        let bytes = mem.commit_ahead(4 << 20);
        // One used frame, 4 MiB ahead, a 2 MiB block per shard.
        assert_eq!(bytes, PAGE + (4 << 20) + SHARDS as u64 * (2 << 20));
        let pages = (bytes / PAGE) as usize;
        assert_eq!(resident(&mem, pages + 512), pages);
        // Still zero, still fresh: the next allocation is unchanged.
        let q = mem.alloc(Order::K4, PageState::Table).unwrap();
        assert!(mem.page(q).iter().all(|w| w.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn test_arena_alloc_zeroes_free_poisons_and_reuses() {
        let m = HostMemory::new(1 << 30, true).unwrap();
        let p = m.alloc(Order::K4, PageState::Data).unwrap();
        assert!(m.page(p).iter().all(|w| w.load(Ordering::Relaxed) == 0));
        m.page(p)[3].store(42, Ordering::Relaxed);
        assert_eq!(m.data_pages(), 1);
        assert!(m.put(p));
        assert_eq!(m.state(p), PageState::Free);
        assert_eq!(m.state(Pfn(p.0 + 100)), PageState::Fresh);
        assert_eq!(m.page(p)[3].load(Ordering::Relaxed), POISON);
        assert!(!m.put(p), "a put on a free page is a violation, not a free");
        assert_eq!(m.violations.bad_puts.load(Ordering::Relaxed), 1);
        let q = m.alloc(Order::K4, PageState::Data).unwrap();
        assert_eq!(q, p, "LIFO reuse");
        assert_eq!(m.page(q)[3].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn test_arena_huge_blocks_are_aligned() {
        let m = HostMemory::new(2 << 30, false).unwrap();
        let a = m.alloc(Order::M2, PageState::Data).unwrap();
        assert_eq!(a.0 % 512, 0, "2M block at a 2M-aligned frame number");
        let g = m.alloc(Order::G1, PageState::Data).unwrap();
        assert_eq!(
            g.0 % (512 * 512),
            0,
            "1G block at a 1G-aligned frame number"
        );
        assert_eq!(m.data_pages(), 512 + 512 * 512);
        assert!(
            m.alloc(Order::G1, PageState::Data).is_err(),
            "the first 1G was split for the 2M block"
        );
    }

    #[test]
    fn test_arena_reuses_frames_freed_by_other_threads_when_full() {
        let m = std::sync::Arc::new(HostMemory::new(1 << 30, false).unwrap());
        let pages = m.capacity_pages();
        // Another thread allocates half the arena and frees it: the frames land on
        // that thread's free list.
        let m2 = m.clone();
        std::thread::spawn(move || {
            let v: Vec<_> = (0..pages / 2)
                .map(|_| m2.alloc(Order::K4, PageState::Data).unwrap())
                .collect();
            for p in v {
                m2.put(p);
            }
        })
        .join()
        .unwrap();
        // This thread can still allocate the whole arena.
        let v: Vec<_> = (0..pages)
            .map(|_| m.alloc(Order::K4, PageState::Data))
            .collect();
        assert!(
            v.iter().all(|r| r.is_ok()),
            "frames freed elsewhere were not reused"
        );
        assert!(
            m.alloc(Order::K4, PageState::Data).is_err(),
            "the arena is full"
        );
    }

    #[test]
    fn test_arena_table_double_free_is_counted() {
        let m = HostMemory::new(1 << 30, true).unwrap();
        let t = m.alloc_table_page().unwrap();
        assert_eq!(m.table_pages(), 1);
        m.free_table_page(t);
        m.free_table_page(t);
        assert_eq!(m.table_pages(), 0);
        assert_eq!(m.violations.double_frees.load(Ordering::Relaxed), 1);
    }
}
