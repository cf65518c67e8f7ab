//! Harvesting the dirty log: `get_dirty_log` with and without manual
//! protection, `clear_dirty_log`'s alignment rules and exact re-protection,
//! `INITIALLY_SET`, and refusals that change nothing.

use vmmu::dirty_log::{INITIALLY_SET, MANUAL_PROTECT_ENABLE};
use vmmu::{errno, DirtyLogError, ErrorCode, Level, MemFlags, RetPf, VmConfig};

mod common;
use common::*;

const LOG: u32 = MemFlags::LOG_DIRTY_PAGES.bits();
/// Pages in the test slot (8 MiB).
const PAGES: u64 = SIZE / 4096;

fn write(vcpu: &mut vmmu::VcpuMmu, page: u64) -> RetPf {
    vcpu.page_fault(gpa(page), ErrorCode::WRITE).unwrap()
}

fn set_bits(log: &[u64]) -> Vec<u64> {
    (0..log.len() as u64 * 64)
        .filter(|p| log[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

#[test]
fn test_get_dirty_log_returns_the_written_pages_clears_and_reprotects_them() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    for p in [3, 64, 65, 2047] {
        write(&mut vcpu, p);
    }
    // A read fault that maps the page writable logs it too, as KVM's
    // make_spte does: once writable, the guest's writes would go unseen.
    vcpu.page_fault(gpa(9), ErrorCode::empty()).unwrap();
    let flushes = vm.stats().tlb_flush_remote;
    let log = vm.get_dirty_log(0).unwrap();
    assert_eq!(log.len() as u64, PAGES / 64);
    assert_eq!(set_bits(&log), [3, 9, 64, 65, 2047]);
    assert_eq!(vm.stats().tlb_flush_remote, flushes + 1, "one flush");
    for p in [3, 9, 64, 65, 2047] {
        let (_, s) = leaf(&vm, p).unwrap();
        assert!(!s.is_writable(), "page {p} must be write-protected again");
        assert!(s.is_mmu_writable(), "the fast path may restore it");
    }
    // Nothing written since: an empty log, no flush, nothing protected.
    let flushes = vm.stats().tlb_flush_remote;
    assert!(vm.get_dirty_log(0).unwrap().iter().all(|w| *w == 0));
    assert_eq!(vm.stats().tlb_flush_remote, flushes, "nothing to flush");
    // A write after the harvest is logged again (through the fast path).
    let before = vcpu.stats();
    vcpu.page_fault(gpa(64), ErrorCode::WRITE | ErrorCode::PRESENT)
        .unwrap();
    assert_eq!(vcpu.stats().since(&before).fast_path_fixed, 1);
    assert_eq!(set_bits(&vm.get_dirty_log(0).unwrap()), [64]);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_manual_protect_get_only_copies_and_clear_reprotects_exactly_what_was_asked() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vm.enable_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE)
        .unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    for p in [1, 2, 70, 130] {
        write(&mut vcpu, p);
    }
    let log = vm.get_dirty_log(0).unwrap();
    assert_eq!(set_bits(&log), [1, 2, 70, 130]);
    assert_eq!(vm.get_dirty_log(0).unwrap(), log, "get only copies");
    assert!(
        leaf(&vm, 1).unwrap().1.is_writable(),
        "get protects nothing"
    );
    // Clear pages 0..128 asking for 1 and 70 (and 5, never written).
    let mut want = vec![0u64; 2];
    want[0] = (1 << 1) | (1 << 5);
    want[1] = 1 << (70 - 64);
    assert_eq!(vm.clear_dirty_log(0, 0, 128, &want).unwrap(), 2);
    assert_eq!(set_bits(&vm.get_dirty_log(0).unwrap()), [2, 130]);
    assert!(!leaf(&vm, 1).unwrap().1.is_writable());
    assert!(!leaf(&vm, 70).unwrap().1.is_writable());
    assert!(leaf(&vm, 2).unwrap().1.is_writable(), "not asked for");
    assert!(leaf(&vm, 130).unwrap().1.is_writable(), "outside the range");
    // The count may stop short of 64 only at the end of the slot.
    let last = PAGES - 64;
    write(&mut vcpu, PAGES - 1);
    assert_eq!(vm.clear_dirty_log(0, last, 64, &[u64::MAX]).unwrap(), 1);
    write(&mut vcpu, 129);
    let e = vm.clear_dirty_log(0, 128, 10, &[u64::MAX]).unwrap_err();
    assert!(matches!(e, DirtyLogError::BadRange { .. }), "{e:?}");
    // A 100-page slot: the last 36 pages are cleared with a short count.
    vm.set_user_memory_region(region(1, 2 * GPA, 100 * 4096, 2 * HVA, LOG))
        .unwrap();
    vcpu.page_fault(vmmu::Gpa(2 * GPA + 99 * 4096), ErrorCode::WRITE)
        .unwrap();
    assert_eq!(vm.get_dirty_log(1).unwrap(), [0, 1 << 35]);
    assert!(vm.clear_dirty_log(1, 0, 36, &[u64::MAX]).is_err());
    assert_eq!(vm.clear_dirty_log(1, 64, 36, &[u64::MAX]).unwrap(), 1);
    assert_eq!(vm.get_dirty_log(1).unwrap(), [0, 0]);
    teardown(host, vm, vec![vcpu]);
}

#[test]
fn test_clear_dirty_log_refusals_change_nothing() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    write(&mut vcpu, 7);
    // Without manual protection clear is refused.
    let e = vm.clear_dirty_log(0, 0, 64, &[u64::MAX]).unwrap_err();
    assert_eq!(e, DirtyLogError::NotManual);
    assert_eq!(e.errno(), errno::EINVAL);
    vm.enable_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE)
        .unwrap();
    let before = vm.get_dirty_log(0).unwrap();
    let mappings = vm.mappings(0);
    for (slot, first, num, words, what, errno) in [
        (
            0,
            1,
            64,
            1,
            "first page not a multiple of 64",
            errno::EINVAL,
        ),
        (
            0,
            0,
            63,
            1,
            "count not a multiple of 64 short of the end",
            errno::EINVAL,
        ),
        (0, PAGES, 64, 1, "past the end", errno::EINVAL),
        (0, 64, PAGES, 40, "count past the end", errno::EINVAL),
        (0, 0, 128, 1, "bitmap shorter than the count", errno::EFAULT),
        (5, 0, 64, 1, "no such slot", errno::ENOENT),
        (7 << 16, 0, 64, 1, "no such address space", errno::EINVAL),
    ] {
        let e = vm
            .clear_dirty_log(slot, first, num, &vec![u64::MAX; words])
            .unwrap_err();
        assert_eq!(e.errno(), errno, "{what}: {e:?}");
        assert_eq!(
            vm.get_dirty_log(0).unwrap(),
            before,
            "{what} changed the log"
        );
        assert_eq!(vm.mappings(0), mappings, "{what} changed a mapping");
    }
    // A slot that does not log, and bad flags.
    vm.set_user_memory_region(region(1, 2 * GPA, SIZE, 2 * HVA, 0))
        .unwrap();
    assert_eq!(vm.get_dirty_log(1).unwrap_err().errno(), errno::ENOENT);
    let e = vm.enable_manual_dirty_log_protect(4).unwrap_err();
    assert_eq!(e.errno(), errno::EINVAL);
    assert_eq!(vm.manual_dirty_log_protect(), MANUAL_PROTECT_ENABLE);
    teardown(host, vm, vec![vcpu]);
}

/// With INITIALLY_SET, enabling logging marks every page and protects
/// nothing (a huge leaf stays writable); the first clear write-protects what
/// it clears, huge leaves covering it included, and later writes are logged.
#[test]
fn test_initially_set_marks_everything_and_the_first_clear_protects() {
    let (host, vm, mut vcpu) = huge_host_vm(VmConfig::default());
    vm.enable_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE | INITIALLY_SET)
        .unwrap();
    write(&mut vcpu, 0);
    assert_eq!(leaf(&vm, 0).unwrap().0, Level::M2, "a huge leaf first");
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    let log = vm.get_dirty_log(0).unwrap();
    assert_eq!(set_bits(&log).len() as u64, PAGES, "every page set");
    let (level, s) = leaf(&vm, 0).unwrap();
    assert!(
        level == Level::M2 && s.is_writable(),
        "enable protected nothing"
    );
    // Clear the first 512 pages: the 2 MiB leaf over them loses W.
    assert_eq!(vm.clear_dirty_log(0, 0, 512, &[u64::MAX; 8]).unwrap(), 512);
    assert!(!leaf(&vm, 0).unwrap().1.is_writable());
    // A write now faults, maps 4 KiB (logged slots map no huge pages) and is
    // logged.
    assert_eq!(write(&mut vcpu, 3), RetPf::Fixed);
    let log = vm.get_dirty_log(0).unwrap();
    assert!(
        log[0] & (1 << 3) != 0,
        "the write after the clear is logged"
    );
    assert_eq!(log[0].count_ones(), 1);
    assert_eq!(leaf(&vm, 3).unwrap().0, Level::K4);
    teardown(host, vm, vec![vcpu]);
}

/// With A/D bits off there is no D bit to harvest: a harvest must
/// write-protect what may have been written (KVM's `clear_dirty_pt_masked`
/// clears W on such roots), so the next write faults and is seen by the next
/// harvest. Clearing a D bit nobody sets would hide every later write.
#[test]
fn test_harvest_without_ad_bits_write_protects_so_later_writes_are_seen() {
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    let range = vmmu::GfnRange::new(gpa(0).gfn(), gpa(8).gfn());
    write(&mut vcpu, 2);
    assert_eq!(
        vm.clear_dirty_gfn_range(0, range).unwrap(),
        1,
        "first write"
    );
    assert!(
        !leaf(&vm, 2).unwrap().1.is_writable(),
        "harvested page writable"
    );
    assert_eq!(
        vm.clear_dirty_gfn_range(0, range).unwrap(),
        0,
        "no write since"
    );
    // The second write faults (fast path) and the second harvest sees it.
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(2), ErrorCode::WRITE | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Fixed
    );
    assert_eq!(
        vm.clear_dirty_gfn_range(0, range).unwrap(),
        1,
        "second write"
    );
    teardown(host, vm, vec![vcpu]);
}

/// The fast path logs a page only when it gives back the write permission: an
/// aged (access-tracked) page restored by a read stays out of the log.
#[test]
fn test_fast_path_read_of_an_aged_page_does_not_log_it() {
    let config = VmConfig {
        ad_enabled: false,
        ..VmConfig::default()
    };
    let (host, vm, mut vcpu) = setup(config);
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    write(&mut vcpu, 6);
    assert_eq!(set_bits(&vm.get_dirty_log(0).unwrap()), [6]);
    // Age it: without A/D bits the entry loses R/W/X until the next access.
    vm.clear_young(vmmu::HvaRange::new(hva(6), hva(7)));
    let before = vcpu.stats();
    assert_eq!(
        vcpu.page_fault(gpa(6), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(vcpu.stats().since(&before).fast_path_fixed, 1);
    assert!(!leaf(&vm, 6).unwrap().1.is_writable());
    assert!(
        vm.get_dirty_log(0).unwrap().iter().all(|w| *w == 0),
        "a read logged the page"
    );
    teardown(host, vm, vec![vcpu]);
}

fn leaves_at(vm: &vmmu::Vm, level: Level) -> usize {
    vm.mappings(0)
        .iter()
        .filter(|(_, l, s)| *l == level && s.is_shadow_present())
        .count()
}

/// Turning logging on splits huge mappings eagerly (1 GiB to 2 MiB to 4 KiB in
/// one walk) and write-protects the 4 KiB pages; with the switch off they
/// stay huge, write-protected whole.
#[test]
fn test_enabling_logging_splits_huge_pages_eagerly_unless_turned_off() {
    for eager in [true, false] {
        let host = vmmu::testing::TestHost::new();
        host.set_host_level(Level::G1);
        let vm = vmmu::Vm::new(
            VmConfig {
                eager_page_split: eager,
                ..VmConfig::default()
            },
            host.ops(),
        )
        .unwrap();
        vm.set_user_memory_region(region(0, 1 << 30, 1 << 30, 1 << 30 << 6, 0))
            .unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.prepare_entry().unwrap();
        vcpu.page_fault(vmmu::Gpa(1 << 30), ErrorCode::WRITE)
            .unwrap();
        assert_eq!(leaves_at(&vm, Level::G1), 1, "a 1 GiB leaf first");
        let before = vm.stats();
        vm.set_user_memory_region(region(0, 1 << 30, 1 << 30, 1 << 30 << 6, LOG))
            .unwrap();
        let d = vm.stats().since(&before);
        if eager {
            assert_eq!(d.eager_splits, 1 + 512, "the 1G leaf, then each 2M child");
            assert_eq!(leaves_at(&vm, Level::G1) + leaves_at(&vm, Level::M2), 0);
            assert_eq!(leaves_at(&vm, Level::K4), 512 * 512);
            assert!(vm.mappings(0).iter().all(|(_, _, s)| !s.is_writable()));
        } else {
            assert_eq!(d.eager_splits, 0);
            assert_eq!(leaves_at(&vm, Level::G1), 1);
            assert!(!vm.mappings(0)[0].2.is_writable(), "protected whole");
        }
        // Either way a write is logged and maps 4 KiB.
        vcpu.prepare_entry().unwrap();
        vcpu.page_fault(
            vmmu::Gpa((1 << 30) + 5 * 4096),
            ErrorCode::WRITE | ErrorCode::PRESENT,
        )
        .unwrap();
        assert_eq!(
            set_bits(&vm.get_dirty_log(0).unwrap()),
            [5],
            "eager {eager}"
        );
        teardown(host, vm, vec![vcpu]);
    }
}

/// Turning logging off brings the huge pages back in place: the 4 KiB tables
/// the host maps as huge pages become 2 MiB leaves again, with one flush and
/// no refault; what the guest wrote stays mapped.
#[test]
fn test_disabling_logging_recovers_huge_pages_in_place() {
    let (host, vm, mut vcpu) = huge_host_vm(VmConfig::default());
    for p in [0, 600, 1500] {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    assert_eq!(leaves_at(&vm, Level::M2), 3);
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, LOG))
        .unwrap();
    assert_eq!(leaves_at(&vm, Level::M2), 0, "split when logging began");
    vcpu.prepare_entry().unwrap();
    vcpu.page_fault(gpa(601), ErrorCode::WRITE | ErrorCode::PRESENT)
        .unwrap();
    let before = vm.stats();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let d = vm.stats().since(&before);
    assert_eq!(d.huge_recovered, 3, "each split 2 MiB page is huge again");
    assert_eq!(leaves_at(&vm, Level::M2), 3);
    assert_eq!(leaves_at(&vm, Level::K4), 0);
    assert_eq!(d.tlb_flush_remote, 1, "one flush for the lot");
    assert_eq!(d.faults, 0, "no refault");
    // The huge leaf maps the frames the 4 KiB leaves did.
    let (level, s) = leaf(&vm, 601).unwrap();
    assert_eq!(level, Level::M2);
    assert_eq!(
        Some(s.pfn().0 + 601 - 512),
        host.lookup(hva(601)).map(|m| m.0 .0)
    );
    teardown(host, vm, vec![vcpu]);
}
