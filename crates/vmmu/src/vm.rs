//! The VM: memslots, the notifier callbacks, roots invalidation and requests, and
//! the teardown that frees every table page.

use std::collections::BTreeSet;

use crate::attributes::Attributes;
use crate::config::HookPoint;
use crate::config::VmConfig;
use crate::gmem::GuestMemfd;
use crate::host::{HostOps, TableMemoryError};
use crate::memslot::GmemArg;
use crate::memslot::{
    self, Change, Memslot, MemslotError, MemslotSet, SetOp, UserMemoryRegion,
    GEN_UPDATE_IN_PROGRESS,
};
use crate::notifier::{ActiveInvalidations, InvalidateState};
use crate::request::{RequestState, VcpuShared, REQ_FREE_OBSOLETE_ROOTS, REQ_TLB_FLUSH};
use crate::root::RootFilter;
use crate::spte::Spte;
use crate::stats::{CounterSet, Stats};
use crate::sync::{Arc, LockClass, MmuLock, Mutex, Snapshot, Srcu, SrcuSnapshot};
use crate::tdp::{Ctx, FlushBatch, RemoteFlush, Tdp};
use crate::types::{Gfn, GfnRange, Level};
use crate::vcpu::VcpuMmu;

/// Why a VM or vCPU call was refused. A refused call changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    /// The configuration is inconsistent (EINVAL).
    #[error("Invalid VM configuration: {0}")]
    InvalidConfig(&'static str),
    /// A vCPU with this id exists (EEXIST).
    #[error("vCPU {0} already exists")]
    VcpuExists(u32),
    /// vCPU ids are below `max` (`KVM_MAX_VCPU_IDS`; EINVAL).
    #[error("vCPU id {id} out of range (ids are 0..{max})")]
    InvalidVcpuId {
        /// The id given.
        id: u32,
        /// One past the largest id.
        max: u32,
    },
    /// System-management mode needs a second address space (EINVAL, as KVM
    /// refuses `KVM_SMI` where SMM is not supported).
    #[error("SMM needs 2 address spaces; this VM has {spaces}")]
    SmmUnsupported {
        /// Address spaces the VM was created with.
        spaces: u16,
    },
    /// An address space the VM does not have (EINVAL).
    #[error("Address space {as_id} out of range (this VM has {spaces})")]
    InvalidAddressSpace {
        /// The address space given.
        as_id: u16,
        /// Address spaces the VM has.
        spaces: u16,
    },
    /// A gfn range whose end lies before its start (EINVAL).
    #[error("Inverted gfn range {start:#x}..{end:#x}")]
    InvalidRange {
        /// First gfn.
        start: u64,
        /// One past the last gfn.
        end: u64,
    },
    /// A CR3 value with bits set above the guest's physical address width
    /// (KVM injects #GP; EINVAL here).
    #[error("CR3 {cr3:#x} has reserved bits set")]
    InvalidCr3 {
        /// The value given.
        cr3: u64,
    },
    /// Table memory ran out (ENOMEM).
    #[error(transparent)]
    Memory(#[from] TableMemoryError),
    /// Every shadow page under the limit is a root in use: nothing to
    /// recycle for a new one (ENOSPC, as KVM's `make_mmu_pages_available`).
    #[error("shadow page limit of {limit} reached and every page is a root in use")]
    NoShadowPages {
        /// The limit in force.
        limit: u64,
    },
    /// `KVM_SET_NR_MMU_PAGES` below the minimum.
    #[error("shadow page limit {pages} is below the minimum of {min}")]
    InvalidNrMmuPages {
        /// The value given.
        pages: u64,
        /// The smallest allowed.
        min: u64,
    },
    /// `KVM_EXIT_DIRTY_RING_FULL`: the vCPU's dirty ring is full up to its
    /// reserve; collect and reset it (`Vm::collect_dirty_ring`,
    /// `Vm::reset_dirty_rings`), then enter again (EAGAIN, "try again").
    #[error("vCPU {vcpu}: dirty ring full, collect and reset it before entering again")]
    DirtyRingFull {
        /// The vCPU.
        vcpu: u32,
    },
}

impl VmError {
    /// The errno KVM would return for this refusal.
    pub fn errno(&self) -> i32 {
        use crate::errno::*;
        match self {
            VmError::VcpuExists(_) => EEXIST,
            VmError::Memory(_) => ENOMEM,
            VmError::DirtyRingFull { .. } => EAGAIN,
            VmError::NoShadowPages { .. } => ENOSPC,
            VmError::InvalidConfig(_)
            | VmError::InvalidVcpuId { .. }
            | VmError::SmmUnsupported { .. }
            | VmError::InvalidAddressSpace { .. }
            | VmError::InvalidRange { .. }
            | VmError::InvalidCr3 { .. }
            | VmError::InvalidNrMmuPages { .. } => EINVAL,
        }
    }
}

/// `KVM_MAX_VCPU_IDS` on x86.
pub const MAX_VCPU_IDS: u32 = 4096;

/// What `slots_lock` guards. Holding `&mut SlotsState` is the proof that the
/// caller serializes memslot updates; there is no data of its own any more.
/// KVM keeps an inactive second set per address space and applies every
/// change to both; here a set's indexes are persistent trees, so the next
/// set starts as an O(1) copy of the active one and each change is applied
/// once (half the tree work per update, DESIGN "Memslot sets").
#[derive(Debug)]
pub(crate) struct SlotsState {
    _serialized: (),
}

/// The shared part of a VM (KVM's `struct kvm`).
pub(crate) struct VmInner {
    pub(crate) config: VmConfig,
    pub(crate) host: HostOps,
    pub(crate) tdp: Tdp,
    /// The shadow MMU's pages, rmaps and write tracking (empty on TDP VMs).
    pub(crate) shadow: crate::shadow::ShadowMmu,
    pub(crate) mmu_lock: MmuLock,
    pub(crate) inval: InvalidateState,
    pub(crate) active_inval: ActiveInvalidations,
    /// `kvm->slots_lock`.
    pub(crate) slots: Mutex<SlotsState>,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags in force.
    pub(crate) manual_dirty_log: crate::sync::AtomicU64,
    /// Walks that clear Dirty bits, started and finished (see
    /// [`Vm::dirty_bit_clears`]).
    pub(crate) d_clears: [crate::sync::AtomicU64; 2],
    /// Entries of each vCPU's dirty ring (0: the VM logs into bitmaps).
    pub(crate) dirty_ring: crate::sync::AtomicU32,
    /// Read inside the vCPUs' SRCU sections by plain reference (the fault
    /// path), elsewhere through a guard.
    pub(crate) memslots: Vec<SrcuSnapshot<MemslotSet>>,
    pub(crate) srcu: Srcu,
    /// The vCPU list, under `kvm->lock` (as `kvm_vm_ioctl_create_vcpu` takes it).
    pub(crate) vcpu_registry: Mutex<Vec<Arc<VcpuShared>>>,
    /// `kvm->slots_arch_lock`: held by a memslot update from publishing its new
    /// set until just before it waits for SRCU readers.
    slots_arch_lock: Mutex<()>,
    pub(crate) vcpus: Snapshot<Vec<Arc<VcpuShared>>>,
    pub(crate) stats: CounterSet,
    /// Generation bits kept in MMIO entries (all 19 outside tests).
    pub(crate) mmio_gen_mask: u64,
    /// Memory attributes (private gfns), for VM types with private memory.
    pub(crate) attrs: Attributes,
}

impl std::fmt::Debug for VmInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmInner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A virtual machine's MMU. Cheap to clone (a handle).
#[derive(Clone, Debug)]
pub struct Vm {
    pub(crate) inner: Arc<VmInner>,
}

impl RemoteFlush for VmInner {
    fn flush_remote_tlbs(&self, stats: &CounterSet) {
        CounterSet::inc(&stats.tlb_flush_remote);
        self.make_all_vcpus_request(REQ_TLB_FLUSH, true);
    }
}

/// A walk that clears Dirty bits is in progress while this lives.
pub(crate) struct ClearingDirtyBits<'a>(&'a [crate::sync::AtomicU64; 2]);

impl Drop for ClearingDirtyBits<'_> {
    fn drop(&mut self) {
        self.0[1].fetch_add(1, crate::sync::Ordering::SeqCst);
    }
}

impl VmInner {
    /// Count a Dirty-bit clearing walk as started until the guard drops.
    pub(crate) fn clearing_dirty_bits(&self) -> ClearingDirtyBits<'_> {
        self.d_clears[0].fetch_add(1, crate::sync::Ordering::SeqCst);
        ClearingDirtyBits(&self.d_clears)
    }

    /// Set `bits` on every vCPU, kick those in guest mode, and with `wait` return
    /// only once each of them has left guest mode.
    pub(crate) fn make_all_vcpus_request(&self, bits: u64, wait: bool) {
        let vcpus = self.vcpus.load();
        let mut waiting: Vec<&Arc<VcpuShared>> = Vec::new();
        for v in vcpus.iter() {
            match v.request(bits) {
                RequestState::MustKick => {
                    self.host.kick.kick(v.id);
                    waiting.push(v);
                }
                RequestState::Exiting => waiting.push(v),
                RequestState::Outside => {}
            }
        }
        if wait && !self.config.knobs.skip_request_wait {
            for v in waiting {
                v.wait_until_exited();
            }
        }
    }

    /// KVM's `kvm_mmu_zap_all_fast`: invalidate roots and make every vCPU drop them
    /// in one write-locked section, then zap them under the read lock before
    /// returning (after a memslot delete, notifiers can no longer find those
    /// entries, so nothing may be left behind).
    pub(crate) fn zap_roots_fast(&self, filter: RootFilter) {
        self.zap_roots_fast_with(filter, || {});
    }

    /// [`VmInner::zap_roots_fast`], running `first` in the same write-locked
    /// section before the roots are invalidated (a setting that new roots
    /// must see and old ones must not outlive).
    pub(crate) fn zap_roots_fast_with(&self, filter: RootFilter, first: impl FnOnce()) {
        crate::sync::lockdep::assert_held(LockClass::SlotsLock);
        CounterSet::inc(&self.stats.fast_zaps);
        {
            let _w = self.mmu_lock.write(&self.stats.lock);
            first();
            self.tdp.invalidate_roots(&self.stats, filter);
            self.make_all_vcpus_request(REQ_FREE_OBSOLETE_ROOTS, true);
            // Shadow pages have no generation here: all of them go (roots in
            // use turn invalid and are dropped by their vCPUs).
            if self.is_shadow() {
                self.shadow.zap_everything(self, filter);
            }
        }
        let rcu = self.tdp.rcu.read_lock();
        let ctx = Ctx::new(&self.stats, &rcu);
        let mut r = self.mmu_lock.read(&self.stats.lock);
        self.tdp
            .zap_invalidated_roots(&ctx, &mut r, &self.stats.lock);
    }

    /// Take `slots_lock` (guest_memfd release runs under it).
    #[track_caller]
    pub(crate) fn slots_guard(&self) -> crate::sync::MutexGuard<'_, SlotsState> {
        self.slots.lock()
    }

    /// Zap leaves of `range` in every root of `as_id` (valid or not), flushing once.
    pub(crate) fn unmap_gfn_range(
        &self,
        ctx: &Ctx<'_>,
        w: &mut crate::sync::MmuWriteGuard<'_>,
        as_id: u16,
        range: GfnRange,
        batch: &mut FlushBatch,
    ) {
        self.tdp.for_each_root(ctx, as_id, false, |root| {
            self.tdp
                .zap_leafs(ctx, root, range, w, &self.stats.lock, batch, self);
        });
        if self.is_shadow() {
            self.shadow.unmap_range(self, as_id, range);
        }
    }

    /// Whether the VM runs the shadow MMU.
    pub(crate) fn is_shadow(&self) -> bool {
        self.config.mmu == crate::config::MmuKind::Shadow
    }

    /// After the attributes of `changed` (inside `slot`) changed: re-evaluate the
    /// mixed flag of every 2 MiB and 1 GiB chunk the change touched (KVM's
    /// `kvm_arch_post_set_memory_attributes`). Chunks the change covers whole are
    /// uniform by construction; the partial ones at its edges are looked at.
    /// 1 GiB after 2 MiB, as KVM orders it (a 1 GiB chunk is uniform exactly when
    /// its attributes are the same throughout).
    pub(crate) fn update_mixed(&self, slot: &Memslot, changed: GfnRange) {
        let sr = slot.gfn_range();
        for level in [Level::M2, Level::G1] {
            let pages = level.pages();
            let mut c = changed.start.align_down(level);
            while c.0 < changed.end.0 {
                let chunk = GfnRange::new(c, c.add(pages));
                if chunk.start.0 >= sr.start.0 && chunk.end.0 <= sr.end.0 {
                    let covered = chunk.start.0 >= changed.start.0 && chunk.end.0 <= changed.end.0;
                    slot.set_mixed(c, level, !covered && !self.attrs.is_uniform(chunk));
                }
                c = c.add(pages);
            }
        }
    }

    /// A new slot (created or moved) starts with the mixed flags its range has
    /// (KVM's `kvm_mmu_init_memslot_memory_attributes`): only chunks that hold an
    /// attribute boundary can be mixed.
    fn init_mixed(&self, slot: &Memslot) {
        if !self.config.vm_type.has_private_mem() {
            return;
        }
        let sr = slot.gfn_range();
        for b in self.attrs.boundaries(sr) {
            for level in [Level::M2, Level::G1] {
                let c = b.align_down(level);
                let chunk = GfnRange::new(c, c.add(level.pages()));
                if c != b && chunk.start.0 >= sr.start.0 && chunk.end.0 <= sr.end.0 {
                    slot.set_mixed(c, level, !self.attrs.is_uniform(chunk));
                }
            }
        }
    }

    fn publish_memslots(&self, _serialized: &mut SlotsState, as_id: u16, ops: &[SetOp]) {
        let idx = as_id as usize;
        let (mut next, cur_gen) = {
            let cur = self.memslots[idx].load();
            let cur_gen = cur.generation() & !GEN_UPDATE_IN_PROGRESS;
            (MemslotSet::clone(&cur), cur_gen)
        };
        for op in ops {
            next.apply(op);
        }
        next.set_generation(cur_gen | GEN_UPDATE_IN_PROGRESS);
        let next = Arc::new(next);
        let old = {
            // KVM's kvm_swap_active_memslots: slots_arch_lock is held while the
            // installer waits for notifiers and publishes, and dropped before it
            // waits for SRCU readers (so it may be taken inside a read section).
            let _arch = self.slots_arch_lock.lock();
            self.active_inval
                .publish_when_idle(self.config.knobs.skip_install_wait, || {
                    self.memslots[idx].swap(next.clone(), &self.srcu)
                })
        };
        self.config.hooks.run(HookPoint::MemslotSetSwapped {
            as_id,
            generation: cur_gen | GEN_UPDATE_IN_PROGRESS,
        });
        // Every reader that might still use the old set is gone after this.
        let old = old.synchronize();
        let new_gen = cur_gen + self.config.address_spaces as u64;
        // KVM's `kvm_arch_memslots_updated`, before the generation is stored: if
        // the generation slice kept in MMIO entries wrapped, an entry cached a
        // whole wrap ago would match the new generation and make a fault emulate
        // MMIO for a gfn that may now have a slot. Zap everything first; until the
        // store below, the in-progress bit keeps every MMIO entry stale.
        let wrapped = new_gen & self.mmio_gen_mask < self.config.address_spaces as u64;
        let zap_first = !self.config.knobs.zap_after_publish;
        if wrapped && zap_first {
            self.zap_roots_fast(RootFilter::All);
        }
        next.set_generation(new_gen);
        self.config
            .hooks
            .run(HookPoint::MemslotGenerationPublished {
                as_id,
                generation: new_gen,
            });
        if wrapped && !zap_first {
            self.zap_roots_fast(RootFilter::All);
        }
        CounterSet::inc(&self.stats.memslot_updates);
        // The retired set (no reader left after the grace period) goes here,
        // freeing the tree nodes only it still held.
        drop(old);
    }
}

impl Vm {
    /// Manual dirty-log protection with `INITIALLY_SET` is in force.
    fn initially_set(&self) -> bool {
        let f = self
            .inner
            .manual_dirty_log
            .load(crate::sync::Ordering::Relaxed);
        f & crate::dirty_log::MANUAL_PROTECT_ENABLE != 0 && f & crate::dirty_log::INITIALLY_SET != 0
    }

    /// Refuse an address space the VM does not have, or an inverted range.
    fn check_range(&self, as_id: u16, range: Option<GfnRange>) -> Result<(), VmError> {
        let spaces = self.inner.config.address_spaces;
        if as_id >= spaces {
            return Err(VmError::InvalidAddressSpace { as_id, spaces });
        }
        if let Some(r) = range {
            if r.start.0 > r.end.0 {
                return Err(VmError::InvalidRange {
                    start: r.start.0,
                    end: r.end.0,
                });
            }
        }
        Ok(())
    }

    /// Create a VM on the given host.
    pub fn new(config: VmConfig, host: HostOps) -> Result<Vm, VmError> {
        if config.root_level != Level::L4 && config.root_level != Level::L5 {
            return Err(VmError::InvalidConfig("root level must be 4 or 5"));
        }
        let max_bits = if config.root_level == Level::L4 {
            48
        } else {
            57
        };
        if config.maxphyaddr < 32 || config.maxphyaddr > max_bits.min(52) {
            return Err(VmError::InvalidConfig(
                "maxphyaddr must be 32..=48 (4-level) or 32..=52 (5-level)",
            ));
        }
        if config.address_spaces == 0 || config.address_spaces > 2 {
            return Err(VmError::InvalidConfig("address spaces must be 1 or 2"));
        }
        if config.max_level > Level::MAX_HUGE {
            return Err(VmError::InvalidConfig("max mapping level is 1G"));
        }
        // KVM turns PML off when EPT A/D bits are off: the log is written when
        // the processor sets a Dirty bit.
        if config.pml() && !config.ad_enabled {
            return Err(VmError::InvalidConfig(
                "PML dirty tracking needs EPT A/D bits (ad_enabled)",
            ));
        }
        if config.mmu == crate::config::MmuKind::Shadow {
            if config.vm_type != crate::config::VmType::Default {
                return Err(VmError::InvalidConfig(
                    "shadow paging needs the default VM type (private memory needs TDP)",
                ));
            }
            if config.pml() {
                return Err(VmError::InvalidConfig(
                    "shadow paging has no PML: use write-protect dirty tracking",
                ));
            }
            if config.root_level != Level::L4 {
                return Err(VmError::InvalidConfig(
                    "shadow paging shadows 4-level guest tables: root level must be 4",
                ));
            }
        }
        let n = config.address_spaces;
        let inner = VmInner {
            shadow: crate::shadow::ShadowMmu::new(config.knobs.unsync_cleared_early),
            tdp: Tdp::new(
                host.memory.clone(),
                config.root_level,
                config.gfn_limit(),
                config.ad_enabled,
                config.nx_huge_pages,
                config.knobs,
            ),
            host,
            mmu_lock: MmuLock::new(),
            inval: InvalidateState::new(config.knobs.relaxed_seq_bump),
            active_inval: ActiveInvalidations::new(),
            manual_dirty_log: crate::sync::AtomicU64::new(0),
            d_clears: Default::default(),
            dirty_ring: crate::sync::AtomicU32::new(0),
            slots: Mutex::new(LockClass::SlotsLock, SlotsState { _serialized: () }),
            memslots: (0..n)
                .map(|a| SrcuSnapshot::new(Arc::new(MemslotSet::new(a))))
                .collect(),
            srcu: Srcu::new(),
            vcpu_registry: Mutex::new(LockClass::KvmLock, Vec::new()),
            slots_arch_lock: Mutex::new(LockClass::SlotsArchLock, ()),
            vcpus: Snapshot::new(Arc::new(Vec::new())),
            stats: CounterSet::default(),
            mmio_gen_mask: config.mmio_gen_mask(),
            attrs: Attributes::new(),
            config,
        };
        Ok(Vm {
            inner: Arc::new(inner),
        })
    }

    /// The configuration the VM was created with.
    pub fn config(&self) -> &VmConfig {
        &self.inner.config
    }

    /// Create the MMU context of vCPU `id`.
    pub fn create_vcpu(&self, id: u32) -> Result<VcpuMmu, VmError> {
        if id >= MAX_VCPU_IDS {
            return Err(VmError::InvalidVcpuId {
                id,
                max: MAX_VCPU_IDS,
            });
        }
        let shared = {
            let mut reg = self.inner.vcpu_registry.lock();
            if reg.iter().any(|v| v.id == id) {
                return Err(VmError::VcpuExists(id));
            }
            let ring = self.inner.dirty_ring.load(crate::sync::Ordering::Relaxed);
            let shared = Arc::new(VcpuShared::new(id, ring));
            reg.push(shared.clone());
            self.inner.vcpus.swap(Arc::new(reg.clone()));
            shared
        };
        Ok(VcpuMmu::new(self.inner.clone(), shared))
    }

    pub(crate) fn remove_vcpu(inner: &VmInner, id: u32) {
        let mut reg = inner.vcpu_registry.lock();
        reg.retain(|v| v.id != id);
        inner.vcpus.swap(Arc::new(reg.clone()));
    }

    /// `KVM_SET_USER_MEMORY_REGION`: create, delete (size 0), move or change the
    /// flags of a slot. All validation happens before anything changes; a refused
    /// call changes nothing.
    ///
    /// Delete and move first publish an invalid copy of the slot (faults on it
    /// retry), wait for in-flight readers, zap every root (x86's default, the
    /// slot-zap-all quirk), then publish the final set. Enabling dirty logging
    /// write-protects the slot after the new flags are visible.
    #[track_caller]
    pub fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<(), MemslotError> {
        self.set_memory_region(region, false, None)
    }

    /// `KVM_SET_USER_MEMORY_REGION2`: [`Vm::set_user_memory_region`] plus the
    /// `GUEST_MEMFD` flag, which binds `guest_memfd` from `guest_memfd_offset`
    /// (page aligned, the slot's range inside the file, not bound to another
    /// slot). A guest_memfd slot cannot be read-only, log dirty pages, move or
    /// change its flags; only deleting it (size 0) is allowed. The flag needs a VM
    /// type with private memory and is refused by the old call.
    #[track_caller]
    pub fn set_user_memory_region2(
        &self,
        region: UserMemoryRegion,
        guest_memfd: Option<&GuestMemfd>,
        guest_memfd_offset: u64,
    ) -> Result<(), MemslotError> {
        if let Some(g) = guest_memfd {
            if region.flags & crate::memslot::MemFlags::GUEST_MEMFD.bits() != 0
                && !g.file.belongs_to(&self.inner)
            {
                return Err(MemslotError::GuestMemfd {
                    slot: region.slot,
                    what: "belongs to another VM",
                });
            }
        }
        let gmem = guest_memfd.map(|g| GmemArg {
            file: &g.file,
            offset: guest_memfd_offset,
        });
        self.set_memory_region(region, true, gmem)
    }

    #[track_caller]
    fn set_memory_region(
        &self,
        region: UserMemoryRegion,
        region2: bool,
        gmem: Option<GmemArg<'_>>,
    ) -> Result<(), MemslotError> {
        let vm = &*self.inner;
        let mut state = vm.slots.lock();
        let as_id = (region.slot >> 16) as u16;
        let change = {
            let idx = (as_id as usize).min(vm.memslots.len().saturating_sub(1));
            let set = vm.memslots[idx].load();
            memslot::classify_with(
                &set,
                &region,
                &memslot::Limits {
                    address_spaces: vm.config.address_spaces,
                    gfn_limit: vm.config.gfn_limit(),
                    region2,
                    gmem: vm.host.private.is_some(),
                    dirty_initially_set: self.initially_set(),
                    dirty_ring: vm.dirty_ring.load(crate::sync::Ordering::Relaxed) > 0,
                },
                gmem,
            )?
        };
        match change {
            Change::Nothing => {}
            Change::Create(slot) => {
                vm.init_mixed(&slot);
                if let Some(g) = slot.gmem() {
                    let bound = g.file.bind(crate::gmem::Binding {
                        as_id,
                        slot_id: slot.id(),
                        start: g.pgoff,
                        npages: slot.npages(),
                        base_gfn: slot.base_gfn(),
                    });
                    if !bound {
                        return Err(MemslotError::GuestMemfd {
                            slot: region.slot,
                            what: "range is bound to another memslot",
                        });
                    }
                }
                vm.publish_memslots(&mut state, as_id, &[SetOp::Insert(slot)])
            }
            Change::Delete(old) => {
                let inv = Change::invalid_copy(&old);
                vm.publish_memslots(&mut state, as_id, &[SetOp::Replace(old.id(), inv.clone())]);
                vm.zap_roots_fast(RootFilter::All);
                vm.publish_memslots(&mut state, as_id, &[SetOp::Remove(inv.id())]);
                if let Some(g) = old.gmem() {
                    g.file.unbind(as_id, old.id());
                }
            }
            Change::Move { old, new } => {
                vm.init_mixed(&new);
                let inv = Change::invalid_copy(&old);
                vm.publish_memslots(&mut state, as_id, &[SetOp::Replace(old.id(), inv.clone())]);
                vm.zap_roots_fast(RootFilter::All);
                vm.publish_memslots(&mut state, as_id, &[SetOp::Replace(inv.id(), new)]);
            }
            Change::FlagsOnly { old, new } => {
                let logging_on = new.dirty_logging() && !old.dirty_logging();
                let logging_off = old.dirty_logging() && !new.dirty_logging();
                let range = new.gfn_range();
                let slot = new.clone();
                vm.publish_memslots(&mut state, as_id, &[SetOp::Replace(old.id(), new)]);
                // Huge pages back in place, now that writes need not be seen
                // page by page (KVM 6.13); the slot's huge-page limits are read
                // from the slot as published.
                if logging_off {
                    self.recover_huge_pages(&slot);
                }
                // With INITIALLY_SET every page counts as dirty and nothing is
                // protected until the first clear (KVM's apply-flags).
                if logging_on && !self.initially_set() {
                    // Split first (KVM's eager_page_split), so write protection
                    // then works on 4 KiB pages and a first write does not
                    // have to split a huge page in the fault path.
                    if vm.config.eager_page_split {
                        self.split_huge_pages(as_id, range);
                    }
                    // Write-protect, or with PML clear D (KVM's
                    // kvm_mmu_slot_leaf_clear_dirty plus write protection of
                    // huge leaves).
                    if self.protect_ranges(as_id, [range], vm.config.pml()) {
                        vm.flush_remote_tlbs(&vm.stats);
                    }
                }
            }
        }
        Ok(())
    }

    /// The current memslots of an address space (a snapshot).
    pub fn memslots(&self, as_id: u16) -> Option<Arc<MemslotSet>> {
        self.inner
            .memslots
            .get(as_id as usize)
            .map(|s| s.load_full())
    }

    /// Invalidate roots and zap them (KVM's fast zap). Every vCPU drops its
    /// obsolete roots before it next enters the guest; valid ones survive.
    pub fn invalidate_roots(&self, filter: RootFilter) -> Result<(), VmError> {
        if let RootFilter::AddressSpace(as_id) = filter {
            self.check_range(as_id, None)?;
        }
        let _s = self.inner.slots.lock();
        self.inner.zap_roots_fast(filter);
        Ok(())
    }

    /// Zap the leaves of `range` in valid roots, bracketed like an invalidation
    /// (KVM's `kvm_zap_gfn_range`). Gfns beyond the guest's physical address
    /// width are never mapped, so a range may extend past them.
    pub fn zap_gfn_range(&self, as_id: u16, range: GfnRange) -> Result<(), VmError> {
        self.check_range(as_id, Some(range))?;
        let vm = &*self.inner;
        let rcu = vm.tdp.rcu.read_lock();
        let ctx = Ctx::new(&vm.stats, &rcu);
        let mut w = vm.mmu_lock.write(&vm.stats.lock);
        vm.inval.begin(&w);
        vm.inval.range_add(range, &w);
        let mut batch = FlushBatch::default();
        vm.tdp.for_each_root(&ctx, as_id, true, |root| {
            vm.tdp
                .zap_leafs(&ctx, root, range, &mut w, &vm.stats.lock, &mut batch, vm);
        });
        if vm.is_shadow() {
            vm.shadow.unmap_range(vm, as_id, range);
        }
        batch.flush(vm, &vm.stats);
        vm.inval.end(&w);
        Ok(())
    }

    /// Clear W (keeping MMU-writable) on every mapping of `range`: the
    /// write-protection dirty logging uses. Writes then take the fast path, which
    /// makes the entry writable again and records the page as dirty.
    pub fn write_protect_gfn_range(&self, as_id: u16, range: GfnRange) -> Result<(), VmError> {
        self.check_range(as_id, Some(range))?;
        if self.protect_ranges(as_id, [range], false) {
            self.inner.flush_remote_tlbs(&self.inner.stats);
        }
        Ok(())
    }

    /// Write-protect `ranges` in every valid root of `as_id`, all under one
    /// read hold of `mmu_lock`, or with `pml` clear the Dirty bits of their
    /// 4 KiB leaves instead (huge leaves are write-protected either way).
    /// Returns whether anything changed: the caller flushes before relying on
    /// it (a translation cached writable, or cached dirty, would let writes
    /// through unseen).
    pub(crate) fn protect_ranges(
        &self,
        as_id: u16,
        ranges: impl IntoIterator<Item = GfnRange>,
        pml: bool,
    ) -> bool {
        let vm = &*self.inner;
        if vm.is_shadow() {
            // Shadow entries change under the write lock only (no PML there).
            let _w = vm.mmu_lock.write(&vm.stats.lock);
            let mut changed = false;
            for range in ranges {
                changed |= vm.shadow.write_protect_range(vm, as_id, range);
            }
            return changed;
        }
        let rcu = vm.tdp.rcu.read_lock();
        let ctx = Ctx::new(&vm.stats, &rcu);
        let _c = pml.then(|| vm.clearing_dirty_bits());
        let _r = vm.mmu_lock.read(&vm.stats.lock);
        let mut changed = false;
        for range in ranges {
            vm.tdp.for_each_root(&ctx, as_id, true, |root| {
                changed |= vm.tdp.dirty_log_protect_range(&ctx, root, range, pml);
            });
        }
        changed
    }

    /// Walks that clear Dirty bits (D-bit harvests, PML dirty logging)
    /// started and finished so far. For checkers: a leaf a processor's write
    /// made dirty and that is clean again afterwards is a harvest's doing only
    /// if a walk overlapped, i.e. unless `started` read after equals
    /// `finished` read before.
    #[doc(hidden)]
    pub fn dirty_bit_clears(&self) -> (u64, u64) {
        let c = &self.inner.d_clears;
        // SeqCst: ordered with the vCPU's own accesses and the walks' bumps.
        (
            c[0].load(crate::sync::Ordering::SeqCst),
            c[1].load(crate::sync::Ordering::SeqCst),
        )
    }

    /// Clear the Dirty bits of `range` in valid roots and return how many pages
    /// were dirty (harvesting for D-bit based dirty logging). Clearing D needs no
    /// immediate flush: a stale TLB entry can only make hardware skip setting D for
    /// a page it already knew was dirty, and the harvester flushes before reuse.
    pub fn clear_dirty_gfn_range(&self, as_id: u16, range: GfnRange) -> Result<u64, VmError> {
        self.check_range(as_id, Some(range))?;
        let vm = &*self.inner;
        let rcu = vm.tdp.rcu.read_lock();
        let ctx = Ctx::new(&vm.stats, &rcu);
        let mut n = 0;
        let mut protected = false;
        {
            let _c = vm.clearing_dirty_bits();
            let _w = vm.mmu_lock.write(&vm.stats.lock);
            vm.tdp.for_each_root(&ctx, as_id, true, |root| {
                let (d, p) = vm.tdp.clear_dirty_range(&ctx, root, range);
                n += d;
                protected |= p;
            });
            if vm.is_shadow() {
                n += vm.shadow.clear_dirty_range(vm, as_id, range);
            }
        }
        // Write-protection (entries without A/D bits) is only in force once no
        // TLB holds the writable translation.
        if protected {
            vm.flush_remote_tlbs(&vm.stats);
        }
        Ok(n)
    }

    /// Counters summed over the VM and all its live vCPUs (a vCPU's counts go away
    /// with it; take snapshots before destroying vCPUs).
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        self.inner.stats.accumulate(&mut s);
        for v in self.inner.vcpus.load().iter() {
            v.stats.accumulate(&mut s);
        }
        s
    }

    /// Table pages in use: linked tables plus live roots (shadow pages on a
    /// shadow VM).
    pub fn table_pages_in_use(&self) -> u64 {
        if self.inner.is_shadow() {
            let _w = self.inner.mmu_lock.write(&self.inner.stats.lock);
            return self.inner.shadow.page_count();
        }
        self.inner
            .tdp
            .linked_tables
            .load(crate::sync::Ordering::Relaxed)
            + self
                .inner
                .tdp
                .roots_snapshot()
                .iter()
                .filter(|r| !r.is_freed())
                .count() as u64
    }

    /// The shadow MMU's pages, tracked gfns and leaves (all zero on a TDP VM).
    pub fn shadow_info(&self) -> crate::shadow::ShadowInfo {
        let _w = self.inner.mmu_lock.write(&self.inner.stats.lock);
        let mut info = self.inner.shadow.lock().info();
        if self.inner.config.mmu == crate::config::MmuKind::Shadow {
            info.max_pages = self.inner.shadow.limit(&self.inner);
            info.unsync = self
                .inner
                .shadow
                .unsync_pages
                .load(crate::sync::Ordering::Relaxed);
        }
        info
    }

    /// Live roots: (id, address space, valid, reference count).
    pub fn roots(&self) -> Vec<RootInfo> {
        self.inner
            .tdp
            .roots_snapshot()
            .iter()
            .map(|r| RootInfo {
                id: r.id,
                as_id: r.role.as_id(),
                valid: !r.is_invalid(),
                refcount: r.refcount(),
            })
            .collect()
    }

    /// Every present leaf (and MMIO entry) in the valid roots of `as_id`, deduplicated
    /// by gfn: for tests and oracles. Lockless; racing changes may or may not show.
    pub fn mappings(&self, as_id: u16) -> Vec<(Gfn, Level, Spte)> {
        let vm = &*self.inner;
        if vm.is_shadow() {
            // Shadow leaves of every page (several may map one gfn).
            let _w = vm.mmu_lock.write(&vm.stats.lock);
            return vm.shadow.leaves_of(vm, as_id);
        }
        let _rcu = vm.tdp.rcu.read_lock();
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for root in vm.tdp.roots_snapshot().iter() {
            if root.role.as_id() != as_id || root.is_invalid() {
                continue;
            }
            vm.tdp.for_each_leaf(root, |gfn, level, spte| {
                if seen.insert((gfn, level)) {
                    out.push((gfn, level, spte));
                }
            });
        }
        out
    }

    /// Tables reachable from live roots (excluding roots), counted by walking.
    pub fn count_reachable_tables(&self) -> u64 {
        let vm = &*self.inner;
        let _rcu = vm.tdp.rcu.read_lock();
        vm.tdp
            .roots_snapshot()
            .iter()
            .map(|r| vm.tdp.count_tables(r))
            .sum()
    }

    /// Table pages retired and still waiting for their RCU grace period, and
    /// the most there have been since [`Vm::reset_pending_free_peak`].
    pub fn tables_pending_free(&self) -> (u64, u64) {
        let t = &self.inner.tdp;
        (
            t.pending_free.load(crate::sync::Ordering::Relaxed),
            t.pending_free_peak.load(crate::sync::Ordering::Relaxed),
        )
    }

    /// Start measuring the peak of [`Vm::tables_pending_free`] afresh.
    pub fn reset_pending_free_peak(&self) {
        let t = &self.inner.tdp;
        t.pending_free_peak.store(
            t.pending_free.load(crate::sync::Ordering::Relaxed),
            crate::sync::Ordering::Relaxed,
        );
    }

    /// The request bits pending on vCPU `id` (for model-checking tests that
    /// must observe them from another thread).
    #[doc(hidden)]
    pub fn debug_pending_requests(&self, id: u32) -> Option<u64> {
        self.inner
            .vcpus
            .load()
            .iter()
            .find(|v| v.id == id)
            .map(|v| v.requests.load(crate::sync::Ordering::SeqCst))
    }

    /// Invalidations currently between start and end.
    pub fn invalidations_in_progress(&self) -> i64 {
        self.inner.inval.in_progress()
    }

    /// begin/end pairs that recorded no range (should stay 0).
    pub fn empty_invalidation_pairs(&self) -> u64 {
        self.inner.inval.empty_pairs()
    }
}

/// A summary of one root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootInfo {
    /// Unique id.
    pub id: u64,
    /// Address space.
    pub as_id: u16,
    /// Not invalidated.
    pub valid: bool,
    /// References (vCPUs, cached previous roots, the MMU's own).
    pub refcount: u32,
}

impl Drop for VmInner {
    fn drop(&mut self) {
        // Teardown (KVM's kvm_mmu_uninit_tdp_mmu): every vCPU is gone, so only the
        // MMU's own references remain. Invalidate, zap and free every root; the RCU
        // domain then runs every deferred free when it drops with `tdp`.
        let rcu = self.tdp.rcu.read_lock();
        let ctx = Ctx::new(&self.stats, &rcu);
        let mut w = self.mmu_lock.write(&self.stats.lock);
        self.shadow.zap_everything(self, RootFilter::All);
        self.tdp.invalidate_roots(&self.stats, RootFilter::All);
        self.tdp
            .zap_invalidated_roots(&ctx, &mut w, &self.stats.lock);
        drop(w);
        rcu.flush();
    }
}
