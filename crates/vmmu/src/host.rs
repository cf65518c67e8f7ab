//! The traits through which the MMU talks to its host.
//!
//! A hypervisor embeds vmmu by implementing three small traits: where page-table
//! pages come from ([`TableMemory`]), how a host virtual address becomes a frame
//! ([`PrimaryMmu`]), and how a vCPU is interrupted ([`Kick`]). The machine model is
//! one implementation; tests use small tracking ones.

use crate::sync::AtomicU64;
use crate::types::{Hva, Level, Pfn, ENTRIES_PER_TABLE};

/// One page-table page: 512 entries, each updated atomically, because hardware
/// walkers and lockless paths read and modify them concurrently.
pub type Table = [AtomicU64; ENTRIES_PER_TABLE];

/// Failure to provide memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableMemoryError {
    /// No page is available.
    #[error("Out of memory for page-table pages")]
    OutOfMemory,
}

/// Where page-table pages live.
///
/// The MMU fills a fresh page itself; the host only hands out frames and maps a
/// frame number to its 512 entries. Frames handed to [`TableMemory::free_table_page`]
/// are never touched by the MMU again; it retires them only after every lockless
/// walker that could still read them is gone.
pub trait TableMemory: Send + Sync {
    /// A frame for a new table. Its contents are overwritten by the caller.
    fn alloc_table_page(&self) -> Result<Pfn, TableMemoryError>;
    /// Return a frame obtained from [`TableMemory::alloc_table_page`].
    fn free_table_page(&self, pfn: Pfn);
    /// The entries of a table frame. The host keeps this memory mapped for its own
    /// lifetime, so stale readers see stale values, never unmapped memory.
    fn table(&self, pfn: Pfn) -> &Table;
    /// The frames as one linear range, if the host lays them out so (the
    /// kernel's direct map): the MMU's walks then find a table by arithmetic,
    /// as KVM's `__va` does, instead of calling [`TableMemory::table`] once
    /// per level. Frames outside the range still go through `table`.
    fn linear(&self) -> Option<LinearTables> {
        None
    }
}

/// Frames `first .. first + count` as consecutive tables from `base`.
#[derive(Clone, Copy, Debug)]
pub struct LinearTables {
    base: std::ptr::NonNull<Table>,
    first: u64,
    count: u64,
}

// SAFETY: a `LinearTables` hands out only shared references to atomics, which
// any thread may use; `new`'s contract keeps the memory valid.
unsafe impl Send for LinearTables {}
// SAFETY: as for `Send`.
unsafe impl Sync for LinearTables {}

impl LinearTables {
    /// Describe `count` tables from `base`, holding frames from `first` on.
    ///
    /// # Safety
    /// `base` must point at `count` consecutive, aligned tables that stay
    /// mapped for as long as the [`TableMemory`] that returns this value
    /// lives, and that are only ever accessed atomically.
    pub unsafe fn new(base: std::ptr::NonNull<Table>, first: Pfn, count: u64) -> Self {
        LinearTables {
            base,
            first: first.0,
            count,
        }
    }

    /// The table of `pfn`, if the range holds it. The borrow is tied to
    /// `self`; the MMU keeps the value beside the [`TableMemory`] it came
    /// from, so the memory outlives every borrow.
    #[inline]
    pub(crate) fn get(&self, pfn: Pfn) -> Option<&Table> {
        let i = pfn.0.wrapping_sub(self.first);
        if i < self.count {
            // SAFETY: `i < count`, so the table lies inside the range `new`
            // was given, which stays valid while its memory lives.
            Some(unsafe { &*self.base.as_ptr().add(i as usize) })
        } else {
            None
        }
    }
}

/// What the fault path asks of the primary MMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultinRequest {
    /// The access is a write: the host must make the page writable (break
    /// copy-on-write) or fail.
    pub write: bool,
}

/// A frame resolved by the primary MMU, with a reference the MMU must release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPfn {
    /// The frame backing the address.
    pub pfn: Pfn,
    /// The host mapping allows writes (a read fault may then map writable).
    pub writable: bool,
    /// The size of the host's own mapping of the address as the frame was
    /// resolved: what [`PrimaryMmu::mapping_level`] would have answered at
    /// that moment. The fault caps its mapping level with it (KVM reads the
    /// host's page tables a second time, under `mmu_lock`; reading them once
    /// with the frame is as safe, since the invalidation sequence checked
    /// under the lock covers every change after the fault's snapshot, and it
    /// saves a second lookup of the address on every fault).
    pub level: Level,
}

/// Why the primary MMU could not provide a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostFaultError {
    /// Nothing is mapped at the address (no VMA).
    #[error("No host mapping at the address")]
    NotMapped,
    /// A write to a mapping the host keeps read-only (mprotect, read-only VMA).
    #[error("Write to a read-only host mapping")]
    ReadOnly,
    /// The host is out of memory.
    #[error("Host out of memory")]
    OutOfMemory,
    /// The page is poisoned.
    #[error("Host page is hardware-poisoned")]
    HwPoison,
}

/// The host's own page tables (the "primary MMU"), as seen by a secondary MMU.
///
/// # What the MMU requires of a host
/// The MMU never trusts a frame it got from [`PrimaryMmu::faultin`] by itself; it
/// trusts the invalidation protocol around it. That works if the host keeps
/// two rules, the ones Linux's mm keeps for KVM:
/// 1. Before it changes or removes a mapping that a fault may already have
///    returned, the host calls `Vm::invalidate_range_start` for its range, and
///    changes the mapping only after that returned.
/// 2. Every store of the change (the host's own page-table entries, however it
///    keeps them) happens before it ends the invalidation ([`crate::Invalidation::end`]),
///    in program order or by its own synchronisation, and `faultin` reads the
///    host's state afresh on each call.
///
/// The MMU supplies the rest: a fault takes an Acquire snapshot of the
/// invalidation sequence before it calls `faultin`, and ending an invalidation
/// bumps the sequence with Release. So a fault that sees the bump sees the
/// change, even if `faultin` reads the host's tables with relaxed loads and no
/// lock; a fault that does not see it retries under `mmu_lock`.
pub trait PrimaryMmu: Send + Sync {
    /// Resolve `hva` to a frame, faulting it in if needed, and take a reference
    /// on it (like get_user_pages).
    fn faultin(&self, hva: Hva, req: FaultinRequest) -> Result<HostPfn, HostFaultError>;
    /// Drop the reference taken by [`PrimaryMmu::faultin`]; `mapped_writable` says
    /// whether the MMU mapped the page writable (so the host treats it as dirty).
    fn release(&self, pfn: Pfn, mapped_writable: bool);
    /// The size of the host's own mapping of `hva` (4 KiB, or 2 MiB / 1 GiB for huge
    /// pages). Read without locks; the result is validated by the invalidation
    /// sequence like the frame itself.
    fn mapping_level(&self, hva: Hva) -> Level;
    /// Read the aligned 8 bytes at `hva` as `copy_from_user` would (faulting
    /// the page in). The shadow MMU reads the guest's page tables this way; a
    /// host that cannot (the default) cannot run a shadow-MMU VM.
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFaultError> {
        let _ = hva;
        Err(HostFaultError::NotMapped)
    }
    /// Read the aligned 8 bytes at `hva` only if the page is mapped now,
    /// without faulting anything in and without calling back into the MMU
    /// (`copy_from_user` with page faults disabled): the shadow MMU re-reads
    /// a guest entry this way while it holds `mmu_lock`. `None` if not
    /// mapped.
    fn peek_u64(&self, hva: Hva) -> Option<u64> {
        let _ = hva;
        None
    }
    /// Compare-and-exchange the aligned 8 bytes at `hva` (a user-space
    /// `cmpxchg`, faulting the page in writable): `Ok(Ok(old))` if it held
    /// `old` and now holds `new`, `Ok(Err(found))` if it held `found`. The
    /// shadow MMU sets the guest's Accessed and Dirty bits this way.
    fn cmpxchg_u64(
        &self,
        hva: Hva,
        old: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, HostFaultError> {
        let _ = (hva, old, new);
        Err(HostFaultError::NotMapped)
    }
    /// Store the aligned 8 bytes at `hva` (`copy_to_user`): the emulator's
    /// write of a guest store the MMU had to intercept.
    fn write_u64(&self, hva: Hva, value: u64) -> Result<(), HostFaultError> {
        let _ = (hva, value);
        Err(HostFaultError::NotMapped)
    }
}

/// Where guest_memfd pages come from: memory the host keeps out of every host
/// virtual address space, so private pages are reachable only through the VM's
/// own mappings.
pub trait PrivateMemory: Send + Sync {
    /// A zeroed page.
    fn alloc_private(&self) -> Result<Pfn, HostFaultError>;
    /// A zeroed page for a guest_memfd whose memory is shared (`MMAP |
    /// INIT_SHARED`): the host may map it, so a host that tells the two sides
    /// apart hands out a shared page. Freed with [`PrivateMemory::free_private`]
    /// like any guest_memfd page.
    fn alloc_shared(&self) -> Result<Pfn, HostFaultError> {
        self.alloc_private()
    }
    /// Give back a page from [`PrivateMemory::alloc_private`]; nothing maps it
    /// any more.
    fn free_private(&self, pfn: Pfn);
}

/// Interrupting a vCPU that runs guest code (an IPI, a signal).
pub trait Kick: Send + Sync {
    /// Make vCPU `vcpu_id` leave guest mode soon. It will process its requests
    /// before entering again.
    fn kick(&self, vcpu_id: u32);
}

/// The host services a VM is built on.
#[derive(Clone)]
pub struct HostOps {
    /// Page-table pages.
    pub memory: std::sync::Arc<dyn TableMemory>,
    /// hva → pfn.
    pub primary: std::sync::Arc<dyn PrimaryMmu>,
    /// vCPU interruption.
    pub kick: std::sync::Arc<dyn Kick>,
    /// Pages for guest_memfd; without them a guest_memfd cannot be created.
    pub private: Option<std::sync::Arc<dyn PrivateMemory>>,
}

impl std::fmt::Debug for HostOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostOps")
    }
}
