//! Private memory in the machine: guest_memfd slots, guests that mark their
//! accesses, the VMM's conversions, and the oracle's private/shared checks.

use vmmu::{Gpa, Hva, UserMemoryRegion, VmConfig, VmType};
use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, Script};
use vmmu_machine::{Backing, Machine, MachineConfig, MemoryFaultPolicy, RunOptions};

const GPA: u64 = 1 << 30;
const HVA: u64 = 0x10_0000_0000;
const SIZE: u64 = 4 << 20;

fn private_machine(vm_type: VmType) -> Machine {
    private_machine_with(vm_type, vmmu::GuardKnobs::default())
}

fn private_machine_with(vm_type: VmType, knobs: vmmu::GuardKnobs) -> Machine {
    let m = Machine::new(
        MachineConfig {
            memory_bytes: 1 << 30,
            vm: VmConfig {
                vm_type,
                knobs,
                ..VmConfig::default()
            },
            ..MachineConfig::default()
        },
        1,
    )
    .unwrap();
    m.map(Hva(HVA), SIZE, Backing::Anonymous).unwrap();
    m.vmm
        .create_gmem_slot(UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: GPA,
            memory_size: SIZE,
            userspace_addr: HVA,
        })
        .unwrap();
    m
}

fn access(page: u64, kind: AccessKind, private: bool) -> GuestAccess {
    GuestAccess {
        gpa: Gpa(GPA + page * 4096),
        kind,
        private,
    }
}

fn run(m: &mut Machine, script: Vec<GuestAccess>, policy: MemoryFaultPolicy) -> Script {
    let s = run_unchecked(m, script, policy);
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    s
}

fn run_unchecked(m: &mut Machine, script: Vec<GuestAccess>, policy: MemoryFaultPolicy) -> Script {
    let opts = RunOptions {
        memory_faults: policy,
        ..RunOptions::default()
    };
    let mut out = m.run(vec![Script::new(script)], &opts, |_| {});
    out.pop().unwrap().0
}

fn results(s: &Script) -> Vec<AccessResult> {
    s.results.iter().map(|(_, r)| *r).collect()
}

fn finish(m: Machine) {
    let oracle = m.oracle.clone();
    let r = m.teardown();
    assert_eq!(
        r.leaked_data_pages + r.leaked_table_pages + r.double_frees,
        0,
        "{r:?}"
    );
    assert_eq!(oracle.total(), 0, "{:?}", oracle.log());
}

/// An SNP-like guest writes a page shared, then private, then shared again: each
/// change of side exits once, the VMM converts the page (the old side is
/// discarded) and the access completes on the new side, which reads zero.
#[test]
fn test_snp_guest_changing_side_exits_once_per_change_and_reads_zero() {
    let mut m = private_machine(VmType::Snp);
    let s = run(
        &mut m,
        vec![
            access(3, AccessKind::Write(0x11), false),
            access(3, AccessKind::Read, false),
            access(3, AccessKind::Read, true),
            access(3, AccessKind::Write(0x22), true),
            access(3, AccessKind::Read, true),
            access(3, AccessKind::Read, false),
        ],
        MemoryFaultPolicy::Convert,
    );
    let results: Vec<AccessResult> = s.results.iter().map(|(_, r)| *r).collect();
    assert_eq!(
        results,
        [
            AccessResult::Memory(0x11),
            AccessResult::Memory(0x11),
            AccessResult::Memory(0),
            AccessResult::Memory(0x22),
            AccessResult::Memory(0x22),
            AccessResult::Memory(0),
        ]
    );
    let page = Gpa(GPA + 3 * 4096);
    assert_eq!(s.conversions, [(page, 4096, true), (page, 4096, false)]);
    assert_eq!(m.vm.stats().private_faults, 1);
    finish(m);
}

/// Passes whose pages change side from pass to pass (half private): every page
/// that changed exits once and is converted once, and every read sees what the
/// guest last wrote on that side, or zero after a conversion.
#[test]
fn test_snp_passes_convert_each_changed_page_once_and_keep_data() {
    use vmmu_machine::guest::{GuestProgram, Pass, Pattern, RefModel};
    let mut m = private_machine(VmType::Snp);
    let mut model = RefModel::new(Gpa(GPA), SIZE / 4096);
    let opts = RunOptions {
        memory_faults: MemoryFaultPolicy::Convert,
        ..RunOptions::default()
    };
    for pass in 1..6 {
        let write = if pass % 2 == 1 { 100 } else { 0 };
        let p = Pass::new(0, pass, Pattern::Random, write, true, model, 1).with_private_percent(50);
        let (p, r) = m.run(vec![p], &opts, |_| {}).pop().unwrap();
        let c = &r.counters;
        assert_eq!(p.mismatches(), 0, "{:?}", p.first_mismatch());
        assert_eq!(
            c.conversions, c.memory_faults,
            "pass {pass}: an exit not converted"
        );
        assert!(c.conversions <= SIZE / 4096, "pass {pass}: {c:?}");
        assert!(c.conversions > 0, "pass {pass}: no page changed side");
        model = p.into_model();
    }
    finish(m);
}

/// A conversion that keeps both sides (attributes only, nothing discarded, as
/// KVM allows): the guest's next access must reach the new side. With the
/// conversion's zap removed, it still reaches the old shared frame, and the
/// oracle says so.
fn convert_in_place(knobs: vmmu::GuardKnobs) -> (Vec<AccessResult>, u64) {
    let mut m = private_machine_with(VmType::SwProtected, knobs);
    let s = run(
        &mut m,
        vec![access(3, AccessKind::Write(0x33), false)],
        MemoryFaultPolicy::Fail,
    );
    assert_eq!(results(&s), [AccessResult::Memory(0x33)]);
    m.vm.set_memory_attributes(GPA + 3 * 4096, 4096, vmmu::MEMORY_ATTRIBUTE_PRIVATE, 0)
        .unwrap();
    let s = run_unchecked(
        &mut m,
        vec![access(3, AccessKind::Read, true)],
        MemoryFaultPolicy::Fail,
    );
    let wrong = m.oracle.count(vmmu_machine::oracle::Violation::WrongSide);
    (results(&s), wrong)
}

#[test]
fn test_conversion_in_place_reaches_the_new_side() {
    let (r, wrong) = convert_in_place(vmmu::GuardKnobs::default());
    assert_eq!((r, wrong), (vec![AccessResult::Memory(0)], 0));
}

#[test]
fn test_oracle_catches_a_conversion_that_does_not_zap() {
    let (r, wrong) = convert_in_place(vmmu::GuardKnobs {
        skip_conversion_zap: true,
        ..vmmu::GuardKnobs::default()
    });
    assert_eq!(r, [AccessResult::Memory(0x33)], "the old shared frame");
    assert_eq!(wrong, 1);
}

/// A punch-hole under a mapped private page: the next private read must see a
/// fresh zero page. With the guest_memfd invalidation's zap removed, it reaches
/// the freed frame, which the oracle sees is no longer the file's page.
fn punch_mapped_page(knobs: vmmu::GuardKnobs) -> (Vec<AccessResult>, u64) {
    let mut m = private_machine_with(VmType::SwProtected, knobs);
    m.vm.set_memory_attributes(GPA + 5 * 4096, 4096, vmmu::MEMORY_ATTRIBUTE_PRIVATE, 0)
        .unwrap();
    let s = run(
        &mut m,
        vec![access(5, AccessKind::Write(0x55), true)],
        MemoryFaultPolicy::Fail,
    );
    assert_eq!(results(&s), [AccessResult::Memory(0x55)]);
    m.vmm.punch_hole(GPA + 5 * 4096, 4096).unwrap();
    let s = run_unchecked(
        &mut m,
        vec![access(5, AccessKind::Read, true)],
        MemoryFaultPolicy::Fail,
    );
    let stale = m
        .oracle
        .count(vmmu_machine::oracle::Violation::StalePrivate);
    (results(&s), stale)
}

#[test]
fn test_punch_hole_under_a_mapped_private_page_reads_zero() {
    let (r, stale) = punch_mapped_page(vmmu::GuardKnobs::default());
    assert_eq!((r, stale), (vec![AccessResult::Memory(0)], 0));
}

#[test]
fn test_oracle_catches_a_punch_hole_that_does_not_zap() {
    let (r, stale) = punch_mapped_page(vmmu::GuardKnobs {
        skip_gmem_zap: true,
        ..vmmu::GuardKnobs::default()
    });
    assert_eq!(stale, 1, "{r:?}");
}
