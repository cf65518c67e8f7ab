//! Aging through the mmu_notifier's young callbacks: lockless by default
//! (KVM 6.15), under `mmu_lock` for write with `lockless_aging` off; without
//! A/D bits an aged entry is access-tracked and the fast path, not the slow
//! path, gives its permissions back.

use vmmu::{ErrorCode, HvaRange, RetPf, VmConfig};

mod common;
use common::*;

fn age_page(vm: &vmmu::Vm, page: u64) -> bool {
    vm.clear_young(HvaRange::new(hva(page), hva(page + 1)))
}

#[test]
fn test_aging_takes_mmu_lock_only_when_locked_aging_is_asked_for() {
    for lockless in [true, false] {
        let (host, vm, mut vcpu) = setup(VmConfig {
            lockless_aging: lockless,
            ..VmConfig::default()
        });
        vcpu.page_fault(gpa(3), ErrorCode::WRITE).unwrap();
        let before = vm.stats();
        assert!(age_page(&vm, 3), "a mapped, accessed page is young");
        assert!(!age_page(&vm, 3), "and old once aged");
        assert!(!vm.test_young(hva(3)));
        let st = vm.stats().since(&before);
        let locks = st.mmu_lock_read + st.mmu_lock_write;
        if lockless {
            assert_eq!((locks, st.aging_locked), (0, 0), "{st:?}");
        } else {
            assert_eq!((st.mmu_lock_write, st.aging_locked), (3, 3), "{st:?}");
        }
        assert_eq!(st.entries_aged, 1);
        assert_eq!(st.tlb_flush_remote, 0, "aging never flushes");
        teardown(host, vm, vec![vcpu]);
    }
}

#[test]
fn test_an_access_tracked_entry_comes_back_through_the_fast_path() {
    let (host, vm, mut vcpu) = setup(VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    });
    vcpu.page_fault(gpa(5), ErrorCode::WRITE).unwrap();
    assert!(age_page(&vm, 5));
    let s = leaf(&vm, 5).unwrap().1;
    assert!(s.is_access_tracked(), "{s:?}");
    // To the processor the entry is not present: the exit says so.
    let before = vcpu.stats();
    assert_eq!(
        vcpu.page_fault(gpa(5), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    let st = vcpu.stats().since(&before);
    assert_eq!((st.access_restored_fast, st.access_restored_slow), (1, 0));
    assert!(leaf(&vm, 5).unwrap().1.is_accessed());
    teardown(host, vm, vec![vcpu]);
}
