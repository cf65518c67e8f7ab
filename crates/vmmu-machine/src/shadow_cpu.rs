//! The processor under shadow paging: one walk, of the MMU's shadow tables,
//! from the linear address straight to the host frame.
//!
//! The shadow tables keep the MMU's one entry layout; read as x86 entries: R
//! is present, W writable, X (NX clear) executable, bit 10 user. The
//! permission checks are the architecture's with the mode the hypervisor
//! runs the guest in: the guest's SMEP and SMAP, but CR0.WP and EFER.NX
//! forced on (the MMU emulates a guest's WP=0 in the entries it builds). A
//! fault is a #PF that exits to the MMU, which walks the guest's own tables
//! and either fixes the shadow entry or hands the #PF to the guest. Accessed
//! and Dirty are set on the shadow leaf by compare-and-exchange, restarting
//! if the entry changed. Translations are cached in the architectural TLB by
//! PCID as with a second stage.

use vmmu::spte::ept;
use vmmu::{Access, ErrorCode, Gva, Level, Pfn, Spte};

use crate::cpu::{Mmu, Source};
use crate::host_memory::HostMemory;
use crate::paging::{acc, GuestCpu, LinearAccess, PagingMode, Permissions};
use crate::sync::Ordering;
use crate::tlb::{LinearEntry, Tlb, Translation};

/// Why a shadow-mode access did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowExit {
    /// A #PF for the MMU, with the processor's error code.
    PageFault(ErrorCode),
    /// The walk left host memory: a corrupted or freed table.
    Wild,
}

/// The permission table the processor applies under shadow paging.
pub fn hardware_permissions(mode: &PagingMode) -> Permissions {
    Permissions::new(&PagingMode {
        wp: true,
        nx: true,
        ..*mode
    })
}

fn rights(raw: u64) -> u8 {
    let mut r = 0;
    if raw & ept::W != 0 {
        r |= acc::WRITE;
    }
    if raw & ept::USER != 0 {
        r |= acc::USER;
    }
    if raw & ept::X != 0 {
        r |= acc::EXEC;
    }
    r
}

/// Translate `gva` for `access` through the TLB and the shadow tables
/// rooted at `mmu.root`.
pub fn translate_shadow(
    mem: &HostMemory,
    tlb: &mut Tlb,
    mmu: &Mmu,
    cpu: &GuestCpu,
    perms: &Permissions,
    gva: Gva,
    access: &LinearAccess,
) -> Result<(Translation, Source), ShadowExit> {
    let pcid = cpu.pcid();
    // The shadow entries' rights hold with guest paging off too: the
    // processor runs the guest on the MMU's tables either way.
    let allowed = |r: u8| !perms.faults(r, access);
    if let Some((e, t, _)) = tlb.lookup_linear(mmu.root_id, pcid, gva) {
        if allowed(e.rights) && (!access.is_write() || t.dirty || !mmu.ad) {
            return Ok((t, Source::Tlb));
        }
    }
    let error = |present: bool| {
        let mut e = ErrorCode::empty();
        if present {
            e |= ErrorCode::PRESENT;
        }
        if access.is_write() {
            e |= ErrorCode::WRITE;
        }
        if access.user {
            e |= ErrorCode::USER;
        }
        if access.is_fetch() {
            e |= ErrorCode::FETCH;
        }
        ShadowExit::PageFault(e)
    };
    let page = gva.0 >> 12;
    'restart: loop {
        let mut table = mmu.root;
        let mut level = Level::L4;
        let mut r = acc::ALL;
        loop {
            if !mem.contains(table) {
                return Err(ShadowExit::Wild);
            }
            let idx = ((page >> level.gfn_shift()) & 511) as usize;
            let sptep = &mem.page(table)[idx];
            let raw = sptep.load(Ordering::Acquire);
            if raw & ept::R == 0 {
                return Err(error(false));
            }
            r &= rights(raw);
            let leaf = level == Level::K4 || raw & ept::LARGE != 0;
            if !leaf {
                let Some(lower) = level.lower() else {
                    return Err(ShadowExit::Wild);
                };
                table = Spte(raw).pfn();
                level = lower;
                continue;
            }
            if !allowed(r) {
                return Err(error(true));
            }
            let write = access.is_write();
            let mut dirty = raw & ept::D != 0;
            let mut set_dirty = false;
            if mmu.ad {
                let want = ept::A | if write { ept::D } else { 0 };
                if raw & want != want {
                    if sptep
                        .compare_exchange(raw, raw | want, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue 'restart;
                    }
                    set_dirty = write && !dirty;
                    dirty |= write;
                }
            }
            let off = page & (level.pages() - 1);
            let spte = Spte(raw);
            let t = Translation {
                pfn: Pfn(spte.pfn().0 + off),
                perm: spte.permits() & (Access::READ | Access::WRITE | Access::EXEC),
                dirty,
                level,
                set_dirty,
            };
            tlb.insert_linear(
                mmu.root_id,
                pcid,
                gva,
                vmmu::Gpa(gva.0),
                &t,
                LinearEntry {
                    rights: r,
                    guest_dirty: true,
                    global: false,
                    guest_level: level,
                },
            );
            return Ok((t, Source::Walk));
        }
    }
}
