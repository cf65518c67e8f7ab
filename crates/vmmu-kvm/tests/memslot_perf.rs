//! memslot_perf_test's loops on the real `/dev/kvm`, when there is one
//! (otherwise the typed "unavailable" error is checked).

use std::time::Duration;

use vmmu_kvm::memslot_perf::kvm_memslot_perf;
use vmmu_kvm::{kvm_available, KvmError};

const LOOPS: [&str; 6] = [
    "map",
    "unmap",
    "unmap-chunked",
    "move-active",
    "move-inactive",
    "rw",
];

#[test]
fn test_kvm_memslot_perf_runs_every_loop_over_many_slots() {
    let budget = Duration::from_millis(10);
    if let Err(e) = kvm_available() {
        println!("no real KVM: {e}");
        let r = kvm_memslot_perf(10, &LOOPS, budget).unwrap_err();
        assert!(matches!(r, KvmError::Unavailable { .. }), "{r:?}");
        return;
    }
    let r = kvm_memslot_perf(64, &LOOPS, budget).unwrap();
    assert_eq!(r.slots, 64);
    let names: Vec<&str> = r.loops.iter().map(|l| l.name).collect();
    assert_eq!(names, LOOPS);
    for l in &r.loops {
        assert!(l.iterations >= 1 && l.ns > 0, "{l:?}");
    }
    // The inactive guest never writes the moved slot (an exit outside it
    // would have been an error).
    assert_eq!(r.loops[4].mmio, 0, "{r:?}");
}

#[test]
fn test_kvm_memslot_perf_refuses_bad_counts_and_loops() {
    let budget = Duration::from_millis(1);
    assert!(matches!(
        kvm_memslot_perf(1, &LOOPS, budget),
        Err(KvmError::BadConfig(_))
    ));
    if kvm_available().is_ok() {
        assert!(matches!(
            kvm_memslot_perf(10, &["sideways"], budget),
            Err(KvmError::BadConfig(_))
        ));
        // One test slot: nothing to move it past.
        assert!(matches!(
            kvm_memslot_perf(2, &["move-active"], budget),
            Err(KvmError::BadConfig(_))
        ));
    }
}
