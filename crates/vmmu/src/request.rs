//! vCPU requests and guest-mode tracking (KVM's `kvm_make_request` /
//! `kvm_make_all_cpus_request` and `vcpu->mode`).
//!
//! A request is a bit in the vCPU's request word, processed before every guest
//! entry. A requester that must know the request was seen before it continues
//! ("wait" semantics, used for TLB flushes and for freeing obsolete roots) kicks
//! every vCPU that is in guest mode and waits until each has left it; such a vCPU
//! cannot re-enter without processing its requests first.
//!
//! The entry and the requester form a Dekker pair, all SeqCst: the vCPU stores
//! `mode = IN_GUEST` and then loads its requests; the requester stores the request
//! bit and then examines the mode. At least one of them sees the other's store,
//! so either the vCPU aborts the entry or the requester kicks it.

use crate::stats::CounterSet;
use crate::sync::{AtomicU64, AtomicU8, Ordering};

/// Flush this vCPU's TLB before entering the guest.
pub const REQ_TLB_FLUSH: u64 = 1 << 0;
/// Drop roots that were invalidated (current and cached previous ones).
pub const REQ_FREE_OBSOLETE_ROOTS: u64 = 1 << 1;

pub(crate) const OUTSIDE_GUEST_MODE: u8 = 0;
pub(crate) const IN_GUEST_MODE: u8 = 1;
pub(crate) const EXITING_GUEST_MODE: u8 = 2;

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
}

impl VcpuShared {
    pub(crate) fn new(id: u32) -> Self {
        VcpuShared {
            id,
            requests: AtomicU64::new(0),
            mode: AtomicU8::new(OUTSIDE_GUEST_MODE),
            stats: CounterSet::default(),
        }
    }

    /// Set request bits. Returns true if the vCPU was in guest mode and must be
    /// kicked (it has been marked as exiting).
    pub(crate) fn request(&self, bits: u64) -> RequestState {
        // SeqCst: the store of the bits must be ordered before the mode check below
        // (Dekker pair with `enter_guest_mode`).
        self.requests.fetch_or(bits, Ordering::SeqCst);
        match self.mode.compare_exchange(
            IN_GUEST_MODE,
            EXITING_GUEST_MODE,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => RequestState::MustKick,
            Err(EXITING_GUEST_MODE) => RequestState::Exiting,
            Err(_) => RequestState::Outside,
        }
    }

    /// Whether the vCPU is still on its way out of guest mode.
    pub(crate) fn is_exiting(&self) -> bool {
        // Acquire: pairs with the Release store in `exit_guest_mode`, so once we see
        // it out, nothing it did in guest mode is still in flight.
        self.mode.load(Ordering::Acquire) == EXITING_GUEST_MODE
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
