//! The oracle: checks that make a run trustworthy, counted as violations.
//!
//! (a) Every access made in guest mode goes to the frame the host maps at that
//!     address *now*, and writes only where the host allows writes. A host changes
//!     a mapping only after `invalidate_range_start` returned, which kicked every
//!     vCPU out of guest mode (the flush waits for it); the vCPU re-enters only
//!     after flushing its TLB. So within one guest-mode section, a translation that
//!     disagrees with the host can only come from a missed zap, a missed flush or a
//!     fault that installed a stale frame.
//! (b) Memory holds what the guest wrote (reference models in the programs,
//!     counted here).
//! (c) No frame or table page is leaked or freed twice at teardown.
//! (d) Accesses to guest addresses without a memslot (in the set published when
//!     the vCPU entered) never reach memory: after a delete completes, only MMIO.
//!     And the reverse: an access the MMU completes as MMIO while the memslots
//!     published at entry are still current and hold a valid slot for its address
//!     is a violation (a write to a read-only slot excepted), e.g. a cached MMIO
//!     entry that outlived the update that gave its gfn a slot.
//! (e) With EPT A/D bits, a write that walked the tables leaves the leaf it went
//!     through dirty: the processor's D update is what dirty logging and the
//!     host's write-back rely on.

use parking_lot::Mutex;

use crate::sync::{AtomicU64, Ordering};

/// Kinds of violations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// Access through a translation to a frame the host no longer maps there.
    StaleTranslation,
    /// Write through a translation the host does not allow writes to.
    WriteToReadOnly,
    /// Access to memory at a guest address that has no memslot.
    NoSlotAccess,
    /// A read returned something other than what was written.
    DataMismatch,
    /// The page walker reached a frame outside host memory.
    WildWalk,
    /// Frames or table pages left over, or freed twice.
    Leak,
    /// The MMU reported an internal invariant violation.
    MmuInvariant,
    /// A vCPU made no progress on an access for too long.
    Stuck,
    /// An access to a gfn with a valid memslot completed as MMIO.
    EmulatedMemory,
    /// A write walked the tables but left the leaf's Dirty bit clear.
    DirtyNotSet,
}

const KINDS: [Violation; 10] = [
    Violation::StaleTranslation,
    Violation::WriteToReadOnly,
    Violation::NoSlotAccess,
    Violation::DataMismatch,
    Violation::WildWalk,
    Violation::Leak,
    Violation::MmuInvariant,
    Violation::Stuck,
    Violation::EmulatedMemory,
    Violation::DirtyNotSet,
];

impl Violation {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Violation::StaleTranslation => "stale_translation",
            Violation::WriteToReadOnly => "write_to_readonly",
            Violation::NoSlotAccess => "no_slot_access",
            Violation::DataMismatch => "data_mismatch",
            Violation::WildWalk => "wild_walk",
            Violation::Leak => "leak",
            Violation::MmuInvariant => "mmu_invariant",
            Violation::Stuck => "stuck",
            Violation::EmulatedMemory => "emulated_memory",
            Violation::DirtyNotSet => "dirty_not_set",
        }
    }
}

/// Violation counters and the first few descriptions.
#[derive(Debug)]
pub struct Oracle {
    enabled: bool,
    counts: [AtomicU64; 10],
    checks: AtomicU64,
    log: Mutex<Vec<String>>,
}

impl Oracle {
    /// An oracle; when disabled, access checks are skipped (data, leak and
    /// invariant checks still count).
    pub fn new(enabled: bool) -> Oracle {
        Oracle {
            enabled,
            counts: Default::default(),
            checks: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        }
    }

    /// Whether per-access checks run.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Record a violation.
    pub fn report(&self, v: Violation, what: impl FnOnce() -> String) {
        let i = KINDS.iter().position(|k| *k == v).unwrap_or(0);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock();
        if log.len() < 16 {
            log.push(format!("{}: {}", v.name(), what()));
        }
    }

    /// Record `n` violations of one kind at once.
    pub fn report_n(&self, v: Violation, n: u64, what: impl FnOnce() -> String) {
        if n > 0 {
            let i = KINDS.iter().position(|k| *k == v).unwrap_or(0);
            self.counts[i].fetch_add(n - 1, Ordering::Relaxed);
            self.report(v, what);
        }
    }

    /// Count an access check.
    pub fn checked(&self) {
        self.checks.fetch_add(1, Ordering::Relaxed);
    }

    /// Accesses checked.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Violations of one kind.
    pub fn count(&self, v: Violation) -> u64 {
        let i = KINDS.iter().position(|k| *k == v).unwrap_or(0);
        self.counts[i].load(Ordering::Relaxed)
    }

    /// All violations.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Per-kind counts.
    pub fn by_kind(&self) -> Vec<(&'static str, u64)> {
        KINDS.iter().map(|k| (k.name(), self.count(*k))).collect()
    }

    /// The first violations, described.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().clone()
    }
}
