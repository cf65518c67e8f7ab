//! Runs the demand-paging workload on the real `/dev/kvm` when there is one.
//!
//! Without a usable `/dev/kvm` the test says so and checks that the failure is the
//! typed "unavailable" error, so a broken setup never passes as a measurement.

use vmmu_kvm::{kvm_available, run_demand_paging, DemandPagingConfig, KvmError};

const BYTES: u64 = 64 << 20;
const PAGES: u64 = BYTES / 4096;

#[test]
fn test_demand_paging_one_vcpu_64m_touches_every_page_natively() {
    let cfg = DemandPagingConfig {
        vcpus: 1,
        bytes_per_vcpu: BYTES,
        host_thp: false,
    };
    if let Err(e) = kvm_available() {
        println!("skipping the real-KVM run: {e}");
        assert!(
            matches!(e, KvmError::Unavailable { .. }),
            "unexpected error: {e:?}"
        );
        let run = run_demand_paging(&cfg).unwrap_err();
        assert!(
            matches!(run, KvmError::Unavailable { .. }),
            "unexpected error: {run:?}"
        );
        return;
    }

    // The run itself fails with MarkerMismatch if any page lacks the guest's marker.
    let report = run_demand_paging(&cfg).unwrap();

    println!("{report:#?}");
    assert!(
        !report.emulated_guest,
        "guest was emulated: {:?}",
        report.warnings
    );
    for phase in [
        &report.first_touch_untouched_host,
        &report.first_touch_pretouched_host,
        &report.warm,
    ] {
        assert_eq!(phase.pages, PAGES, "{}", phase.name);
        assert!(phase.wall_ns > 0, "{}", phase.name);
        // The completion `out` may itself be emulated (kvm_pvm does): one per vCPU.
        assert!(
            phase.counters.insn_emulation <= 4,
            "{}: {:?}",
            phase.name,
            phase.counters
        );
    }
    assert!(report.first_touch_untouched_host.counters.pf_fixed > 0);
    assert!(report.first_touch_pretouched_host.counters.pf_fixed > 0);
    assert!(report.delete_populated_slot_ns > 0);
}

#[test]
fn test_demand_paging_bad_config_is_typed_error_before_kvm() {
    let cfg = DemandPagingConfig {
        vcpus: 1,
        bytes_per_vcpu: 4096,
        host_thp: false,
    };

    let err = run_demand_paging(&cfg).unwrap_err();

    assert!(
        matches!(err, KvmError::BadChunkSize { bytes: 4096, .. }),
        "{err:?}"
    );
}
