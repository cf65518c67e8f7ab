//! The entries of `vmmu bugs` and their in-process checks (see [`crate::bugs`]).

use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, GfnRange, Gpa, Hva, HvaRange, Level, MemFlags, RootFilter, UserMemoryRegion, Vm,
    VmConfig,
};

use crate::bugs::{Bug, Detector};

const GPA: u64 = 1 << 30;
const HVA: u64 = 64 << 30;

type Setup = (std::sync::Arc<TestHost>, Vm, vmmu::VcpuMmu);

/// A VM over the test host (mapping `level` pages), one 8 MiB slot.
fn vm_with(cfg: VmConfig, level: Level) -> Result<Setup, String> {
    let host = TestHost::new();
    host.set_host_level(level);
    let vm = Vm::new(cfg, host.ops()).map_err(|e| e.to_string())?;
    vm.set_user_memory_region(slot(0))
        .map_err(|e| e.to_string())?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    vcpu.prepare_entry().map_err(|e| e.to_string())?;
    Ok((host, vm, vcpu))
}

fn slot(flags: u32) -> UserMemoryRegion {
    UserMemoryRegion {
        slot: 0,
        flags,
        guest_phys_addr: GPA,
        memory_size: 8 << 20,
        userspace_addr: HVA,
    }
}

fn level_of(vm: &Vm, page: u64) -> Option<Level> {
    let gfn = Gpa(GPA + page * 4096).gfn();
    vm.mappings(0)
        .into_iter()
        .find(|(g, l, s)| s.is_shadow_present() && gfn.0 >= g.0 && gfn.0 < g.0 + l.pages())
        .map(|(_, l, _)| l)
}

fn fault(vcpu: &mut vmmu::VcpuMmu, page: u64, ec: ErrorCode) -> Result<(), String> {
    vcpu.page_fault(Gpa(GPA + page * 4096), ec)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A read in a range a fetch split stays at 4 KiB until recovery.
fn nx_vm(cfg: VmConfig) -> Result<Setup, String> {
    vm_with(
        VmConfig {
            nx_huge_pages: true,
            ..cfg
        },
        Level::M2,
    )
}

fn check_nx_reads_stay_below(cfg: VmConfig) -> Result<(), String> {
    let (_host, vm, mut vcpu) = nx_vm(cfg)?;
    fault(&mut vcpu, 1, ErrorCode::FETCH)?;
    fault(&mut vcpu, 100, ErrorCode::empty())?;
    match level_of(&vm, 100) {
        Some(Level::K4) => Ok(()),
        l => Err(format!(
            "a read after a fetch mapped the range at {l:?}: the split is undone and the next fetch splits again"
        )),
    }
}

/// NX recovery leaves tables in dirty-logged slots in place.
fn check_nx_recovery_spares_logged_slots(cfg: VmConfig) -> Result<(), String> {
    let (_host, vm, mut vcpu) = nx_vm(cfg)?;
    fault(&mut vcpu, 1, ErrorCode::FETCH)?;
    vm.set_user_memory_region(slot(MemFlags::LOG_DIRTY_PAGES.bits()))
        .map_err(|e| e.to_string())?;
    let r = vm.recover_nx_huge_pages(1);
    if r.zapped > 0 || level_of(&vm, 1).is_none() {
        return Err(format!(
            "recovery zapped {} table(s) of a dirty-logged slot: the pages come back at 4 KiB and logging pays the faults",
            r.zapped
        ));
    }
    Ok(())
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// A zap that yields hands the lock over only after moving on.
fn check_yields_make_progress(mut cfg: VmConfig) -> Result<(), String> {
    cfg.knobs.yield_every_step = true;
    let (_host, vm, mut vcpu) = vm_with(cfg, Level::K4)?;
    for p in 0..8 {
        fault(&mut vcpu, p, ErrorCode::WRITE)?;
    }
    let before = vm.stats();
    let g = Gpa(GPA).gfn();
    vm.zap_gfn_range(0, GfnRange::new(g, g.add(8))).map_err(e)?;
    let yields = vm.stats().since(&before).yields;
    if yields > 16 {
        return Err(format!(
            "zapping 8 leaves yielded mmu_lock {yields} times: after each yield the walk restarts at the same gfn and yields again (a livelock, cut short here)"
        ));
    }
    Ok(())
}

/// Huge-page recovery never asks about a huge page reaching below the slot.
fn check_recovery_stays_in_the_slot(cfg: VmConfig) -> Result<(), String> {
    let (_host, vm, mut vcpu) = vm_with(cfg, Level::M2)?;
    // A second slot whose base is 1 MiB into a 2 MiB page.
    let base = GPA + (16 << 20) + (1 << 20);
    let logged = UserMemoryRegion {
        slot: 1,
        flags: MemFlags::LOG_DIRTY_PAGES.bits(),
        guest_phys_addr: base,
        memory_size: 4 << 20,
        userspace_addr: HVA + (16 << 20) + (1 << 20),
    };
    vm.set_user_memory_region(logged).map_err(e)?;
    vcpu.page_fault(Gpa(base), ErrorCode::WRITE).map_err(e)?;
    let before = vm.stats().invariant_violations;
    // Logging off: huge pages are recovered in place.
    vm.set_user_memory_region(UserMemoryRegion { flags: 0, ..logged })
        .map_err(e)?;
    let bad = vm.stats().invariant_violations - before;
    if bad > 0 {
        return Err(format!(
            "recovery asked for the mapping level of a 2 MiB page starting below the slot's base ({bad} read(s) of huge-page information outside the slot)"
        ));
    }
    Ok(())
}

/// A vCPU drops every obsolete cached root, and only those.
fn check_free_obsolete_roots(cfg: VmConfig) -> Result<(), String> {
    let (_host, vm, mut vcpu) = vm_with(cfg, Level::K4)?;
    fault(&mut vcpu, 0, ErrorCode::WRITE)?;
    // The SMM root becomes current; the normal one is cached.
    vcpu.set_smm(true).map_err(e)?;
    vcpu.prepare_entry().map_err(e)?;
    vm.invalidate_roots(RootFilter::AddressSpace(0))
        .map_err(e)?;
    vcpu.prepare_entry().map_err(e)?;
    if let Some(r) = vm.roots().iter().find(|r| !r.valid) {
        return Err(format!(
            "after the vCPU handled its requests it still holds zapped root {} (refcount {}) in its cache: the current root was valid, so the cached one was judged valid too",
            r.id, r.refcount
        ));
    }
    Ok(())
}

/// Zapping a root gives the lock up along the way, not once per top-level
/// entry.
fn check_root_zap_yields_within_a_subtree(mut cfg: VmConfig) -> Result<(), String> {
    cfg.knobs.yield_every_step = true;
    let (_host, vm, mut vcpu) = vm_with(cfg, Level::K4)?;
    for p in 0..1024 {
        fault(&mut vcpu, p, ErrorCode::WRITE)?;
    }
    let before = vm.stats();
    vm.invalidate_roots(RootFilter::All).map_err(e)?;
    let d = vm.stats().since(&before);
    if d.yields < 512 {
        return Err(format!(
            "zapping a root of 1024 leaves and {} tables yielded {} times: each top-level entry's whole subtree is torn down in one step (an RCU stall on a large guest)",
            d.tables_freed, d.yields
        ));
    }
    Ok(())
}

/// Faults into a range being invalidated retry before taking `mmu_lock`.
fn check_no_retry_storm(cfg: VmConfig) -> Result<(), String> {
    let (_host, vm, mut vcpu) = vm_with(cfg, Level::K4)?;
    fault(&mut vcpu, 0, ErrorCode::WRITE)?;
    let inv = vm.invalidate_range_start(HvaRange::new(Hva(HVA + 4096), Hva(HVA + 2 * 4096)));
    let before = vm.stats();
    for _ in 0..10 {
        vcpu.page_fault(Gpa(GPA + 4096), ErrorCode::WRITE)
            .map_err(e)?;
    }
    let d = vm.stats().since(&before);
    inv.end();
    if d.mmu_lock_read > 0 {
        return Err(format!(
            "10 faults on a page being invalidated took mmu_lock {} times to learn they must retry (the retry storm the pre-check removed)",
            d.mmu_lock_read
        ));
    }
    Ok(())
}

/// NX recovery looks up a page's memslot in the page's address space.
fn check_nx_recovery_uses_the_pages_address_space(cfg: VmConfig) -> Result<(), String> {
    let (_host, vm, mut vcpu) = nx_vm(cfg)?;
    // The same gfns in address space 1 (SMM), logging added after the fetch.
    let smm = UserMemoryRegion {
        slot: 1 << 16,
        ..slot(0)
    };
    vm.set_user_memory_region(smm).map_err(e)?;
    vcpu.set_smm(true).map_err(e)?;
    vcpu.prepare_entry().map_err(e)?;
    fault(&mut vcpu, 1, ErrorCode::FETCH)?;
    vm.set_user_memory_region(UserMemoryRegion {
        flags: MemFlags::LOG_DIRTY_PAGES.bits(),
        ..smm
    })
    .map_err(e)?;
    let r = vm.recover_nx_huge_pages(1);
    if r.zapped > 0 {
        return Err(format!(
            "recovery zapped {} SMM page(s) of a slot that logs dirty pages: it looked the slot up in address space 0",
            r.zapped
        ));
    }
    Ok(())
}

macro_rules! knob {
    ($k:ident) => {
        |c: &mut VmConfig| c.knobs.$k = true
    };
}

/// The zoo: upstream bugs first (fix subject, SHA, first release), then
/// rules of vmmu's own with no known upstream bug.
pub(crate) static BUGS: &[Bug] = &[
    Bug::new(
        "root-freed-under-yielding-walker",
        "KVM: x86/mmu: Use yield-safe TDP MMU root iter in MMU notifier unmapping",
        "7533377215b6",
        "v5.16-rc4",
        "a notifier zap walks the roots without holding a reference and yields mmu_lock: the root is freed under it",
        "roots_without_refs",
        knob!(roots_without_refs),
        Detector::Model { target: None, test: "root::loom_tests::loom_root_freed_under_a_walk_without_references" },
    ),
    Bug::new(
        "lost-dirty-bit-plain-zap",
        "KVM: x86/mmu: Use atomic XCHG to write TDP MMU SPTEs with volatile bits",
        "ba3a6120a4e7",
        "v5.18-rc6",
        "a zap under the write lock stores over a leaf whose Dirty bit the processor sets meanwhile: the write is never logged",
        "nonatomic_zap",
        knob!(nonatomic_zap),
        Detector::Model { target: Some("loom"), test: "loom_zap_loses_dirty_bit_with_plain_store" },
    ),
    Bug::new(
        "missing-flush-before-yield",
        "KVM: x86/mmu: Ensure TLBs are flushed when yielding during GFN range zap",
        "a835429cda91",
        "v5.12-rc6",
        "a zap yields mmu_lock with its flush still pending: another invalidation finds nothing to zap and returns while a vCPU can still use the page",
        "skip_flush_before_yield",
        knob!(skip_flush_before_yield),
        Detector::Model { target: Some("loom"), test: "loom_two_invalidations_lose_the_flush_when_a_zap_yields_unflushed" },
    ),
    Bug::new(
        "yield-without-progress",
        "KVM: x86/mmu: Ensure forward progress when yielding in TDP MMU iter",
        "ed5e484b79e8",
        "v5.12-rc1",
        "a walk yields again right after restarting at the same gfn: two walkers hand the lock back and forth without moving",
        "yield_without_progress",
        knob!(yield_without_progress),
        Detector::Check(check_yields_make_progress),
    ),
    Bug::new(
        "memslot-install-during-invalidation",
        "KVM: Block memslot updates across range_start() and range_end()",
        "52ac8b358b0c",
        "v5.15-rc1",
        "a memslot is installed between an invalidation's start and end, so the two see different slots and the count they pair goes wrong",
        "skip_install_wait",
        knob!(skip_install_wait),
        Detector::Model { target: Some("loom"), test: "loom_memslot_install_without_wait_breaks_pairing" },
    ),
    Bug::new(
        "nx-recovery-in-dirty-logged-slot",
        "KVM: x86/mmu: Do not recover dirty-tracked NX Huge Pages",
        "eb298605705a",
        "v6.2-rc1",
        "NX recovery zaps split pages of a slot that logs dirty pages: they can only come back at 4 KiB, at the cost of faults during migration",
        "nx_recovery_ignores_dirty_log",
        knob!(nx_recovery_ignores_dirty_log),
        Detector::Check(check_nx_recovery_spares_logged_slots),
    ),
    Bug::new(
        "nx-recovery-slot-in-wrong-address-space",
        "KVM: x86/mmu: Grab memslot for correct address space in NX recovery worker",
        "817fa998362d",
        "v6.4-rc5",
        "NX recovery looks a page's memslot up in address space 0, so an SMM page in a dirty-logged slot is zapped anyway",
        "nx_recovery_slot_as0",
        knob!(nx_recovery_slot_as0),
        Detector::Check(check_nx_recovery_uses_the_pages_address_space),
    ),
    Bug::new(
        "huge-recovery-reads-outside-the-slot",
        "KVM: x86/mmu: Ensure hugepage is in by slot before checking max mapping level",
        "ef057cbf825e",
        "v7.2-rc1",
        "recovering huge pages asks for the mapping level of a huge page that starts below the slot's base, reading huge-page information outside the slot",
        "recover_huge_outside_slot",
        knob!(recover_huge_outside_slot),
        Detector::Check(check_recovery_stays_in_the_slot),
    ),
    Bug::new(
        "fault-retry-storm-without-precheck",
        "KVM: x86/mmu: Retry fault before acquiring mmu_lock if mapping is changing",
        "d02c357e5bfa",
        "v6.8",
        "faults on pages being invalidated take mmu_lock only to learn they must retry, contending with the zap (a performance bug)",
        "precheck = false",
        |c: &mut VmConfig| c.precheck = false,
        Detector::Check(check_no_retry_storm),
    ),
    Bug::new(
        "unsync-children-linked-unsynced",
        "KVM: X86: Synchronize the shadow pagetable before link it",
        "65855ed8b034",
        "v5.15-rc4",
        "the shadow MMU links a page found in its hash whose children are unsync without syncing them, so the guest uses an entry it made present without a flush",
        "reuse_skips_sync",
        knob!(reuse_skips_sync),
        Detector::Test { package: "vmmu", target: None, test: "shadow::unsync::tests::test_a_reused_page_with_unsync_pages_below_gets_the_root_synced" },
    ),
    Bug::new(
        "hugepage-during-attribute-change",
        "KVM: x86/mmu: Prevent installing hugepages when mem attributes are changing",
        "9129633d568e",
        "v6.15",
        "a fault on an unchanged gfn of a huge chunk while other gfns of it change attributes maps the chunk huge before its mixed flag is set: a shared 2 MiB leaf over gfns now private",
        "skip_hugepage_range_add",
        knob!(skip_hugepage_range_add),
        Detector::Test { package: "vmmu", target: Some("private"), test: "test_a_fault_beside_a_conversion_cannot_map_its_chunk_huge" },
    ),
    Bug::new(
        "free-obsolete-roots-tests-current-root",
        "KVM: x86/mmu: Check every prev_roots in __kvm_mmu_free_obsolete_roots()",
        "cf4a8693d97a",
        "v5.19-rc2",
        "freeing obsolete roots judges each cached root by the current root's state: with a valid current root, zapped cached roots are kept",
        "free_obsolete_tests_current_root",
        knob!(free_obsolete_tests_current_root),
        Detector::Check(check_free_obsolete_roots),
    ),
    Bug::new(
        "root-zap-in-one-pass",
        "KVM: x86/mmu: Zap roots in two passes to avoid inducing RCU stalls",
        "1b6043e8e584",
        "v5.18-rc1",
        "zapping a root tears down each top-level entry's whole subtree in one step, with no chance to yield (RCU stalls on large guests)",
        "zap_root_one_pass",
        knob!(zap_root_one_pass),
        Detector::Check(check_root_zap_yields_within_a_subtree),
    ),
    Bug::new(
        "missing-flush-after-zap",
        "",
        "",
        "vmmu rule",
        "an invalidation zaps leaves and returns before the vCPUs' TLBs are flushed: the host frees a page the guest still reaches",
        "skip_flush_after_zap",
        knob!(skip_flush_after_zap),
        Detector::Oracle,
    ),
    Bug::new(
        "missing-locked-retry",
        "",
        "",
        "vmmu rule",
        "the fault does not recheck the invalidation sequence under mmu_lock, so a frame the host is about to move gets mapped",
        "skip_locked_retry (precheck off)",
        |c: &mut VmConfig| {
            c.knobs.skip_locked_retry = true;
            c.precheck = false;
        },
        Detector::Oracle,
    ),
    Bug::new(
        "nx-split-undone-by-reads",
        "",
        "",
        "vmmu rule",
        "a data fault replaces a table the NX mitigation made with a huge leaf (no disallowed_hugepage_adjust), so every fetch splits again",
        "nx_replace_disallowed_table",
        knob!(nx_replace_disallowed_table),
        Detector::Check(check_nx_reads_stay_below),
    ),
    Bug::new(
        "lockless-aging-plain-store",
        "",
        "",
        "vmmu rule",
        "lockless aging writes the aged entry over whatever is there now: a zap in between is undone",
        "aging_plain_store",
        knob!(aging_plain_store),
        Detector::Model { target: Some("loom_aging"), test: "loom_lockless_aging_with_a_plain_store_brings_a_zapped_entry_back" },
    ),
];
