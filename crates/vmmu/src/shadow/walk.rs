//! The guest page-table walker of the shadow MMU (KVM's `paging_tmpl.h` for
//! 64-bit, 4-level guests).
//!
//! It reads the guest's entries through the host's mapping of guest memory,
//! checks the access against the guest's rights and mode, and sets the
//! guest's Accessed (and, for writes, Dirty) bits by compare-and-exchange on
//! guest memory, restarting if the guest changed an entry meanwhile. What it
//! returns is what the fault path shadows: the table gfns it passed (they
//! will be write-protected), the entries it read (re-read under `mmu_lock`
//! before they are trusted), and the rights on the way down.

use crate::fault::{ErrorCode, FaultError};
use crate::memslot::MemslotSet;
use crate::types::{Gfn, Gpa, Gva, Level};
use crate::vm::VmInner;

/// The guest's paging state the MMU needs (the inputs of KVM's CPU role):
/// CR0.PG and CR0.WP, CR4.SMEP and CR4.SMAP, EFER.NX, and CR3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GuestPaging {
    /// CR0.PG (with long mode: 4-level tables). Off, linear = physical.
    pub paging: bool,
    /// CR0.WP: supervisor writes obey read-only entries.
    pub wp: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// CR4.SMAP.
    pub smap: bool,
    /// EFER.NX: bit 63 of entries forbids fetches (else it is reserved).
    pub nx: bool,
    /// CR4.PCIDE: CR3 bits 11:0 are a PCID.
    pub pcide: bool,
    /// CR3 (the no-flush bit 63 is not part of it).
    pub cr3: u64,
}

impl GuestPaging {
    /// Guest physical frame of the top-level table.
    pub fn root_gfn(&self) -> Gfn {
        Gfn((self.cr3 & ADDR_MASK) >> 12)
    }
}

/// Guest entry bits.
pub(crate) mod gpte {
    pub(crate) const P: u64 = 1 << 0;
    pub(crate) const W: u64 = 1 << 1;
    pub(crate) const U: u64 = 1 << 2;
    pub(crate) const A: u64 = 1 << 5;
    pub(crate) const D: u64 = 1 << 6;
    pub(crate) const PS: u64 = 1 << 7;
    pub(crate) const NX: u64 = 1 << 63;
}

/// Address bits 51:12 of an entry or CR3.
pub(crate) const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Rights (KVM's `ACC_*`).
pub(crate) const ACC_EXEC: u8 = 1;
/// Writes allowed.
pub(crate) const ACC_WRITE: u8 = 2;
/// User-mode accesses allowed.
pub(crate) const ACC_USER: u8 = 4;
/// Everything.
pub(crate) const ACC_ALL: u8 = 7;

/// One access as the walker sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WalkAccess {
    pub(crate) write: bool,
    pub(crate) user: bool,
    pub(crate) fetch: bool,
    /// EFLAGS.AC (SMAP lets supervisor code reach user pages with it set).
    pub(crate) ac: bool,
}

impl WalkAccess {
    pub(crate) fn from_error_code(ec: ErrorCode, ac: bool) -> Self {
        WalkAccess {
            write: ec.contains(ErrorCode::WRITE),
            user: ec.contains(ErrorCode::USER),
            fetch: ec.contains(ErrorCode::FETCH),
            ac,
        }
    }
}

/// A successful walk. Arrays are indexed by level (1..=4).
#[derive(Clone, Debug)]
pub(crate) struct Walk {
    /// Level of the guest's leaf (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
    pub(crate) level: Level,
    /// The 4 KiB gfn accessed.
    pub(crate) gfn: Gfn,
    /// The table read at each level.
    pub(crate) table_gfn: [Gfn; 5],
    /// Where each entry was read.
    pub(crate) pte_gpa: [Gpa; 5],
    /// The entries as read (after the walker's own A/D updates).
    pub(crate) ptes: [u64; 5],
    /// Rights of the entries from the top down to and including each level
    /// (a child shadow page of the entry at level L gets `acc_through[L]`).
    pub(crate) acc_through: [u8; 5],
    /// Rights the leaf SPTE gets: W only with a dirty guest leaf (so the
    /// first write faults and sets D).
    pub(crate) pte_access: u8,
}

/// What the walker may fail with.
pub(crate) enum WalkError {
    /// A page fault for the guest, with its error code.
    Guest(ErrorCode),
    /// The host could not provide a table page.
    Host(FaultError),
}

fn index(gva: Gva, level: u8) -> u64 {
    (gva.0 >> (12 + 9 * (level as u32 - 1))) & 511
}

/// Walk the guest's tables for `gva`.
pub(crate) fn walk(
    vm: &VmInner,
    slots: &MemslotSet,
    ring: Option<&crate::dirty_ring::DirtyRing>,
    paging: &GuestPaging,
    gva: Gva,
    acc: WalkAccess,
) -> Result<Walk, WalkError> {
    let reserved_addr = ADDR_MASK & !((1u64 << vm.config.maxphyaddr) - 1);
    let fault = |present: bool, rsvd: bool| {
        let mut e = ErrorCode::empty();
        if present {
            e |= ErrorCode::PRESENT;
        }
        if acc.write {
            e |= ErrorCode::WRITE;
        }
        if acc.user {
            e |= ErrorCode::USER;
        }
        if rsvd {
            e |= ErrorCode::RSVD;
        }
        // The I/D bit exists only where fetches can fault.
        if acc.fetch && (paging.nx || paging.smep) {
            e |= ErrorCode::FETCH;
        }
        WalkError::Guest(e)
    };
    'restart: loop {
        let mut w = Walk {
            level: Level::K4,
            gfn: Gfn(0),
            table_gfn: [Gfn(0); 5],
            pte_gpa: [Gpa(0); 5],
            ptes: [0; 5],
            acc_through: [0; 5],
            pte_access: 0,
        };
        let mut table = paging.root_gfn();
        let mut access = ACC_ALL;
        let mut level = 4u8;
        loop {
            let gpa = Gpa(table.gpa().0 + index(gva, level) * 8);
            let e = match read_gpte(vm, slots, gpa)? {
                Some(e) => e,
                // A table outside guest memory: nothing to read, as if not present.
                None => return Err(fault(false, false)),
            };
            let l = level as usize;
            w.table_gfn[l] = table;
            w.pte_gpa[l] = gpa;
            w.ptes[l] = e;
            if e & gpte::P == 0 {
                return Err(fault(false, false));
            }
            let huge = e & gpte::PS != 0 && level > 1;
            let rsvd = e & reserved_addr != 0
                || (!paging.nx && e & gpte::NX != 0)
                || (level == 4 && e & gpte::PS != 0)
                || (huge && level == 2 && e & 0x1f_e000 != 0)
                || (huge && level == 3 && e & 0x3fff_e000 != 0);
            if rsvd {
                return Err(fault(true, true));
            }
            access &= gpte_rights(paging, e);
            w.acc_through[l] = access;
            if level == 1 || huge {
                let lv = Level::new(level).unwrap_or(Level::K4);
                let frame = (e & ADDR_MASK & !(lv.bytes() - 1)) >> 12;
                w.level = lv;
                w.gfn = Gfn(frame + ((gva.0 >> 12) & (lv.pages() - 1)));
                break;
            }
            table = Gfn((e & ADDR_MASK) >> 12);
            level -= 1;
        }
        if permission_fault(paging, access, acc) {
            return Err(fault(true, false));
        }
        // Accessed on every entry, Dirty on the leaf of a write, top down.
        let leaf = w.level.get() as usize;
        for l in (leaf..=4).rev() {
            let mut want = w.ptes[l] | gpte::A;
            if l == leaf && acc.write {
                want |= gpte::D;
            }
            if want == w.ptes[l] {
                continue;
            }
            match cmpxchg_gpte(vm, slots, ring, w.pte_gpa[l], w.ptes[l], want)? {
                Some(true) => w.ptes[l] = want,
                // A table in read-only memory keeps its bits (the entry
                // stays as read, which the fault re-reads under the lock).
                None => {}
                Some(false) => continue 'restart,
            }
        }
        // A clean leaf maps read-only, so the first write faults and sets D.
        w.pte_access = access;
        if !acc.write && w.ptes[leaf] & gpte::D == 0 {
            w.pte_access &= !ACC_WRITE;
        }
        return Ok(w);
    }
}

/// The rights one guest entry grants (`ACC_*`).
pub(crate) fn gpte_rights(paging: &GuestPaging, e: u64) -> u8 {
    let mut a = 0;
    if e & gpte::W != 0 {
        a |= ACC_WRITE;
    }
    if e & gpte::U != 0 {
        a |= ACC_USER;
    }
    if !(paging.nx && e & gpte::NX != 0) {
        a |= ACC_EXEC;
    }
    a
}

/// A guest 4 KiB leaf entry as a sync sees it (KVM's `FNAME(sync_spte)`
/// with `prefetch_invalid_gpte`): the gfn it maps and the rights a shadow
/// leaf may have (`parent`'s, W only once the guest entry is dirty), or
/// `None` if no shadow leaf may stay for it (not present, reserved bits set,
/// never accessed).
pub(crate) fn sync_gpte(
    maxphyaddr: u32,
    paging: &GuestPaging,
    e: u64,
    parent: u8,
) -> Option<(Gfn, u8)> {
    let reserved_addr = ADDR_MASK & !((1u64 << maxphyaddr) - 1);
    if e & gpte::P == 0
        || e & gpte::A == 0
        || e & reserved_addr != 0
        || (!paging.nx && e & gpte::NX != 0)
    {
        return None;
    }
    let mut access = parent & gpte_rights(paging, e);
    if e & gpte::D == 0 {
        access &= !ACC_WRITE;
    }
    Some((Gfn((e & ADDR_MASK) >> 12), access))
}

/// Whether `access` rights (the AND of the walk) forbid the access in this
/// mode (KVM's `permission_fault`).
pub(crate) fn permission_fault(p: &GuestPaging, access: u8, acc: WalkAccess) -> bool {
    let user_page = access & ACC_USER != 0;
    if acc.user && !user_page {
        return true;
    }
    if acc.write && access & ACC_WRITE == 0 && (acc.user || p.wp) {
        return true;
    }
    if acc.fetch && access & ACC_EXEC == 0 {
        return true;
    }
    if !acc.user && user_page {
        if acc.fetch && p.smep {
            return true;
        }
        if !acc.fetch && p.smap && !acc.ac {
            return true;
        }
    }
    false
}

/// Read a guest entry (faulting the page in). `None`: no memslot there.
fn read_gpte(vm: &VmInner, slots: &MemslotSet, gpa: Gpa) -> Result<Option<u64>, WalkError> {
    let Some(slot) = slots.lookup(gpa.gfn()).filter(|s| !s.is_invalid()) else {
        return Ok(None);
    };
    let hva = slot.gfn_to_hva(gpa.gfn()).add(gpa.0 & 0xff8);
    vm.host
        .primary
        .read_u64(hva)
        .map(Some)
        .map_err(|cause| WalkError::Host(FaultError::Host { gpa, hva, cause }))
}

/// Set bits in a guest entry: `Some(false)` if it no longer held `old`,
/// `None` if its page is read-only to the guest (KVM skips A/D updates on
/// read-only table pages).
fn cmpxchg_gpte(
    vm: &VmInner,
    slots: &MemslotSet,
    ring: Option<&crate::dirty_ring::DirtyRing>,
    gpa: Gpa,
    old: u64,
    new: u64,
) -> Result<Option<bool>, WalkError> {
    let Some(slot) = slots.lookup(gpa.gfn()).filter(|s| !s.is_invalid()) else {
        return Ok(Some(false));
    };
    if slot.is_readonly() {
        return Ok(None);
    }
    let hva = slot.gfn_to_hva(gpa.gfn()).add(gpa.0 & 0xff8);
    let r = vm
        .host
        .primary
        .cmpxchg_u64(hva, old, new)
        .map_err(|cause| WalkError::Host(FaultError::Host { gpa, hva, cause }))?;
    if r.is_ok() {
        crate::dirty_log::mark_page_dirty(slot, gpa.gfn(), ring);
    }
    Ok(Some(r.is_ok()))
}

/// Re-read a guest entry under `mmu_lock`, without faulting (`None` if the
/// page is not mapped now: the caller retries).
pub(crate) fn peek_gpte(vm: &VmInner, slots: &MemslotSet, gpa: Gpa) -> Option<u64> {
    let slot = slots.lookup(gpa.gfn()).filter(|s| !s.is_invalid())?;
    vm.host
        .primary
        .peek_u64(slot.gfn_to_hva(gpa.gfn()).add(gpa.0 & 0xff8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(write: bool, user: bool, fetch: bool, ac: bool) -> WalkAccess {
        WalkAccess {
            write,
            user,
            fetch,
            ac,
        }
    }

    #[test]
    fn test_permission_fault_rules() {
        let mut p = GuestPaging {
            paging: true,
            wp: true,
            nx: true,
            ..Default::default()
        };
        let ro_user = ACC_USER | ACC_EXEC;
        assert!(permission_fault(&p, ro_user, acc(true, true, false, false)));
        assert!(permission_fault(
            &p,
            ro_user,
            acc(true, false, false, false)
        ));
        p.wp = false;
        assert!(!permission_fault(
            &p,
            ro_user,
            acc(true, false, false, false)
        ));
        assert!(permission_fault(
            &p,
            ACC_WRITE,
            acc(false, true, false, false)
        ));
        assert!(permission_fault(
            &p,
            ACC_WRITE,
            acc(false, false, true, false)
        ));
        p.smep = true;
        assert!(permission_fault(
            &p,
            ACC_ALL,
            acc(false, false, true, false)
        ));
        assert!(!permission_fault(
            &p,
            ACC_ALL,
            acc(false, true, true, false)
        ));
        p.smap = true;
        assert!(permission_fault(
            &p,
            ACC_ALL,
            acc(false, false, false, false)
        ));
        assert!(!permission_fault(
            &p,
            ACC_ALL,
            acc(false, false, false, true)
        ));
        assert!(!permission_fault(
            &p,
            ACC_WRITE | ACC_EXEC,
            acc(true, false, false, false)
        ));
    }
}
