//! VM configuration.

use crate::types::Level;

/// How a VM's MMU is configured. `Default` is what KVM does on a modern Intel host.
#[derive(Debug, Clone)]
pub struct VmConfig {
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
    /// Test-only switches that remove a guarding step, so tests can show their
    /// checkers catch the resulting bug. Never set outside tests.
    #[doc(hidden)]
    pub knobs: GuardKnobs,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            root_level: Level::L4,
            maxphyaddr: 46,
            ad_enabled: true,
            max_level: Level::G1,
            precheck: true,
            mmio_caching: true,
            address_spaces: 2,
            nx_huge_pages: false,
            knobs: GuardKnobs::default(),
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
}

impl VmConfig {
    /// One past the largest gfn the guest can address.
    pub fn gfn_limit(&self) -> u64 {
        1u64 << (self.maxphyaddr.saturating_sub(12)).min(52)
    }
}
