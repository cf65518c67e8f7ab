//! Model-checked protocols (loom). Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vmmu --release --test loom`.
//!
//! Each protocol is checked twice: once as built, where every interleaving within
//! the preemption bound must keep the invariant, and once with its guarding step
//! removed through a test-only knob, where the model must find a violating
//! interleaving. A checker that cannot fail proves nothing.
#![cfg(loom)]

use std::sync::Arc;

use loom::thread;
use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, GfnRange, Gpa, GuardKnobs, Hva, HvaRange, MemFlags, Pfn, RetPf, UserMemoryRegion,
    Vm, VmConfig,
};

mod loom_common;

use loom_common::{model_finds_violation, GPA, HVA};

fn vm_with(knobs: GuardKnobs) -> (Arc<TestHost>, Vm) {
    let host = TestHost::new();
    let vm = Vm::new(
        VmConfig {
            knobs,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    (host, vm)
}

fn vm_with_slot(knobs: GuardKnobs, flags: u32) -> (Arc<TestHost>, Vm) {
    let (host, vm) = vm_with(knobs);
    add_slot(&vm, flags);
    (host, vm)
}

/// Slot 0: 2 MiB at `GPA`, backed from `HVA`.
fn add_slot(vm: &Vm, flags: u32) {
    vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags,
        guest_phys_addr: GPA,
        memory_size: 2 << 20,
        userspace_addr: HVA,
    })
    .unwrap();
}

fn leaf_pfn(vm: &Vm, gpa: u64) -> Option<(Pfn, bool)> {
    let gfn = Gpa(gpa).gfn();
    vm.mappings(0)
        .into_iter()
        .find(|(g, _, s)| *g == gfn && s.is_shadow_present())
        .map(|(_, _, s)| (s.pfn(), s.is_writable()))
}

/// (a) A fault racing an invalidation never leaves the old frame mapped once
/// `invalidate_range_start` has returned and the host has moved the page.
fn fault_vs_invalidation(knobs: GuardKnobs) {
    let (host, vm) = vm_with_slot(knobs, 0);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    // Build the tables with a neighbour so the racing fault only installs a leaf.
    assert_eq!(
        vcpu.page_fault(Gpa(GPA + 4096), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    host.set(Hva(HVA), Pfn(0x777), true);
    let t = thread::spawn(move || {
        let _ = vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE);
        vcpu
    });
    let range = HvaRange::new(Hva(HVA), Hva(HVA + 4096));
    let inv = vm.invalidate_range_start(range);
    // The host migrates the page only after start returned.
    host.set(Hva(HVA), Pfn(0x888), true);
    let vcpu = t.join().unwrap();
    assert_ne!(
        leaf_pfn(&vm, GPA).map(|m| m.0),
        Some(Pfn(0x777)),
        "old frame mapped after invalidation"
    );
    inv.end();
    drop(vcpu);
    drop(vm);
    assert_eq!(host.memory.allocated(), 0);
}

/// (b1) A dirty bit set by hardware while the entry is zapped is never lost: if
/// the processor's update succeeded, the zap saw it.
fn zap_vs_hardware_dirty(knobs: GuardKnobs) {
    let (host, vm) = vm_with_slot(knobs, 0);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE).unwrap();
    // Harvest D, leaving a writable clean entry that hardware may dirty.
    assert_eq!(
        vm.clear_dirty_gfn_range(0, GfnRange::new(Gpa(GPA).gfn(), Gpa(GPA).gfn().add(1)))
            .unwrap(),
        1
    );
    let hw_vm = vm.clone();
    let hw = thread::spawn(move || {
        // The processor's locked update of the entry it walked.
        vmmu::testing::hardware_set_dirty(&hw_vm, Gpa(GPA))
    });
    let range = HvaRange::new(Hva(HVA), Hva(HVA + 4096));
    let before = vm.stats().dirty_leaves_zapped;
    let inv = vm.invalidate_range_start(range);
    let zapped_dirty = vm.stats().dirty_leaves_zapped - before;
    inv.end();
    let hw_dirtied = hw.join().unwrap();
    assert!(
        !hw_dirtied || zapped_dirty == 1,
        "hardware set D but the zap lost it"
    );
    drop(vcpu);
    drop(vm);
    assert_eq!(host.memory.allocated(), 0);
}

/// (b3) Write-protection never leaves an entry writable when the processor
/// sets its D bit at the same moment: the compare-and-exchange fails and the
/// entry is looked at again.
fn write_protect_vs_hardware_dirty(knobs: GuardKnobs) {
    let (host, vm) = vm_with_slot(knobs, 0);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE).unwrap();
    let page = GfnRange::new(Gpa(GPA).gfn(), Gpa(GPA).gfn().add(1));
    // Harvest D, so the processor has a bit to set.
    vm.clear_dirty_gfn_range(0, page).unwrap();
    let hw_vm = vm.clone();
    let hw = thread::spawn(move || vmmu::testing::hardware_set_dirty(&hw_vm, Gpa(GPA)));
    vm.write_protect_gfn_range(0, page).unwrap();
    hw.join().unwrap();
    let writable = leaf_pfn(&vm, GPA).is_some_and(|(_, w)| w);
    drop(vcpu);
    drop(vm);
    assert_eq!(host.memory.allocated(), 0);
    assert!(
        !writable,
        "the entry is still writable after write-protection"
    );
}

/// (b4) A dirty-log harvest racing the fast path that gives a page its write
/// permission back never leaves the entry writable with its page out of the
/// log (its later writes would never be seen): the fast path logs the page
/// after it made the entry writable.
fn harvest_vs_fast_path(knobs: GuardKnobs) {
    let (_host, vm) = vm_with_slot(knobs, MemFlags::LOG_DIRTY_PAGES.bits());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE).unwrap();
    // The first harvest takes the page and write-protects it.
    assert_eq!(vm.get_dirty_log(0).unwrap()[0], 1);
    let t = thread::spawn(move || {
        let _ = vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE | ErrorCode::PRESENT);
        vcpu
    });
    // As in the ring model: a yield point, so the fault may also go first.
    thread::yield_now();
    let second = vm.get_dirty_log(0).unwrap();
    let vcpu = t.join().unwrap();
    let writable = leaf_pfn(&vm, GPA).is_some_and(|(_, w)| w);
    let st = vcpu.stats();
    let logged = vm
        .memslots(0)
        .unwrap()
        .by_id(0)
        .unwrap()
        .dirty_bitmap()
        .unwrap()
        .test(0);
    drop(vcpu);
    drop(vm);
    assert!(
        !writable || logged,
        "the entry is writable but its page is not in the log (harvest {:#x}, fast {}, faults fixed {}, retries {})",
        second[0],
        st.fast_path_fixed,
        st.faults_fixed,
        st.faults_retry
    );
}

/// (b1r) The same with dirty rings: a ring reset that frees the entry a
/// racing fast path pushed has write-protected the page after that fast path
/// made it writable, or the push is still in the ring when both are done.
fn ring_reset_vs_fast_path(knobs: GuardKnobs) {
    let (_host, vm) = vm_with(knobs);
    vm.enable_dirty_ring(256).unwrap();
    add_slot(&vm, MemFlags::LOG_DIRTY_PAGES.bits());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE).unwrap();
    // The first harvest collects the page and the reset write-protects it.
    let mut fetch = 0;
    assert_eq!(vm.collect_dirty_ring(0, &mut fetch, |_, _| {}), 1);
    assert_eq!(vm.reset_dirty_rings(), 1);
    let t = thread::spawn(move || {
        let _ = vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE | ErrorCode::PRESENT);
        vcpu
    });
    // A yield point before the VMM's harvest: without it the model never
    // schedules the vCPU's fault ahead of the collect (one execution only).
    thread::yield_now();
    let collected = vm.collect_dirty_ring(0, &mut fetch, |_, _| {});
    let reset = vm.reset_dirty_rings();
    let vcpu = t.join().unwrap();
    let writable = leaf_pfn(&vm, GPA).is_some_and(|(_, w)| w);
    let pending = vm.collect_dirty_ring(0, &mut fetch, |_, _| {});
    drop(vcpu);
    drop(vm);
    assert!(
        !writable || pending > 0,
        "the entry is writable but no ring entry for it is left (collected {collected}, reset {reset})"
    );
}

/// (b2) The fast path never makes an entry writable after it was zapped and the
/// host moved the page.
fn fast_path_vs_zap(knobs: GuardKnobs) {
    let (host, vm) = vm_with_slot(knobs, MemFlags::LOG_DIRTY_PAGES.bits());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    host.set(Hva(HVA), Pfn(0x777), true);
    vcpu.page_fault(Gpa(GPA), ErrorCode::empty()).unwrap();
    vm.write_protect_gfn_range(0, GfnRange::new(Gpa(GPA).gfn(), Gpa(GPA).gfn().add(1)))
        .unwrap();
    let t = thread::spawn(move || {
        let _ = vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE | ErrorCode::PRESENT);
        vcpu
    });
    let range = HvaRange::new(Hva(HVA), Hva(HVA + 4096));
    let inv = vm.invalidate_range_start(range);
    host.set(Hva(HVA), Pfn(0x888), true);
    inv.end();
    let vcpu = t.join().unwrap();
    if let Some((pfn, writable)) = leaf_pfn(&vm, GPA) {
        assert!(
            pfn != Pfn(0x777),
            "stale frame {pfn:?} (writable {writable}) survived the invalidation"
        );
    }
    drop(vcpu);
    drop(vm);
}

/// A primary MMU whose one page-table entry is an atomic read and written
/// without any lock or fence (like a lockless page-table walk). Only the MMU's
/// invalidation protocol orders the fault's read against the host's change.
struct LocklessPte {
    pfn: loom::sync::atomic::AtomicU64,
}

impl vmmu::PrimaryMmu for LocklessPte {
    fn faultin(
        &self,
        _hva: Hva,
        _req: vmmu::FaultinRequest,
    ) -> Result<vmmu::HostPfn, vmmu::HostFaultError> {
        Ok(vmmu::HostPfn {
            pfn: Pfn(self.pfn.load(loom::sync::atomic::Ordering::Relaxed)),
            writable: true,
            level: vmmu::Level::K4,
        })
    }
    fn release(&self, _pfn: Pfn, _mapped_writable: bool) {}
    fn mapping_level(&self, _hva: Hva) -> vmmu::Level {
        vmmu::Level::K4
    }
}

/// (a') A fault never installs the frame a lockless host replaced before it
/// ended the invalidation: the fault that sees the end's sequence bump sees the
/// new frame, one that does not see it retries under the lock.
fn lockless_host_vs_fault(knobs: GuardKnobs) {
    let host = TestHost::new();
    let pte = Arc::new(LocklessPte {
        pfn: loom::sync::atomic::AtomicU64::new(0x777),
    });
    let mut ops = host.ops();
    ops.primary = pte.clone();
    let vm = Vm::new(
        VmConfig {
            knobs,
            // Only the snapshot's edge is under test; the unlocked checks would
            // add edges of their own in some interleavings.
            precheck: false,
            ..VmConfig::default()
        },
        ops,
    )
    .unwrap();
    add_slot(&vm, 0);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    // Build the tables with a neighbour so the racing fault only installs a leaf.
    vcpu.page_fault(Gpa(GPA + 4096), ErrorCode::WRITE).unwrap();
    let hvm = vm.clone();
    let hpte = pte.clone();
    let hostt = thread::spawn(move || {
        let inv = hvm.invalidate_range_start(HvaRange::new(Hva(HVA), Hva(HVA + 4096)));
        hpte.pfn.store(0x888, loom::sync::atomic::Ordering::Relaxed);
        inv.end();
    });
    let _ = vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE);
    hostt.join().unwrap();
    assert_ne!(
        leaf_pfn(&vm, GPA).map(|m| m.0),
        Some(Pfn(0x777)),
        "old frame of a lockless host mapped after its invalidation"
    );
    drop(vcpu);
    drop(vm);
}

/// (e) Two invalidations of one page at once: whichever returns first, the
/// page's translation may be cached in a vCPU's TLB only until a flush the
/// vCPU has been asked for. A zapper that yields `mmu_lock` midway must flush
/// what it zapped before, or the other one finds the leaf gone, flushes
/// nothing and lets the host change the page under a live TLB entry.
fn two_invalidations_one_page(knobs: GuardKnobs) {
    let (_host, vm) = vm_with_slot(knobs, 0);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE).unwrap();
    vcpu.page_fault(Gpa(GPA + 4096), ErrorCode::WRITE).unwrap();
    // The vCPU enters with both translations cached; nothing is pending.
    vcpu.prepare_entry().unwrap();
    assert_eq!(vm.debug_pending_requests(0), Some(0));
    let bvm = vm.clone();
    let b = thread::spawn(move || {
        let inv = bvm.invalidate_range_start(HvaRange::new(Hva(HVA), Hva(HVA + 4096)));
        // The host may now change the page: the vCPU must have a flush pending.
        let pending = bvm.debug_pending_requests(0).unwrap_or(0);
        inv.end();
        pending
    });
    // The other zap covers two leaves, so its walk has made progress when B's
    // wait for mmu_lock makes it yield.
    vm.invalidate_range_start(HvaRange::new(Hva(HVA), Hva(HVA + 8192)))
        .end();
    let pending = b.join().unwrap();
    drop(vcpu);
    // Asserted once every thread is done: a model panic must not unwind
    // through live locks of other threads.
    assert!(
        pending & vmmu::request::REQ_TLB_FLUSH != 0,
        "an invalidation returned with the page's translation still usable"
    );
}

/// (f) The request / guest-mode protocol: a TLB flush requested while a vCPU
/// enters, runs or leaves guest mode is done before the vCPU uses its TLB
/// again, and a requester that waits returns only once no vCPU can still use
/// the old translation.
fn flush_vs_guest_entry(knobs: GuardKnobs) {
    let (_host, vm) = vm_with_slot(knobs, 0);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE).unwrap();
    vcpu.prepare_entry().unwrap();
    let changed = Arc::new(loom::sync::atomic::AtomicBool::new(false));
    let (hvm, hchanged) = (vm.clone(), changed.clone());
    let host = thread::spawn(move || {
        let inv = hvm.invalidate_range_start(HvaRange::new(Hva(HVA), Hva(HVA + 4096)));
        // Release: pairs with the guest's Acquire below.
        hchanged.store(true, loom::sync::atomic::Ordering::Release);
        inv.end();
    });
    // The vCPU's TLB holds the page's translation.
    let mut tlb_valid = true;
    let mut stale = false;
    for _ in 0..2 {
        let e = vcpu.prepare_entry().unwrap();
        if e.flush_tlb {
            tlb_valid = false;
        }
        if !vcpu.enter_guest_mode() {
            continue;
        }
        // One guest access through the TLB, then an exit.
        stale |= tlb_valid && changed.load(loom::sync::atomic::Ordering::Acquire);
        vcpu.exit_guest_mode();
    }
    host.join().unwrap();
    drop(vcpu);
    assert!(
        !stale,
        "the guest used a translation the host had already changed"
    );
}

/// (g) A conversion is atomic with respect to faults: a shared fault racing a
/// conversion of its gfn to private never leaves a shared mapping of the gfn
/// once the conversion returned.
fn conversion_vs_shared_fault(knobs: GuardKnobs) {
    let host = TestHost::new();
    let vm = Vm::new(
        VmConfig {
            knobs,
            vm_type: vmmu::VmType::Snp,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    add_slot(&vm, 0);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(Gpa(GPA + 4096), ErrorCode::WRITE).unwrap();
    let t = thread::spawn(move || {
        let _ = vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE);
        vcpu
    });
    vm.set_memory_attributes(GPA, 4096, vmmu::MEMORY_ATTRIBUTE_PRIVATE, 0)
        .unwrap();
    let vcpu = t.join().unwrap();
    let shared_mapping = leaf_pfn(&vm, GPA).is_some();
    drop(vcpu);
    drop(vm);
    assert!(
        !shared_mapping,
        "a shared mapping of a gfn converted to private survived the conversion"
    );
}

/// A punch-hole racing a private fault on the page it frees: the fault reads
/// the file's page without the file's lock, so the page must be freed inside
/// the punch's invalidation (where the fault's retry check sees it), never
/// after its end.
fn punch_vs_private_fault(knobs: GuardKnobs) {
    let host = TestHost::new();
    let vm = Vm::new(
        VmConfig {
            knobs,
            vm_type: vmmu::VmType::SwProtected,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    let file = vm.create_guest_memfd(2 << 20, 0).unwrap();
    file.fallocate(vmmu::gmem::FALLOC_FL_KEEP_SIZE, 0, 4096)
        .unwrap();
    vm.set_user_memory_region2(
        UserMemoryRegion {
            slot: 0,
            flags: MemFlags::GUEST_MEMFD.bits(),
            guest_phys_addr: GPA,
            memory_size: 2 << 20,
            userspace_addr: HVA,
        },
        Some(&file),
        0,
    )
    .unwrap();
    vm.set_memory_attributes(GPA, 4096, vmmu::MEMORY_ATTRIBUTE_PRIVATE, 0)
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    let t = thread::spawn(move || {
        let _ = vcpu.page_fault(Gpa(GPA), ErrorCode::WRITE);
        vcpu
    });
    file.fallocate(
        vmmu::gmem::FALLOC_FL_PUNCH_HOLE | vmmu::gmem::FALLOC_FL_KEEP_SIZE,
        0,
        4096,
    )
    .unwrap();
    let vcpu = t.join().unwrap();
    let mapped = leaf_pfn(&vm, GPA).map(|(pfn, _)| pfn);
    let freed = mapped.is_some_and(|pfn| !host.is_private_page(pfn));
    drop(vcpu);
    drop(file);
    drop(vm);
    assert!(
        !freed,
        "a private page freed by the punch-hole is still mapped"
    );
}

// (c) Root reference counting vs invalidation is checked inside the crate
// (`src/root.rs`, `loom_root_*`), on the roots code alone: a whole-VM model spends
// its budget walking table entries that play no part in that protocol.

/// (d) A memslot install never completes between an invalidation's start and
/// its end; otherwise start and end disagree on whether a slot overlapped, and the
/// in-progress count is left unbalanced.
fn install_vs_notifier(knobs: GuardKnobs) {
    let (_host, vm) = vm_with(knobs);
    let vm2 = vm.clone();
    let installer = thread::spawn(move || {
        vm2.set_user_memory_region(UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: GPA,
            memory_size: 1 << 20,
            userspace_addr: HVA,
        })
        .unwrap();
    });
    let range = HvaRange::new(Hva(HVA), Hva(HVA + 4096));
    let inv = vm.invalidate_range_start(range);
    let gen_after_start = vm.memslots(0).unwrap().len();
    let gen_before_end = vm.memslots(0).unwrap().len();
    inv.end();
    installer.join().unwrap();
    assert_eq!(
        gen_after_start, gen_before_end,
        "memslots changed between start and end"
    );
    assert_eq!(
        vm.invalidations_in_progress(),
        0,
        "unbalanced in-progress count"
    );
}

protocol!(
    loom_fault_vs_invalidation_never_maps_old_frame,
    loom_fault_vs_invalidation_fails_without_locked_check,
    fault_vs_invalidation,
    skip_locked_retry,
    "old frame mapped after invalidation"
);
protocol!(
    loom_lockless_host_change_is_seen_by_faults_after_the_end,
    loom_lockless_host_change_missed_with_relaxed_sequence_bump,
    lockless_host_vs_fault,
    relaxed_seq_bump,
    "old frame of a lockless host"
);
protocol!(
    loom_two_invalidations_of_one_page_both_leave_a_flush_behind,
    loom_two_invalidations_lose_the_flush_when_a_zap_yields_unflushed,
    two_invalidations_one_page,
    skip_flush_before_yield,
    "still usable"
);
protocol!(
    loom_flush_requests_reach_vcpus_entering_or_in_guest_mode,
    loom_flush_request_missed_without_waiting_for_kicked_vcpus,
    flush_vs_guest_entry,
    skip_request_wait,
    "already changed"
);

/// (l) A vCPU's cached last-level table is used only while it cannot have
/// been freed: vCPU 0 caches the table of a 2 MiB region (an instruction
/// fetch with the NX mitigation on, so its faults there stay 4 KiB), then
/// faults there again while NX recovery zaps that table and vCPU 1 faults
/// elsewhere, taking table pages the host may hand out again. A fault must
/// never write into the table where it now serves other gfns.
fn walk_cache_vs_table_reuse(knobs: GuardKnobs) {
    let host = TestHost::new();
    let vm = Vm::new(
        VmConfig {
            knobs,
            nx_huge_pages: true,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    let mb2 = 2 << 20;
    for (slot, at, size) in [(0, 0, mb2), (1, mb2, 2 * mb2)] {
        vm.set_user_memory_region(UserMemoryRegion {
            slot,
            flags: 0,
            guest_phys_addr: GPA + at,
            memory_size: size,
            userspace_addr: HVA + at,
        })
        .unwrap();
    }
    // Region 0 is one huge host page, so recovery could map it huge; the
    // rest 4 KiB pages.
    host.set_host_level(vmmu::Level::M2);
    let mut vcpu0 = vm.create_vcpu(0).unwrap();
    vcpu0.prepare_entry().unwrap();
    assert_eq!(
        vcpu0.page_fault(Gpa(GPA + 4096), ErrorCode::FETCH).unwrap(),
        RetPf::Fixed
    );
    host.set_host_level(vmmu::Level::K4);
    let mut vcpu1 = vm.create_vcpu(1).unwrap();
    vcpu1.prepare_entry().unwrap();
    let t = thread::spawn(move || {
        let _ = vcpu0.page_fault(Gpa(GPA + 2 * 4096), ErrorCode::FETCH);
        vcpu0
    });
    vm.recover_nx_huge_pages(1);
    // (Not the entry vCPU 0 faults on: a stale walk must find it empty.)
    for at in [mb2, 2 * mb2] {
        let _ = vcpu1.page_fault(Gpa(GPA + at + 5 * 4096), ErrorCode::empty());
    }
    let vcpu0 = t.join().unwrap();
    for (gfn, level, spte) in vm.mappings(0) {
        if level != vmmu::Level::K4 || !spte.is_shadow_present() {
            continue;
        }
        let hva = Hva(HVA + gfn.gpa().0 - GPA);
        let want = host.lookup(hva).map(|m| m.0);
        assert_eq!(
            Some(spte.pfn()),
            want,
            "gfn {gfn:?} maps the frame of another gfn"
        );
    }
    drop((vcpu0, vcpu1));
    drop(vm);
    if let Some(pfn) = host.memory.freed_page_written() {
        panic!("table page {pfn:?} was written after it was freed");
    }
    assert_eq!(host.memory.allocated(), 0);
}

#[test]
fn loom_flush_request_missed_when_entry_ignores_requests() {
    let knobs = GuardKnobs {
        enter_without_request_check: true,
        ..GuardKnobs::default()
    };
    let msg = model_finds_violation(move || flush_vs_guest_entry(knobs));
    assert!(msg.contains("already changed"), "{msg}");
}

protocol!(
    loom_conversion_is_atomic_with_respect_to_faults,
    loom_conversion_missed_with_a_second_sequence_snapshot,
    conversion_vs_shared_fault,
    second_seq_snapshot,
    "survived the conversion"
);
protocol!(
    loom_zap_never_loses_hardware_dirty_bit,
    loom_zap_loses_dirty_bit_with_plain_store,
    zap_vs_hardware_dirty,
    nonatomic_zap,
    "lost it"
);
protocol!(
    loom_fast_path_never_rewrites_a_changed_entry,
    loom_fast_path_plain_store_resurrects_zapped_entry,
    fast_path_vs_zap,
    fast_path_plain_store,
    "survived the invalidation"
);
protocol!(
    loom_memslot_install_waits_for_invalidation_end,
    loom_memslot_install_without_wait_breaks_pairing,
    install_vs_notifier,
    skip_install_wait,
    "between start and end",
    "unbalanced"
);
protocol!(
    loom_punch_hole_frees_before_its_invalidation_ends,
    loom_punch_hole_freeing_after_the_end_leaves_a_freed_page_mapped,
    punch_vs_private_fault,
    free_after_gmem_invalidation,
    "still mapped"
);
protocol!(
    loom_write_protect_never_leaves_an_entry_writable,
    loom_write_protect_giving_up_on_a_lost_race_leaves_it_writable,
    write_protect_vs_hardware_dirty,
    write_protect_skips_lost_race,
    "still writable"
);
protocol!(
    loom_ring_reset_never_leaves_a_writable_page_unlogged,
    loom_fast_path_pushing_before_the_write_permission_loses_ring_writes,
    ring_reset_vs_fast_path,
    fast_path_marks_dirty_first,
    "no ring entry"
);
protocol!(
    loom_harvest_never_leaves_a_writable_page_unlogged,
    loom_fast_path_logging_before_the_write_permission_loses_writes,
    harvest_vs_fast_path,
    fast_path_marks_dirty_first,
    "not in the log"
);
protocol!(
    loom_a_cached_walk_never_writes_into_a_freed_table,
    loom_a_cached_walk_without_the_removal_check_writes_into_a_freed_table,
    walk_cache_vs_table_reuse,
    walk_cache_unchecked,
    "maps the frame of another gfn",
    "written after it was freed"
);
