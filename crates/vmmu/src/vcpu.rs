//! The per-vCPU MMU context: the current root, the previous-roots cache, the
//! table-page cache, and request processing at guest entry.

use crate::request::{
    VcpuShared, EXITING_GUEST_MODE, IN_GUEST_MODE, OUTSIDE_GUEST_MODE, REQ_FREE_OBSOLETE_ROOTS,
    REQ_TLB_FLUSH,
};
use crate::root::{Role, Root};
use crate::stats::{CounterSet, Stats};
use std::panic::Location;

use crate::sync::lockdep::Held;
use crate::sync::{fence, Arc, LockClass, Ordering, RcuReader, SrcuReader};
use crate::tdp::{Ctx, TableCache};
use crate::types::{Level, Pfn};
use crate::vm::{Vm, VmError, VmInner};

/// `vcpu->mutex` for the lock-order checker. Exclusive access to a vCPU is
/// already `&mut VcpuMmu`; what the pseudo-lock adds is the check that nothing a
/// vCPU call does (including host callbacks it triggers) takes a lock that must
/// come before `vcpu->mutex`, such as `kvm->lock`. Free in release builds.
#[track_caller]
fn vcpu_mutex() -> Held {
    Held::acquire(LockClass::VcpuMutex, Location::caller())
}

/// Number of cached previous roots (`KVM_MMU_NUM_PREV_ROOTS`).
pub const NUM_PREV_ROOTS: usize = 3;

/// What the vCPU's hardware needs to enter the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Frame of the root table (the EPT pointer).
    pub root: Pfn,
    /// Unique id of the root, to tag TLB entries.
    pub root_id: u64,
    /// Levels of the table.
    pub root_level: Level,
    /// Hardware A/D bits enabled (EPTP bit 6).
    pub ad_enabled: bool,
    /// The TLB must be flushed before entering.
    pub flush_tlb: bool,
}

/// One vCPU's MMU. Owned by the thread running the vCPU (`Send`, not `Sync`).
pub struct VcpuMmu {
    pub(crate) vm: Arc<VmInner>,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) role: Role,
    pub(crate) root: Option<Arc<Root>>,
    pub(crate) prev_roots: [Option<Arc<Root>>; NUM_PREV_ROOTS],
    pub(crate) cache: TableCache,
    pub(crate) rcu: RcuReader,
    pub(crate) srcu: SrcuReader,
    /// The last-level table the previous fault walked to.
    pub(crate) walk: std::cell::Cell<crate::tdp::walk_cache::WalkCache>,
    /// The memslot the previous fault found.
    pub(crate) last_slot: crate::memslot::LastUsedSlot,
    /// What the last fault decided, for pre-faulting.
    pub(crate) last_fault: std::cell::Cell<crate::prefault::LastFault>,
    /// The page-modification log, with PML dirty tracking.
    pub(crate) pml: crate::pml::PmlLog,
    /// Shadow paging: the guest's paging state and the shadow root.
    pub(crate) shadow: crate::shadow::paging::ShadowVcpu,
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

impl std::fmt::Debug for VcpuMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuMmu")
            .field("id", &self.shared.id)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl VcpuMmu {
    pub(crate) fn new(vm: Arc<VmInner>, shared: Arc<VcpuShared>) -> Self {
        let role = Role {
            level: vm.config.root_level,
            smm: false,
            guest_mode: false,
        };
        VcpuMmu {
            rcu: vm.tdp.rcu.register(),
            srcu: vm.srcu.register(),
            last_slot: Default::default(),
            walk: Default::default(),
            vm,
            shared,
            role,
            root: None,
            prev_roots: Default::default(),
            cache: TableCache::default(),
            last_fault: Default::default(),
            pml: Default::default(),
            shadow: Default::default(),
            _not_sync: std::marker::PhantomData,
        }
    }

    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The VM this vCPU belongs to.
    pub fn vm(&self) -> Vm {
        Vm {
            inner: self.vm.clone(),
        }
    }

    /// This vCPU's counters.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        self.shared.stats.accumulate(&mut s);
        s
    }

    /// `mmu_lock` read acquisitions made by this vCPU so far (cheap: one atomic
    /// load; used to attribute lock traffic to individual faults).
    pub fn mmu_lock_reads(&self) -> u64 {
        self.shared.stats.lock.read.load(Ordering::Relaxed)
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Id of the current root, if loaded.
    pub fn root_id(&self) -> Option<u64> {
        if self.vm.config.mmu == crate::config::MmuKind::Shadow {
            return self.shadow.root.as_ref().map(|r| r.id);
        }
        self.root.as_ref().map(|r| r.id)
    }

    /// Whether the current root's memory has been freed. Always false in a correct
    /// MMU; model-checking tests use it to catch a root freed while referenced.
    #[doc(hidden)]
    pub fn debug_current_root_freed(&self) -> bool {
        self.root.as_ref().is_some_and(|r| r.is_freed())
    }

    /// Ids of the cached previous roots.
    pub fn prev_root_ids(&self) -> Vec<Option<u64>> {
        if self.vm.config.mmu == crate::config::MmuKind::Shadow {
            return self
                .shadow
                .prev
                .iter()
                .map(|r| r.as_ref().map(|r| r.id))
                .collect();
        }
        self.prev_roots
            .iter()
            .map(|r| r.as_ref().map(|r| r.id))
            .collect()
    }

    /// Process pending requests and make sure a valid root is loaded (KVM's
    /// request handling in `vcpu_enter_guest` plus `kvm_mmu_load`).
    pub fn prepare_entry(&mut self) -> Result<Entry, VmError> {
        let _m = vcpu_mutex();
        // KVM_EXIT_DIRTY_RING_FULL: the VMM must collect and reset first.
        if self.shared.ring.as_ref().is_some_and(|r| r.soft_full()) {
            return Err(VmError::DirtyRingFull {
                vcpu: self.shared.id,
            });
        }
        // Acquire: requests were published with SeqCst stores by requesters.
        let reqs = self.shared.requests.swap(0, Ordering::Acquire);
        let mut flush = reqs & REQ_TLB_FLUSH != 0;
        if self.vm.config.mmu == crate::config::MmuKind::Shadow {
            return self.prepare_shadow_entry(reqs, flush);
        }
        let current_invalid = self.root.as_ref().is_some_and(|r| r.is_invalid());
        if reqs & REQ_FREE_OBSOLETE_ROOTS != 0 || current_invalid {
            self.free_obsolete_roots();
        }
        if self.root.is_none() {
            self.load_root()?;
            // A newly loaded root may have been used before with other contents.
            flush = true;
        }
        let root = self
            .root
            .as_ref()
            .unwrap_or_else(|| unreachable!("load_root sets the root"));
        if flush {
            CounterSet::inc(&self.shared.stats.tlb_flush_local);
        }
        Ok(Entry {
            root: root.pfn,
            root_id: root.id,
            root_level: self.vm.config.root_level,
            ad_enabled: self.vm.config.ad_enabled,
            flush_tlb: flush,
        })
    }

    /// Guest entry on a shadow VM: drop the root if it was zapped, load one
    /// for the current paging state if there is none.
    fn prepare_shadow_entry(&mut self, reqs: u64, mut flush: bool) -> Result<Entry, VmError> {
        let current_invalid = self
            .shadow
            .root
            .as_ref()
            .is_some_and(|r| r.invalid.load(Ordering::Acquire));
        if reqs & REQ_FREE_OBSOLETE_ROOTS != 0 || current_invalid {
            self.free_obsolete_shadow_roots();
        }
        if self.shadow.root.is_none() {
            self.load_shadow_root()?;
            // A root found in the hash may have unsync pages below it.
            self.shadow.sync_pending = true;
            flush = true;
        }
        if std::mem::take(&mut self.shadow.sync_pending) {
            self.sync_shadow_root();
        }
        let root = self
            .shadow
            .root
            .as_ref()
            .unwrap_or_else(|| unreachable!("load_shadow_root sets the root"));
        if flush {
            CounterSet::inc(&self.shared.stats.tlb_flush_local);
        }
        Ok(Entry {
            root: root.pfn,
            root_id: root.id,
            root_level: Level::L4,
            ad_enabled: self.vm.config.ad_enabled,
            flush_tlb: flush,
        })
    }

    pub(crate) fn load_root(&mut self) -> Result<(), VmError> {
        let vm = &*self.vm;
        CounterSet::inc(&self.shared.stats.root_loads);
        loop {
            self.cache.topup(&vm.tdp, 1)?;
            let stats = &self.shared.stats;
            let _r = vm.mmu_lock.read(&stats.lock);
            if let Some(root) = vm
                .tdp
                .find_or_create_root(stats, self.role, &mut self.cache)
            {
                let rcu = vm.tdp.rcu.read_lock_with(&self.rcu);
                let ctx = Ctx::new(stats, &rcu);
                if let Some(old) = self.root.replace(root) {
                    vm.tdp.put_root(&ctx, &old);
                }
                return Ok(());
            }
        }
    }

    /// Drop the current root and every cached previous root that is obsolete; keep
    /// valid previous roots (the 2021 fix: before it, every root was dropped).
    pub(crate) fn free_obsolete_roots(&mut self) {
        let vm = &*self.vm;
        let stats = &self.shared.stats;
        let _r = vm.mmu_lock.read(&stats.lock);
        let rcu = vm.tdp.rcu.read_lock_with(&self.rcu);
        let ctx = Ctx::new(stats, &rcu);
        let current_obsolete = self.root.as_ref().is_some_and(|r| r.is_invalid());
        if let Some(r) = self.root.take_if(|r| r.is_invalid()) {
            vm.tdp.put_root(&ctx, &r);
            CounterSet::inc(&stats.obsolete_roots_dropped);
        }
        let wrong = vm.config.knobs.free_obsolete_tests_current_root;
        for slot in self.prev_roots.iter_mut() {
            match slot.take_if(|r| {
                if wrong {
                    current_obsolete
                } else {
                    r.is_invalid()
                }
            }) {
                Some(r) => {
                    vm.tdp.put_root(&ctx, &r);
                    CounterSet::inc(&stats.obsolete_roots_dropped);
                }
                None if slot.is_some() => CounterSet::inc(&stats.prev_roots_kept),
                None => {}
            }
        }
    }

    /// Switch to role `smm` (entering or leaving system-management mode): the
    /// current root moves to the previous-roots cache and a cached root for the new
    /// role is reused if there is one (KVM's `fast_pgd_switch`); otherwise the root
    /// is loaded at the next entry. A valid root that comes back from the cache is
    /// never reloaded. Refused (and nothing changes) on a VM without the SMM
    /// address space.
    pub fn set_smm(&mut self, smm: bool) -> Result<(), VmError> {
        let _m = vcpu_mutex();
        let spaces = self.vm.config.address_spaces;
        if smm && spaces < 2 {
            return Err(VmError::SmmUnsupported { spaces });
        }
        if self.role.smm == smm {
            return Ok(());
        }
        self.role.smm = smm;
        if self.vm.config.mmu == crate::config::MmuKind::Shadow {
            // Another address space: other roots (KVM resets the MMU).
            self.free_shadow_roots(|_| true);
            return Ok(());
        }
        let want = self.role;
        let hit = self.prev_roots.iter().position(|r| {
            r.as_ref()
                .is_some_and(|r| r.role == want && !r.is_invalid())
        });
        let current = self.root.take();
        match hit {
            Some(i) => {
                CounterSet::inc(&self.shared.stats.prev_root_hits);
                self.root = self.prev_roots[i].take();
                self.prev_roots[i] = current;
            }
            None => {
                // Rotate: the least recently used cached root falls out. The
                // current root stays empty, so the next entry loads one.
                let evicted = self.prev_roots[NUM_PREV_ROOTS - 1].take();
                self.prev_roots.rotate_right(1);
                self.prev_roots[0] = current;
                if let Some(r) = evicted {
                    let vm = &*self.vm;
                    let stats = &self.shared.stats;
                    let _l = vm.mmu_lock.read(&stats.lock);
                    let rcu = vm.tdp.rcu.read_lock_with(&self.rcu);
                    vm.tdp.put_root(&Ctx::new(stats, &rcu), &r);
                }
            }
        }
        // The new root needs a local flush before use.
        self.shared
            .requests
            .fetch_or(REQ_TLB_FLUSH, Ordering::Relaxed);
        Ok(())
    }

    /// Enter guest mode. Returns false (and stays outside) if a request arrived
    /// since [`VcpuMmu::prepare_entry`]; call it again.
    pub fn enter_guest_mode(&self) -> bool {
        // Dekker pair with `VcpuShared::request`: store the mode, full fence,
        // load the requests here; store requests, full fence, update the mode
        // there.
        self.shared.set_mode(IN_GUEST_MODE, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !self.vm.config.knobs.enter_without_request_check
            && self.shared.requests.load(Ordering::Relaxed) != 0
        {
            self.shared.set_mode(OUTSIDE_GUEST_MODE, Ordering::Release);
            self.shared.left_guest_mode();
            return false;
        }
        true
    }

    /// Leave guest mode. Release: everything done in guest mode happens before a
    /// waiting requester continues.
    pub fn exit_guest_mode(&self) {
        // Every exit drains the page-modification log first (KVM does it at
        // the top of its exit handler), so a requester that waits for this
        // vCPU to leave guest mode finds its writes logged.
        self.flush_pml();
        self.shared.set_mode(OUTSIDE_GUEST_MODE, Ordering::Release);
        self.shared.left_guest_mode();
    }

    /// Whether a requester asked this vCPU to leave guest mode (poll while running
    /// guest code; the kick is the asynchronous version of this).
    pub fn exit_requested(&self) -> bool {
        self.shared.mode.load(Ordering::Relaxed) == EXITING_GUEST_MODE
    }

    /// Whether this vCPU's dirty ring is full up to its reserve (it exits with
    /// [`VmError::DirtyRingFull`] until the VMM has collected and reset it).
    pub fn dirty_ring_soft_full(&self) -> bool {
        self.shared.ring.as_ref().is_some_and(|r| r.soft_full())
    }

    /// Entries in this vCPU's dirty ring not yet reset (0 without a ring).
    pub fn dirty_ring_used(&self) -> u32 {
        self.shared.ring.as_ref().map_or(0, |r| r.used())
    }

    /// Whether requests are pending.
    pub fn has_requests(&self) -> bool {
        self.shared.requests.load(Ordering::Relaxed) != 0
    }
}

impl Drop for VcpuMmu {
    fn drop(&mut self) {
        self.free_shadow_roots(|_| true);
        let vm = &*self.vm;
        {
            let stats = &vm.stats;
            let _r = vm.mmu_lock.read(&stats.lock);
            let rcu = vm.tdp.rcu.read_lock_with(&self.rcu);
            let ctx = Ctx::new(stats, &rcu);
            for r in self
                .root
                .take()
                .into_iter()
                .chain(self.prev_roots.iter_mut().filter_map(Option::take))
            {
                vm.tdp.put_root(&ctx, &r);
            }
        }
        self.cache.drain(&vm.tdp);
        // Fold this vCPU's counters into the VM's so they are not lost.
        let mut s = Stats::default();
        self.shared.stats.accumulate(&mut s);
        vm.stats.absorb(&s);
        Vm::remove_vcpu(vm, self.shared.id);
    }
}
