//! vCPU requests and guest-mode tracking (KVM's `kvm_make_request` /
//! `kvm_make_all_cpus_request` and `vcpu->mode`).
//!
//! A request is a bit in the vCPU's request word, processed before every guest
//! entry. A requester that must know the request was seen before it continues
//! ("wait" semantics, used for TLB flushes and for freeing obsolete roots) kicks
//! every vCPU that is in guest mode and waits until each has left it; such a vCPU
//! cannot re-enter without processing its requests first.
//!
//! The entry and the requester form a Dekker pair: the vCPU stores
//! `mode = IN_GUEST`, issues a full fence and loads its requests; the requester
//! stores the request bit, issues a full fence and examines the mode (KVM's
//! `smp_store_mb(vcpu->mode, IN_GUEST_MODE)` against `smp_mb__before_atomic()`
//! in `kvm_vcpu_exiting_guest_mode`). With both fences at least one of them sees
//! the other's store, so either the vCPU aborts the entry or the requester kicks
//! it. An all-SeqCst version (the store, the load, the bit and the exchange)
//! is equally correct on paper; the fences are KVM's form, and the one the
//! model checker can prove, since loom treats SeqCst loads and stores as
//! Acquire/Release and only SeqCst fences as a total order.

use crate::stats::CounterSet;
use crate::sync::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};

/// Flush this vCPU's TLB before entering the guest.
pub const REQ_TLB_FLUSH: u64 = 1 << 0;
/// Drop roots that were invalidated (current and cached previous ones).
pub const REQ_FREE_OBSOLETE_ROOTS: u64 = 1 << 1;

pub(crate) const OUTSIDE_GUEST_MODE: u8 = 0;
pub(crate) const IN_GUEST_MODE: u8 = 1;
pub(crate) const EXITING_GUEST_MODE: u8 = 2;
/// Walking shadow tables without `mmu_lock` (the shadow MMU's fast path):
/// a requester that waits (a remote flush before table pages are freed)
/// waits for the walk to end, as KVM's IPI waits for interrupts to come
/// back on (`READING_SHADOW_PAGE_TABLES`).
pub(crate) const READING_SHADOW_PAGE_TABLES: u8 = 3;

/// The part of a vCPU other threads touch. Aligned to its own cache lines: the
/// vCPU bumps its counters on every fault, and a neighbour's fields on the same
/// line would make every fault of two vCPUs contend.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct VcpuShared {
    pub(crate) id: u32,
    pub(crate) requests: AtomicU64,
    pub(crate) mode: AtomicU8,
    pub(crate) stats: CounterSet,
    /// A signal is pending for the vCPU's thread (see [`crate::prefault::VcpuSignal`]).
    pub(crate) signal: AtomicBool,
    /// The vCPU's dirty ring, on a VM that logs into rings.
    pub(crate) ring: Option<crate::dirty_ring::DirtyRing>,
    #[cfg(loom)]
    exit_lock: crate::sync::Mutex<()>,
    #[cfg(loom)]
    exit_cv: crate::sync::Condvar,
}

impl VcpuShared {
    pub(crate) fn new(id: u32, ring_entries: u32) -> Self {
        VcpuShared {
            ring: (ring_entries > 0).then(|| crate::dirty_ring::DirtyRing::new(ring_entries)),
            id,
            requests: AtomicU64::new(0),
            mode: AtomicU8::new(OUTSIDE_GUEST_MODE),
            stats: CounterSet::default(),
            signal: AtomicBool::new(false),
            #[cfg(loom)]
            exit_lock: crate::sync::Mutex::new(crate::sync::LockClass::Leaf, ()),
            #[cfg(loom)]
            exit_cv: crate::sync::Condvar::new(),
        }
    }

    /// Set request bits. Returns true if the vCPU was in guest mode and must be
    /// kicked (it has been marked as exiting).
    pub(crate) fn request(&self, bits: u64) -> RequestState {
        // Release: whatever the requester changed (zapped entries) is visible to
        // the vCPU that takes the bits with its Acquire swap in `prepare_entry`.
        self.requests.fetch_or(bits, Ordering::Release);
        // SeqCst fence: the store of the bits is ordered before the mode check
        // below (Dekker pair with the fence in `enter_guest_mode`).
        fence(Ordering::SeqCst);
        match self.mode.compare_exchange(
            IN_GUEST_MODE,
            EXITING_GUEST_MODE,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => RequestState::MustKick,
            Err(EXITING_GUEST_MODE | READING_SHADOW_PAGE_TABLES) => RequestState::Exiting,
            Err(_) => RequestState::Outside,
        }
    }

    /// Whether the vCPU is still on its way out of guest mode.
    pub(crate) fn is_exiting(&self) -> bool {
        // Acquire: pairs with the Release store in `exit_guest_mode`, so once we see
        // it out, nothing it did in guest mode is still in flight.
        matches!(
            self.mode.load(Ordering::Acquire),
            EXITING_GUEST_MODE | READING_SHADOW_PAGE_TABLES
        )
    }

    /// Begin a walk of shadow tables without `mmu_lock` (KVM's
    /// `walk_shadow_page_lockless_begin`): the mode store, then a full fence
    /// before the first table read, the Dekker pair with `request`'s fence
    /// after the requester's zap.
    pub(crate) fn begin_lockless_walk(&self) {
        self.set_mode(READING_SHADOW_PAGE_TABLES, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// End it: Release, so the walk's reads are done before a waiting
    /// requester frees what they read.
    pub(crate) fn end_lockless_walk(&self) {
        self.set_mode(OUTSIDE_GUEST_MODE, Ordering::Release);
        self.left_guest_mode();
    }

    /// Set the vCPU's mode with `order`, from the vCPU's own thread.
    pub(crate) fn set_mode(&self, mode: u8, order: Ordering) {
        #[cfg(not(loom))]
        self.mode.store(mode, order);
        // The model checker may order a plain store before a requester's
        // compare-and-exchange that read the value the store overwrites, which
        // no processor does to a store its own thread then reads back. An
        // exchange is placed after everything it read, as the hardware's store
        // is after the requester's locked update it could not see.
        #[cfg(loom)]
        self.mode.swap(mode, order);
    }

    /// Wait until the vCPU is no longer on its way out of guest mode.
    pub(crate) fn wait_until_exited(&self) {
        #[cfg(not(loom))]
        {
            let mut spins = 0;
            while self.is_exiting() {
                super::sync::spin_wait(&mut spins);
            }
        }
        // Under the model checker a spinning load may read the same old value
        // forever (the memory model promises nothing about when a store becomes
        // visible without a happens-before edge), so the model blocks on a
        // condition variable the leaving vCPU signals instead: the same
        // condition, with the eventual visibility real processors give.
        #[cfg(loom)]
        {
            let mut g = self.exit_lock.lock();
            while self.is_exiting() {
                self.exit_cv.wait(&mut g);
            }
        }
    }

    /// The vCPU left (or gave up entering) guest mode.
    pub(crate) fn left_guest_mode(&self) {
        #[cfg(loom)]
        {
            let _g = self.exit_lock.lock();
            self.exit_cv.notify_all();
        }
    }
}

/// Where a vCPU was when a request was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestState {
    /// In guest mode: now marked exiting and must be kicked.
    MustKick,
    /// Already leaving guest mode (another requester kicked it).
    Exiting,
    /// Not in guest mode; it will see the request at its next entry.
    Outside,
}
