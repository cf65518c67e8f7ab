//! Pre-faulting (`KVM_PRE_FAULT_MEMORY`): a vCPU maps a guest-physical range
//! before the guest touches it, through the same fault pipeline a guest access
//! takes.
//!
//! The contract is KVM's: the range is updated in place as it is mapped, and a
//! call either made progress (and returns success with the leftover size, even if
//! it then stopped at an error) or made none and returns the error — never both.
//! The fault is a read fault (as KVM's `PFERR_GUEST_FINAL_MASK` alone), private
//! when the attributes say the gfn is private. Each step covers up to the end of
//! the mapping it installed, so a 2 MiB leaf advances the range to the next 2 MiB
//! boundary.
//!
//! A pending signal ([`VcpuSignal`]) stops a call between steps and between
//! the retries of a step with "interrupted" (`EINTR`): a step can retry for as
//! long as an invalidation covering its gpa is in progress, and only a signal
//! gets the caller out of that, as on KVM.
//!
//! A memslot being deleted or moved under a step answers "try again" (`EAGAIN`,
//! as KVM does since 6.18) rather than spinning: unlike `KVM_RUN`, pre-faulting
//! promises no forward progress, and the caller can retry once the slot is back.

use crate::errno::{EAGAIN, EINTR, EINVAL, ENOENT, EOPNOTSUPP};
use crate::fault::{ErrorCode, FaultError, RetPf};
use crate::request::VcpuShared;
use crate::request::REQ_TLB_FLUSH;
use crate::stats::CounterSet;
use crate::sync::{Arc, Ordering};
use crate::types::{Gpa, Level, PAGE_SIZE};
use crate::vcpu::VcpuMmu;
use crate::vm::VmError;

/// The range of one `KVM_PRE_FAULT_MEMORY` call, advanced in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreFaultRange {
    /// First guest-physical address not yet mapped.
    pub gpa: u64,
    /// Bytes left to map.
    pub size: u64,
    /// Must be 0.
    pub flags: u64,
}

/// Why a pre-fault made no progress.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreFaultError {
    /// Flags must be 0 (EINVAL).
    #[error("pre-fault flags {0:#x} are not supported (flags must be 0)")]
    Flags(u64),
    /// The gpa and the size must be page-aligned, the size non-zero and the range
    /// must not wrap (EINVAL).
    #[error("pre-fault range gpa {gpa:#x} size {size:#x} is invalid: gpa and size must be 4 KiB aligned, size non-zero, and the range must not wrap")]
    InvalidRange {
        /// The gpa given.
        gpa: u64,
        /// The size given.
        size: u64,
    },
    /// The gpa has no memslot: it is MMIO, nothing to map (ENOENT).
    #[error("no memslot at gpa {0}")]
    NoMemslot(Gpa),
    /// The memslot at the gpa is being deleted or moved (EAGAIN): retry when the
    /// memslot update is done.
    #[error("the memslot at gpa {0} is being deleted or moved; try again")]
    SlotChanging(Gpa),
    /// A signal was pending (EINTR): call again to continue.
    #[error("interrupted by a signal")]
    Interrupted,
    /// The fault itself failed: a memory-fault exit (EFAULT), a host failure
    /// (EFAULT or EHWPOISON) or no table memory (ENOMEM).
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// Loading a root failed (its errno).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The fault ended in an outcome pre-faulting cannot use (EOPNOTSUPP).
    #[error("pre-fault at gpa {gpa} ended with {outcome:?}")]
    Unexpected {
        /// Where.
        gpa: Gpa,
        /// What the fault returned.
        outcome: RetPf,
    },
}

impl PreFaultError {
    /// The errno `KVM_PRE_FAULT_MEMORY` returns.
    pub fn errno(&self) -> i32 {
        match self {
            PreFaultError::Flags(_) | PreFaultError::InvalidRange { .. } => EINVAL,
            PreFaultError::NoMemslot(_) => ENOENT,
            PreFaultError::SlotChanging(_) => EAGAIN,
            PreFaultError::Interrupted => EINTR,
            PreFaultError::Fault(e) => e.errno(),
            PreFaultError::Vm(e) => e.errno(),
            PreFaultError::Unexpected { .. } => EOPNOTSUPP,
        }
    }
}

impl VcpuMmu {
    /// `KVM_PRE_FAULT_MEMORY`: map `range` ahead of the guest, advancing it as
    /// pages are mapped. Success means some progress was made (`range.size` may
    /// still be non-zero: the call stopped at the first page it could not map);
    /// an error means none was, and the range is unchanged.
    ///
    /// Pre-faulting an SNP-like VM is allowed: this model has no launch sequence,
    /// so the VM is treated as launched (KVM allows it after `SNP_LAUNCH_FINISH`).
    pub fn pre_fault_memory(&mut self, range: &mut PreFaultRange) -> Result<(), PreFaultError> {
        if range.flags != 0 {
            return Err(PreFaultError::Flags(range.flags));
        }
        let wraps = range
            .gpa
            .checked_add(range.size)
            .is_none_or(|end| end <= range.gpa);
        if !range.gpa.is_multiple_of(PAGE_SIZE) || !range.size.is_multiple_of(PAGE_SIZE) || wraps {
            return Err(PreFaultError::InvalidRange {
                gpa: range.gpa,
                size: range.size,
            });
        }
        let full = range.size;
        let mut stopped = None;
        while range.size > 0 {
            match self.pre_fault_step(Gpa(range.gpa)) {
                Ok(level) => {
                    let end = (range.gpa & !(level.bytes() - 1)) + level.bytes();
                    let done = range.size.min(end - range.gpa);
                    range.gpa += done;
                    range.size -= done;
                }
                Err(e) => {
                    stopped = Some(e);
                    break;
                }
            }
        }
        match stopped {
            Some(e) if range.size == full => Err(e),
            _ => {
                let st = &self.shared.stats;
                CounterSet::inc(&st.pre_fault_calls);
                st.pre_faulted_bytes
                    .fetch_add(full - range.size, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Map the page at `gpa`; returns the level of the mapping that covers it.
    fn pre_fault_step(&mut self, gpa: Gpa) -> Result<Level, PreFaultError> {
        let mut ec = ErrorCode::empty();
        if self.vm.config.vm_type.has_private_mem() && self.vm.attrs.is_private(gpa.gfn()) {
            ec |= ErrorCode::PRIVATE;
        }
        loop {
            if self.shared.signal.swap(false, Ordering::Acquire) {
                return Err(PreFaultError::Interrupted);
            }
            self.reload_root_for_pre_fault()?;
            self.last_fault.set(Default::default());
            let r = self.page_fault(gpa, ec)?;
            match r {
                RetPf::Fixed | RetPf::Spurious => return Ok(self.last_fault.get().level),
                RetPf::Emulate => return Err(PreFaultError::NoMemslot(gpa)),
                RetPf::Retry if self.last_fault.get().saw_invalid_slot => {
                    return Err(PreFaultError::SlotChanging(gpa))
                }
                // An invalidation in progress or an obsolete root: spin as KVM
                // does (rescheduling in between), reloading the root each time.
                RetPf::Retry => std::thread::yield_now(),
                outcome => return Err(PreFaultError::Unexpected { gpa, outcome }),
            }
        }
    }

    /// KVM's `kvm_mmu_reload` plus the obsolete-root freeing a guest entry would
    /// do: a pre-fault needs a valid root but must not consume the requests the
    /// next entry handles. A root loaded here makes the next entry flush.
    fn reload_root_for_pre_fault(&mut self) -> Result<(), VmError> {
        let _m = crate::sync::lockdep::Held::acquire(
            crate::sync::LockClass::VcpuMutex,
            std::panic::Location::caller(),
        );
        if self.root.as_ref().is_some_and(|r| r.is_invalid()) {
            self.free_obsolete_roots();
        }
        if self.root.is_none() {
            self.load_root()?;
            self.shared
                .requests
                .fetch_or(REQ_TLB_FLUSH, crate::sync::Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Raises a signal on a vCPU's thread, as far as pre-faulting is concerned:
/// the vCPU's current or next [`VcpuMmu::pre_fault_memory`] stops with
/// [`PreFaultError::Interrupted`] at its next check. Cloneable, `Send + Sync`.
#[derive(Clone)]
pub struct VcpuSignal {
    shared: Arc<VcpuShared>,
}

impl std::fmt::Debug for VcpuSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSignal")
            .field("vcpu", &self.shared.id)
            .finish()
    }
}

impl VcpuSignal {
    /// Make a signal pending (consumed by the call it interrupts).
    pub fn raise(&self) {
        self.shared.signal.store(true, Ordering::Release);
    }
}

impl VcpuMmu {
    /// A handle that interrupts this vCPU's pre-faulting from another thread.
    pub fn signal(&self) -> VcpuSignal {
        VcpuSignal {
            shared: self.shared.clone(),
        }
    }
}

/// What the last fault of a vCPU decided, for pre-faulting: the level it mapped
/// at and whether it retried because its memslot was being deleted or moved.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LastFault {
    pub(crate) level: Level,
    pub(crate) saw_invalid_slot: bool,
}

impl Default for LastFault {
    fn default() -> Self {
        LastFault {
            level: Level::K4,
            saw_invalid_slot: false,
        }
    }
}
