//! The hardening rules: NX huge pages, huge-page fallbacks, refused calls that
//! change nothing, invalidation tokens, MMIO generation wrap, RCU frees during
//! long zaps, the lock-order checker, errnos and the fast path's limits.

use std::sync::Arc;

use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, FaultError, GfnRange, Gpa, HostFaultError, Hva, HvaRange, Level, MemFlags, RetPf,
    RootFilter, VcpuMmu, Vm, VmConfig,
};

mod common;
use common::*;

fn executable(s: vmmu::Spte) -> bool {
    s.raw() & vmmu::spte::ept::X != 0
}

#[test]
fn test_nx_huge_pages_read_and_write_faults_map_non_executable_huge_leaves() {
    let config = VmConfig {
        nx_huge_pages: true,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = huge_host_vm(config);
    for (page, ec) in [(512, ErrorCode::empty()), (1024, ErrorCode::WRITE)] {
        assert_eq!(vcpu.page_fault(gpa(page), ec).unwrap(), RetPf::Fixed);
        let (level, s) = leaf(&vm, page).unwrap();
        assert_eq!(level, Level::M2);
        assert!(!executable(s), "huge leaf {s:?} is executable");
    }
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_nx_huge_pages_fetch_splits_and_maps_executed_page_at_4k() {
    let config = VmConfig {
        nx_huge_pages: true,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = huge_host_vm(config);
    vcpu.page_fault(gpa(512), ErrorCode::empty()).unwrap();
    assert_eq!(leaf(&vm, 512).unwrap().0, Level::M2);
    // The guest executes from the huge page: the hardware reports an exec
    // violation on the non-executable leaf. Splitting it makes the 4 KiB children
    // executable again, so the target entry already allows the fetch (KVM
    // answers spurious there too).
    let r = vcpu
        .page_fault(gpa(513), ErrorCode::FETCH | ErrorCode::PRESENT)
        .unwrap();
    assert!(matches!(r, RetPf::Fixed | RetPf::Spurious), "{r:?}");
    let (level, s) = leaf(&vm, 513).unwrap();
    assert_eq!(level, Level::K4);
    assert!(executable(s));
    assert_eq!(vm.stats().huge_splits, 1);
    // A fetch in a region never mapped maps 4 KiB straight away.
    assert_eq!(
        vcpu.page_fault(gpa(1024 + 7), ErrorCode::FETCH).unwrap(),
        RetPf::Fixed
    );
    let (level, s) = leaf(&vm, 1024 + 7).unwrap();
    assert_eq!(level, Level::K4);
    assert!(executable(s));
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_without_nx_huge_pages_huge_leaves_are_executable() {
    let (host, vm, mut vcpu) = huge_host_vm(VmConfig::default());
    vcpu.page_fault(gpa(512), ErrorCode::FETCH).unwrap();
    let (level, s) = leaf(&vm, 512).unwrap();
    assert_eq!(level, Level::M2);
    assert!(executable(s));
    teardown(host, vm, vec![vcpu]);
}

/// A host that claims 1 GiB mappings over frames aligned only for 2 MiB.
struct MisalignedHost {
    inner: Arc<TestHost>,
}

const SHIFT_PFN: u64 = 512;

impl vmmu::PrimaryMmu for MisalignedHost {
    fn faultin(
        &self,
        hva: Hva,
        req: vmmu::FaultinRequest,
    ) -> Result<vmmu::HostPfn, HostFaultError> {
        let mut r = self.inner.faultin(hva, req)?;
        r.pfn = vmmu::Pfn(r.pfn.0 + SHIFT_PFN);
        r.level = Level::G1;
        Ok(r)
    }
    fn release(&self, pfn: vmmu::Pfn, w: bool) {
        self.inner.release(vmmu::Pfn(pfn.0 - SHIFT_PFN), w)
    }
    fn mapping_level(&self, _hva: Hva) -> Level {
        Level::G1
    }
}

#[test]
fn test_huge_level_falls_back_one_level_when_frame_is_misaligned() {
    let host = TestHost::new();
    host.set_host_level(Level::G1);
    let mut ops = host.ops();
    ops.primary = Arc::new(MisalignedHost {
        inner: host.clone(),
    });
    let vm = Vm::new(VmConfig::default(), ops).unwrap();
    vm.set_user_memory_region(region(0, GPA, 1 << 30, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(leaf(&vm, 3).unwrap().0, Level::M2, "2M, not 4K");
    assert_eq!(vm.stats().leaves_mapped_2m, 1);
    teardown(host, vm, vec![vcpu]);
}

/// A host whose own mapping is 2 MiB over frames that happen to line up for
/// 1 GiB: nothing but the host's level stops a 1 GiB leaf.
struct TwoMegHost {
    inner: Arc<TestHost>,
}

impl vmmu::PrimaryMmu for TwoMegHost {
    fn faultin(
        &self,
        hva: Hva,
        req: vmmu::FaultinRequest,
    ) -> Result<vmmu::HostPfn, HostFaultError> {
        let mut r = self.inner.faultin(hva, req)?;
        r.level = Level::M2;
        Ok(r)
    }
    fn release(&self, pfn: vmmu::Pfn, w: bool) {
        self.inner.release(pfn, w)
    }
    fn mapping_level(&self, _hva: Hva) -> Level {
        Level::M2
    }
}

#[test]
fn test_the_hosts_2m_level_caps_a_slot_and_frame_that_allow_1g() {
    let host = TestHost::new();
    host.set_host_level(Level::G1);
    let mut ops = host.ops();
    ops.primary = Arc::new(TwoMegHost {
        inner: host.clone(),
    });
    let vm = Vm::new(VmConfig::default(), ops).unwrap();
    vm.set_user_memory_region(region(0, GPA, 1 << 30, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(leaf(&vm, 3).unwrap().0, Level::M2, "2M, not 1G");
    assert_eq!(vm.stats().leaves_mapped_2m, 1);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_smm_on_a_vm_without_smm_address_space_is_refused_and_changes_nothing() {
    let config = VmConfig {
        address_spaces: 1,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    let root = vcpu.root_id();
    let err = vcpu.set_smm(true).unwrap_err();
    assert_eq!(err, vmmu::VmError::SmmUnsupported { spaces: 1 });
    assert_eq!(err.errno(), vmmu::errno::EINVAL);
    assert!(!vcpu.role().smm);
    assert!(!vcpu.has_requests(), "a refused call makes no request");
    vcpu.prepare_entry().unwrap();
    assert_eq!(vcpu.root_id(), root);
    // Faults keep working in address space 0.
    assert_eq!(
        vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    // Leaving SMM when not in it is a no-op, not an error.
    vcpu.set_smm(false).unwrap();
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_calls_naming_a_missing_address_space_or_an_inverted_range_are_refused() {
    let config = VmConfig {
        address_spaces: 1,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    let before = (vm.mappings(0), vm.roots(), vm.stats().tlb_flush_remote);
    let all = GfnRange::new(gpa(0).gfn(), gpa(64).gfn());
    let inverted = GfnRange::new(gpa(64).gfn(), gpa(0).gfn());
    let bad_as = vmmu::VmError::InvalidAddressSpace {
        as_id: 1,
        spaces: 1,
    };
    assert_eq!(vm.zap_gfn_range(1, all), Err(bad_as.clone()));
    assert_eq!(vm.write_protect_gfn_range(1, all), Err(bad_as.clone()));
    assert_eq!(vm.clear_dirty_gfn_range(1, all), Err(bad_as.clone()));
    assert_eq!(
        vm.invalidate_roots(RootFilter::AddressSpace(1)),
        Err(bad_as)
    );
    for r in [
        vm.zap_gfn_range(0, inverted),
        vm.write_protect_gfn_range(0, inverted),
        vm.clear_dirty_gfn_range(0, inverted).map(|_| ()),
    ] {
        let e = r.unwrap_err();
        assert!(matches!(e, vmmu::VmError::InvalidRange { .. }), "{e:?}");
        assert_eq!(e.errno(), vmmu::errno::EINVAL);
    }
    assert_eq!(
        (vm.mappings(0), vm.roots(), vm.stats().tlb_flush_remote),
        before,
        "refused calls changed the VM"
    );
    assert!(matches!(
        vm.create_vcpu(vmmu::vm::MAX_VCPU_IDS),
        Err(vmmu::VmError::InvalidVcpuId { .. })
    ));
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_smm_round_trip_before_entry_never_reloads_the_valid_root() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let normal = vcpu.root_id();
    let loads = vcpu.stats().root_loads;
    // Enter and leave SMM before the next entry: the normal root comes straight
    // back from the previous-roots cache.
    vcpu.set_smm(true).unwrap();
    vcpu.set_smm(false).unwrap();
    let e = vcpu.prepare_entry().unwrap();
    assert_eq!(vcpu.root_id(), normal);
    assert_eq!(
        vcpu.stats().root_loads,
        loads,
        "a valid current root was reloaded"
    );
    assert!(e.flush_tlb, "a role switch still flushes the TLB");
    // And a real switch does load one.
    vcpu.set_smm(true).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(vcpu.stats().root_loads, loads + 1);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_invalidation_token_pairs_start_and_end_even_when_dropped() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let range = HvaRange::new(hva(0), hva(4));
    let a = vm.invalidate_range_start(range);
    let b = vm.invalidate_range_start(range);
    assert_eq!(a.range(), range);
    assert_eq!(vm.invalidations_in_progress(), 2);
    a.end();
    assert_eq!(vm.invalidations_in_progress(), 1);
    // A host that forgets to call end still ends the invalidation (an unwinding
    // host thread, an early return).
    drop(b);
    assert_eq!(vm.invalidations_in_progress(), 0);
    assert_eq!(
        vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed,
        "faults stop retrying once every invalidation ended"
    );
    // A range that overlaps no slot pairs up too, without touching the count.
    let c = vm.invalidate_range_start(HvaRange::new(Hva(1 << 40), Hva(1 << 39)));
    assert_eq!(vm.invalidations_in_progress(), 0);
    c.end();
    assert_eq!(vm.empty_invalidation_pairs(), 0);
    teardown(host, vm, vec![vcpu]);
}

/// A fault that runs right after a memslot update stored a generation whose
/// MMIO slice wrapped (a 3-bit slice: address space 0 wraps every 4 updates).
/// Returns what a misconfiguration fault on a gfn that now has a slot answered.
fn fault_at_generation_wrap(knobs: vmmu::GuardKnobs) -> RetPf {
    use std::sync::mpsc;
    use std::sync::Mutex;
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<RetPf>();
    let answer: Arc<Mutex<Option<RetPf>>> = Arc::default();
    let chan = Mutex::new((go_tx, done_rx));
    let seen = answer.clone();
    let hook = move |p: vmmu::HookPoint| {
        if let vmmu::HookPoint::MemslotGenerationPublished { generation, .. } = p {
            if generation & 7 == 0 {
                // Let the vCPU fault inside the window, and wait for it.
                let c = chan.lock().unwrap();
                c.0.send(()).unwrap();
                *seen.lock().unwrap() = c.1.recv().ok();
            }
        }
    };
    let host = TestHost::new();
    let config = VmConfig {
        knobs: vmmu::GuardKnobs {
            mmio_gen_bits: 3,
            ..knobs
        },
        hooks: vmmu::TestHooks {
            on: Some(Arc::new(hook)),
        },
        ..VmConfig::default()
    };
    let vm = Vm::new(config, host.ops()).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    let hole = Gpa(3 * GPA);
    // Generation 0: the hole is cached as MMIO.
    assert_eq!(
        vcpu.page_fault(hole, ErrorCode::empty()).unwrap(),
        RetPf::Emulate
    );
    assert_eq!(vm.stats().mmio_sptes_created, 1);
    // Three creates elsewhere (generations 2, 4, 6) zap nothing; the entry stays
    // (a fault on it now would refresh it with the current generation).
    for i in 0..3u32 {
        let gpa = GPA + i as u64 * SIZE;
        vm.set_user_memory_region(region(10 + i, gpa, SIZE, HVA + i as u64 * SIZE, 0))
            .unwrap();
    }
    let t = std::thread::spawn(move || {
        go_rx.recv().unwrap();
        let r = vcpu.page_fault(hole, ErrorCode::RSVD).unwrap();
        done_tx.send(r).unwrap();
        vcpu
    });
    // The fourth update (generation 8, slice 0) gives the hole a slot.
    vm.set_user_memory_region(region(1, 3 * GPA, 1 << 20, 2 * HVA, 0))
        .unwrap();
    let mut vcpu = t.join().unwrap();
    let r = answer
        .lock()
        .unwrap()
        .expect("the hook ran at the wrapping update");
    // Afterwards the gfn maps memory.
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(hole, ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    teardown(host, vm, vec![vcpu]);
    r
}

#[test]
fn test_mmio_generation_wrap_is_zapped_before_the_generation_is_visible() {
    let r = fault_at_generation_wrap(vmmu::GuardKnobs::default());
    assert_ne!(
        r,
        RetPf::Emulate,
        "emulated MMIO for a gfn that has a memslot"
    );
}

#[test]
fn test_mmio_generation_wrap_zapped_after_publish_emulates_a_memory_gfn() {
    // The order before the fix: the check above must be able to fail.
    let knobs = vmmu::GuardKnobs {
        zap_after_publish: true,
        ..vmmu::GuardKnobs::default()
    };
    assert_eq!(fault_at_generation_wrap(knobs), RetPf::Emulate);
}

/// Map 1 GiB at 4 KiB, then delete its slot with the zap yielding `mmu_lock` at
/// every step (as if a writer always waited). Returns the peak number of table
/// pages retired but not yet freed during the delete, and how many tables the
/// delete retired.
fn pending_free_peak_during_1g_zap(knobs: vmmu::GuardKnobs) -> (u64, u64) {
    let host = TestHost::new();
    let vm = Vm::new(
        VmConfig {
            knobs: vmmu::GuardKnobs {
                yield_every_step: true,
                ..knobs
            },
            max_level: Level::K4,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    vm.set_user_memory_region(region(0, GPA, 1 << 30, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    for p in 0..(1u64 << 18) {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    assert_eq!(vm.stats().present(Level::K4), 1 << 18);
    let freed_before = vm.stats().tables_freed;
    vm.reset_pending_free_peak();
    vm.set_user_memory_region(region(0, GPA, 0, HVA, 0))
        .unwrap();
    let peak = vm.tables_pending_free().1;
    let retired = vm.stats().tables_freed - freed_before;
    vcpu.prepare_entry().unwrap();
    teardown(host, vm, vec![vcpu]);
    (peak, retired)
}

#[test]
fn test_long_zap_lets_retired_tables_be_freed_while_it_runs() {
    let (peak, retired) = pending_free_peak_during_1g_zap(vmmu::GuardKnobs::default());
    eprintln!("1 GiB zap: {retired} tables retired, peak {peak} unfreed at once");
    assert!(retired >= 512);
    assert!(
        peak <= 8,
        "{peak} of {retired} retired tables were unfreed at once"
    );
}

#[test]
fn test_long_zap_pinned_across_yields_holds_back_every_free() {
    // The behaviour before the fix: the check above must be able to fail.
    let knobs = vmmu::GuardKnobs {
        rcu_pinned_across_yields: true,
        ..vmmu::GuardKnobs::default()
    };
    let (peak, retired) = pending_free_peak_during_1g_zap(knobs);
    eprintln!("1 GiB zap, pinned: {retired} tables retired, peak {peak} unfreed at once");
    assert!(peak >= retired, "peak {peak}, retired {retired}");
}

/// A host whose fault-in handler changes memslots: `slots_lock` (whose holder
/// waits for SRCU readers) taken inside a vCPU fault, which holds the SRCU read
/// side. A real deadlock when two vCPUs race a memslot update; the lock-order
/// checker reports it the first time it happens.
#[cfg(debug_assertions)]
struct MemslotUpdatingHost {
    inner: Arc<TestHost>,
    vm: std::sync::OnceLock<Vm>,
}

#[cfg(debug_assertions)]
impl vmmu::PrimaryMmu for MemslotUpdatingHost {
    fn faultin(
        &self,
        hva: Hva,
        req: vmmu::FaultinRequest,
    ) -> Result<vmmu::HostPfn, HostFaultError> {
        if let Some(vm) = self.vm.get() {
            let _ = vm.set_user_memory_region(region(9, 16 * GPA, 4096, 16 * HVA, 0));
        }
        self.inner.faultin(hva, req)
    }
    fn release(&self, pfn: vmmu::Pfn, w: bool) {
        self.inner.release(pfn, w)
    }
    fn mapping_level(&self, hva: Hva) -> Level {
        self.inner.mapping_level(hva)
    }
}

#[cfg(debug_assertions)]
#[test]
fn test_lock_order_checker_reports_a_host_callback_that_takes_slots_lock_in_a_fault() {
    let host = TestHost::new();
    let bad = Arc::new(MemslotUpdatingHost {
        inner: host.clone(),
        vm: std::sync::OnceLock::new(),
    });
    let mut ops = host.ops();
    ops.primary = bad.clone();
    let vm = Vm::new(VmConfig::default(), ops).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let _ = bad.vm.set(vm.clone());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = vcpu.page_fault(gpa(1), ErrorCode::WRITE);
    }));
    let err = r.expect_err("the checker did not report slots_lock inside a fault");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("acquiring kvm->slots_lock") && msg.contains("while holding kvm->srcu (read)"),
        "{msg}"
    );
}

#[test]
fn test_refusals_and_exits_map_to_kvm_errnos() {
    use vmmu::errno::*;
    use vmmu::{FaultError, MemslotError, TableMemoryError, VmError};
    let gpa = Gpa(0x1000);
    let host = |cause| FaultError::Host {
        gpa,
        hva: Hva(0),
        cause,
    };
    for (e, want) in [
        (
            FaultError::MemoryFault {
                gpa,
                size: 4096,
                private: true,
            },
            EFAULT,
        ),
        (host(HostFaultError::ReadOnly), EFAULT),
        (host(HostFaultError::NotMapped), EFAULT),
        (host(HostFaultError::OutOfMemory), EFAULT),
        (host(HostFaultError::HwPoison), EHWPOISON),
        (FaultError::NoMemory(TableMemoryError::OutOfMemory), ENOMEM),
    ] {
        assert_eq!(e.errno(), want, "{e:?}");
    }
    assert_eq!(VmError::VcpuExists(1).errno(), EEXIST);
    assert_eq!(
        VmError::Memory(TableMemoryError::OutOfMemory).errno(),
        ENOMEM
    );
    assert_eq!(VmError::InvalidConfig("x").errno(), EINVAL);
    let overlap = MemslotError::Overlap {
        slot: 1,
        start: 0,
        end: 1,
        other: 2,
    };
    assert_eq!(overlap.errno(), EEXIST);
    assert_eq!(MemslotError::NoSuchSlot { slot: 3 }.errno(), EINVAL);
}

#[test]
fn test_fetch_and_write_together_need_both_permissions() {
    // A fault that is both an instruction fetch and a write (the error code a
    // guest gets for neither being allowed) is not satisfied by an executable
    // read-only leaf.
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let pfn = host.fresh_pfn();
    host.set(hva(6), pfn, false);
    assert_eq!(
        vcpu.page_fault(gpa(6), ErrorCode::FETCH).unwrap(),
        RetPf::Fixed
    );
    let r = vcpu.page_fault(
        gpa(6),
        ErrorCode::FETCH | ErrorCode::WRITE | ErrorCode::PRESENT,
    );
    assert!(
        matches!(
            r,
            Err(FaultError::Host {
                cause: HostFaultError::ReadOnly,
                ..
            })
        ),
        "a write+fetch on a read-only page was answered {r:?}"
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_frames_are_released_dirty_only_when_mapped_writable() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    // A read of a read-only host page: mapped, but not writable.
    let pfn = host.fresh_pfn();
    host.set(hva(8), pfn, false);
    vcpu.page_fault(gpa(8), ErrorCode::empty()).unwrap();
    assert_eq!(
        host.released_writable(),
        0,
        "read-only mapping released dirty"
    );
    // A fault that retries maps nothing: released clean too.
    let range = HvaRange::new(hva(9), hva(10));
    let inv = vm.invalidate_range_start(range);
    assert_eq!(
        vcpu.page_fault(gpa(9), ErrorCode::WRITE).unwrap(),
        RetPf::Retry
    );
    inv.end();
    assert_eq!(
        host.released_writable(),
        0,
        "a retried fault released dirty"
    );
    // A write fault maps writable: released dirty.
    vcpu.page_fault(gpa(10), ErrorCode::WRITE).unwrap();
    assert_eq!(host.released_writable(), 1);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fast_path_is_tried_only_where_it_can_help() {
    // KVM's page_fault_can_be_fast: a write to a present entry (maybe
    // write-protected), or with A/D disabled a fault on a not-present entry
    // (maybe access-tracked); never a first touch with A/D on, a read of a
    // present entry, an MMIO misconfiguration or a private fault.
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let attempts = |v: &VcpuMmu| v.stats().fast_path_attempts;
    let a0 = attempts(&vcpu);
    vcpu.page_fault(gpa(1), ErrorCode::WRITE).unwrap();
    vcpu.page_fault(gpa(2), ErrorCode::empty()).unwrap();
    vcpu.page_fault(gpa(2), ErrorCode::PRESENT).unwrap();
    let _ = vcpu.page_fault(
        gpa(3),
        ErrorCode::PRESENT | ErrorCode::WRITE | ErrorCode::PRIVATE,
    );
    vcpu.page_fault(Gpa(3 * GPA), ErrorCode::RSVD).unwrap();
    assert_eq!(
        attempts(&vcpu),
        a0,
        "the fast path was tried where it cannot help"
    );
    vcpu.page_fault(gpa(2), ErrorCode::PRESENT | ErrorCode::WRITE)
        .unwrap();
    assert_eq!(
        attempts(&vcpu),
        a0 + 1,
        "a present write tries the fast path"
    );
    teardown(host, vm, vec![vcpu]);
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    let a0 = attempts(&vcpu);
    vcpu.page_fault(gpa(1), ErrorCode::empty()).unwrap();
    assert_eq!(
        attempts(&vcpu),
        a0 + 1,
        "without A/D a not-present fault tries it"
    );
    vcpu.page_fault(gpa(1), ErrorCode::PRESENT).unwrap();
    assert_eq!(attempts(&vcpu), a0 + 1, "a present read never does");
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fast_path_leaves_a_write_it_cannot_allow_to_the_slow_path() {
    // A/D off: a page the host maps read-only is access-tracked; a write to it
    // must not be "fixed" by restoring read access: the slow path answers
    // (EFAULT, the host refuses the write).
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    let pfn = host.fresh_pfn();
    host.set(hva(4), pfn, false);
    vcpu.page_fault(gpa(4), ErrorCode::empty()).unwrap();
    assert!(vm.clear_young(HvaRange::new(hva(4), hva(5))));
    assert!(leaf(&vm, 4).unwrap().1.is_access_tracked());
    let r = vcpu.page_fault(gpa(4), ErrorCode::WRITE);
    assert!(
        matches!(
            r,
            Err(FaultError::Host {
                cause: HostFaultError::ReadOnly,
                ..
            })
        ),
        "{r:?}"
    );
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_fast_path_logs_only_writes() {
    // Dirty logging with A/D off: restoring an access-tracked, write-protected
    // entry for a read must not mark the page dirty.
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    vcpu.page_fault(gpa(5), ErrorCode::empty()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, MemFlags::LOG_DIRTY_PAGES.bits()))
        .unwrap();
    assert!(vm.clear_young(HvaRange::new(hva(5), hva(6))));
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(5), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    let slots = vm.memslots(0).unwrap();
    let bitmap = slots.by_id(0).unwrap().dirty_bitmap().unwrap();
    assert!(!bitmap.test(5), "a read marked the page dirty");
    // The write that follows is logged.
    vcpu.page_fault(gpa(5), ErrorCode::WRITE | ErrorCode::PRESENT)
        .unwrap();
    assert!(bitmap.test(5));
    teardown(host, vm, vec![vcpu]);
}
