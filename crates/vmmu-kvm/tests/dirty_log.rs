//! Dirty logging on the real `/dev/kvm`, when there is one (otherwise the
//! typed "unavailable" error is checked).

use vmmu_kvm::dirty_log::kvm_dirty_log;
use vmmu_kvm::{kvm_available, KvmError};

#[test]
fn test_kvm_dirty_log_reports_exactly_the_pages_the_guest_wrote() {
    const BYTES: u64 = 16 << 20;
    if let Err(e) = kvm_available() {
        println!("no real KVM: {e}");
        let run = kvm_dirty_log(BYTES, 3 * 4096, 1).unwrap_err();
        assert!(matches!(run, KvmError::Unavailable { .. }), "{run:?}");
        return;
    }
    let r = kvm_dirty_log(BYTES, 3 * 4096, 1).unwrap();
    println!(
        "{:?}",
        (r.enable_ns, r.write_pass_ns, r.get_all_ns, r.get_none_ns)
    );
    let set: Vec<u64> = (0..r.pages)
        .filter(|p| r.pattern_bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    let want: Vec<u64> = (0..r.pages).filter(|p| p % 3 == 0).collect();
    assert_eq!(set, want, "the pages written, no more, no fewer");
}

/// Two vCPUs, each writing every third page of its own half.
#[test]
fn test_kvm_dirty_log_with_two_vcpus_reports_each_chunk_pattern() {
    const BYTES: u64 = 16 << 20;
    if kvm_available().is_err() {
        return;
    }
    let r = kvm_dirty_log(BYTES, 3 * 4096, 2).unwrap();
    let half = r.pages / 2;
    let set: Vec<u64> = (0..r.pages)
        .filter(|p| r.pattern_bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    let want: Vec<u64> = (0..r.pages)
        .filter(|p| (p % half).is_multiple_of(3))
        .collect();
    assert_eq!(set, want);
    // A chunk that is not a whole number of 2 MiB is refused.
    assert!(matches!(
        kvm_dirty_log(BYTES, 4096, 3),
        Err(KvmError::BadChunkSize { .. })
    ));
}
