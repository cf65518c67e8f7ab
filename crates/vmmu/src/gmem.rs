//! guest_memfd: the store private memory comes from (KVM's `virt/kvm/guest_memfd.c`).
//!
//! A [`GuestMemfd`] is a file of `size` bytes of memory that only the VM can map:
//! its pages are never reachable through a host virtual address. A memslot binds
//! a range of the file (`set_user_memory_region2` with the `GUEST_MEMFD` flag);
//! a private fault on that slot takes its frame from the file, allocating it on
//! first use. Pages come from the host's [`PrivateMemory`].
//!
//! Invalidation is the file's own, not the host MMU's: punching a hole zaps the
//! hole intersected with every bound slot, once per file and call, frees its
//! pages and ends the invalidation; allocating never invalidates; a memory
//! failure zaps the page and poisons it (later faults get the hardware-poison
//! error); closing the file zaps everything it mapped. The file holds a
//! reference on the VM, not the other way round, so either may go first.
//!
//! Locks: the file's lock stands for the mapping's invalidate lock. Faults take
//! it inside their SRCU section to look a page up; hole punching and release take
//! it and then `mmu_lock`, release after `slots_lock`.

use std::collections::BTreeMap;

use crate::fault::PageFault;
use crate::host::{HostFaultError, PrivateMemory};
use crate::stats::CounterSet;
use crate::sync::{Arc, AtomicBool, AtomicU64, LockClass, Mutex, Ordering};
use crate::tdp::{Ctx, FlushBatch};
use crate::types::{Gfn, GfnRange, Pfn, PAGE_SIZE};
use crate::vm::VmInner;

/// `GUEST_MEMFD_FLAG_MMAP` (6.18): the file may be mmap()ed for shared access.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (6.18): its memory starts shared.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// Flags `create_guest_memfd` accepts.
pub const GUEST_MEMFD_FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
/// `FALLOC_FL_KEEP_SIZE`.
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
/// `FALLOC_FL_PUNCH_HOLE`.
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;

/// Why a guest_memfd call was refused. A refused call changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GmemError {
    /// The size is 0 or not page aligned (EINVAL).
    #[error("guest_memfd size {0:#x} must be a non-zero multiple of 4 KiB")]
    InvalidSize(u64),
    /// Flags this VM does not support (EINVAL).
    #[error(
        "guest_memfd flags {flags:#x} are not valid (supported on this VM type: {supported:#x})"
    )]
    InvalidFlags {
        /// The flags given.
        flags: u64,
        /// The flags supported.
        supported: u64,
    },
    /// The host has no private memory to back a guest_memfd (ENODEV).
    #[error("This host provides no private memory for guest_memfd")]
    NoPrivateMemory,
    /// A `fallocate` mode other than allocate or keep-size hole punching
    /// (EOPNOTSUPP).
    #[error("fallocate mode {0:#x} is not supported (allocate, or PUNCH_HOLE|KEEP_SIZE)")]
    InvalidMode(u32),
    /// Offset or length not page aligned (EINVAL).
    #[error("fallocate range {offset:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A range beyond the end of the file, or an empty one (EINVAL).
    #[error("Range {offset:#x}+{len:#x} is outside the {size:#x}-byte guest_memfd")]
    OutOfBounds {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The file's size.
        size: u64,
    },
    /// The host ran out of private memory (ENOMEM).
    #[error("Out of private memory")]
    NoMemory,
    /// `mmap` of a file created without `GUEST_MEMFD_FLAG_MMAP` (ENODEV).
    #[error("This guest_memfd was created without GUEST_MEMFD_FLAG_MMAP: it cannot be mapped")]
    MmapNotSupported,
    /// A `MAP_PRIVATE` mapping of the file (EINVAL).
    #[error("guest_memfd can only be mapped MAP_SHARED")]
    PrivateMapping,
    /// A host access through the file's mapping that the kernel answers with
    /// SIGBUS (reported as EFAULT, as `MADV_POPULATE_READ` reports it): past
    /// the end of the file, memory that is not shared (no INIT_SHARED), or a
    /// poisoned page.
    #[error("Host access to guest_memfd offset {offset:#x} faults (SIGBUS): {why}")]
    SigBus {
        /// Offset in the file.
        offset: u64,
        /// Why.
        why: &'static str,
    },
}

impl GmemError {
    /// The errno KVM (or the file) returns for this refusal.
    pub fn errno(&self) -> i32 {
        use crate::errno::*;
        match self {
            GmemError::InvalidSize(_)
            | GmemError::InvalidFlags { .. }
            | GmemError::Unaligned { .. }
            | GmemError::OutOfBounds { .. }
            | GmemError::PrivateMapping => EINVAL,
            GmemError::NoPrivateMemory => ENODEV,
            GmemError::InvalidMode(_) => EOPNOTSUPP,
            GmemError::NoMemory => ENOMEM,
            GmemError::MmapNotSupported => ENODEV,
            GmemError::SigBus { .. } => EFAULT,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Page {
    pfn: Pfn,
    poisoned: bool,
}

/// A memslot's binding of part of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Binding {
    pub(crate) as_id: u16,
    pub(crate) slot_id: u16,
    /// First file page bound.
    pub(crate) start: u64,
    /// Pages bound.
    pub(crate) npages: u64,
    /// The slot's first gfn (bound to `start`).
    pub(crate) base_gfn: Gfn,
}

impl Binding {
    /// The gfns bound to the file pages `[first, last)`, if any.
    fn gfns(&self, first: u64, last: u64) -> Option<GfnRange> {
        let s = first.max(self.start);
        let e = last.min(self.start + self.npages);
        (s < e).then(|| {
            GfnRange::new(
                self.base_gfn.add(s - self.start),
                self.base_gfn.add(e - self.start),
            )
        })
    }
}

#[derive(Debug, Default)]
struct State {
    pages: BTreeMap<u64, Page>,
    bindings: Vec<Binding>,
    released: bool,
}

/// The file's pages as private faults read them: one word per page, the
/// frame and its state, in chunks of 512 allocated on first use (a file's
/// index costs 8 bytes per page only where pages were allocated). Written
/// under the file's lock, together with [`State::pages`]; read without it, so
/// a fault on a page the file already has takes no lock. A fault that reads a
/// frame a punch-hole then frees is safe for the same reason a fault racing
/// the host is: the punch frees inside its invalidation (after the begin,
/// before the end), so the fault's locked check against its sequence snapshot
/// retries it. Freeing after the end would not be (the loom model
/// `loom_punch_hole_frees_before_its_invalidation_ends` shows the race).
struct PageIndex {
    chunks: Box<[std::sync::OnceLock<Box<[AtomicU64]>>]>,
}

const INDEX_CHUNK: u64 = 512;
/// The index covers the first 128 GiB of a file (its top level costs 8 bytes
/// per 2 MiB, 512 KiB at most); pages beyond are looked up under the lock.
/// Files are sparse and may be far larger than the memory behind them.
const INDEX_MAX_CHUNKS: u64 = 1 << 16;
const ENTRY_PRESENT: u64 = 1;
const ENTRY_POISONED: u64 = 2;

impl PageIndex {
    fn new(pages: u64) -> PageIndex {
        PageIndex {
            chunks: (0..pages.div_ceil(INDEX_CHUNK).min(INDEX_MAX_CHUNKS))
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        }
    }

    /// The entry of page `i` (0: no page).
    fn get(&self, i: u64) -> u64 {
        self.chunks
            .get((i / INDEX_CHUNK) as usize)
            .and_then(|c| c.get())
            .map_or(0, |c| c[(i % INDEX_CHUNK) as usize].load(Ordering::Acquire))
    }

    /// Set the entry of page `i` (under the file's lock).
    fn set(&self, i: u64, entry: u64) {
        let Some(chunk) = self.chunks.get((i / INDEX_CHUNK) as usize) else {
            return;
        };
        if entry == 0 && chunk.get().is_none() {
            return;
        }
        let c = chunk.get_or_init(|| (0..INDEX_CHUNK).map(|_| AtomicU64::new(0)).collect());
        // Release: a fault that reads the entry sees a page the file owns.
        c[(i % INDEX_CHUNK) as usize].store(entry, Ordering::Release);
    }

    fn entry(p: &Page) -> u64 {
        (p.pfn.0 << 2) | ENTRY_PRESENT | if p.poisoned { ENTRY_POISONED } else { 0 }
    }
}

/// The file behind a [`GuestMemfd`], shared with the memslots that bind it.
pub(crate) struct GmemFile {
    pub(crate) id: u64,
    pub(crate) size: u64,
    pub(crate) flags: u64,
    vm: Mutex<Option<Arc<VmInner>>>,
    private: Arc<dyn PrivateMemory>,
    state: Mutex<State>,
    /// Lock-free view of `state.pages` for faults.
    index: PageIndex,
    /// The file was closed (set under the lock, before its pages are freed).
    released: AtomicBool,
    /// Pages allocated and not yet freed.
    allocated: AtomicU64,
}

impl std::fmt::Debug for GmemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmemFile")
            .field("id", &self.id)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// What a private fault got from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GetPfn {
    Page(Pfn),
    /// The file was closed; the slot can no longer back private memory.
    Gone,
    /// The page had a memory failure.
    Poisoned,
    NoMemory,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl GmemFile {
    pub(crate) fn new(
        vm: Arc<VmInner>,
        size: u64,
        flags: u64,
        private: Arc<dyn PrivateMemory>,
    ) -> Self {
        GmemFile {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            size,
            flags,
            vm: Mutex::new(LockClass::Leaf, Some(vm)),
            private,
            state: Mutex::new(LockClass::GmemLock, State::default()),
            index: PageIndex::new(size / PAGE_SIZE),
            released: AtomicBool::new(false),
            allocated: AtomicU64::new(0),
        }
    }

    /// Whether `vm` is the VM this file belongs to.
    pub(crate) fn belongs_to(&self, vm: &VmInner) -> bool {
        self.vm
            .lock()
            .as_ref()
            .is_some_and(|v| std::ptr::eq(&**v, vm))
    }

    /// Bind file pages `[start, start + npages)` to a slot, unless some of them
    /// are bound already. Called with `slots_lock` held, before the slot is
    /// published.
    pub(crate) fn bind(&self, b: Binding) -> bool {
        let mut st = self.state.lock();
        if st.released
            || st
                .bindings
                .iter()
                .any(|o| o.start < b.start + b.npages && b.start < o.start + o.npages)
        {
            return false;
        }
        st.bindings.push(b);
        true
    }

    /// Forget a slot's binding (the slot is being deleted; SRCU readers of it
    /// are gone, and it was zapped).
    pub(crate) fn unbind(&self, as_id: u16, slot_id: u16) {
        self.state
            .lock()
            .bindings
            .retain(|b| !(b.as_id == as_id && b.slot_id == slot_id));
    }

    /// The frame of file page `index` for a private fault, allocated (zeroed) on
    /// first use.
    pub(crate) fn get_pfn(&self, index: u64) -> GetPfn {
        let e = self.index.get(index);
        if e & ENTRY_PRESENT != 0 && !self.released.load(Ordering::Acquire) {
            return if e & ENTRY_POISONED != 0 {
                GetPfn::Poisoned
            } else {
                GetPfn::Page(Pfn(e >> 2))
            };
        }
        let mut st = self.state.lock();
        if st.released {
            return GetPfn::Gone;
        }
        if let Some(p) = st.pages.get(&index) {
            return if p.poisoned {
                GetPfn::Poisoned
            } else {
                GetPfn::Page(p.pfn)
            };
        }
        match self.alloc() {
            Ok(pfn) => {
                self.allocated.fetch_add(1, Ordering::Relaxed);
                let page = Page {
                    pfn,
                    poisoned: false,
                };
                st.pages.insert(index, page);
                self.index.set(index, PageIndex::entry(&page));
                GetPfn::Page(pfn)
            }
            Err(_) => GetPfn::NoMemory,
        }
    }

    /// Whether the file's memory is shared (`MMAP | INIT_SHARED`): the host may
    /// map it and shared faults take their frames from it.
    pub(crate) fn is_shared(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 && self.flags & GUEST_MEMFD_FLAG_MMAP != 0
    }

    /// Whether the file may be mapped by the host (a slot bound to it is
    /// "gmem-only": shared faults come here too, not to the slot's hva).
    pub(crate) fn is_mappable(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_MMAP != 0
    }

    fn alloc(&self) -> Result<Pfn, HostFaultError> {
        if self.is_shared() {
            self.private.alloc_shared()
        } else {
            self.private.alloc_private()
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(u64, u64), GmemError> {
        if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(GmemError::Unaligned { offset, len });
        }
        let end = offset
            .checked_add(len)
            .filter(|e| len > 0 && *e <= self.size);
        let Some(end) = end else {
            return Err(GmemError::OutOfBounds {
                offset,
                len,
                size: self.size,
            });
        };
        Ok((offset / PAGE_SIZE, end / PAGE_SIZE))
    }

    /// Zap what the bound slots map of file pages `[first, last)`, inside one
    /// invalidation (begin .. `f` .. end) if any binding overlaps; `f` runs in
    /// between either way. Caller holds the file's lock (`st`).
    fn invalidate(
        &self,
        vm: &VmInner,
        st: &mut State,
        first: u64,
        last: u64,
        f: impl FnOnce(&mut State),
    ) {
        let hits: Vec<(u16, GfnRange)> = st
            .bindings
            .iter()
            .filter_map(|b| b.gfns(first, last).map(|g| (b.as_id, g)))
            .collect();
        if hits.is_empty() {
            f(st);
            return;
        }
        CounterSet::inc(&vm.stats.gmem_invalidations);
        vm.gmem_zap(&hits);
        f(st);
        let w = vm.mmu_lock.write(&vm.stats.lock);
        vm.inval.end(&w);
    }

    fn vm(&self) -> Option<Arc<VmInner>> {
        self.vm.lock().clone()
    }

    /// Free the pages of `[first, last)`.
    fn free_pages(&self, st: &mut State, first: u64, last: u64) {
        let indices: Vec<u64> = st.pages.range(first..last).map(|(i, _)| *i).collect();
        for i in indices {
            if let Some(p) = st.pages.remove(&i) {
                self.index.set(i, 0);
                self.private.free_private(p.pfn);
                self.allocated.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Close the file (the last handle went): zap everything it mapped, forget
    /// the bindings, free every page and let go of the VM.
    fn release(&self) {
        let Some(vm) = self.vm() else { return };
        {
            let _s = vm.slots_guard();
            let mut st = self.state.lock();
            let pages = self.size / PAGE_SIZE;
            // The pages are freed inside the invalidation: a fault that read
            // one without the lock is still caught by its retry check.
            let released = &self.released;
            self.invalidate(&vm, &mut st, 0, pages, |st| {
                st.bindings.clear();
                st.released = true;
                released.store(true, Ordering::Release);
                self.free_pages(st, 0, pages);
            });
        }
        // Let go of the VM outside the lock: if this was the last reference, the
        // VM's teardown takes mmu_lock.
        let ours = self.vm.lock().take();
        drop(ours);
        drop(vm);
    }
}

/// A guest_memfd file (KVM_CREATE_GUEST_MEMFD's fd). Dropping it closes the file.
#[derive(Debug)]
pub struct GuestMemfd {
    pub(crate) file: Arc<GmemFile>,
}

impl GuestMemfd {
    pub(crate) fn new(file: GmemFile) -> GuestMemfd {
        GuestMemfd {
            file: Arc::new(file),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.file.size
    }

    /// Flags it was created with.
    pub fn flags(&self) -> u64 {
        self.file.flags
    }

    /// Pages allocated in the file now.
    pub fn allocated_pages(&self) -> u64 {
        self.file.allocated.load(Ordering::Relaxed)
    }

    /// `fallocate(fd, mode, offset, len)`: mode 0 or `KEEP_SIZE` allocates the
    /// range (no invalidation); `PUNCH_HOLE | KEEP_SIZE` zaps the hole in every
    /// bound slot (one invalidation for the call), then frees its pages, so
    /// later reads see zeros. Anything else is refused.
    #[track_caller]
    pub fn fallocate(&self, mode: u32, offset: u64, len: u64) -> Result<(), GmemError> {
        // The file's size never changes: KEEP_SIZE is required (KVM answers
        // EOPNOTSUPP without it).
        let punch = match mode {
            FALLOC_FL_KEEP_SIZE => false,
            m if m == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE => true,
            m => return Err(GmemError::InvalidMode(m)),
        };
        // A hole is clipped to the file (past its end there is nothing to
        // punch, and that is no error); an allocation must lie inside it.
        let (first, last) = if punch {
            if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
                return Err(GmemError::Unaligned { offset, len });
            }
            let end = offset.saturating_add(len).min(self.file.size);
            if offset >= end {
                return Ok(());
            }
            (offset / PAGE_SIZE, end / PAGE_SIZE)
        } else {
            self.file.check_range(offset, len)?
        };
        let f = &*self.file;
        if punch {
            let vm = f.vm();
            let mut st = f.state.lock();
            // Freed inside the invalidation (before it ends), so a fault that
            // read a page of the hole without the lock retries.
            match &vm {
                Some(vm) if vm.config.knobs.free_after_gmem_invalidation => {
                    f.invalidate(vm, &mut st, first, last, |_| {});
                    f.free_pages(&mut st, first, last);
                }
                Some(vm) => {
                    f.invalidate(vm, &mut st, first, last, |st| f.free_pages(st, first, last))
                }
                None => f.free_pages(&mut st, first, last),
            }
            return Ok(());
        }
        for i in first..last {
            match f.get_pfn(i) {
                GetPfn::Page(_) | GetPfn::Poisoned => {}
                GetPfn::Gone => return Ok(()),
                GetPfn::NoMemory => return Err(GmemError::NoMemory),
            }
        }
        Ok(())
    }

    /// `mmap` of the file (`shared`: `MAP_SHARED`, else `MAP_PRIVATE`): refused
    /// (ENODEV) unless it was created with `GUEST_MEMFD_FLAG_MMAP`, and a
    /// private (copy-on-write) mapping is refused (EINVAL): the point of the
    /// mapping is to share the guest's pages. The mapping's faults are
    /// [`GuestMemfd::mmap_fault`].
    pub fn mmap(&self, shared: bool) -> Result<(), GmemError> {
        if !self.file.is_mappable() {
            return Err(GmemError::MmapNotSupported);
        }
        if !shared {
            return Err(GmemError::PrivateMapping);
        }
        Ok(())
    }

    /// The host touching its mapping of the file at `offset` (KVM's user-mapping
    /// fault handler): the frame there, allocated zeroed on first touch. Only
    /// shared memory can be reached this way: without INIT_SHARED, past the
    /// end, or on a poisoned page it is SIGBUS; without MMAP there is no mapping.
    /// A punch-hole frees the page, so the next touch sees a fresh zero page.
    pub fn mmap_fault(&self, offset: u64) -> Result<Pfn, GmemError> {
        self.mmap(true)?;
        let sigbus = |why| GmemError::SigBus { offset, why };
        if offset >= self.file.size {
            return Err(sigbus("past the end of the file"));
        }
        if !self.file.is_shared() {
            return Err(sigbus(
                "the file's memory is private (created without INIT_SHARED)",
            ));
        }
        match self.file.get_pfn(offset / PAGE_SIZE) {
            GetPfn::Page(pfn) => Ok(pfn),
            GetPfn::Poisoned => Err(sigbus("the page is poisoned")),
            // The handle is alive, so the file is not released.
            GetPfn::Gone => Err(sigbus("the file was released")),
            GetPfn::NoMemory => Err(GmemError::NoMemory),
        }
    }

    /// A memory failure on the page at `offset`: zap it wherever it is mapped and
    /// poison it; the next fault on it gets the hardware-poison error.
    pub fn memory_failure(&self, offset: u64) -> Result<(), GmemError> {
        let (first, _) = self
            .file
            .check_range(offset & !(PAGE_SIZE - 1), PAGE_SIZE)?;
        let f = &*self.file;
        let vm = f.vm();
        let mut st = f.state.lock();
        if let Some(p) = st.pages.get_mut(&first) {
            p.poisoned = true;
            let entry = PageIndex::entry(p);
            f.index.set(first, entry);
        } else {
            // A failure on a page never used: allocate it, poisoned, so the
            // fault that comes still sees the failure.
            if let Ok(pfn) = f.alloc() {
                f.allocated.fetch_add(1, Ordering::Relaxed);
                let page = Page {
                    pfn,
                    poisoned: true,
                };
                st.pages.insert(first, page);
                f.index.set(first, PageIndex::entry(&page));
            }
        }
        if let Some(vm) = &vm {
            f.invalidate(vm, &mut st, first, first + 1, |_| {});
        }
        Ok(())
    }
}

impl Drop for GuestMemfd {
    fn drop(&mut self) {
        self.file.release();
    }
}

/// The frame of a fault served by the slot's guest_memfd (private, or shared on
/// a gmem-only slot): `Ok(Some(pfn))`, `Ok(None)` when the slot cannot back
/// private memory (a memory-fault exit), or the fault's error.
pub(crate) fn faultin_gmem(f: &PageFault<'_>) -> Result<Option<Pfn>, HostFaultError> {
    let Some(slot) = f.slot else { return Ok(None) };
    let Some(b) = slot.gmem() else {
        return Ok(None);
    };
    let index = b.pgoff + (f.gfn.0 - slot.base_gfn().0);
    match b.file.get_pfn(index) {
        GetPfn::Page(pfn) => Ok(Some(pfn)),
        GetPfn::Gone => Err(HostFaultError::NotMapped),
        GetPfn::Poisoned => Err(HostFaultError::HwPoison),
        GetPfn::NoMemory => Err(HostFaultError::OutOfMemory),
    }
}

/// What a guest_memfd holds at one page, as [`crate::Memslot::peek_private_page`]
/// sees it without allocating or waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivatePage {
    /// The slot has no guest_memfd.
    Unbound,
    /// No page is allocated there (never faulted, or punched).
    Absent,
    /// The page, and whether it is poisoned.
    Page {
        /// Its frame.
        pfn: Pfn,
        /// A memory failure poisoned it.
        poisoned: bool,
    },
    /// The file was closed.
    Released,
    /// The file's lock is held (a fault, a punch, a release is running): ask
    /// again later.
    Busy,
}

impl GmemFile {
    pub(crate) fn peek(&self, index: u64) -> PrivatePage {
        let Some(st) = self.state.try_lock() else {
            return PrivatePage::Busy;
        };
        if st.released {
            return PrivatePage::Released;
        }
        match st.pages.get(&index) {
            Some(p) => PrivatePage::Page {
                pfn: p.pfn,
                poisoned: p.poisoned,
            },
            None => PrivatePage::Absent,
        }
    }
}

/// A slot's binding to its file.
#[derive(Debug, Clone)]
pub(crate) struct SlotGmem {
    pub(crate) file: Arc<GmemFile>,
    /// File page bound to the slot's first gfn.
    pub(crate) pgoff: u64,
}

impl VmInner {
    /// Begin an invalidation over `hits` and zap them, with a flush (the first
    /// half of a guest_memfd invalidation; the caller ends it).
    pub(crate) fn gmem_zap(&self, hits: &[(u16, GfnRange)]) {
        let rcu = self.tdp.rcu.read_lock();
        let ctx = Ctx::new(&self.stats, &rcu);
        let mut w = self.mmu_lock.write(&self.stats.lock);
        self.inval.begin(&w);
        let mut batch = FlushBatch::default();
        for (as_id, g) in hits {
            self.inval.range_add(*g, &w);
            if !self.config.knobs.skip_gmem_zap {
                self.unmap_gfn_range(&ctx, &mut w, *as_id, *g, &mut batch);
            }
        }
        batch.flush(self, &self.stats);
    }
}

impl crate::vm::Vm {
    /// `KVM_CREATE_GUEST_MEMFD`: a file of `size` bytes (a non-zero multiple of
    /// 4 KiB) of private memory for this VM. Flags: `GUEST_MEMFD_FLAG_MMAP` and
    /// `GUEST_MEMFD_FLAG_INIT_SHARED` as in 6.18, the latter only on VM types
    /// without private memory ([`Vm::guest_memfd_flags`]).
    pub fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<GuestMemfd, GmemError> {
        // Only supported flags; INIT_SHARED alone is accepted, as the KVM it was
        // compared with accepts it (it has no effect without MMAP).
        let supported = self.guest_memfd_flags();
        if flags & !supported != 0 {
            return Err(GmemError::InvalidFlags { flags, supported });
        }
        // The size is a signed file offset (loff_t) for KVM: beyond its range
        // it is as invalid as 0.
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || size > i64::MAX as u64 {
            return Err(GmemError::InvalidSize(size));
        }
        let Some(private) = self.inner.host.private.clone() else {
            return Err(GmemError::NoPrivateMemory);
        };
        Ok(GuestMemfd::new(GmemFile::new(
            self.inner.clone(),
            size,
            flags,
            private,
        )))
    }

    /// The guest_memfd flags this VM accepts: `MMAP` always; `INIT_SHARED` only
    /// where the VM has no private memory (on a confidential or
    /// software-protected VM memory starts private; shared memory there comes
    /// from conversions, not from the file).
    pub fn guest_memfd_flags(&self) -> u64 {
        if self.inner.config.vm_type.has_private_mem() {
            GUEST_MEMFD_FLAG_MMAP
        } else {
            GUEST_MEMFD_FLAGS
        }
    }
}
