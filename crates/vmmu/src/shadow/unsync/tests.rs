//! Unsync pages and the page limit, on the test host.

use crate::config::VmConfig;
use crate::fault::{ErrorCode, RetPf};
use crate::shadow::fault::GvaFault;
use crate::shadow::paging::CR3_NOFLUSH;
use crate::shadow::tests::{
    get, guest, guest_with, idx, leaf_for, no_leaks, put, Guest, DATA, GVA, PD, PDPT, PML4, PT,
};
use crate::shadow::walk::gpte;
use crate::spte::ept;
use crate::types::{Gpa, Gva};
use crate::vm::VmError;

const ALL: u64 = gpte::P | gpte::W | gpte::U;
/// Where the guest maps its own PT (a kernel's direct map would).
const ALIAS: u64 = GVA + 0x1000;
const OTHER: u64 = DATA + 0x1000;

fn fault(g: &mut Guest, gva: u64, ec: ErrorCode) -> GvaFault {
    g.vcpu.page_fault_gva(Gva(gva), ec, false).unwrap()
}

/// Shadow the path to `GVA`, then store to its PT through `ALIAS`: the PT's
/// page goes unsync and the alias maps it writable.
fn unsynced(cfg: VmConfig, pcide: bool) -> Guest {
    let mut g = guest_with(cfg, pcide);
    put(&g.host, PT + idx(ALIAS, 1) * 8, PT | ALL | gpte::D);
    let w = ErrorCode::USER | ErrorCode::WRITE;
    assert_eq!(fault(&mut g, GVA, w), GvaFault::Mmu(RetPf::Fixed));
    assert_eq!(fault(&mut g, ALIAS, w), GvaFault::Mmu(RetPf::Fixed));
    g
}

#[test]
fn test_a_store_to_a_shadowed_4k_table_unsyncs_it_and_invlpg_syncs_the_entry() {
    let mut g = unsynced(VmConfig::default(), false);
    let pt = leaf_for(&g.vm, PT >> 12);
    assert_eq!(pt.len(), 1);
    assert!(pt[0].1.is_writable(), "the unsync table is not writable");
    assert_eq!(g.vm.stats().shadow_unsynced, 1);
    assert_eq!(g.vm.shadow_info().unsync, 1);
    assert_eq!(g.vm.stats().shadow_pte_writes, 0, "a store was emulated");
    // The guest repoints GVA through its writable mapping: no exit, and the
    // old translation may be used until the guest flushes it.
    put(&g.host, PT + idx(GVA, 1) * 8, OTHER | ALL);
    assert_eq!(leaf_for(&g.vm, DATA >> 12).len(), 1);
    g.vcpu.invlpg(Gva(GVA));
    assert!(
        leaf_for(&g.vm, DATA >> 12).is_empty(),
        "INVLPG left the stale leaf"
    );
    assert_eq!(g.vm.stats().shadow_entries_synced, 1);
    // One entry synced; the page stays unsync, its table writable.
    assert_eq!(g.vm.shadow_info().unsync, 1);
    assert_eq!(
        fault(&mut g, GVA, ErrorCode::USER),
        GvaFault::Mmu(RetPf::Fixed)
    );
    assert_eq!(leaf_for(&g.vm, OTHER >> 12).len(), 1);
    no_leaks(g);
}

#[test]
fn test_a_cr3_load_that_flushes_syncs_the_root_and_protects_the_table_again() {
    let mut g = unsynced(VmConfig::default(), false);
    assert!(leaf_for(&g.vm, DATA >> 12)[0].1.is_writable());
    // The guest takes the write right away from GVA.
    let e = PT + idx(GVA, 1) * 8;
    put(&g.host, e, get(&g.host, e) & !gpte::W);
    g.vcpu.load_cr3(PML4).unwrap();
    assert!(
        leaf_for(&g.vm, DATA >> 12)[0].1.is_writable(),
        "synced early"
    );
    g.vcpu.prepare_entry().unwrap();
    let data = leaf_for(&g.vm, DATA >> 12);
    assert_eq!(data.len(), 1, "narrowed rights need no zap");
    assert!(
        !data[0].1.is_writable(),
        "the sync kept a revoked write right"
    );
    assert!(
        !leaf_for(&g.vm, PT >> 12)[0].1.is_writable(),
        "a synced table stayed writable"
    );
    let s = g.vm.stats();
    assert_eq!((s.shadow_synced, g.vm.shadow_info().unsync), (1, 0));
    // Synced, the table is write-protected again: the next store through
    // the alias goes unsync again (one more), rather than being lost.
    assert_eq!(
        fault(
            &mut g,
            ALIAS,
            ErrorCode::USER | ErrorCode::WRITE | ErrorCode::PRESENT
        ),
        GvaFault::Mmu(RetPf::Fixed)
    );
    assert_eq!(g.vm.stats().shadow_unsynced, 2);
}

#[test]
fn test_a_no_flush_cr3_load_keeps_the_stale_entry_until_the_pcid_is_flushed() {
    for skip in [false, true] {
        let mut cfg = VmConfig::default();
        cfg.knobs.cr3_flush_skips_sync = skip;
        let mut g = unsynced(cfg, true);
        put(&g.host, PT + idx(GVA, 1) * 8, OTHER | ALL);
        g.vcpu.load_cr3(PML4 | CR3_NOFLUSH).unwrap();
        g.vcpu.prepare_entry().unwrap();
        assert_eq!(leaf_for(&g.vm, DATA >> 12).len(), 1, "PCID kept: no sync");
        g.vcpu.load_cr3(PML4).unwrap();
        g.vcpu.prepare_entry().unwrap();
        assert_eq!(
            leaf_for(&g.vm, DATA >> 12).is_empty(),
            !skip,
            "skip {skip}: a flushing CR3 load must sync the current root"
        );
    }
}

/// INVLPG cannot reach an unsync page while the path to it is cut (here an
/// emulated store zaps the PDPT's link; recycling does it too). The fault
/// that links the path again finds the PD in the hash with an unsync page
/// below and asks for the root to be synced before the next entry.
#[test]
fn test_a_reused_page_with_unsync_pages_below_gets_the_root_synced() {
    for skip in [false, true] {
        let mut cfg = VmConfig::default();
        cfg.knobs.reuse_skips_sync = skip;
        let mut g = unsynced(cfg, false);
        let gva2 = GVA + 0x2000;
        let data2 = DATA + 0x2000;
        put(&g.host, PT + idx(gva2, 1) * 8, data2 | ALL);
        fault(&mut g, gva2, ErrorCode::USER);
        let pdpte = PDPT + idx(GVA, 3) * 8;
        g.vcpu
            .emulate_write(Gpa(pdpte), get(&g.host, pdpte))
            .unwrap();
        put(&g.host, PT + idx(gva2, 1) * 8, OTHER | ALL);
        g.vcpu.invlpg(Gva(gva2));
        assert_eq!(
            leaf_for(&g.vm, data2 >> 12).len(),
            1,
            "INVLPG reached the page through a cut path"
        );
        assert!(matches!(
            fault(&mut g, GVA, ErrorCode::USER | ErrorCode::PRESENT),
            GvaFault::Mmu(RetPf::Fixed | RetPf::Spurious)
        ));
        g.vcpu.prepare_entry().unwrap();
        assert_eq!(
            leaf_for(&g.vm, data2 >> 12).is_empty(),
            !skip,
            "skip {skip}: the flushed, stale entry must be gone before the guest runs"
        );
    }
}

#[test]
fn test_a_table_shadowed_at_an_upper_level_stays_write_tracked() {
    let mut g = guest();
    put(&g.host, PT + idx(ALIAS, 1) * 8, PD | ALL | gpte::D);
    fault(&mut g, GVA, ErrorCode::USER);
    assert_eq!(
        fault(&mut g, ALIAS, ErrorCode::USER | ErrorCode::WRITE),
        GvaFault::Emulate {
            gpa: Gpa(PD),
            mmio: false
        }
    );
    assert_eq!(g.vm.stats().shadow_unsynced, 0);
    assert!(!leaf_for(&g.vm, PD >> 12)[0].1.is_writable());
}

#[test]
fn test_a_guest_tlb_flush_syncs_the_current_root_and_drops_unsync_cached_ones() {
    let mut g = unsynced(VmConfig::default(), true);
    let first = g.vcpu.root_id();
    // A second address space sharing nothing: the first root gets cached.
    let pml4b = 0x30000u64;
    put(&g.host, pml4b + idx(0, 4) * 8, 0);
    g.vcpu.load_cr3(pml4b | 2).unwrap();
    g.vcpu.prepare_entry().unwrap();
    assert_eq!(g.vcpu.prev_root_ids()[0], first);
    g.vcpu.flush_guest_tlb();
    assert_eq!(
        g.vcpu.prev_root_ids()[0],
        None,
        "a cached root with unsync pages below it was kept"
    );
    // INVPCID of a context drops that PCID's cached roots.
    g.vcpu.load_cr3(PML4).unwrap();
    g.vcpu.prepare_entry().unwrap();
    assert!(g.vcpu.prev_root_ids()[0].is_some());
    g.vcpu.invpcid_context(2);
    assert_eq!(g.vcpu.prev_root_ids()[0], None);
    no_leaks(g);
}

#[test]
fn test_the_page_limit_recycles_the_oldest_pages_and_refuses_too_small_a_limit() {
    let mut g = guest();
    // 64 MiB of memslots: 2 % is 327 pages.
    assert_eq!(g.vm.nr_mmu_pages(), 327);
    assert!(matches!(
        g.vm.set_nr_mmu_pages(63),
        Err(VmError::InvalidNrMmuPages { pages: 63, min: 64 })
    ));
    assert_eq!(
        g.vm.nr_mmu_pages(),
        327,
        "a refused limit changed something"
    );
    g.vm.set_nr_mmu_pages(64).unwrap();
    // 100 guest PTs, one per 2 MiB.
    for i in 0..100u64 {
        let gva = GVA + (i << 21);
        let pt = 0x20_0000 + i * 0x1000;
        put(&g.host, PD + idx(gva, 2) * 8, pt | ALL);
        put(&g.host, pt + idx(gva, 1) * 8, DATA | ALL);
        assert_eq!(
            fault(&mut g, gva, ErrorCode::USER),
            GvaFault::Mmu(RetPf::Fixed),
            "page {i}"
        );
        assert!(g.vm.shadow_info().pages <= 64, "page {i}: over the limit");
    }
    let s = g.vm.stats();
    assert!(s.shadow_recycled >= 100 + 3 - 64, "{}", s.shadow_recycled);
    assert_eq!(g.vm.shadow_info().max_pages, 64);
    // The root was never recycled: the vCPU still runs on it.
    assert_eq!(s.obsolete_roots_dropped, 0);
    no_leaks(g);
}

/// Flooding is for upper-level pages: a 4 KiB page goes unsync instead, so
/// emulated stores to it never zap it for their number; with unsync off
/// the third one does.
#[test]
fn test_flooding_spares_4k_pages_unless_unsync_is_off() {
    for unsync in [true, false] {
        let cfg = VmConfig {
            shadow_unsync: unsync,
            ..VmConfig::default()
        };
        let mut g = guest_with(cfg, false);
        fault(&mut g, GVA, ErrorCode::USER);
        for i in 0..3u64 {
            g.vcpu.emulate_write(Gpa(PT + (300 + i) * 8), 0).unwrap();
        }
        assert_eq!(
            g.vm.stats().shadow_flooded,
            u64::from(!unsync),
            "unsync {unsync}"
        );
        assert_eq!(leaf_for(&g.vm, DATA >> 12).len(), usize::from(unsync));
    }
}

/// A kernel frees a process's page table and reuses its frame as another
/// process's top-level table: the new upper-level page must write-protect
/// the frame (whose 4 KiB page was unsync, mapped writable) and zap that
/// unsync page, or the kernel's stores to the new table bypass the MMU and
/// the root's entries go stale (the soak's lost write protection).
#[test]
fn test_an_unsync_table_reused_as_an_upper_level_table_is_write_protected() {
    let mut g = unsynced(VmConfig::default(), false);
    assert!(leaf_for(&g.vm, PT >> 12)[0].1.is_writable());
    assert_eq!(g.vm.shadow_info().unsync, 1);
    g.vcpu.load_cr3(PT).unwrap();
    g.vcpu.prepare_entry().unwrap();
    assert!(
        leaf_for(&g.vm, PT >> 12)
            .iter()
            .all(|(_, s)| !s.is_writable()),
        "the frame of a new root is still mapped writable"
    );
    assert_eq!(
        g.vm.shadow_info().unsync,
        0,
        "the unsync page of the reused frame was kept"
    );
    // Back on the first tables, a store to the new root's table exits.
    g.vcpu.load_cr3(PML4).unwrap();
    g.vcpu.prepare_entry().unwrap();
    assert_eq!(
        fault(&mut g, ALIAS, ErrorCode::USER | ErrorCode::WRITE),
        GvaFault::Emulate {
            gpa: Gpa(PT),
            mmio: false
        }
    );
    no_leaks(g);
}

/// A second page for an unsync table (the same PT reached through a
/// read-only PD entry, another role) starts in sync, so its creation must
/// take the write right away again even though the gfn is tracked already.
#[test]
fn test_a_second_page_for_an_unsync_table_write_protects_it_again() {
    let mut g = unsynced(VmConfig::default(), false);
    assert!(leaf_for(&g.vm, PT >> 12)[0].1.is_writable());
    let other = GVA + (2 << 20);
    put(&g.host, PD + idx(other, 2) * 8, PT | gpte::P | gpte::U);
    let zapped = g.vm.stats().shadow_pages_zapped;
    assert_eq!(
        fault(&mut g, other, ErrorCode::USER),
        GvaFault::Mmu(RetPf::Fixed)
    );
    // Only an upper-level page zaps the unsync pages of its gfn.
    assert_eq!(
        g.vm.stats().shadow_pages_zapped,
        zapped,
        "a 4 KiB page zapped its twin"
    );
    assert!(
        leaf_for(&g.vm, PT >> 12)
            .iter()
            .all(|(_, s)| !s.is_writable()),
        "a new in-sync page left its table writable"
    );
    // The next store unsyncs both and exits no more.
    assert_eq!(
        fault(&mut g, ALIAS, ErrorCode::USER | ErrorCode::WRITE),
        GvaFault::Mmu(RetPf::Fixed)
    );
    assert_eq!(g.vm.shadow_info().unsync, 2);
    no_leaks(g);
}

/// INVLPG narrows every right the guest took away in an unsync table, not
/// only W: user access (U/S cleared) and execution (NX set).
#[test]
fn test_invlpg_syncs_lost_user_and_execute_rights() {
    let mut g = unsynced(VmConfig::default(), false);
    let leaf = |g: &Guest| leaf_for(&g.vm, DATA >> 12)[0].1;
    let flushes = |g: &Guest| g.vm.stats().tlb_flush_remote;
    assert!(leaf(&g).is_user());
    assert!(leaf(&g).0 & ept::X != 0);
    let e = PT + idx(GVA, 1) * 8;
    let (f0, ad) = (flushes(&g), leaf(&g).0 & (ept::A | ept::D));
    put(&g.host, e, get(&g.host, e) & !gpte::U);
    g.vcpu.invlpg(Gva(GVA));
    assert!(!leaf(&g).is_user(), "a supervisor page kept user access");
    assert!(leaf(&g).0 & ept::X != 0);
    // A right taken away is flushed everywhere; the A/D bits stay.
    assert!(flushes(&g) > f0, "lost U/S not flushed");
    assert_eq!(leaf(&g).0 & (ept::A | ept::D), ad);
    let f1 = flushes(&g);
    put(&g.host, e, get(&g.host, e) | gpte::NX);
    g.vcpu.invlpg(Gva(GVA));
    assert!(leaf(&g).0 & ept::X == 0, "an NX page stayed executable");
    assert!(flushes(&g) > f1, "lost X not flushed");
    // Nothing changed: no entry touched, no flush.
    let (f2, before) = (flushes(&g), leaf(&g).0);
    g.vcpu.invlpg(Gva(GVA));
    assert_eq!((flushes(&g), leaf(&g).0), (f2, before));
    no_leaks(g);
}

/// Zapping an upper-level page zaps the unsync pages below it (no sync
/// could reach them through it any more).
#[test]
fn test_zapping_a_page_zaps_the_unsync_pages_below_it() {
    let mut g = unsynced(VmConfig::default(), false);
    assert_eq!(g.vm.shadow_info().unsync, 1);
    // A store the emulator cannot map to one entry zaps the PD's page.
    g.vcpu.emulate_write(Gpa(PD + 1), 0).unwrap();
    assert_eq!(
        g.vm.shadow_info().unsync,
        0,
        "the unsync PT below the zapped PD was kept"
    );
    no_leaks(g);
}
