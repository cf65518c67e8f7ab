//! Shadow MMU pipeline tests on the test host (whose memory holds the
//! guest's tables).

use std::sync::Arc;

use crate::config::{MmuKind, VmConfig};
use crate::fault::{ErrorCode, FaultError, RetPf};
use crate::host::PrimaryMmu;
use crate::memslot::UserMemoryRegion;
use crate::spte::Spte;
use crate::testing::TestHost;
use crate::types::{Gfn, Gpa, Gva, Hva, HvaRange, Level};
use crate::vcpu::VcpuMmu;
use crate::vm::{Vm, VmError};

use super::fault::GvaFault;
use super::walk::{gpte, GuestPaging};

/// Guest memory: 64 MiB at gpa 0, host addresses from 1 GiB.
pub(super) const HVA: u64 = 1 << 30;
pub(super) const PML4: u64 = 0x1000;
pub(super) const PDPT: u64 = 0x2000;
pub(super) const PD: u64 = 0x3000;
pub(super) const PT: u64 = 0x4000;
/// The page the test maps at `GVA`.
pub(super) const DATA: u64 = 0x10_0000;
pub(super) const GVA: u64 = 0x4000_0000_0000 | 0x20_0000 | 0x5000;

pub(super) struct Guest {
    pub(super) host: Arc<TestHost>,
    pub(super) vm: Vm,
    pub(super) vcpu: VcpuMmu,
}

pub(super) fn put(host: &TestHost, gpa: u64, v: u64) {
    host.write_u64(Hva(HVA + gpa), v).unwrap();
}

pub(super) fn get(host: &TestHost, gpa: u64) -> u64 {
    host.read_u64(Hva(HVA + gpa)).unwrap()
}

pub(super) fn idx(gva: u64, level: u32) -> u64 {
    (gva >> (12 + 9 * (level - 1))) & 511
}

/// A shadow-MMU VM on `host` (`legacy`: `legacy_root_reload`) with one
/// memslot of `size` bytes at `gpa`, backed from `HVA`, with `flags`.
fn shadow_vm(host: &Arc<TestHost>, legacy: bool, gpa: u64, size: u64, flags: u32) -> Vm {
    let cfg = VmConfig {
        legacy_root_reload: legacy,
        ..VmConfig::default()
    };
    shadow_vm_with(host, cfg, gpa, size, flags)
}

/// [`shadow_vm`] with the rest of the configuration from `cfg`.
pub(super) fn shadow_vm_with(
    host: &Arc<TestHost>,
    cfg: VmConfig,
    gpa: u64,
    size: u64,
    flags: u32,
) -> Vm {
    let cfg = VmConfig {
        mmu: MmuKind::Shadow,
        ..cfg
    };
    let vm = Vm::new(cfg, host.ops()).unwrap();
    vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: HVA,
    })
    .unwrap();
    vm
}

/// A shadow VM whose guest maps `GVA` → `DATA` (4 KiB, user, writable)
/// through PML4 → PDPT → PD → PT, paging on, CR3 loaded, entered.
pub(super) fn guest() -> Guest {
    guest_with(VmConfig::default(), false)
}

/// [`guest`] on a VM configured from `cfg`, with CR4.PCIDE as `pcide`.
pub(super) fn guest_with(cfg: VmConfig, pcide: bool) -> Guest {
    let host = TestHost::new();
    let vm = shadow_vm_with(&host, cfg, 0, 64 << 20, 0);
    let all = gpte::P | gpte::W | gpte::U;
    put(&host, PML4 + idx(GVA, 4) * 8, PDPT | all);
    put(&host, PDPT + idx(GVA, 3) * 8, PD | all);
    put(&host, PD + idx(GVA, 2) * 8, PT | all);
    put(&host, PT + idx(GVA, 1) * 8, DATA | all);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_guest_paging(GuestPaging {
        paging: true,
        wp: true,
        nx: true,
        pcide,
        cr3: PML4,
        ..Default::default()
    })
    .unwrap();
    vcpu.prepare_entry().unwrap();
    Guest { host, vm, vcpu }
}

pub(super) fn leaf_for(vm: &Vm, gfn: u64) -> Vec<(Level, Spte)> {
    vm.mappings(0)
        .into_iter()
        .filter(|(g, _, _)| g.0 == gfn)
        .map(|(_, l, s)| (l, s))
        .collect()
}

#[test]
fn test_shadow_fault_maps_gva_with_guest_rights_and_sets_guest_accessed() {
    let mut g = guest();
    let r = g
        .vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    assert_eq!(r, GvaFault::Mmu(RetPf::Fixed));
    let leaves = leaf_for(&g.vm, DATA >> 12);
    assert_eq!(leaves.len(), 1, "{leaves:?}");
    let (level, spte) = leaves[0];
    assert_eq!(level, Level::K4);
    assert!(spte.is_user());
    // A read of a clean guest page maps it read-only: the first write must
    // fault so the guest's Dirty bit gets set.
    assert!(!spte.is_writable());
    for (t, i) in [(PML4, 4), (PDPT, 3), (PD, 2), (PT, 1)] {
        let e = get(&g.host, t + idx(GVA, i) * 8);
        assert_ne!(e & gpte::A, 0, "level {i} entry not accessed");
    }
    assert_eq!(get(&g.host, PT + idx(GVA, 1) * 8) & gpte::D, 0);
    let w = g
        .vcpu
        .page_fault_gva(
            Gva(GVA),
            ErrorCode::USER | ErrorCode::WRITE | ErrorCode::PRESENT,
            false,
        )
        .unwrap();
    assert_eq!(w, GvaFault::Mmu(RetPf::Fixed));
    assert_ne!(get(&g.host, PT + idx(GVA, 1) * 8) & gpte::D, 0);
    assert!(leaf_for(&g.vm, DATA >> 12)[0].1.is_writable());
    // Four shadow pages: one per guest table.
    assert_eq!(g.vm.table_pages_in_use(), 4);
    assert_eq!(g.vm.stats().shadow_pages_created, 4);
}

#[test]
fn test_shadow_guest_level_faults_are_injected_with_the_guest_error_code() {
    let mut g = guest();
    // Nothing mapped at the next page: not present.
    let r = g
        .vcpu
        .page_fault_gva(Gva(GVA + 0x1000), ErrorCode::WRITE, false)
        .unwrap();
    assert_eq!(r, GvaFault::Inject(ErrorCode::WRITE));
    // Supervisor-only leaf, user read: present | user.
    put(&g.host, PT + idx(GVA, 1) * 8, DATA | gpte::P | gpte::W);
    let r = g
        .vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    assert_eq!(r, GvaFault::Inject(ErrorCode::PRESENT | ErrorCode::USER));
    // Fetch from an NX page: the I/D bit is there with EFER.NX.
    put(
        &g.host,
        PT + idx(GVA, 1) * 8,
        DATA | gpte::P | gpte::U | gpte::NX,
    );
    let r = g
        .vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER | ErrorCode::FETCH, false)
        .unwrap();
    assert_eq!(
        r,
        GvaFault::Inject(ErrorCode::PRESENT | ErrorCode::USER | ErrorCode::FETCH)
    );
    // Reserved bit 51: RSVD.
    put(
        &g.host,
        PT + idx(GVA, 1) * 8,
        DATA | gpte::P | gpte::U | (1 << 51),
    );
    let r = g
        .vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    assert_eq!(
        r,
        GvaFault::Inject(ErrorCode::PRESENT | ErrorCode::USER | ErrorCode::RSVD)
    );
    assert!(g.vm.mappings(0).is_empty(), "no leaf for a faulting access");
    assert_eq!(g.vm.stats().shadow_guest_faults, 4);
}

/// With unsync off, every shadowed table stays write-tracked (see the
/// unsync tests for what happens with it on).
#[test]
fn test_shadowed_tables_are_write_protected_and_their_writes_emulated() {
    let cfg = VmConfig {
        shadow_unsync: false,
        ..VmConfig::default()
    };
    let mut g = guest_with(cfg, false);
    // Map the guest's own PT page at a second address (like a kernel's
    // direct map), writable.
    let alias = GVA + 0x1000;
    let all = gpte::P | gpte::W | gpte::U;
    put(&g.host, PT + idx(alias, 1) * 8, PT | all | gpte::D);
    // Shadow the path: the PT (and everything above) is now a shadowed table.
    g.vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    // A write through the alias reaches a write-tracked gfn: emulate.
    let r = g
        .vcpu
        .page_fault_gva(Gva(alias), ErrorCode::USER | ErrorCode::WRITE, false)
        .unwrap();
    assert_eq!(
        r,
        GvaFault::Emulate {
            gpa: Gpa(PT),
            mmio: false
        }
    );
    let pt_leaf = leaf_for(&g.vm, PT >> 12);
    assert_eq!(pt_leaf.len(), 1);
    assert!(
        !pt_leaf[0].1.is_writable(),
        "a shadowed table mapped writable"
    );
    // The guest remaps GVA to another page; the emulated store zaps the stale leaf.
    assert_eq!(leaf_for(&g.vm, DATA >> 12).len(), 1);
    let other = DATA + 0x1000;
    g.vcpu
        .emulate_write(Gpa(PT + idx(GVA, 1) * 8), other | all)
        .unwrap();
    assert_eq!(get(&g.host, PT + idx(GVA, 1) * 8), other | all);
    assert!(
        leaf_for(&g.vm, DATA >> 12).is_empty(),
        "stale leaf survived"
    );
    g.vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    assert_eq!(leaf_for(&g.vm, other >> 12).len(), 1);
    assert_eq!(g.vm.stats().shadow_pte_writes, 1);
}

#[test]
fn test_shadow_write_flooding_zaps_the_root_and_the_vcpu_drops_it() {
    let mut g = guest();
    g.vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    let root = g.vcpu.shadow.root.as_ref().unwrap().id;
    // Three writes to the PML4 with no fault in between: flooded.
    for i in 0..3u64 {
        g.vcpu.emulate_write(Gpa(PML4 + (100 + i) * 8), 0).unwrap();
    }
    let s = g.vm.stats();
    assert_eq!(s.shadow_flooded, 1);
    // The root is held, so it stays (invalid) until the vCPU drops it.
    assert!(g
        .vcpu
        .shadow
        .root
        .as_ref()
        .unwrap()
        .invalid
        .load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        g.vcpu
            .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
            .unwrap(),
        GvaFault::Mmu(RetPf::Retry)
    );
    let e = g.vcpu.prepare_entry().unwrap();
    assert_ne!(e.root_id, root, "an obsolete root was entered again");
    assert!(e.flush_tlb);
    assert_eq!(g.vcpu.stats().obsolete_roots_dropped, 1);
    // The pages below the old root survived it (unlinked, still shadowing
    // their tables): the new root links them again and finds the leaf.
    assert_eq!(
        g.vcpu
            .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
            .unwrap(),
        GvaFault::Mmu(RetPf::Spurious)
    );
    assert_eq!(g.vm.stats().shadow_pages_created, 5);
}

#[test]
fn test_shadow_invalidation_zaps_leaves_through_the_rmap() {
    let mut g = guest();
    g.vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    assert_eq!(leaf_for(&g.vm, DATA >> 12).len(), 1);
    let inv =
        g.vm.invalidate_range_start(HvaRange::new(Hva(HVA + DATA), Hva(HVA + DATA + 0x1000)));
    assert!(leaf_for(&g.vm, DATA >> 12).is_empty());
    // Inside the invalidation the fault retries; after it, it maps again.
    assert_eq!(
        g.vcpu
            .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
            .unwrap(),
        GvaFault::Mmu(RetPf::Retry)
    );
    inv.end();
    g.vcpu.prepare_entry().unwrap();
    assert_eq!(
        g.vcpu
            .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
            .unwrap(),
        GvaFault::Mmu(RetPf::Fixed)
    );
    // The shadow pages stayed through it.
    assert_eq!(g.vm.stats().shadow_pages_created, 4);
}

#[test]
fn test_shadow_guest_huge_page_uses_direct_pages_unless_the_host_maps_huge() {
    let mut g = guest();
    // A 2 MiB guest page at gva 2 MiB in the same PD, frame 32 MiB.
    let gva = (GVA & !0x3f_ffff) | 0x40_0000 | 0x3000;
    let frame = 32 << 20;
    put(
        &g.host,
        PD + idx(gva, 2) * 8,
        frame | gpte::P | gpte::W | gpte::U | gpte::PS | gpte::D,
    );
    g.vcpu
        .page_fault_gva(Gva(gva), ErrorCode::USER, false)
        .unwrap();
    // The test host maps 4 KiB pages: a direct page of 4 KiB leaves.
    let gfn = (frame >> 12) + 3;
    let l = leaf_for(&g.vm, gfn);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].0, Level::K4);
    assert!(
        l[0].1.is_writable(),
        "dirty guest leaf, read fault: writable"
    );
    // Four indirect pages (PML4, PDPT, PD) plus one direct.
    assert_eq!(g.vm.stats().shadow_pages_created, 4);
}

#[test]
fn test_shadow_paging_off_maps_linear_as_physical() {
    let host = TestHost::new();
    let vm = shadow_vm(&host, false, 1 << 30, 4 << 20, 0);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    let r = vcpu
        .page_fault_gva(Gva((1 << 30) + 0x2000), ErrorCode::WRITE, false)
        .unwrap();
    assert_eq!(r, GvaFault::Mmu(RetPf::Fixed));
    assert_eq!(leaf_for(&vm, ((1 << 30) >> 12) + 2).len(), 1);
    // Outside memory: MMIO.
    assert_eq!(
        vcpu.page_fault_gva(Gva(0x1000), ErrorCode::empty(), false)
            .unwrap(),
        GvaFault::Emulate {
            gpa: Gpa(0x1000),
            mmio: true
        }
    );
    // A memslot delete zaps every shadow page, the root included.
    vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 1 << 30,
        memory_size: 0,
        userspace_addr: HVA,
    })
    .unwrap();
    assert!(vm.mappings(0).is_empty());
    let _ = Gfn(0);
}

#[test]
fn test_shadow_config_and_calls_are_validated() {
    let host = TestHost::new();
    for (cfg, what) in [
        (
            VmConfig {
                mmu: MmuKind::Shadow,
                vm_type: crate::config::VmType::SwProtected,
                ..VmConfig::default()
            },
            "VM type",
        ),
        (
            VmConfig {
                mmu: MmuKind::Shadow,
                dirty_tracking: crate::config::DirtyTracking::Pml,
                ..VmConfig::default()
            },
            "PML",
        ),
        (
            VmConfig {
                mmu: MmuKind::Shadow,
                root_level: Level::L5,
                maxphyaddr: 52,
                ..VmConfig::default()
            },
            "root level",
        ),
    ] {
        assert!(
            matches!(Vm::new(cfg, host.ops()), Err(VmError::InvalidConfig(_))),
            "{what}"
        );
    }
    // A TDP VM has no guest-virtual faults.
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let e = vcpu
        .page_fault_gva(Gva(0), ErrorCode::empty(), false)
        .unwrap_err();
    assert!(matches!(e, FaultError::WrongMmu(_)));
    assert_eq!(e.errno(), crate::errno::EINVAL);
    // CR3 beyond the physical address width: refused, nothing changes.
    let before = vcpu.guest_paging();
    assert!(matches!(
        vcpu.load_cr3(1 << 50),
        Err(VmError::InvalidCr3 { .. })
    ));
    assert_eq!(vcpu.guest_paging(), before);
}

#[test]
fn test_a_page_that_becomes_a_shadowed_table_loses_its_writable_leaves() {
    let mut g = guest();
    let all = gpte::P | gpte::W | gpte::U;
    // A second PT, for the next 2 MiB, and an alias of it at GVA + 4 KiB.
    let pt2 = 0x6000u64;
    let gva2 = GVA + 0x20_0000;
    let alias = GVA + 0x1000;
    put(&g.host, PD + idx(gva2, 2) * 8, pt2 | all);
    put(&g.host, pt2 + idx(gva2, 1) * 8, DATA | all);
    put(&g.host, PT + idx(alias, 1) * 8, pt2 | all | gpte::D);
    // Written through the alias while still ordinary memory: writable.
    let r = g
        .vcpu
        .page_fault_gva(Gva(alias), ErrorCode::USER | ErrorCode::WRITE, false)
        .unwrap();
    assert_eq!(r, GvaFault::Mmu(RetPf::Fixed));
    assert!(leaf_for(&g.vm, pt2 >> 12)[0].1.is_writable());
    // Now it becomes a guest table that is shadowed.
    g.vcpu
        .page_fault_gva(Gva(gva2), ErrorCode::USER, false)
        .unwrap();
    let l = leaf_for(&g.vm, pt2 >> 12);
    assert_eq!(l.len(), 1);
    assert!(!l[0].1.is_writable(), "a shadowed table stayed writable");
    assert!(g.vm.stats().entries_write_protected >= 1);
    assert_eq!(g.vm.shadow_info().tracked_gfns, 5);
    // Every page zapped: no gfn stays write-tracked (or huge-disallowed).
    g.vm.invalidate_roots(crate::root::RootFilter::All).unwrap();
    g.vcpu.prepare_entry().unwrap();
    assert_eq!(g.vm.shadow_info().tracked_gfns, 1, "only the new root's");
}

#[test]
fn test_shadow_dirty_logging_write_protects_through_the_rmap() {
    let host = TestHost::new();
    let logged = crate::memslot::MemFlags::LOG_DIRTY_PAGES.bits();
    let vm = shadow_vm(&host, false, 1 << 30, 4 << 20, logged);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    let gva = Gva((1 << 30) + 0x3000);
    for round in 0..3 {
        let ec = if round == 0 {
            ErrorCode::WRITE
        } else {
            ErrorCode::WRITE | ErrorCode::PRESENT
        };
        assert_eq!(
            vcpu.page_fault_gva(gva, ec, false).unwrap(),
            GvaFault::Mmu(RetPf::Fixed),
            "round {round}"
        );
        assert!(leaf_for(&vm, ((1 << 30) >> 12) + 3)[0].1.is_writable());
        let log = vm.get_dirty_log(0).unwrap();
        assert_eq!(log[0], 1 << 3, "round {round}");
        let l = leaf_for(&vm, ((1 << 30) >> 12) + 3);
        assert_eq!(l.len(), 1);
        assert!(
            !l[0].1.is_writable(),
            "round {round}: still writable after the harvest"
        );
    }
    // Paging off: a direct root, so each write after a harvest was fixed by
    // the lockless fast path (its gfn follows from the entry's position).
    assert_eq!(vcpu.stats().fast_path_fixed, 2);
}

/// With guest paging on, entries are indirect: a write to a page the
/// harvest protected takes the slow path under `mmu_lock` (the fast path's
/// exchange could not tell that the entry still maps the gfn the walk saw).
#[test]
fn test_shadow_fast_path_stays_off_indirect_entries() {
    let mut g = guest();
    let logged = crate::memslot::MemFlags::LOG_DIRTY_PAGES.bits();
    g.vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags: logged,
        guest_phys_addr: 0,
        memory_size: 64 << 20,
        userspace_addr: HVA,
    })
    .unwrap();
    g.vcpu.prepare_entry().unwrap();
    let w = ErrorCode::USER | ErrorCode::WRITE;
    for ec in [w, w | ErrorCode::PRESENT] {
        g.vm.get_dirty_log(0).unwrap();
        assert_eq!(
            g.vcpu.page_fault_gva(Gva(GVA), ec, false).unwrap(),
            GvaFault::Mmu(RetPf::Fixed)
        );
        let log = g.vm.get_dirty_log(0).unwrap();
        assert_ne!(
            log[(DATA >> 12) as usize / 64] & (1 << ((DATA >> 12) % 64)),
            0
        );
    }
    let s = g.vcpu.stats();
    assert_eq!((s.fast_path_attempts, s.fast_path_fixed), (0, 0), "{s:?}");
}

/// Four address spaces, each PML4 → the same lower tables (as processes
/// sharing a kernel half would): PML4s at 0x20000 + i * 0x1000.
fn spaces(g: &Guest, n: u64) -> Vec<u64> {
    let all = gpte::P | gpte::W | gpte::U;
    (0..n)
        .map(|i| {
            let pml4 = 0x20000 + i * 0x1000;
            put(&g.host, pml4 + idx(GVA, 4) * 8, PDPT | all);
            pml4
        })
        .collect()
}

fn enter_and_touch(g: &mut Guest) -> u64 {
    let e = g.vcpu.prepare_entry().unwrap();
    let r = g
        .vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    assert!(
        matches!(r, GvaFault::Mmu(RetPf::Fixed | RetPf::Spurious)),
        "{r:?}"
    );
    e.root_id
}

#[test]
fn test_cr3_switches_hit_the_previous_roots_cache_most_recent_first() {
    let mut g = guest();
    let s = spaces(&g, 5);
    let mut ids = Vec::new();
    for &cr3 in &s[..4] {
        g.vcpu.load_cr3(cr3).unwrap();
        ids.push(enter_and_touch(&mut g));
    }
    let loads = g.vcpu.stats().shadow_root_loads;
    let order = |g: &Guest| g.vcpu.prev_root_ids();
    assert_eq!(order(&g), vec![Some(ids[2]), Some(ids[1]), Some(ids[0])]);
    // Back to the second: cached (current was the fourth; cache 3, 2, 1).
    g.vcpu.load_cr3(s[1]).unwrap();
    assert_eq!(g.vcpu.root_id(), Some(ids[1]), "switched without an entry");
    assert_eq!(order(&g), vec![Some(ids[3]), Some(ids[2]), Some(ids[0])]);
    assert_eq!(enter_and_touch(&mut g), ids[1]);
    assert_eq!(
        g.vcpu.stats().shadow_root_loads,
        loads,
        "a hit loaded a root"
    );
    assert_eq!(g.vcpu.stats().prev_root_hits, 1);
    // The cache is now 4th, 3rd, 1st (most recent first): the 1st is still in.
    g.vcpu.load_cr3(s[0]).unwrap();
    assert_eq!(order(&g), vec![Some(ids[1]), Some(ids[3]), Some(ids[2])]);
    assert_eq!(enter_and_touch(&mut g), ids[0]);
    assert_eq!(g.vcpu.stats().prev_root_hits, 2);
    // A fifth pushes out the least recent (the 3rd).
    g.vcpu.load_cr3(s[4]).unwrap();
    enter_and_touch(&mut g);
    assert_eq!(g.vcpu.stats().prev_root_misses, 5);
    g.vcpu.load_cr3(s[2]).unwrap();
    let again = enter_and_touch(&mut g);
    assert_eq!(g.vcpu.stats().prev_root_misses, 6, "the 3rd was evicted");
    // Evicted roots stay as ordinary pages: found in the hash, not rebuilt.
    assert_eq!(again, ids[2]);
    // "Free obsolete roots" with nothing obsolete keeps all three, in order.
    let before = order(&g);
    g.vcpu.free_obsolete_shadow_roots();
    assert_eq!(order(&g), before);
    assert!(before.iter().all(Option::is_some));
    no_leaks(g);
}

/// Every table page goes back to the host once the vCPU and the VM are gone
/// (a root slot lost without its count dropped would keep its page).
pub(super) fn no_leaks(g: Guest) {
    let Guest { host, vm, vcpu } = g;
    drop(vcpu);
    drop(vm);
    assert_eq!(host.memory.allocated(), 0, "table pages leaked");
}

/// A cached root whose table the guest floods goes invalid; "free obsolete
/// roots" drops only that slot: the current root and the other cached ones
/// stay, and switching back to them still hits. With the legacy switch every
/// slot goes.
#[test]
fn test_a_zapped_cached_root_is_the_only_slot_dropped() {
    for legacy in [false, true] {
        let mut g = guest();
        if legacy {
            // A fresh VM with the switch on, same guest tables.
            let vm = shadow_vm(&g.host, true, 0, 64 << 20, 0);
            let mut vcpu = vm.create_vcpu(0).unwrap();
            vcpu.set_guest_paging(g.vcpu.guest_paging()).unwrap();
            vcpu.prepare_entry().unwrap();
            g = Guest {
                host: g.host.clone(),
                vm,
                vcpu,
            };
        }
        let s = spaces(&g, 3);
        for &cr3 in &s {
            g.vcpu.load_cr3(cr3).unwrap();
            enter_and_touch(&mut g);
        }
        // Current: s[2]; cached: s[1], s[0], the first PML4.
        for i in 0..3u64 {
            g.vcpu.emulate_write(Gpa(s[1] + (200 + i) * 8), 0).unwrap();
        }
        let before = g.vcpu.stats();
        let cur = g.vcpu.prepare_entry().unwrap().root_id;
        let st = g.vcpu.stats().since(&before);
        if legacy {
            assert_eq!(st.roots_reloaded_legacy, 4, "{st:?}");
            assert_eq!(st.shadow_root_loads, 1, "{st:?}");
        } else {
            assert_eq!(st.obsolete_roots_dropped, 1, "{st:?}");
            assert_eq!(
                st.shadow_root_loads, 0,
                "the valid current root was reloaded"
            );
            let _ = cur;
            g.vcpu.load_cr3(s[0]).unwrap();
            g.vcpu.prepare_entry().unwrap();
            assert_eq!(g.vcpu.stats().since(&before).prev_root_hits, 1);
        }
        no_leaks(g);
    }
}

/// A host on which the first read of one guest word returns a stale value:
/// as if the guest changed the entry between the walk and `mmu_lock`.
struct StaleOnce {
    inner: Arc<TestHost>,
    hva: Hva,
    stale: std::sync::Mutex<Option<u64>>,
}

impl PrimaryMmu for StaleOnce {
    fn faultin(
        &self,
        hva: Hva,
        req: crate::host::FaultinRequest,
    ) -> Result<crate::host::HostPfn, crate::host::HostFaultError> {
        self.inner.faultin(hva, req)
    }
    fn release(&self, pfn: crate::types::Pfn, w: bool) {
        self.inner.release(pfn, w)
    }
    fn mapping_level(&self, hva: Hva) -> Level {
        self.inner.mapping_level(hva)
    }
    fn read_u64(&self, hva: Hva) -> Result<u64, crate::host::HostFaultError> {
        if hva == self.hva {
            if let Some(v) = self.stale.lock().unwrap().take() {
                return Ok(v);
            }
        }
        self.inner.read_u64(hva)
    }
    fn peek_u64(&self, hva: Hva) -> Option<u64> {
        self.inner.peek_u64(hva)
    }
    fn cmpxchg_u64(
        &self,
        hva: Hva,
        old: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, crate::host::HostFaultError> {
        self.inner.cmpxchg_u64(hva, old, new)
    }
    fn write_u64(&self, hva: Hva, v: u64) -> Result<(), crate::host::HostFaultError> {
        self.inner.write_u64(hva, v)
    }
}

/// The guest entry a walk read is read again under `mmu_lock` (its table is
/// write-protected by then); an entry changed meanwhile makes the fault
/// retry instead of mapping what the walk saw.
#[test]
fn test_a_guest_entry_changed_after_the_walk_makes_the_fault_retry() {
    let host = TestHost::new();
    let all = gpte::P | gpte::W | gpte::U | gpte::A | gpte::D;
    let pte = Hva(HVA + PT + idx(GVA, 1) * 8);
    let other = DATA + 0x1000;
    let stale = Arc::new(StaleOnce {
        inner: host.clone(),
        hva: pte,
        stale: std::sync::Mutex::new(Some(DATA | all)),
    });
    let mut ops = host.ops();
    ops.primary = stale.clone();
    let vm = Vm::new(
        VmConfig {
            mmu: MmuKind::Shadow,
            ..VmConfig::default()
        },
        ops,
    )
    .unwrap();
    vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 64 << 20,
        userspace_addr: HVA,
    })
    .unwrap();
    put(&host, PML4 + idx(GVA, 4) * 8, PDPT | all);
    put(&host, PDPT + idx(GVA, 3) * 8, PD | all);
    put(&host, PD + idx(GVA, 2) * 8, PT | all);
    put(&host, PT + idx(GVA, 1) * 8, other | all);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_guest_paging(GuestPaging {
        paging: true,
        wp: true,
        cr3: PML4,
        ..Default::default()
    })
    .unwrap();
    vcpu.prepare_entry().unwrap();
    let r = vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    assert_eq!(r, GvaFault::Mmu(RetPf::Retry));
    assert!(
        leaf_for(&vm, DATA >> 12).is_empty(),
        "mapped the stale entry"
    );
    // Again: the entry as it is now.
    let r = vcpu
        .page_fault_gva(Gva(GVA), ErrorCode::USER, false)
        .unwrap();
    assert_eq!(r, GvaFault::Mmu(RetPf::Fixed));
    assert_eq!(leaf_for(&vm, other >> 12).len(), 1);
}
