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
//! (f) Private memory: an access reaches a private (guest_memfd) frame only
//!     for a gfn whose attributes say private, and a shared frame only for a
//!     shared one — so no private byte is read through the shared path or the
//!     reverse, and no access uses a translation made before a conversion that
//!     completed. A private frame must be the page the slot's guest_memfd holds
//!     for the gfn now (not one a punch-hole or a release freed).
//! (g) Guest paging: every linear access reaches the guest physical address
//!     (or takes the page fault, with its error code) that a reference walk of
//!     the guest's tables gives now, unless the guest changed its tables since
//!     this vCPU last flushed that translation (then the old one may still be
//!     cached, as on a processor). See [`crate::guest_oracle`].

use std::sync::Arc;

use parking_lot::Mutex;
use vmmu::{Gpa, MemslotSet, Vm};

use crate::cpu::{peek_leaf, Mmu};
use crate::host_memory::{HostMemory, PageState};
use crate::primary_mmu::HostMmu;
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
    /// A private frame reached for a shared gfn, or a shared frame for a
    /// private one.
    WrongSide,
    /// A private frame that is not the guest_memfd's page for the gfn now.
    StalePrivate,
    /// A linear access the guest's tables do not give, after the guest flushed.
    GuestTranslation,
}

const KINDS: [Violation; 13] = [
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
    Violation::WrongSide,
    Violation::StalePrivate,
    Violation::GuestTranslation,
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
            Violation::WrongSide => "wrong_side",
            Violation::StalePrivate => "stale_private",
            Violation::GuestTranslation => "guest_translation",
        }
    }
}

/// Violation counters and the first few descriptions.
#[derive(Debug)]
pub struct Oracle {
    enabled: bool,
    counts: [AtomicU64; 13],
    checks: AtomicU64,
    log: Mutex<Vec<String>>,
    /// Guest page-table writes so far (a clock for (g)).
    pte_seq: AtomicU64,
    /// Per guest address space (its root table's address): the clock at its
    /// last page-table write.
    pte_changes: Mutex<std::collections::HashMap<u64, u64>>,
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
            pte_seq: AtomicU64::new(0),
            pte_changes: Mutex::new(Default::default()),
        }
    }

    /// A guest is about to write an entry of the tables of address space
    /// `space`: a translation cached before may now differ from its tables.
    pub fn note_pte_write(&self, space: Gpa) {
        let seq = self.pte_seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.pte_changes.lock().insert(space.0, seq);
    }

    /// The page-table write clock now (a flush records it).
    pub fn pte_clock(&self) -> u64 {
        self.pte_seq.load(Ordering::SeqCst)
    }

    /// The clock at the last write to the tables of `space` (0: none).
    pub fn last_pte_write(&self, space: Gpa) -> u64 {
        self.pte_changes.lock().get(&space.0).copied().unwrap_or(0)
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

/// Oracle (a) and (f): the frame an access in guest mode reached, against the
/// host's mapping now and, on a VM with private memory, against the gfn's
/// attributes and its guest_memfd page now.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_access(
    oracle: &Oracle,
    host: &HostMmu,
    mem: &HostMemory,
    vm: &Vm,
    slots: &MemslotSet,
    gpa: Gpa,
    pfn: vmmu::Pfn,
    write: bool,
    private_mem: bool,
) {
    oracle.checked();
    let gfn = gpa.gfn();
    let slot = match slots.lookup(gfn) {
        None => {
            return oracle.report(Violation::NoSlotAccess, || {
                format!("{gpa} reached {pfn:?} with no memslot")
            })
        }
        Some(s) if s.is_invalid() => return,
        Some(s) => s,
    };
    let state = mem.state(pfn);
    let frame_private = state == PageState::Private;
    if !matches!(
        state,
        PageState::Data | PageState::Private | PageState::GmemShared
    ) {
        // A frame nobody owns (freed, never allocated) or a table: a
        // translation outlived what it pointed to.
        let private = private_mem && vm.memory_attributes(gfn) != 0;
        let kind = if private {
            Violation::StalePrivate
        } else {
            Violation::StaleTranslation
        };
        return oracle.report(kind, || {
            format!("{gpa} reached {pfn:?}, a frame in state {state:?}")
        });
    }
    // A gmem-only slot (its file may be mapped by the host) on a VM without
    // private memory: every access is served by the file, whichever kind of
    // page it holds; the translation must reach the page the file holds now.
    if slot.is_gmem_only() && (state == PageState::GmemShared || !private_mem) {
        match slot.peek_private_page(gfn) {
            vmmu::PrivatePage::Page { pfn: p, .. } if p == pfn => {}
            vmmu::PrivatePage::Busy => {}
            other => oracle.report(Violation::StaleTranslation, || {
                format!("{gpa} reached guest_memfd {pfn:?} but the file holds {other:?}")
            }),
        }
        return;
    }
    if private_mem || frame_private {
        // A conversion stores the attributes only after it zapped the range and
        // its flush waited for every vCPU to leave guest mode, so within this
        // guest-mode section the attributes read now are the ones the
        // translation must agree with.
        let attr_private = vm.memory_attributes(gfn) & vmmu::MEMORY_ATTRIBUTE_PRIVATE != 0;
        if frame_private != attr_private {
            let side = |p: bool| if p { "private" } else { "shared" };
            return oracle.report(Violation::WrongSide, || {
                format!(
                    "{gpa} reached a {} frame {pfn:?} but the gfn is {}",
                    side(frame_private),
                    side(attr_private)
                )
            });
        }
        if frame_private {
            // The page the file holds for the gfn now (a punched or released page
            // must not be reachable any more). A busy file is not waited for: the
            // check must never block a vCPU that a punch waits on.
            match slot.peek_private_page(gfn) {
                vmmu::PrivatePage::Page { pfn: p, .. } if p == pfn => {}
                vmmu::PrivatePage::Busy => {}
                other => oracle.report(Violation::StalePrivate, || {
                    format!("{gpa} reached private {pfn:?} but its guest_memfd holds {other:?}")
                }),
            }
            return;
        }
    }
    let hva = slot.gfn_to_hva(gfn);
    match host.translate(hva) {
        None => oracle.report(Violation::StaleTranslation, || {
            format!("{gpa} ({hva}) reached {pfn:?} but the host maps nothing there")
        }),
        Some(m) if m.pfn != pfn => oracle.report(Violation::StaleTranslation, || {
            format!(
                "{gpa} ({hva}) reached {pfn:?} but the host maps {:?}",
                m.pfn
            )
        }),
        Some(m) if write && !m.writable => oracle.report(Violation::WriteToReadOnly, || {
            format!("write to {gpa} ({hva}, {pfn:?}) the host maps read-only")
        }),
        Some(_) => {}
    }
}

/// Oracle (d), the reverse direction: the MMU answered "emulate" for `gpa`.
/// That is wrong if the memslots the vCPU entered with are still the current
/// ones (so the fault saw them too) and hold a valid slot there, unless the
/// access writes a read-only slot.
pub(crate) fn check_emulated(
    oracle: &Oracle,
    vm: &Vm,
    entry_slots: &Arc<MemslotSet>,
    as_id: u16,
    gpa: Gpa,
    write: bool,
) {
    let Some(current) = vm.memslots(as_id) else {
        return;
    };
    if !Arc::ptr_eq(&current, entry_slots) {
        return;
    }
    if let Some(slot) = current.lookup(gpa.gfn()) {
        let legitimate = slot.is_invalid() || (write && slot.is_readonly());
        if !legitimate {
            oracle.report(Violation::EmulatedMemory, || {
                format!(
                    "{} {gpa} completed as MMIO, but slot {:#x} maps it (generation {:#x})",
                    if write { "write to" } else { "read of" },
                    slot.slot_number(),
                    current.generation()
                )
            });
        }
    }
}

/// Oracle (e): a write that walked the tables (A/D on) must leave the leaf it
/// used dirty. Only checked while the leaf still maps the same frame writable
/// (a zap or a remap in between replaced it, and a writable leaf is created
/// dirty) and when `no_harvest` says no Dirty-bit harvest overlapped.
pub(crate) fn check_dirty_after_walk(
    oracle: &Oracle,
    mem: &HostMemory,
    view: &Mmu,
    gpa: Gpa,
    pfn: vmmu::Pfn,
    no_harvest: impl FnOnce() -> bool,
) {
    if let Some((leaf, level)) = peek_leaf(mem, view, gpa) {
        let offset = gpa.gfn().0 & (level.pages() - 1);
        let same = leaf.pfn().0 + offset == pfn.0;
        if same && leaf.is_writable() && !leaf.is_dirty() && no_harvest() {
            oracle.report(Violation::DirtyNotSet, || {
                format!("write to {gpa} ({pfn:?}) walked the tables but its leaf {leaf:?} is clean")
            });
        }
    }
}
