//! A guest on guest_memfd-backed shared memory on the real `/dev/kvm`, when
//! there is one (otherwise the typed "unavailable" error is checked, so a
//! broken setup never passes as a result).

use vmmu_kvm::gmem::guest_on_gmem;
use vmmu_kvm::{kvm_available, KvmError};

#[test]
fn test_guest_on_mmap_init_shared_gmem_writes_reach_the_host_mapping() {
    const BYTES: u64 = 4 << 20;
    if let Err(e) = kvm_available() {
        println!("no real KVM: {e}");
        let run = guest_on_gmem(BYTES).unwrap_err();
        assert!(matches!(run, KvmError::Unavailable { .. }), "{run:?}");
        return;
    }
    let r = match guest_on_gmem(BYTES) {
        Err(KvmError::Unsupported { cap, .. }) => {
            // Checked against the KVM's own answer, so a broken call cannot pass.
            let vm = vmmu_kvm::gmem::GmemVm::new().unwrap();
            assert_eq!(vm.caps().guest_memfd, 0, "{cap} refused though offered");
            println!("this KVM has no guest_memfd");
            return;
        }
        r => r.unwrap(),
    };
    println!("{r:#?}");
    assert_eq!(r.pages, 1024);
    assert_eq!(
        r.pass1_verified, r.pages,
        "guest writes seen through the mmap"
    );
    assert_eq!(
        r.zero_after_punch, r.punched_pages,
        "punched pages read as zero"
    );
    assert_eq!(r.kept_after_punch, r.pages - r.punched_pages);
    assert_eq!(
        r.pass2_verified, r.pages,
        "the guest refaults punched pages"
    );
}

#[test]
fn test_guest_on_gmem_rejects_sizes_that_are_not_2m_multiples() {
    assert!(matches!(
        guest_on_gmem(4096),
        Err(KvmError::BadChunkSize { .. })
    ));
    assert!(matches!(
        guest_on_gmem(0),
        Err(KvmError::BadChunkSize { .. })
    ));
}
