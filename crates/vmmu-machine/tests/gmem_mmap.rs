//! A guest on guest_memfd-backed shared memory (a slot bound to an `MMAP |
//! INIT_SHARED` file on a default VM): the host's writes through its mapping
//! of the file reach the guest, the guest's reach the host, a punch-hole
//! zeroes both views, and the slot's host address is never used (nothing is
//! mapped there).

use vmmu::gmem::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use vmmu::{Gpa, UserMemoryRegion, VmConfig};
use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, Script};
use vmmu_machine::{Machine, MachineConfig, RunOptions};

const GPA: u64 = 1 << 30;
const HVA: u64 = 0x10_0000_0000;
const PAGES: u64 = 64;
const SIZE: u64 = PAGES * 4096;

fn machine(knobs: vmmu::GuardKnobs) -> (Machine, std::sync::Arc<vmmu::GuestMemfd>) {
    let m = Machine::new(
        MachineConfig {
            memory_bytes: 1 << 30,
            vm: VmConfig {
                knobs,
                ..VmConfig::default()
            },
            ..MachineConfig::default()
        },
        1,
    )
    .unwrap();
    let file = m
        .vmm
        .create_gmem_slot_with(
            UserMemoryRegion {
                slot: 0,
                flags: 0,
                guest_phys_addr: GPA,
                memory_size: SIZE,
                userspace_addr: HVA,
            },
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .unwrap();
    (m, file)
}

fn at(page: u64, kind: AccessKind) -> GuestAccess {
    GuestAccess {
        gpa: Gpa(GPA + page * 4096),
        kind,
        private: false,
    }
}

fn run(m: &mut Machine, script: Vec<GuestAccess>) -> Vec<AccessResult> {
    let mut out = m.run(vec![Script::new(script)], &RunOptions::default(), |_| {});
    out.pop()
        .unwrap()
        .0
        .results
        .iter()
        .map(|(_, r)| *r)
        .collect()
}

fn marker(page: u64, pass: u64) -> u64 {
    (pass << 32) | page
}

#[test]
fn test_guest_on_gmem_only_memory_shares_pages_with_the_hosts_mapping() {
    let (mut m, file) = machine(vmmu::GuardKnobs::default());
    // The host fills the first half through its mapping.
    for p in 0..PAGES / 2 {
        m.vmm.mmap_write_u64(&file, p * 4096, marker(p, 0)).unwrap();
    }
    // The guest reads every page (the host's values, zeros in the other half),
    // then writes its own.
    let mut script: Vec<_> = (0..PAGES).map(|p| at(p, AccessKind::Read)).collect();
    script.extend((0..PAGES).map(|p| at(p, AccessKind::Write(marker(p, 1)))));
    let r = run(&mut m, script);
    for p in 0..PAGES {
        let want = if p < PAGES / 2 { marker(p, 0) } else { 0 };
        assert_eq!(r[p as usize], AccessResult::Memory(want), "page {p}");
        assert_eq!(m.vmm.mmap_read_u64(&file, p * 4096), Ok(marker(p, 1)));
    }
    let st = m.vm.stats();
    assert_eq!(
        st.gmem_shared_faults, PAGES,
        "every page faulted from the file"
    );
    assert_eq!(st.private_faults, 0);
    assert_eq!(file.allocated_pages(), PAGES);

    // Punch the first quarter: both views read zeros there, the rest is kept.
    m.vmm.punch_hole(GPA, SIZE / 4).unwrap();
    assert_eq!(file.allocated_pages(), PAGES - PAGES / 4);
    let r = run(
        &mut m,
        (0..PAGES).map(|p| at(p, AccessKind::Read)).collect(),
    );
    for p in 0..PAGES {
        let want = if p < PAGES / 4 { 0 } else { marker(p, 1) };
        assert_eq!(r[p as usize], AccessResult::Memory(want), "page {p}");
        assert_eq!(m.vmm.mmap_read_u64(&file, p * 4096), Ok(want));
    }
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    drop(file);
    let oracle = m.oracle.clone();
    let t = m.teardown();
    assert_eq!(
        t.leaked_data_pages + t.leaked_table_pages + t.double_frees,
        0,
        "{t:?}"
    );
    assert_eq!(oracle.total(), 0, "{:?}", oracle.log());
}

/// The oracle's check for gmem-only slots: a punch-hole that does not zap
/// leaves the guest a translation to a page the file freed.
#[test]
fn test_oracle_catches_a_punch_that_leaves_a_gmem_only_page_mapped() {
    let knobs = vmmu::GuardKnobs {
        skip_gmem_zap: true,
        ..vmmu::GuardKnobs::default()
    };
    let (mut m, file) = machine(knobs);
    run(&mut m, vec![at(1, AccessKind::Write(7))]);
    m.vmm.punch_hole(GPA, SIZE).unwrap();
    run(&mut m, vec![at(1, AccessKind::Read)]);
    assert!(m.oracle.total() > 0, "the stale translation went unnoticed");
    assert!(
        m.oracle
            .log()
            .iter()
            .any(|l| l.contains("stale_translation")),
        "{:?}",
        m.oracle.log()
    );
    drop(file);
}
