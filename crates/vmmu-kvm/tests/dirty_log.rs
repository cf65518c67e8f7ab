//! Dirty logging on the real `/dev/kvm`, when there is one (otherwise the
//! typed "unavailable" error is checked).

use vmmu_kvm::dirty_log::kvm_dirty_log;
use vmmu_kvm::{kvm_available, KvmError};

#[test]
fn test_kvm_dirty_log_reports_exactly_the_pages_the_guest_wrote() {
    const BYTES: u64 = 16 << 20;
    if let Err(e) = kvm_available() {
        println!("no real KVM: {e}");
        let run = kvm_dirty_log(BYTES, 3 * 4096).unwrap_err();
        assert!(matches!(run, KvmError::Unavailable { .. }), "{run:?}");
        return;
    }
    let r = kvm_dirty_log(BYTES, 3 * 4096).unwrap();
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
