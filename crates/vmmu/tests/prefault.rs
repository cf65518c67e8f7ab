//! `KVM_PRE_FAULT_MEMORY` on the core: validation, the selftest's three calls,
//! private pre-faults, and the memslot deleted under a call.

use std::sync::{mpsc, Arc, Mutex};

use vmmu::errno::{EAGAIN, EFAULT, EINVAL, ENOENT};
use vmmu::testing::TestHost;
use vmmu::{
    HookPoint, Level, PreFaultError, PreFaultRange, RetPf, TestHooks, UserMemoryRegion, VcpuMmu,
    Vm, VmConfig, VmType,
};

mod common;
use common::*;

/// The selftest's slot: 2 MiB + 4 KiB at a 2 MiB-aligned gpa (slot 10).
const BASE: u64 = 4 << 30;
const SLOT_SIZE: u64 = (2 << 20) + 4096;

fn slot10() -> UserMemoryRegion {
    region(10, BASE, SLOT_SIZE, HVA, 0)
}

fn prefault_vm(vm_type: VmType, hooks: TestHooks) -> (Arc<TestHost>, Vm, VcpuMmu) {
    let host = TestHost::new();
    host.set_host_level(Level::M2);
    let vm = Vm::new(
        VmConfig {
            vm_type,
            hooks,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    vm.set_user_memory_region(slot10()).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}

fn range(gpa: u64, size: u64) -> PreFaultRange {
    PreFaultRange {
        gpa,
        size,
        flags: 0,
    }
}

#[test]
fn test_pre_fault_refuses_bad_ranges_and_changes_nothing() {
    let (host, vm, mut vcpu) = prefault_vm(VmType::Default, TestHooks::default());
    for (r, what) in [
        (
            PreFaultRange {
                flags: 1,
                ..range(BASE, 4096)
            },
            "flags",
        ),
        (range(BASE + 1, 4096), "unaligned gpa"),
        (range(BASE, 4095), "unaligned size"),
        (range(BASE, 0), "empty"),
        (range(u64::MAX - 4095, 8192), "wraps"),
    ] {
        let mut given = r;
        let e = vcpu.pre_fault_memory(&mut given).unwrap_err();
        assert_eq!(e.errno(), EINVAL, "{what}: {e:?}");
        assert_eq!(given, r, "{what}: a refused call moved the range");
    }
    assert!(vm.mappings(0).is_empty());
    assert_eq!(vm.stats().faults, 0);
    teardown(host, vm, vec![vcpu]);
}

/// The selftest's three calls, on each VM type it runs on.
#[test]
fn test_pre_fault_maps_the_slot_and_stops_at_its_end_with_enoent() {
    for (vm_type, private) in [
        (VmType::Default, false),
        (VmType::SwProtected, false),
        (VmType::SwProtected, true),
    ] {
        let (host, vm, mut vcpu) = prefault_vm(vm_type, TestHooks::default());
        let file = private.then(|| {
            let file = vm.create_guest_memfd(SLOT_SIZE, 0).unwrap();
            vm.set_user_memory_region(UserMemoryRegion {
                memory_size: 0,
                ..slot10()
            })
            .unwrap();
            vm.set_user_memory_region2(
                UserMemoryRegion {
                    flags: 1 << 2,
                    ..slot10()
                },
                Some(&file),
                0,
            )
            .unwrap();
            vm.set_memory_attributes(BASE, SLOT_SIZE, vmmu::MEMORY_ATTRIBUTE_PRIVATE, 0)
                .unwrap();
            file
        });
        let ctx = format!("{vm_type:?} private {private}");

        // The whole 2 MiB: done, nothing left. A shared range on a 2 MiB host page
        // is one 2 MiB leaf (one step); private memory is mapped at 4 KiB.
        let mut r = range(BASE, 2 << 20);
        vcpu.pre_fault_memory(&mut r).unwrap();
        assert_eq!(r, range(BASE + (2 << 20), 0), "{ctx}");
        let leaves = vm.mappings(0);
        if private {
            assert_eq!(leaves.len(), 512, "{ctx}");
            assert_eq!(vm.stats().private_faults, 512, "{ctx}");
        } else {
            assert_eq!(leaves.len(), 1, "{ctx}");
            assert_eq!(leaves[0].1, Level::M2, "{ctx}");
            assert_eq!(vm.stats().faults, 1, "{ctx}: one step per 2 MiB leaf");
        }

        // 8 KiB from 2 MiB: the first page maps (progress, so success) and the
        // call stops at the second, which has no slot; asking again for what is
        // left is ENOENT with nothing moved.
        let mut r = range(BASE + (2 << 20), 8192);
        vcpu.pre_fault_memory(&mut r).unwrap();
        assert_eq!(r, range(BASE + (2 << 20) + 4096, 4096), "{ctx}");
        let e = vcpu.pre_fault_memory(&mut r).unwrap_err();
        assert_eq!(e.errno(), ENOENT, "{ctx}: {e:?}");
        assert_eq!(r, range(BASE + (2 << 20) + 4096, 4096), "{ctx}");

        // The page past the slot alone: ENOENT straight away.
        let mut r = range(BASE + (2 << 20) + 4096, 4096);
        let e = vcpu.pre_fault_memory(&mut r).unwrap_err();
        assert!(matches!(e, PreFaultError::NoMemslot(_)), "{ctx}: {e:?}");

        // What was pre-faulted is there for the guest: its accesses are spurious.
        let ec = if private {
            vmmu::ErrorCode::PRIVATE
        } else {
            vmmu::ErrorCode::empty()
        };
        let r = vcpu.page_fault(vmmu::Gpa(BASE + 4096), ec).unwrap();
        assert_eq!(r, RetPf::Spurious, "{ctx}");
        drop(file);
        teardown(host, vm, vec![vcpu]);
    }
}

#[test]
fn test_private_pre_fault_without_guest_memfd_is_a_memory_fault() {
    let (host, vm, mut vcpu) = prefault_vm(VmType::SwProtected, TestHooks::default());
    vm.set_memory_attributes(BASE, 4096, vmmu::MEMORY_ATTRIBUTE_PRIVATE, 0)
        .unwrap();
    let mut r = range(BASE, 8192);
    let e = vcpu.pre_fault_memory(&mut r).unwrap_err();
    assert_eq!(e.errno(), EFAULT, "{e:?}");
    assert!(
        matches!(
            e,
            PreFaultError::Fault(vmmu::FaultError::MemoryFault { private: true, .. })
        ),
        "{e:?}"
    );
    assert_eq!(r, range(BASE, 8192));
    assert!(vm.mappings(0).is_empty());
    teardown(host, vm, vec![vcpu]);
}

/// A pre-fault that runs while slot 10 is marked invalid (its delete published
/// the invalid copy and has not removed it yet) answers EAGAIN, not a spin and
/// not a mapping; once the delete is done the gpa is ENOENT, and once the slot is
/// back the call completes.
#[test]
fn test_pre_fault_while_the_slot_is_being_deleted_is_eagain_then_completes() {
    let (paused_tx, paused_rx) = mpsc::channel::<()>();
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let armed = Arc::new(Mutex::new(false));
    let hook_state = Arc::new(Mutex::new((paused_tx, resume_rx)));
    let hooks = {
        let armed = armed.clone();
        TestHooks {
            on: Some(Arc::new(move |p: HookPoint| {
                let HookPoint::MemslotGenerationPublished { .. } = p else {
                    return;
                };
                let mut armed = armed.lock().unwrap();
                if *armed {
                    // Pause only at the first publication of the delete (the
                    // invalid copy).
                    *armed = false;
                    let (paused, resume) = &*hook_state.lock().unwrap();
                    paused.send(()).unwrap();
                    resume.recv().unwrap();
                }
            })),
        }
    };
    let (host, vm, mut vcpu) = prefault_vm(VmType::Default, hooks);
    *armed.lock().unwrap() = true;
    let deleter = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            vm.set_user_memory_region(UserMemoryRegion {
                memory_size: 0,
                ..slot10()
            })
            .unwrap();
        })
    };
    paused_rx.recv().unwrap();
    // On its own thread, so a call that spins instead of answering fails the
    // test (after releasing the delete, which lets the spin end) instead of
    // hanging it.
    let (done_tx, done_rx) = mpsc::channel();
    let caller = std::thread::spawn(move || {
        let mut r = range(BASE, 2 << 20);
        let res = vcpu.pre_fault_memory(&mut r);
        done_tx.send((res, r)).unwrap();
        vcpu
    });
    let answer = done_rx.recv_timeout(std::time::Duration::from_secs(10));
    resume_tx.send(()).unwrap();
    deleter.join().unwrap();
    let mut vcpu = caller.join().unwrap();
    let (res, mut r) = answer.expect("the pre-fault spun while its memslot was invalid");
    let e = res.unwrap_err();
    assert_eq!(e.errno(), EAGAIN, "{e:?}");
    assert_eq!(r, range(BASE, 2 << 20));
    assert!(vm.mappings(0).is_empty());

    let e = vcpu.pre_fault_memory(&mut r).unwrap_err();
    assert_eq!(e.errno(), ENOENT, "{e:?}");
    vm.set_user_memory_region(slot10()).unwrap();
    vcpu.pre_fault_memory(&mut r).unwrap();
    assert_eq!(r.size, 0);
    teardown(host, vm, vec![vcpu]);
}

/// The selftest's race, free-running: a thread deletes and recreates the slot
/// while the vCPU pre-faults. Every call makes progress or fails, never both;
/// EAGAIN and ENOENT are the only errors; retrying completes once the slot is
/// back.
#[test]
fn test_pre_fault_racing_slot_delete_makes_progress_or_fails_never_both() {
    let (host, vm, mut vcpu) = prefault_vm(VmType::Default, TestHooks::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cycles = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let churn = {
        let (vm, stop, cycles) = (vm.clone(), stop.clone(), cycles.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                vm.set_user_memory_region(UserMemoryRegion {
                    memory_size: 0,
                    ..slot10()
                })
                .unwrap();
                vm.set_user_memory_region(slot10()).unwrap();
                cycles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let mut errors = std::collections::BTreeMap::<i32, u64>::new();
    let mut calls = 0u64;
    // Until the slot has cycled often enough (every delete zaps what the calls
    // mapped, so the calls keep faulting), and at least 300 rounds.
    let mut round = 0;
    while round < 300 || cycles.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        round += 1;
        let mut r = range(BASE, 2 << 20);
        while r.size > 0 {
            let before = r;
            calls += 1;
            match vcpu.pre_fault_memory(&mut r) {
                Ok(()) => assert!(r.size < before.size, "success without progress"),
                Err(e) => {
                    assert_eq!(r, before, "an error with progress: {e:?}");
                    assert!([EAGAIN, ENOENT].contains(&e.errno()), "{e:?}");
                    *errors.entry(e.errno()).or_default() += 1;
                }
            }
        }
        // The guest's next entry handles what the deletes requested.
        vcpu.prepare_entry().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    eprintln!(
        "{round} rounds, {calls} calls, slot cycles {}, errors by errno {errors:?}",
        cycles.load(std::sync::atomic::Ordering::Relaxed)
    );
    teardown(host, vm, vec![vcpu]);
}

/// A step retries for as long as an invalidation covering its gpa is in
/// progress; a signal gets the caller out with EINTR and nothing moved, and the
/// call completes once the invalidation ends.
#[test]
fn test_pre_fault_spinning_on_an_invalidation_is_interrupted_by_a_signal() {
    let (host, vm, vcpu) = prefault_vm(VmType::Default, TestHooks::default());
    let inv = vm.invalidate_range_start(vmmu::HvaRange::new(
        vmmu::Hva(HVA),
        vmmu::Hva(HVA + SLOT_SIZE),
    ));
    let signal = vcpu.signal();
    let (done_tx, done_rx) = mpsc::channel();
    let caller = std::thread::spawn(move || {
        let mut vcpu = vcpu;
        let mut r = range(BASE, 2 << 20);
        let res = vcpu.pre_fault_memory(&mut r);
        done_tx.send((res, r)).unwrap();
        vcpu
    });
    // Still spinning after a while: nothing can be mapped under the invalidation.
    assert!(done_rx
        .recv_timeout(std::time::Duration::from_millis(100))
        .is_err());
    signal.raise();
    let (res, r) = done_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a signal did not stop the pre-fault");
    let mut vcpu = caller.join().unwrap();
    let e = res.unwrap_err();
    assert_eq!(e.errno(), vmmu::errno::EINTR, "{e:?}");
    assert_eq!(r, range(BASE, 2 << 20));
    assert!(vm.mappings(0).is_empty());
    inv.end();
    let mut r = range(BASE, 2 << 20);
    vcpu.pre_fault_memory(&mut r).unwrap();
    assert_eq!(r.size, 0);
    teardown(host, vm, vec![vcpu]);
}
