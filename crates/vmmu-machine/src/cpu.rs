//! A vCPU's hardware: the EPT page walker and the TLB.
//!
//! The walker reads each entry with an acquire load (entries are published with
//! release stores or compare-and-exchange by the MMU) and, when EPT A/D bits are
//! on, sets Accessed (and Dirty for writes) with a locked update of the entry it
//! read, as the processor does; if the entry changed meanwhile the walk starts
//! over, so a bit is never set on an entry that was zapped or frozen.

use vmmu::spte::ept;
use vmmu::{Access, ErrorCode, Gfn, Gpa, Level, Pfn, Spte};

use crate::host_memory::HostMemory;
use crate::sync::Ordering;
use crate::tlb::{Tlb, Translation};

/// Why an access exited to the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// EPT violation: the translation is missing or forbids the access.
    Violation {
        /// Faulting address.
        gpa: Gpa,
        /// Error code handed to the MMU.
        error: ErrorCode,
    },
    /// EPT misconfiguration: an MMIO entry.
    Misconfig {
        /// Faulting address.
        gpa: Gpa,
    },
    /// The walk followed a frame outside host memory: a corrupted or freed table.
    Wild {
        /// Faulting address.
        gpa: Gpa,
    },
}

/// The walker's view of the loaded root.
#[derive(Clone, Copy, Debug)]
pub struct Mmu {
    /// Root table frame.
    pub root: Pfn,
    /// Root id (TLB tag).
    pub root_id: u64,
    /// Levels.
    pub root_level: Level,
    /// EPT A/D bits enabled.
    pub ad: bool,
}

fn error_code(access: Access, present: bool) -> ErrorCode {
    let mut e = ErrorCode::empty();
    if present {
        e |= ErrorCode::PRESENT;
    }
    if access.contains(Access::WRITE) {
        e |= ErrorCode::WRITE;
    }
    if access.contains(Access::EXEC) {
        e |= ErrorCode::FETCH;
    }
    e
}

/// Walk the tables for `gpa`.
pub fn walk(mem: &HostMemory, mmu: &Mmu, gpa: Gpa, access: Access) -> Result<Translation, Exit> {
    let gfn = gpa.gfn();
    'restart: loop {
        let mut table = mmu.root;
        let mut level = mmu.root_level;
        loop {
            if !mem.contains(table) {
                return Err(Exit::Wild { gpa });
            }
            let sptep = &mem.page(table)[level.index(gfn)];
            let raw = sptep.load(Ordering::Acquire);
            let spte = Spte(raw);
            let rwx = raw & ept::RWX;
            if rwx == 0 {
                return Err(Exit::Violation {
                    gpa,
                    error: error_code(access, false),
                });
            }
            if raw & ept::R == 0 && raw & ept::W != 0 {
                return Err(Exit::Misconfig { gpa });
            }
            let leaf = level == Level::K4 || raw & ept::LARGE != 0;
            if !leaf {
                let Some(lower) = level.lower() else {
                    return Err(Exit::Wild { gpa });
                };
                table = spte.pfn();
                level = lower;
                continue;
            }
            if !spte.allows(access) {
                return Err(Exit::Violation {
                    gpa,
                    error: error_code(access, true),
                });
            }
            let mut dirty = raw & ept::D != 0;
            let mut set_dirty = false;
            if mmu.ad {
                let mut want = ept::A;
                if access.contains(Access::WRITE) {
                    want |= ept::D;
                }
                if raw & want != want {
                    // The processor's locked update of the entry it walked.
                    if sptep
                        .compare_exchange(raw, raw | want, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue 'restart;
                    }
                    set_dirty = !dirty && access.contains(Access::WRITE);
                    dirty |= access.contains(Access::WRITE);
                }
            }
            let offset = gfn.0 & (level.pages() - 1);
            return Ok(Translation {
                pfn: Pfn(spte.pfn().0 + offset),
                perm: spte.permits(),
                dirty,
                level,
                set_dirty,
            });
        }
    }
}

/// How an access was translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// From the TLB.
    Tlb,
    /// By walking the tables (and setting A/D as the access needed).
    Walk,
}

/// Translate through the TLB, walking on a miss (or on a write through a
/// translation cached clean) and caching the result.
pub fn translate(
    mem: &HostMemory,
    tlb: &mut Tlb,
    mmu: &Mmu,
    gpa: Gpa,
    access: Access,
) -> Result<(Translation, Source), Exit> {
    let gfn: Gfn = gpa.gfn();
    if let Some(t) = tlb.lookup(mmu.root_id, gfn) {
        if t.perm.contains(access) && (!access.contains(Access::WRITE) || t.dirty || !mmu.ad) {
            return Ok((t, Source::Tlb));
        }
    }
    let t = walk(mem, mmu, gpa, access)?;
    tlb.insert(mmu.root_id, gfn, t.pfn, t.level, t.perm, t.dirty);
    Ok((t, Source::Walk))
}

/// The leaf entry that maps `gpa` now, read without changing anything (the
/// oracle's view of the tables, not a processor's): `None` if the walk does not
/// reach a present leaf.
pub fn peek_leaf(mem: &HostMemory, mmu: &Mmu, gpa: Gpa) -> Option<(Spte, Level)> {
    let gfn = gpa.gfn();
    let mut table = mmu.root;
    let mut level = mmu.root_level;
    loop {
        if !mem.contains(table) {
            return None;
        }
        let spte = Spte(mem.page(table)[level.index(gfn)].load(Ordering::Acquire));
        if spte.0 & ept::RWX == 0 || !spte.is_shadow_present() {
            return None;
        }
        if level == Level::K4 || spte.0 & ept::LARGE != 0 {
            return Some((spte, level));
        }
        table = spte.pfn();
        level = level.lower()?;
    }
}
