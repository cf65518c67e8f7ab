//! Oracle (g): guest paging.
//!
//! A reference walk of the guest's tables, written from the architecture's
//! rules one by one (not from the permission table the processor model uses),
//! reads the guest's entries through the host's mapping now. Every linear
//! access must agree with it: same guest physical address, or the same page
//! fault with the same error code.
//!
//! A processor may keep using a translation after the guest changed its
//! tables, until the guest flushes it. So a disagreement is allowed only while
//! the guest has written the tables of the current address space since this
//! vCPU's last flush that covered the access (INVLPG or INVPCID of the page,
//! INVPCID or a CR3 load that flushes the PCID, a flush of everything). The
//! clock is the oracle's count of guest page-table writes, which guests
//! announce (`AccessKind::PteWrite`).

use std::collections::HashMap;

use vmmu::{ErrorCode, Gpa, Gva, MemslotSet};

use crate::oracle::{Oracle, Violation};
use crate::paging::{pte, GuestCpu, LinearAccess, PagingMode};
use crate::primary_mmu::HostMmu;

/// Where a linear access went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Reached this guest physical address.
    Reached(Gpa),
    /// Took a page fault with this error code.
    Fault(ErrorCode),
    /// Reached this host frame (shadow paging: the processor never sees the
    /// guest physical address). Agrees with `Reached(gpa)` when the host maps
    /// that gpa to this frame now.
    Frame(vmmu::Pfn),
}

/// The reference walk: `read` gives the guest entry at a guest physical
/// address (`None`: unreadable now, no verdict).
pub fn reference_walk(
    mut read: impl FnMut(Gpa) -> Option<u64>,
    mode: &PagingMode,
    cr3: u64,
    gva: Gva,
    access: &LinearAccess,
) -> Option<Outcome> {
    if !mode.enabled {
        return Some(Outcome::Reached(Gpa(gva.0)));
    }
    // The error code, bit by bit (written apart from the processor model's).
    let fault = |present: bool, rsvd: bool| {
        let bits = [
            (present, ErrorCode::PRESENT),
            (access.is_write(), ErrorCode::WRITE),
            (access.user, ErrorCode::USER),
            (rsvd, ErrorCode::RSVD),
            (
                access.is_fetch() && (mode.nx || mode.smep),
                ErrorCode::FETCH,
            ),
        ];
        let code = bits
            .iter()
            .filter(|(on, _)| *on)
            .fold(ErrorCode::empty(), |e, (_, b)| e | *b);
        Some(Outcome::Fault(code))
    };
    let mut table = cr3 & pte::ADDR;
    let (mut writable, mut user, mut exec) = (true, true, true);
    let mut level = 4u8;
    let (entry, size) = loop {
        let index = (gva.0 >> (12 + 9 * (level as u32 - 1))) & 511;
        let e = read(Gpa(table + index * 8))?;
        if e & pte::P == 0 {
            return fault(false, false);
        }
        // Reserved: address bits 51:46 (MAXPHYADDR 46), NX without EFER.NX,
        // PS in a PML4E, and the low address bits of a huge leaf but PAT.
        let huge = e & pte::PS != 0;
        let reserved = e & 0x000f_c000_0000_0000 != 0
            || (!mode.nx && e & pte::NX != 0)
            || (level == 4 && huge)
            || (level == 3 && huge && e & 0x3fff_e000 != 0)
            || (level == 2 && huge && e & 0x001f_e000 != 0);
        if reserved {
            return fault(true, true);
        }
        writable &= e & pte::W != 0;
        user &= e & pte::U != 0;
        if mode.nx {
            exec &= e & pte::NX == 0;
        }
        let size = 1u64 << (12 + 9 * (level as u32 - 1));
        if level == 1 || (level <= 3 && e & pte::PS != 0) {
            break (e, size);
        }
        table = e & pte::ADDR;
        level -= 1;
    };
    let (write, fetch, cpl3) = (access.is_write(), access.is_fetch(), access.user);
    // The rules, one per line.
    let denied = (cpl3 && !user)
        || (write && !writable && (cpl3 || mode.wp))
        || (fetch && !exec)
        || (fetch && !cpl3 && mode.smep && user)
        || (!fetch && !cpl3 && mode.smap && user && !access.ac);
    if denied {
        return fault(true, false);
    }
    let frame = entry & pte::ADDR & !(size - 1);
    Some(Outcome::Reached(Gpa(frame | (gva.0 & (size - 1)))))
}

/// Read a guest word through the host's mapping now (`None` without a valid
/// memslot or a host page). The read holds the page's lock, so it sees a
/// whole state of the page: a reference walk outside guest mode (judging a
/// fault the MMU gave back to the guest, or a store it emulated) may meet a
/// host event mid-way, and a lock-free read could then see a frame already
/// copied and freed (its poison reads as a reserved-bit entry).
pub(crate) fn host_read(host: &HostMmu, slots: &MemslotSet, gpa: Gpa) -> Option<u64> {
    let slot = slots.lookup(gpa.gfn()).filter(|s| !s.is_invalid())?;
    host.peek_word(slot.gfn_to_hva(gpa.gfn()).add(gpa.0 & 0xff8))
}

/// The host frame behind `gpa` now, if the host maps it.
fn host_frame(host: &HostMmu, slots: &MemslotSet, gpa: Gpa) -> Option<vmmu::Pfn> {
    let slot = slots.lookup(gpa.gfn()).filter(|s| !s.is_invalid())?;
    host.translate(slot.gfn_to_hva(gpa.gfn())).map(|m| m.pfn)
}

/// One vCPU's guest flushes, stamped with the page-table write clock.
#[derive(Debug, Default)]
pub struct FlushLog {
    /// Everything, global translations too.
    all: u64,
    /// Every PCID's non-global translations.
    all_nonglobal: u64,
    /// One PCID's non-global translations.
    pcid: HashMap<u16, u64>,
    /// One linear page of one PCID (non-global).
    page: HashMap<(u16, u64), u64>,
    /// One linear page's global translations (INVLPG).
    page_global: HashMap<u64, u64>,
}

/// Entries kept per map before the log forgets pages (forgetting only makes
/// it more lenient, never reports a false violation).
const PAGE_LOG_MAX: usize = 1 << 16;

impl FlushLog {
    /// Everything was flushed at `clock`.
    pub fn flush_all(&mut self, clock: u64) {
        self.all = clock;
    }
    /// Every PCID's non-global translations.
    pub fn flush_nonglobal(&mut self, clock: u64) {
        self.all_nonglobal = clock;
    }
    /// One PCID's non-global translations.
    pub fn flush_pcid(&mut self, pcid: u16, clock: u64) {
        self.pcid.insert(pcid, clock);
    }
    /// One page: of `pcid`, and its global translation when `global`.
    pub fn flush_page(&mut self, pcid: u16, gva: Gva, global: bool, clock: u64) {
        if self.page.len() >= PAGE_LOG_MAX || self.page_global.len() >= PAGE_LOG_MAX {
            self.page.clear();
            self.page_global.clear();
        }
        let vpn = gva.0 >> 12;
        self.page.insert((pcid, vpn), clock);
        if global {
            self.page_global.insert(vpn, clock);
        }
    }
    /// The clock at the last flush that removed the translation of `gva` in
    /// `pcid` (a global one when `global`).
    pub fn flushed(&self, pcid: u16, gva: Gva, global: bool) -> u64 {
        let vpn = gva.0 >> 12;
        let mut t = self
            .all
            .max(self.page_global.get(&vpn).copied().unwrap_or(0));
        if !global {
            t = t
                .max(self.all_nonglobal)
                .max(self.pcid.get(&pcid).copied().unwrap_or(0))
                .max(self.page.get(&(pcid, vpn)).copied().unwrap_or(0));
        }
        t
    }
}

/// Check one linear access (`actual`) against the reference walk.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_linear(
    oracle: &Oracle,
    host: &HostMmu,
    slots: &MemslotSet,
    cpu: &GuestCpu,
    log: &FlushLog,
    gva: Gva,
    access: &LinearAccess,
    actual: Outcome,
    global: bool,
) {
    if !cpu.mode().enabled {
        return;
    }
    let Some(want) = reference_walk(
        |gpa| host_read(host, slots, gpa),
        cpu.mode(),
        cpu.cr3,
        gva,
        access,
    ) else {
        return;
    };
    oracle.checked();
    let agrees = match (want, actual) {
        (Outcome::Reached(gpa), Outcome::Frame(pfn)) => {
            let Some(frame) = host_frame(host, slots, gpa) else {
                // The host maps nothing there now: no verdict.
                return;
            };
            frame == pfn
        }
        (w, a) => w == a,
    };
    if agrees {
        return;
    }
    let space = cpu.root();
    let flushed = log.flushed(cpu.pcid(), gva, global);
    if oracle.last_pte_write(space) > flushed {
        return;
    }
    oracle.report(Violation::GuestTranslation, || {
        format!(
            "{access:?} at {gva} (cr3 {:#x}) gave {actual:?}; the guest's tables give {want:?} and it flushed after its last change",
            cpu.cr3
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::LinearOp;

    #[test]
    fn test_flush_log_scopes() {
        let mut l = FlushLog::default();
        let g = Gva(0x1234_5000);
        assert_eq!(l.flushed(1, g, false), 0);
        l.flush_page(1, g, false, 5);
        assert_eq!(l.flushed(1, g, false), 5);
        assert_eq!(l.flushed(2, g, false), 0, "another PCID");
        assert_eq!(
            l.flushed(1, g, true),
            0,
            "INVPCID's single address keeps globals"
        );
        l.flush_page(1, g, true, 6);
        assert_eq!(
            l.flushed(3, g, true),
            6,
            "INVLPG drops the global translation"
        );
        l.flush_pcid(2, 7);
        assert_eq!(l.flushed(2, Gva(0), false), 7);
        assert_eq!(l.flushed(2, Gva(0), true), 0, "a PCID flush keeps globals");
        l.flush_nonglobal(8);
        assert_eq!(l.flushed(9, Gva(0), false), 8);
        l.flush_all(9);
        assert_eq!(l.flushed(9, Gva(0), true), 9);
    }

    #[test]
    fn test_reference_walk_huge_page_and_faults() {
        // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000 with a 2 MiB leaf.
        let mem: HashMap<u64, u64> = [
            (0x1000, 0x2000 | pte::P | pte::W | pte::U),
            (0x2000, 0x3000 | pte::P | pte::W | pte::U),
            (0x3000 + 8, 0x40_0000 | pte::P | pte::PS),
        ]
        .into_iter()
        .collect();
        let read = |g: Gpa| Some(mem.get(&g.0).copied().unwrap_or(0));
        let m = PagingMode::long_mode();
        let rd = LinearAccess {
            op: LinearOp::Read,
            user: false,
            ac: false,
        };
        let gva = Gva(0x20_0000 + 0x1_2345);
        assert_eq!(
            reference_walk(read, &m, 0x1000, gva, &rd),
            Some(Outcome::Reached(Gpa(0x40_0000 + 0x1_2345)))
        );
        let user = LinearAccess { user: true, ..rd };
        assert_eq!(
            reference_walk(read, &m, 0x1000, gva, &user),
            Some(Outcome::Fault(ErrorCode::PRESENT | ErrorCode::USER))
        );
        assert_eq!(
            reference_walk(read, &m, 0x1000, Gva(0x40_0000), &rd),
            Some(Outcome::Fault(ErrorCode::empty()))
        );
    }
}
