//! VM configuration.

use crate::types::{Gfn, Level};

/// The VM type (`KVM_CREATE_VM`'s argument on x86).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VmType {
    /// `KVM_X86_DEFAULT_VM`: no private memory; attribute calls are refused and
    /// every access is shared.
    #[default]
    Default,
    /// `KVM_X86_SW_PROTECTED_VM`: private memory for testing. A fault is private
    /// when the memory attributes say its gfn is; the guest's accesses carry no
    /// private bit.
    SwProtected,
    /// Modelled on `KVM_X86_SNP_VM`: the guest marks each access private or shared
    /// (its C-bit), so an access whose marking disagrees with the attributes exits
    /// to the VMM as on a confidential VM. No encryption or RMP is modelled.
    Snp,
}

impl VmType {
    /// The `KVM_CREATE_VM` type number.
    pub const fn kvm_type(self) -> u32 {
        match self {
            VmType::Default => 0,
            VmType::SwProtected => 1,
            VmType::Snp => 4,
        }
    }

    /// Every type, in `KVM_CREATE_VM` number order.
    pub const ALL: [VmType; 3] = [VmType::Default, VmType::SwProtected, VmType::Snp];

    /// Short name (`default`, `sw_protected`, `snp`).
    pub const fn name(self) -> &'static str {
        match self {
            VmType::Default => "default",
            VmType::SwProtected => "sw_protected",
            VmType::Snp => "snp",
        }
    }

    /// Whether the type has private memory (KVM's `kvm_arch_has_private_mem`).
    pub const fn has_private_mem(self) -> bool {
        !matches!(self, VmType::Default)
    }

    /// Whether the guest's access itself says private or shared.
    pub const fn private_bit_from_access(self) -> bool {
        matches!(self, VmType::Snp)
    }
}

/// How dirty logging catches a guest's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DirtyTracking {
    /// Write-protect logged pages: the next write to each faults (the fast
    /// path makes it writable again and logs it). What KVM does without PML
    /// (AMD hosts, `enable_pml=0`, EPT A/D bits off).
    #[default]
    WriteProtect,
    /// Intel's Page-Modification Logging: logged 4 KiB pages stay writable
    /// with Dirty cleared; the processor sets Dirty on the first write and
    /// appends the address to the vCPU's 512-entry log, which KVM drains into
    /// the dirty bitmap or ring at every VM exit (and at a log-full exit).
    /// Huge leaves are still write-protected, since one Dirty bit cannot say
    /// which of their pages were written. Needs EPT A/D bits.
    Pml,
}

impl DirtyTracking {
    /// Short name (`write-protect`, `pml`).
    pub const fn name(self) -> &'static str {
        match self {
            DirtyTracking::WriteProtect => "write-protect",
            DirtyTracking::Pml => "pml",
        }
    }
}

/// Which MMU a VM runs on (KVM's `tdp_enabled`, a module parameter there,
/// a per-VM choice here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MmuKind {
    /// Two-dimensional paging: the guest's tables are the processor's
    /// business; the MMU maps guest physical memory (the TDP MMU).
    #[default]
    Tdp,
    /// Shadow paging (`tdp=off`): the MMU walks the guest's page tables and
    /// builds tables from guest virtual to host physical addresses
    /// (`shadow/`). Guest paging instructions and faults exit to it.
    Shadow,
}

impl MmuKind {
    /// Short name (`tdp`, `shadow`).
    pub const fn name(self) -> &'static str {
        match self {
            MmuKind::Tdp => "tdp",
            MmuKind::Shadow => "shadow",
        }
    }
}

/// How a VM's MMU is configured. `Default` is what KVM does on a modern Intel host.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The VM type: whether it has private memory, and where a fault's private
    /// bit comes from.
    pub vm_type: VmType,
    /// TDP or shadow paging. Shadow paging needs the default VM type (KVM's
    /// private-memory types need TDP) and write-protection dirty logging (PML
    /// logs guest physical addresses of a second stage there is none of).
    pub mmu: MmuKind,
    /// Root level: 4 (48-bit guest physical space) or 5 (57-bit).
    pub root_level: Level,
    /// Guest physical address width in bits; gfns at or above `1 << (bits-12)` are
    /// refused by memslots and always emulated by faults.
    pub maxphyaddr: u32,
    /// EPT hardware Accessed/Dirty bits. Without them entries are aged by access
    /// tracking (permissions stripped, restored by the fast page-fault path).
    pub ad_enabled: bool,
    /// Largest leaf the MMU maps.
    pub max_level: Level,
    /// The unlocked invalidation checks of KVM ≥ 6.9: before asking the host for
    /// the frame (the pre-check) and again after it (the post-check), retry
    /// without taking `mmu_lock` if an in-progress invalidation covers the gfn.
    /// Off reproduces earlier kernels, where every fault took `mmu_lock` and only
    /// the locked check retried it; used to measure what the checks buy.
    pub precheck: bool,
    /// Cache "no memslot here" as MMIO entries (KVM's `enable_mmio_caching`).
    pub mmio_caching: bool,
    /// Address spaces (2 with SMM).
    pub address_spaces: u16,
    /// Refuse to map executable huge pages (the iTLB-multihit workaround).
    pub nx_huge_pages: bool,
    /// Split huge mappings of a slot down to 4 KiB when its dirty logging is
    /// turned on (or, with `INITIALLY_SET`, at the first clear of a range),
    /// instead of letting each first write fault split them (KVM's
    /// `eager_page_split` module parameter, on by default).
    pub eager_page_split: bool,
    /// How dirty logging catches writes (KVM's `enable_pml`).
    pub dirty_tracking: DirtyTracking,
    /// Age entries (the mmu_notifier's young callbacks) under RCU without
    /// `mmu_lock`, as KVM does since 6.15; off, each callback takes
    /// `mmu_lock` for write as before, to measure the difference.
    pub lockless_aging: bool,
    /// Shadow paging, before KVM 5.18/5.19's "free only obsolete roots": a
    /// zapped root makes every vCPU drop every root it holds (current and
    /// cached) instead of only the slots naming zapped roots. For measuring
    /// what the fix buys.
    pub legacy_root_reload: bool,
    /// Shadow paging: let a shadowed 4 KiB guest table go *unsync* at the
    /// guest's first store to it (its shadow page is resynced when the guest
    /// flushes its TLB) instead of emulating every store. KVM always does;
    /// off, every shadowed table stays write-tracked, to measure what unsync
    /// buys.
    pub shadow_unsync: bool,
    /// NX recovery takes `mmu_lock` for write, as KVM did before 6.18
    /// (off: the read lock, as since), to measure what faults gain.
    pub nx_recovery_write_lock: bool,
    /// Test-only switches that remove a guarding step, so tests can show their
    /// checkers catch the resulting bug. Never set outside tests.
    #[doc(hidden)]
    pub knobs: GuardKnobs,
    /// Test-only callbacks at points of multi-step operations, so a test can act
    /// inside a window that is otherwise too short to hit. Never set outside
    /// tests; only off the hot paths.
    #[doc(hidden)]
    pub hooks: TestHooks,
}

/// Where a [`TestHooks`] callback runs.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookPoint {
    /// A memslot update made its new set visible, still marked as an update
    /// in progress (its final generation is stored later).
    MemslotSetSwapped {
        /// The address space.
        as_id: u16,
        /// The generation of the set now visible (with the in-progress bit).
        generation: u64,
    },
    /// A memory-attribute change zapped its range and flushed, and is about
    /// to store the new attributes (its invalidation is still in progress;
    /// `slots_lock` is held, `mmu_lock` is not).
    AttributesZapped {
        /// First gfn of the change.
        start: Gfn,
        /// One past its last gfn.
        end: Gfn,
    },
    /// A memslot update stored the final generation of `as_id`'s new set.
    MemslotGenerationPublished {
        /// The address space.
        as_id: u16,
        /// The generation now visible.
        generation: u64,
    },
}

/// Test-only callbacks (see [`VmConfig::hooks`]).
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct TestHooks {
    /// Called at every [`HookPoint`] with no VM lock held beyond the ones the
    /// point names.
    pub on: Option<std::sync::Arc<dyn Fn(HookPoint) + Send + Sync>>,
}

impl TestHooks {
    pub(crate) fn run(&self, point: HookPoint) {
        if let Some(f) = &self.on {
            f(point);
        }
    }
}

impl std::fmt::Debug for TestHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.on.is_some() {
            "TestHooks(set)"
        } else {
            "TestHooks"
        })
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vm_type: VmType::Default,
            mmu: MmuKind::Tdp,
            root_level: Level::L4,
            maxphyaddr: 46,
            ad_enabled: true,
            max_level: Level::G1,
            precheck: true,
            mmio_caching: true,
            address_spaces: 2,
            nx_huge_pages: false,
            eager_page_split: true,
            dirty_tracking: DirtyTracking::WriteProtect,
            lockless_aging: true,
            legacy_root_reload: false,
            shadow_unsync: true,
            nx_recovery_write_lock: false,
            knobs: GuardKnobs::default(),
            hooks: TestHooks::default(),
        }
    }
}

/// Guarding steps a test can remove to prove that a checker notices.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardKnobs {
    /// Skip the locked `mmu_seq` / range retry check in the fault path.
    pub skip_locked_retry: bool,
    /// Skip the remote TLB flush after zapping leaves for an invalidation.
    pub skip_flush_after_zap: bool,
    /// Replace entries with plain stores instead of atomic exchanges under the
    /// write lock, even when other agents may change them concurrently.
    pub nonatomic_zap: bool,
    /// Publish memslots without waiting for in-flight invalidations.
    pub skip_install_wait: bool,
    /// Walk roots in notifier zaps without holding a reference, so a root can be
    /// freed while a walk that yielded `mmu_lock` is still on it.
    pub roots_without_refs: bool,
    /// Fast page fault writes with a plain store instead of compare-and-exchange.
    pub fast_path_plain_store: bool,
    /// Publish a new memslot generation before zapping for an MMIO-generation
    /// wrap (the order before the fix), instead of after.
    pub zap_after_publish: bool,
    /// A leaf zap that yields `mmu_lock` without first flushing what it zapped.
    pub skip_flush_before_yield: bool,
    /// Requests with "wait" semantics return without waiting for kicked vCPUs
    /// to leave guest mode.
    pub skip_request_wait: bool,
    /// Guest entry does not look at pending requests after announcing guest
    /// mode (breaking the Dekker pair with requesters).
    pub enter_without_request_check: bool,
    /// Keep one RCU read-side section across every `mmu_lock` yield of a long
    /// zap (the behaviour before the fix), holding back deferred table frees.
    pub rcu_pinned_across_yields: bool,
    /// A fault uses the last-level table its vCPU cached without checking that
    /// no table was removed since, so it can write into a table that was
    /// unlinked (and freed and reused) after it was cached.
    pub walk_cache_unchecked: bool,
    /// Long walks yield `mmu_lock` after every step that made progress, as if
    /// someone always waited: makes yield-dependent behaviour deterministic in
    /// tests. Not a guard.
    pub yield_every_step: bool,
    /// Take the invalidation sequence snapshot a second time after the private
    /// check (the order before the fix), so a conversion that completes between
    /// the attribute read and the snapshot goes unnoticed.
    pub second_seq_snapshot: bool,
    /// Bump the invalidation sequence with a Relaxed store instead of Release.
    pub relaxed_seq_bump: bool,
    /// A memory-attribute change leaves the range's mappings in place (it
    /// still begins and ends its invalidation).
    pub skip_conversion_zap: bool,
    /// A memory-attribute change leaves the huge chunks at its head and tail
    /// out of its invalidation (vmmu before it followed KVM there): a fault
    /// on an unchanged gfn of such a chunk may then map it huge over the
    /// changed gfns before their mixed flags are recomputed.
    pub skip_hugepage_range_add: bool,
    /// A guest_memfd invalidation (punch-hole, release, memory failure) leaves
    /// the mappings of the pages it frees in place.
    pub skip_gmem_zap: bool,
    /// A punch-hole frees its pages after its invalidation ended instead of
    /// inside it, so a fault that read a page without the file's lock and
    /// snapshotted after the end maps a freed page.
    pub free_after_gmem_invalidation: bool,
    /// Write-protection gives up on an entry whose compare-and-exchange lost a
    /// race (the processor set D meanwhile) instead of looking at it again, so
    /// the entry stays writable.
    pub write_protect_skips_lost_race: bool,
    /// The fast path records a page dirty before it makes the entry writable,
    /// so a harvest between the two takes the bit and leaves the entry writable
    /// and unlogged.
    pub fast_path_marks_dirty_first: bool,
    /// Syncing unsync shadow pages re-reads their guest tables without first
    /// write-protecting them (and flushing), so a store through a writable
    /// translation still cached goes unseen by the now-synced page.
    pub sync_without_write_protect: bool,
    /// INVLPG leaves the entries of unsync shadow pages as they are.
    pub invlpg_skips_sync: bool,
    /// A CR3 load that flushes the PCID skips the resync of the current root.
    pub cr3_flush_skips_sync: bool,
    /// A fault that links a page found in the hash with unsync pages below
    /// it does not ask for the root to be synced before the next entry.
    pub reuse_skips_sync: bool,
    /// The shadow MMU's fast path also runs on indirect entries (guest paging
    /// on), whose gfn comes from a guest walk the entry may no longer match
    /// (locking.rst's ABA), instead of direct ones only.
    pub shadow_fast_path_indirect: bool,
    /// A zapped or synced shadow page stops counting as unsync before its
    /// entries are dropped or brought up to date, so a guest flush on
    /// another vCPU that finds nothing unsync skips the lock and uses the
    /// stale entry the zap or sync is about to fix.
    pub unsync_cleared_early: bool,
    /// A walk yields `mmu_lock` even when it has not moved since it last
    /// (re)started, so two walkers can hand the lock back and forth at the
    /// same gfn forever (the model gives up after 1,000 such yields).
    pub yield_without_progress: bool,
    /// Huge-page recovery asks for the mapping level of a huge page that
    /// reaches below its memslot's base, i.e. reads the slot's huge-page
    /// information outside the slot.
    pub recover_huge_outside_slot: bool,
    /// "Free obsolete roots" judges each cached previous root by whether
    /// the *current* root is obsolete, not by its own state.
    pub free_obsolete_tests_current_root: bool,
    /// Zapping a whole root tears down each top-level entry in one step
    /// instead of in passes of growing level, so one step can free a huge
    /// subtree without a chance to yield.
    pub zap_root_one_pass: bool,
    /// NX recovery looks up the memslot of a listed page in address space 0
    /// whatever the page's root (so an SMM page's dirty logging is missed).
    pub nx_recovery_slot_as0: bool,
    /// Lockless aging writes the aged entry with a plain store instead of a
    /// compare-and-exchange from the value it read, so a zap (or any other
    /// change) in between is undone.
    pub aging_plain_store: bool,
    /// A fault that lists a possible NX huge page does not check, under the
    /// list's lock, that the table it linked is still linked, so a table
    /// torn down in between stays on the list.
    pub nx_track_without_recheck: bool,
    /// A fault that would map huge replaces a table the NX mitigation made
    /// (no `disallowed_hugepage_adjust`): every data access undoes the split
    /// and the next fetch splits again.
    pub nx_replace_disallowed_table: bool,
    /// NX recovery zaps pages in slots that log dirty pages too (they come
    /// back as 4 KiB pages, split by logging anyway).
    pub nx_recovery_ignores_dirty_log: bool,
    /// Store only this many memslot-generation bits in MMIO entries (0: all 19),
    /// so a test reaches a generation wrap within a few updates. Not a guard.
    pub mmio_gen_bits: u32,
}

impl GuardKnobs {
    /// Whether any guard is removed (anything but the default).
    pub fn removes_a_guard(&self) -> bool {
        *self != GuardKnobs::default()
    }
}

impl VmConfig {
    /// One past the largest gfn the guest can address.
    /// As KVM's `kvm_mmu_max_gfn`: with a second stage the host's physical
    /// width bounds guest physical addresses; shadow paging (no EPT/NPT) allows
    /// the architectural 52 bits.
    pub fn gfn_limit(&self) -> u64 {
        let bits = if self.mmu == MmuKind::Shadow {
            52
        } else {
            self.maxphyaddr.min(52)
        };
        1u64 << bits.saturating_sub(12)
    }

    /// Whether dirty logging uses PML (Dirty bits) rather than write protection.
    pub fn pml(&self) -> bool {
        self.dirty_tracking == DirtyTracking::Pml
    }

    /// The memslot-generation bits that MMIO entries store.
    pub(crate) fn mmio_gen_mask(&self) -> u64 {
        match self.knobs.mmio_gen_bits {
            0 => crate::spte::MMIO_GEN_MASK,
            b => ((1u64 << b.min(crate::spte::MMIO_GEN_BITS)) - 1).max(1),
        }
    }
}
