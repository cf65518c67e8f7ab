//! The page-fault pipeline (KVM's `kvm_tdp_mmu_page_fault` and what it calls).
//!
//! In order: the lockless fast path; the invalidation sequence snapshot; the
//! pre-check that retries *before* the host is asked for the frame and before
//! `mmu_lock` is taken when an in-progress invalidation covers the gfn; the memslot
//! checks; the frame and the host's mapping level from the primary MMU; `mmu_lock`
//! for read; the stale check (obsolete root, locked sequence/range check); the map;
//! releasing the frame.

use bitflags::bitflags;

use crate::host::{FaultinRequest, HostFaultError, TableMemoryError};
use crate::memslot::Memslot;
use crate::spte::Access;
use crate::stats::CounterSet;
use crate::sync::Ordering;
use crate::tdp::Ctx;
use crate::types::{Gfn, Gpa, Hva, Level, Pfn, PAGE_SIZE};
use crate::vcpu::VcpuMmu;

bitflags! {
    /// A page-fault error code, x86 #PF layout plus KVM's synthetic bits. An EPT
    /// violation is translated into these bits; an EPT misconfiguration (an MMIO
    /// entry) sets `RSVD`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct ErrorCode: u64 {
        /// The translation existed but did not allow the access.
        const PRESENT = 1 << 0;
        /// The access was a write.
        const WRITE = 1 << 1;
        /// User-mode access.
        const USER = 1 << 2;
        /// A reserved-bit / misconfigured entry was hit (MMIO entries).
        const RSVD = 1 << 3;
        /// Instruction fetch.
        const FETCH = 1 << 4;
        /// KVM synthetic: access made by KVM itself.
        const IMPLICIT = 1 << 48;
        /// KVM synthetic: the access was to private memory.
        const PRIVATE = 1 << 49;
    }
}

/// What a fault asks of the vCPU, mirroring KVM's `RET_PF_*` codes.
///
/// [`VcpuMmu::page_fault`] never returns `Continue` or `Invalid`; they exist so the
/// pipeline's internal steps read like KVM's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetPf {
    /// Internal: keep going.
    Continue,
    /// Let the vCPU run again; it will fault again if needed.
    Retry,
    /// Emulate the access (MMIO, or a write to a read-only memslot).
    Emulate,
    /// A write to a write-protected gfn.
    WriteProtected,
    /// Internal: the fast or MMIO path could not decide; take the slow path.
    Invalid,
    /// A mapping was installed.
    Fixed,
    /// The access is already allowed (another vCPU fixed it, or a stale TLB entry).
    Spurious,
}

/// A fault that must be reported to the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// `KVM_EXIT_MEMORY_FAULT`: private/shared mismatch or missing private backing.
    /// The VMM converts the memory and runs the vCPU again.
    #[error("Memory fault at gpa {gpa} (size {size:#x}, private {private})")]
    MemoryFault {
        /// Guest physical address of the page.
        gpa: Gpa,
        /// Size of the faulting range.
        size: u64,
        /// Whether the access was private.
        private: bool,
    },
    /// The host could not provide the page (`-EFAULT`), e.g. a write to memory the
    /// host made read-only.
    #[error("Host fault at {hva} for gpa {gpa}")]
    Host {
        /// Guest physical address.
        gpa: Gpa,
        /// Host virtual address.
        hva: Hva,
        /// Why.
        #[source]
        cause: HostFaultError,
    },
    /// No memory for page-table pages.
    #[error(transparent)]
    NoMemory(#[from] TableMemoryError),
    /// The call needs the other MMU: a guest-virtual fault on a TDP VM (EINVAL).
    #[error("{0}")]
    WrongMmu(&'static str),
    /// The shadow page limit is reached and only roots in use are left to
    /// recycle (ENOSPC).
    #[error("shadow page limit of {limit} reached and every page is a root in use")]
    NoShadowPages {
        /// The limit in force.
        limit: u64,
    },
}

impl FaultError {
    /// The errno `KVM_RUN` returns with this exit: `EFAULT` for memory-fault exits
    /// and host failures (KVM turns every failed host lookup into an error pfn),
    /// `EHWPOISON` for a poisoned page, `ENOMEM` when table pages ran out.
    pub fn errno(&self) -> i32 {
        use crate::errno::*;
        match self {
            FaultError::MemoryFault { .. } => EFAULT,
            FaultError::Host {
                cause: HostFaultError::HwPoison,
                ..
            } => EHWPOISON,
            FaultError::NoMemory(_) => ENOMEM,
            FaultError::Host { .. } => EFAULT,
            FaultError::WrongMmu(_) => EINVAL,
            FaultError::NoShadowPages { .. } => ENOSPC,
        }
    }
}

/// One fault as it moves through the pipeline (KVM's `struct kvm_page_fault`).
#[derive(Debug)]
pub(crate) struct PageFault<'s> {
    pub(crate) gfn: Gfn,
    pub(crate) write: bool,
    pub(crate) present: bool,
    pub(crate) rsvd: bool,
    pub(crate) private: bool,
    pub(crate) access: Access,
    pub(crate) slot: Option<&'s Memslot>,
    pub(crate) max_level: Level,
    pub(crate) goal_level: Level,
    /// The largest level the slot, the host and the frame allow, before the NX
    /// mitigation (KVM's `req_level`).
    pub(crate) req_level: Level,
    pub(crate) mmu_seq: u64,
    /// The gfn's attribute, when it was read after the snapshot to set
    /// `private` (the software-protected type).
    pub(crate) attr_private: Option<bool>,
    /// The frame came from the slot's guest_memfd (a private fault, or any
    /// fault on a gmem-only slot): the file owns it, the host MMU plays no part.
    pub(crate) from_gmem: bool,
    /// The faulting vCPU's dirty ring, on a VM that logs into rings.
    pub(crate) ring: Option<&'s crate::dirty_ring::DirtyRing>,
    pub(crate) pfn: Pfn,
    /// The frame the host returned (before huge-page alignment), released at the end.
    pub(crate) host_pfn: Pfn,
    /// The host's mapping level as the frame was resolved.
    pub(crate) host_level: Level,
    pub(crate) map_writable: bool,
    pub(crate) mmio_gen: u64,
    pub(crate) huge_page_disallowed: bool,
}

impl PageFault<'_> {
    /// The `KVM_EXIT_MEMORY_FAULT` exit for this fault's page.
    fn memory_fault(&self) -> FaultError {
        FaultError::MemoryFault {
            gpa: self.gfn.gpa(),
            size: PAGE_SIZE,
            private: self.private,
        }
    }
}

impl VcpuMmu {
    /// Handle an EPT violation or misconfiguration at `gpa`.
    #[track_caller]
    pub fn page_fault(&mut self, gpa: Gpa, error_code: ErrorCode) -> Result<RetPf, FaultError> {
        let _m = crate::sync::lockdep::Held::acquire(
            crate::sync::LockClass::VcpuMutex,
            std::panic::Location::caller(),
        );
        let r = self.page_fault_inner(gpa, error_code);
        let st = &self.shared.stats;
        CounterSet::inc(&st.faults);
        match r {
            Ok(RetPf::Fixed) => CounterSet::inc(&st.faults_fixed),
            Ok(RetPf::Spurious) => CounterSet::inc(&st.faults_spurious),
            Ok(RetPf::Retry) => CounterSet::inc(&st.faults_retry),
            Ok(RetPf::Emulate) => CounterSet::inc(&st.faults_emulate),
            Ok(RetPf::WriteProtected) => CounterSet::inc(&st.faults_write_protected),
            Ok(RetPf::Continue | RetPf::Invalid) => {
                debug_assert!(false, "internal code escaped: {r:?}")
            }
            Err(_) => CounterSet::inc(&st.faults_error),
        }
        r
    }

    fn page_fault_inner(&mut self, gpa: Gpa, ec: ErrorCode) -> Result<RetPf, FaultError> {
        let gfn = gpa.gfn();
        // Borrowed, not cloned: only this vCPU changes its root, and it cannot
        // while it faults. (A clone would make every fault of every vCPU write
        // the root's shared reference count.)
        let Some(root) = self.root.as_deref() else {
            CounterSet::inc(&self.shared.stats.no_root_retries);
            return Ok(RetPf::Retry);
        };
        let stats = &self.shared.stats;
        if root.is_invalid() {
            CounterSet::inc(&stats.stale_root_retries);
            return Ok(RetPf::Retry);
        }
        let vm = &*self.vm;
        // (The limit as the TDP MMU keeps it: computing it from the
        // configuration was a dozen instructions on every fault.)
        if gfn.0 >= vm.tdp.gfn_limit {
            // Beyond the guest's physical address width: always emulated.
            return Ok(RetPf::Emulate);
        }
        let as_id = root.role.as_id();
        let srcu = self.srcu.read_lock();
        // SAFETY: the section is of the VM's SRCU domain (the vCPU's reader was
        // registered with it), the one every memslot swap waits on.
        let slots = unsafe { vm.memslots[as_id as usize].read(&srcu) };
        // A reserved-bit fault on a cached MMIO entry of this generation is
        // emulated at once, before any memslot lookup (as in KVM, where
        // `handle_mmio_page_fault` comes first): the gfn has no slot, so a
        // lookup would descend the whole gfn tree for nothing, on every access
        // the guest makes to MMIO.
        let rsvd = ec.contains(ErrorCode::RSVD);
        if rsvd {
            match self.handle_mmio_fault(root, gfn, slots.generation()) {
                RetPf::Invalid => {}
                r => return Ok(r),
            }
        }
        let slot: Option<&Memslot> = slots.lookup_cached(&mut self.last_slot, gfn);

        let write = ec.contains(ErrorCode::WRITE);
        let exec = ec.contains(ErrorCode::FETCH);
        let mut access = Access::READ;
        if write {
            access |= Access::WRITE;
        }
        if exec {
            access = Access::EXEC
                | if write {
                    Access::WRITE
                } else {
                    Access::empty()
                };
        }
        // On a VM with private memory the fault's one sequence snapshot is taken
        // here, before the attributes are first read: the attribute read that
        // decides the fault's side then comes after it, so a conversion that
        // completes after the read is caught by the checks against the snapshot,
        // and the software-protected type needs no second read. (Earlier than
        // KVM takes it: at worst a retry KVM would not make; never a missed
        // conversion.) Other VMs take it where KVM does, in `faultin_pfn`.
        let has_private = vm.config.vm_type.has_private_mem();
        let mmu_seq = if has_private { vm.inval.snapshot() } else { 0 };
        // Where a fault's private bit comes from: the guest's access on a
        // confidential VM type; the attributes on the software-protected type
        // (as KVM sets PFERR_PRIVATE_ACCESS for it); nowhere on the default type,
        // where a private access can only mismatch.
        let attr_private = (vm.config.vm_type == crate::config::VmType::SwProtected)
            .then(|| vm.attrs.is_private(gfn));
        let private = attr_private.unwrap_or_else(|| ec.contains(ErrorCode::PRIVATE));
        let mut f = PageFault {
            gfn,
            write,
            present: ec.contains(ErrorCode::PRESENT),
            rsvd,
            private,
            access,
            slot,
            max_level: vm.config.max_level,
            goal_level: Level::K4,
            req_level: Level::K4,
            mmu_seq,
            attr_private,
            from_gmem: false,
            ring: self.shared.ring.as_ref(),
            pfn: Pfn(0),
            host_pfn: Pfn(0),
            host_level: Level::K4,
            map_writable: false,
            mmio_gen: slots.generation() & vm.mmio_gen_mask,
            huge_page_disallowed: exec && vm.tdp.nx_enabled(),
        };

        if self.fault_can_be_fast(&f) {
            CounterSet::inc(&self.shared.stats.fast_path_attempts);
            match self.fast_page_fault(root, &f) {
                RetPf::Invalid => {}
                r => return Ok(r),
            }
        }

        // Allocation may sleep: never under mmu_lock.
        self.cache
            .topup(&vm.tdp, vm.config.root_level.get() as usize)?;

        match self.faultin_pfn(&mut f)? {
            RetPf::Continue => {}
            r => return Ok(r),
        }

        let stats = &self.shared.stats;
        let result = {
            // On the vCPU's own shard (its id, not its thread's).
            let _r = vm.mmu_lock.read_on(self.shared.id as usize, &stats.lock);
            if self.is_stale(root, &f) {
                RetPf::Retry
            } else {
                self.hugepage_adjust(&mut f);
                let mut last = self.last_fault.get();
                last.level = f.goal_level;
                self.last_fault.set(last);
                let rcu = vm.tdp.rcu.read_lock_with(&self.rcu);
                let ctx = Ctx::new(stats, &rcu);
                vm.tdp.map(&ctx, root, &f, &mut self.cache, &self.walk, vm)
            }
        };
        // A guest_memfd frame belongs to its file: nothing to release.
        if f.slot.is_some() && !f.from_gmem {
            let mapped_writable =
                f.map_writable && matches!(result, RetPf::Fixed | RetPf::Spurious);
            vm.host.primary.release(f.host_pfn, mapped_writable);
        }
        Ok(result)
    }

    /// MMIO entries turn accesses into EPT misconfigurations. A current one means
    /// "still no memslot here": emulate without taking any lock. A stale generation
    /// falls through to the full fault, which maps memory or refreshes the entry.
    fn handle_mmio_fault(&self, root: &crate::root::Root, gfn: Gfn, gen: u64) -> RetPf {
        let vm = &*self.vm;
        let _rcu = vm.tdp.rcu.read_lock_with(&self.rcu);
        let (_, spte, _) = vm.tdp.last_spte(root, gfn);
        if !spte.is_mmio() {
            // The entry changed under us; let the vCPU look again.
            CounterSet::inc(&self.shared.stats.mmio_changed_retries);
            return RetPf::Retry;
        }
        if gen & crate::memslot::GEN_UPDATE_IN_PROGRESS == 0
            && spte.mmio_gen() == gen & vm.mmio_gen_mask
        {
            CounterSet::inc(&self.shared.stats.mmio_fast_hits);
            return RetPf::Emulate;
        }
        RetPf::Invalid
    }

    pub(crate) fn fault_can_be_fast(&self, f: &PageFault<'_>) -> bool {
        if f.rsvd || f.private {
            return false;
        }
        // A shared access to a private gfn (a confidential guest that changed
        // its mind before asking for a conversion) finds the private leaf
        // present and writable: the fast path would call it spurious and the
        // guest would fault forever. Only the slow path's memory-fault exit
        // gets it out. (A racing conversion at worst sends a fault the slow
        // way, or lets it spin until the conversion is done.)
        let vm = &*self.vm;
        // Not present with A/D disabled: maybe an access-tracked entry.
        // Present write: maybe write-protected but MMU-writable.
        let could_help = (!f.present && !vm.config.ad_enabled) || (f.present && f.write);
        could_help && !(vm.config.vm_type.has_private_mem() && vm.attrs.is_private(f.gfn))
    }

    /// The lockless fast path (KVM's `fast_page_fault`): restore an access-tracked
    /// entry or set W on an MMU-writable one with a compare-and-exchange, inside an
    /// RCU read-side section. Only direct entries qualify: their gfn is fixed by
    /// position, so a successful exchange can never apply to another gfn (the ABA
    /// race of locking.rst), and any zap, remap or write-protect in between changes
    /// the value and fails the exchange.
    fn fast_page_fault(&self, root: &crate::root::Root, f: &PageFault<'_>) -> RetPf {
        let vm = &*self.vm;
        let rcu = vm.tdp.rcu.read_lock_with(&self.rcu);
        for _ in 0..4 {
            let (sptep, spte, level) = vm.tdp.last_spte_cached(root, f.gfn, &self.walk, &rcu);
            if let Some(r) = self.fast_fix(sptep, spte, level, f) {
                return r;
            }
        }
        RetPf::Invalid
    }

    /// One attempt of the fast path on the last entry of the walk, `spte`
    /// read from `sptep` at `level` (shared by the TDP and shadow MMUs):
    /// `None` when the exchange lost a race and the walk should look again.
    pub(crate) fn fast_fix(
        &self,
        sptep: &crate::sync::AtomicU64,
        spte: crate::spte::Spte,
        level: Level,
        f: &PageFault<'_>,
    ) -> Option<RetPf> {
        let vm = &*self.vm;
        let stats = &self.shared.stats;
        if !spte.is_leaf(level) {
            return Some(RetPf::Invalid);
        }
        if spte.allows(f.access) {
            CounterSet::inc(&stats.fast_path_spurious);
            return Some(RetPf::Spurious);
        }
        let mut new = spte;
        if new.is_access_tracked() {
            new = new.restore_access_tracked();
        }
        if f.write && new.is_mmu_writable() {
            // Only one 4 KiB page of a huge mapping could be logged; let the
            // slow path map a 4 KiB entry instead.
            if level > Level::K4 && f.slot.is_some_and(|s| s.dirty_logging()) {
                return Some(RetPf::Invalid);
            }
            new = new.make_writable();
        }
        if new == spte || !new.allows(f.access) {
            return Some(RetPf::Invalid);
        }
        // The page is logged after the entry is writable: a harvest in between
        // either protects the entry again or finds the bit set after it.
        let marks_first = vm.config.knobs.fast_path_marks_dirty_first;
        let logs = new.is_writable() && !spte.is_writable();
        if marks_first && logs {
            if let Some(slot) = f.slot {
                crate::dirty_log::mark_page_dirty(slot, f.gfn, f.ring);
            }
        }
        let ok = if vm.config.knobs.fast_path_plain_store {
            sptep.store(new.0, Ordering::Release);
            true
        } else {
            // AcqRel: the exchange must observe the latest value (including D
            // set by hardware) and publish ours.
            sptep
                .compare_exchange(spte.0, new.0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        };
        if !ok {
            return None;
        }
        if spte.is_access_tracked() {
            CounterSet::inc(&stats.access_restored_fast);
        }
        if logs && !marks_first {
            if let Some(slot) = f.slot {
                crate::dirty_log::mark_page_dirty(slot, f.gfn, f.ring);
            }
        }
        CounterSet::inc(&stats.fast_path_fixed);
        Some(RetPf::Fixed)
    }

    /// Resolve the frame (KVM's `kvm_mmu_faultin_pfn`), including the pre-check.
    ///
    /// Always inlined into the two fault handlers, like the stale check and
    /// `hugepage_adjust`: the three calls, their register saves and the
    /// `PageFault` reloads after them were 28 of a fault's instructions.
    #[inline(always)]
    pub(crate) fn faultin_pfn(&self, f: &mut PageFault<'_>) -> Result<RetPf, FaultError> {
        let vm = &*self.vm;
        let stats = &self.shared.stats;
        // The one snapshot of the fault, before anything it decides on is read
        // (the attributes, the memslot's state, the host's page tables): an
        // invalidation that changes any of them after this point is caught by the
        // checks below. A second snapshot later would let a change that ended in
        // between go unnoticed. (With private memory it was taken at the start
        // of the fault, before the first attribute read.)
        let has_private = vm.config.vm_type.has_private_mem();
        if !has_private {
            f.mmu_seq = vm.inval.snapshot();
        }
        // Private/shared first, so a mismatch exits to the VMM even without a
        // slot: the VMM converts the memory and runs the vCPU again.
        let gfn_is_private = match f.attr_private {
            Some(p) => p,
            None => has_private && vm.attrs.is_private(f.gfn),
        };
        if f.private != gfn_is_private {
            return Err(f.memory_fault());
        }
        if vm.config.knobs.second_seq_snapshot {
            f.mmu_seq = vm.inval.snapshot();
        }
        // A slot bound to a mappable guest_memfd is gmem-only: its shared
        // memory is the file's too, so every fault takes its frame there.
        if f.private || f.slot.is_some_and(Memslot::is_gmem_only) {
            return self.faultin_gmem(f);
        }
        let Some(slot) = f.slot else {
            // No memslot: MMIO. Cached as an MMIO entry (generation-checked, so no
            // invalidation check is needed) unless caching is off.
            return Ok(if vm.config.mmio_caching {
                RetPf::Continue
            } else {
                RetPf::Emulate
            });
        };
        if slot.is_invalid() {
            self.note_invalid_slot();
            CounterSet::inc(&stats.invalid_slot_retries);
            return Ok(RetPf::Retry);
        }
        if vm.config.precheck && vm.inval.retry_gfn_unsafe(f.mmu_seq, f.gfn) {
            CounterSet::inc(&stats.precheck_retries);
            return Ok(RetPf::Retry);
        }
        if f.write && slot.is_readonly() {
            return Ok(RetPf::Emulate);
        }
        let hva = slot.gfn_to_hva(f.gfn);
        let host = vm
            .host
            .primary
            .faultin(hva, FaultinRequest { write: f.write })
            .map_err(|cause| FaultError::Host {
                gpa: f.gfn.gpa(),
                hva,
                cause,
            })?;
        f.pfn = host.pfn;
        f.host_pfn = host.pfn;
        f.host_level = host.level;
        f.map_writable = host.writable && !slot.is_readonly();
        if vm.config.precheck && vm.inval.retry_gfn_unsafe(f.mmu_seq, f.gfn) {
            vm.host.primary.release(f.pfn, false);
            f.slot = None;
            CounterSet::inc(&stats.postcheck_retries);
            return Ok(RetPf::Retry);
        }
        Ok(RetPf::Continue)
    }

    /// The frame of a private fault, or of a shared one on a gmem-only slot
    /// (KVM's `kvm_mmu_faultin_pfn_gmem`): from the guest_memfd bound to the
    /// slot, never from a host address. A slot without one (or no slot) cannot
    /// back private memory: a memory-fault exit.
    fn faultin_gmem(&self, f: &mut PageFault<'_>) -> Result<RetPf, FaultError> {
        let vm = &*self.vm;
        let stats = &self.shared.stats;
        if f.slot.is_some_and(|s| s.is_invalid()) {
            self.note_invalid_slot();
            CounterSet::inc(&stats.invalid_slot_retries);
            return Ok(RetPf::Retry);
        }
        let pfn = match crate::gmem::faultin_gmem(f) {
            Ok(Some(pfn)) => pfn,
            Ok(None) => return Err(f.memory_fault()),
            Err(cause) => {
                return Err(FaultError::Host {
                    gpa: f.gfn.gpa(),
                    hva: Hva(0),
                    cause,
                })
            }
        };
        f.pfn = pfn;
        f.host_pfn = pfn;
        f.from_gmem = true;
        f.map_writable = true;
        if vm.config.precheck && vm.inval.retry_gfn_unsafe(f.mmu_seq, f.gfn) {
            f.slot = None;
            CounterSet::inc(&stats.postcheck_retries);
            return Ok(RetPf::Retry);
        }
        if f.private {
            CounterSet::inc(&stats.private_faults);
        } else {
            CounterSet::inc(&stats.gmem_shared_faults);
        }
        Ok(RetPf::Continue)
    }

    /// Remember that this fault retried because its memslot is being deleted or
    /// moved: a pre-fault answers "try again" instead of spinning.
    fn note_invalid_slot(&self) {
        let mut last = self.last_fault.get();
        last.saw_invalid_slot = true;
        self.last_fault.set(last);
    }

    /// Under `mmu_lock`: has anything made this fault stale since it started?
    #[inline(always)]
    fn is_stale(&self, root: &crate::root::Root, f: &PageFault<'_>) -> bool {
        let stats = &self.shared.stats;
        if root.is_invalid() {
            CounterSet::inc(&stats.stale_root_retries);
            return true;
        }
        if f.slot.is_some()
            && !self.vm.config.knobs.skip_locked_retry
            && self.vm.inval.retry_gfn(f.mmu_seq, f.gfn)
        {
            CounterSet::inc(&stats.locked_retries);
            return true;
        }
        false
    }

    /// Pick the largest level the slot, the configuration and the host's own
    /// mapping allow (KVM's `kvm_mmu_hugepage_adjust`). Runs under `mmu_lock`; the
    /// host level is validated by the invalidation sequence like the frame.
    #[inline(always)]
    pub(crate) fn hugepage_adjust(&self, f: &mut PageFault<'_>) {
        f.goal_level = Level::K4;
        f.req_level = Level::K4;
        let Some(slot) = f.slot else { return };
        // guest_memfd hands out 4 KiB pages (order 0) here, so its frames map
        // at 4 KiB; the host's page tables play no part for them.
        if f.from_gmem {
            return;
        }
        // The level is the smallest of the configuration's, the slot's and
        // the host's: with either bound at 4 KiB it is 4 KiB, and the slot's
        // per-level counters need not be read (KVM reads them before the
        // host's level; the minimum is the same).
        if f.max_level == Level::K4 || f.host_level == Level::K4 {
            return;
        }
        let mut level = slot.max_mapping_level(f.gfn, f.max_level).min(f.host_level);
        // The frame must agree with the gfn modulo the mapping size. The host's
        // level normally guarantees it; a host that claims a huge mapping over a
        // frame aligned only for a smaller one still gets the largest level that
        // fits, one level at a time, never straight 4 KiB.
        while level > Level::K4 && (f.gfn.0 ^ f.pfn.0) & (level.pages() - 1) != 0 {
            level = level.lower().unwrap_or(Level::K4);
        }
        f.req_level = level;
        if level == Level::K4 || f.huge_page_disallowed {
            return;
        }
        let mask = level.pages() - 1;
        f.goal_level = level;
        f.pfn = Pfn(f.pfn.0 & !mask);
    }
}
