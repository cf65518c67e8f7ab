//! Model-checked protocols of the shadow MMU (loom): the fast path on
//! shadow entries and the lock-free "nothing unsync" INVLPG. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vmmu --release --test loom_shadow`;
//! each protocol is checked as built and with its guard removed, as in
//! `loom.rs`.
#![cfg(loom)]

mod loom_common;

use loom::thread;
use loom_common::{GPA, HVA};
use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, Gpa, GuardKnobs, GuestPaging, Hva, MemFlags, MmuKind, PrimaryMmu, UserMemoryRegion,
    Vm, VmConfig,
};

/// The guest's tables: PML4 at 0x1000, PDPT, PD, and the PT for `GVA`.
const PML4: u64 = 0x1000;
const PT: u64 = 0x4000;
const GVA: u64 = 0x40_0000;

/// A shadow VM whose memslots `(slot, gpa, flags)` are 2 MiB each, all
/// backed by the same host memory at `HVA`.
fn shadow_vm(knobs: GuardKnobs, slots: &[(u32, u64, u32)]) -> (std::sync::Arc<TestHost>, Vm) {
    let host = TestHost::new();
    let vm = Vm::new(
        VmConfig {
            mmu: MmuKind::Shadow,
            knobs,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    for &(slot, gpa, flags) in slots {
        vm.set_user_memory_region(UserMemoryRegion {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: 2 << 20,
            userspace_addr: HVA,
        })
        .unwrap();
    }
    (host, vm)
}

/// A guest store to `gpa` of the memory behind the slots.
fn put(host: &TestHost, gpa: u64, v: u64) {
    host.write_u64(Hva(HVA + gpa), v).unwrap();
}

/// Link the path PML4 → PDPT → PD → PT for `GVA` with `rights`; returns the
/// gpa of `GVA`'s PTE.
fn guest_path(host: &TestHost, rights: u64) -> u64 {
    put(host, PML4, 0x2000 | rights);
    put(host, 0x2000, 0x3000 | rights);
    put(host, 0x3000 + ((GVA >> 21) & 511) * 8, PT | rights);
    PT + ((GVA >> 12) & 511) * 8
}

/// 4-level paging with CR0.WP and NX on `PML4`.
fn long_mode() -> GuestPaging {
    GuestPaging {
        paging: true,
        wp: true,
        nx: true,
        cr3: PML4,
        ..Default::default()
    }
}

/// (s1) The shadow MMU's fast path stays off indirect entries: a guest that
/// repoints a PTE from gfn A to gfn B (two memslots on the same host page,
/// so B's entry, once written and harvested, holds the same value A's did)
/// must never end with B's entry writable and B out of the log. On an
/// indirect entry the exchange cannot tell: it succeeds and logs A, the gfn
/// its guest walk saw (locking.rst's ABA).
fn shadow_fast_path_vs_repointed_pte(knobs: GuardKnobs) {
    use vmmu::{Gva, GvaFault};
    const A: u64 = 0x10_0000;
    const B: u64 = GPA + A;
    let logged = MemFlags::LOG_DIRTY_PAGES.bits();
    let (host, vm) = shadow_vm(knobs, &[(0, 0, logged), (1, GPA, logged)]);
    let all = 0b111; // P | W | U
    let pte = guest_path(&host, all);
    put(&host, pte, A | all);
    let paging = long_mode();
    let mut vcpus: Vec<_> = (0..2)
        .map(|i| {
            let mut v = vm.create_vcpu(i).unwrap();
            v.set_guest_paging(paging).unwrap();
            v.prepare_entry().unwrap();
            v
        })
        .collect();
    let w = ErrorCode::USER | ErrorCode::WRITE;
    vcpus[0].page_fault_gva(Gva(GVA), w, false).unwrap();
    // The harvest protects A's entry: a write to it is a fast-path candidate.
    vm.get_dirty_log(0).unwrap();
    let mut v0 = vcpus.remove(0);
    let mut v1 = vcpus.remove(0);
    let t = thread::spawn(move || {
        let _ = v0.page_fault_gva(Gva(GVA), w | ErrorCode::PRESENT, false);
        v0
    });
    // The guest repoints the PTE (an emulated store), touches B, and the VMM
    // harvests B: B's entry ends write-protected with A's old value.
    v1.emulate_write(Gpa(pte), B | all | 0x60).unwrap();
    let r = v1.page_fault_gva(Gva(GVA), w, false).unwrap();
    assert!(matches!(r, GvaFault::Mmu(_)), "{r:?}");
    vm.get_dirty_log(1).unwrap();
    let v0 = t.join().unwrap();
    let b_gfn = Gpa(B).gfn();
    let writable = vm
        .mappings(0)
        .into_iter()
        .any(|(g, _, s)| g == b_gfn && s.is_writable());
    let logged = vm
        .memslots(0)
        .unwrap()
        .by_id(1)
        .unwrap()
        .dirty_bitmap()
        .unwrap()
        .test(b_gfn.0 - Gpa(GPA).gfn().0);
    drop((v0, v1));
    assert!(
        !writable || logged,
        "gfn B writable but not in the log (the fast path logged A)"
    );
}

protocol!(
    loom_shadow_fast_path_never_logs_a_gfn_its_entry_no_longer_maps,
    loom_shadow_fast_path_on_indirect_entries_logs_the_wrong_gfn,
    shadow_fast_path_vs_repointed_pte,
    shadow_fast_path_indirect,
    "not in the log"
);

/// (s2) A guest flush that finds nothing unsync may skip `mmu_lock`, so a
/// page must count as unsync until its entries are gone: a guest takes W
/// away from a PTE in an unsync table and runs INVLPG while another vCPU's
/// store to that table zaps its shadow page (a store the emulator cannot
/// map to one entry; recycling at the page limit zaps the same way, with no
/// request to the vCPUs first); after the INVLPG the processor
/// must never reach a writable leaf for the address. With the count dropped
/// before the zap clears the page, the INVLPG skips the lock while the stale
/// writable leaf is still there.
fn invlpg_vs_zap_of_unsync_page(knobs: GuardKnobs) {
    use vmmu::testing::hardware_walk_shadow;
    use vmmu::Gva;
    const ALIAS: u64 = GVA + 0x1000;
    const DATA: u64 = 0x10_0000;
    let (host, vm) = shadow_vm(knobs, &[(0, 0, 0)]);
    let all = 0b111 | 0x60; // P | W | U, A | D
    let pte = guest_path(&host, all);
    put(&host, pte, DATA | all);
    // The guest maps its own PT at ALIAS, as a kernel's direct map does.
    put(&host, pte + 8, PT | all);
    let paging = long_mode();
    let mut v = vm.create_vcpu(0).unwrap();
    v.set_guest_paging(paging).unwrap();
    v.prepare_entry().unwrap();
    let mut v1 = vm.create_vcpu(1).unwrap();
    v1.set_guest_paging(paging).unwrap();
    let w = ErrorCode::USER | ErrorCode::WRITE;
    v.page_fault_gva(Gva(GVA), w, false).unwrap();
    // A store to the PT through ALIAS: the PT goes unsync, ALIAS writable.
    v.page_fault_gva(Gva(ALIAS), w, false).unwrap();
    let root = v.prepare_entry().unwrap().root;
    assert!(hardware_walk_shadow(&vm, root, Gva(GVA)).is_writable());
    // The guest's store through ALIAS takes W away from GVA's entry.
    put(&host, pte, DATA | (all & !0b10));
    let t = thread::spawn(move || {
        // Misaligned: the whole table's shadow pages go.
        v1.emulate_write(Gpa(PT + 1), 0).unwrap();
        v1
    });
    v.invlpg(Gva(GVA));
    let mut stale = false;
    if v.enter_guest_mode() {
        let e = hardware_walk_shadow(&vm, root, Gva(GVA));
        stale = e.is_shadow_present() && e.is_writable();
        v.exit_guest_mode();
    }
    let v1 = t.join().unwrap();
    drop((v, v1));
    assert!(
        !stale,
        "a write went through after the guest took W away and ran INVLPG"
    );
}

protocol!(
    loom_invlpg_never_skips_a_page_a_zap_has_not_cleared,
    loom_invlpg_skips_the_lock_when_unsync_is_cleared_before_the_zap,
    invlpg_vs_zap_of_unsync_page,
    unsync_cleared_early,
    "after the guest took W away"
);
