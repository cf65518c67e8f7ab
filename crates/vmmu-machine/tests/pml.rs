//! PML dirty tracking on the machine: after a harvest the processor's own
//! walk sets the Dirty bit again and logs the write, the vCPU's exit drains
//! the log into the bitmap, and not one write takes a fault. The harvest's
//! TLB flush is what makes this work: a translation cached dirty would let
//! the next write skip the walk, and with it the log.

use vmmu::{DirtyTracking, Gpa, Hva, MemFlags, UserMemoryRegion, VmConfig};
use vmmu_machine::guest::{AccessKind, GuestAccess, Script};
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

const GPA: u64 = 1 << 30;
const HVA: u64 = 0x10_0000_0000;
const PAGES: u64 = 256;
const SIZE: u64 = PAGES * 4096;

fn region(flags: u32) -> UserMemoryRegion {
    UserMemoryRegion {
        slot: 1,
        flags,
        guest_phys_addr: GPA,
        memory_size: SIZE,
        userspace_addr: HVA,
    }
}

fn write_all(m: &mut Machine, value: u64, stride: u64) {
    let script = (0..PAGES)
        .step_by(stride as usize)
        .map(|p| GuestAccess {
            gpa: Gpa(GPA + p * 4096),
            kind: AccessKind::Write(value),
            private: false,
        })
        .collect();
    m.run(vec![Script::new(script)], &RunOptions::default(), |_| {});
}

fn count(log: &[u64]) -> u64 {
    log.iter().map(|w| w.count_ones() as u64).sum()
}

/// One vCPU with PML, the region mapped by the host (no memslot yet).
fn pml_machine() -> Machine {
    let m = Machine::new(
        MachineConfig {
            memory_bytes: 1 << 30,
            vm: VmConfig {
                dirty_tracking: DirtyTracking::Pml,
                ..VmConfig::default()
            },
            ..MachineConfig::default()
        },
        1,
    )
    .unwrap();
    m.map(Hva(HVA), SIZE, Backing::Anonymous).unwrap();
    m
}

#[test]
fn test_pml_logs_every_write_after_each_harvest_without_a_fault() {
    let mut m = pml_machine();
    m.set_memslot(region(0)).unwrap();
    write_all(&mut m, 1, 1);
    m.set_memslot(region(MemFlags::LOG_DIRTY_PAGES.bits()))
        .unwrap();
    let _ = m.vm.get_dirty_log(1).unwrap();
    let before = m.vm.stats();
    for round in 0..3u64 {
        // Every page, then every third: the harvest must see exactly those.
        let stride = if round == 1 { 3 } else { 1 };
        write_all(&mut m, 10 + round, stride);
        let log = m.vm.get_dirty_log(1).unwrap();
        assert_eq!(count(&log), PAGES.div_ceil(stride), "round {round}");
    }
    let st = m.vm.stats().since(&before);
    assert_eq!(st.fast_path_fixed, 0, "PML writes never fault");
    assert_eq!(st.pml_entries_flushed, 2 * PAGES + PAGES.div_ceil(3));
    assert_eq!(st.entries_write_protected, 0);
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    let r = m.teardown();
    assert_eq!(
        r.leaked_data_pages + r.leaked_table_pages + r.double_frees,
        0
    );
}

/// With guest paging, the processor's Accessed update of a guest page-table
/// entry is a write to the table page: once a harvest cleaned that page, the
/// write that sets its Dirty bit again is logged like any other (a
/// migration would otherwise send a stale copy of the guest's tables).
#[test]
fn test_pml_logs_the_walks_accessed_update_of_a_guest_table() {
    use vmmu::Gva;
    use vmmu_machine::guest::PagingOp;
    use vmmu_machine::paging::{pte, LinearAccess, LinearOp, PagingMode};
    let mut m = pml_machine();
    m.set_memslot(region(MemFlags::LOG_DIRTY_PAGES.bits()))
        .unwrap();
    // Tables in pages 0..4, data in page 8.
    let root = GPA;
    let user = pte::P | pte::W | pte::U;
    let pw = |gpa: u64, v: u64| {
        GuestAccess::shared(
            Gpa(gpa),
            AccessKind::PteWrite {
                value: v,
                space: Gpa(root),
            },
        )
    };
    let read = GuestAccess::linear(
        Gva(0),
        LinearAccess {
            op: LinearOp::Read,
            user: true,
            ac: false,
        },
    );
    let setup = vec![
        GuestAccess::paging(PagingOp::SetMode(PagingMode::long_mode())),
        GuestAccess::paging(PagingOp::LoadCr3(root)),
        pw(root, (root + 0x1000) | user),
        pw(root + 0x1000, (root + 0x2000) | user),
        pw(root + 0x2000, (root + 0x3000) | user),
        pw(root + 0x3000, (GPA + 0x8000) | user),
        read,
    ];
    m.run(vec![Script::new(setup)], &RunOptions::default(), |_| {});
    let _ = m.vm.get_dirty_log(1).unwrap();
    // The kernel rewrites the leaf entry (Accessed clear): one logged store.
    let rewrite = vec![
        pw(root + 0x3000, (GPA + 0x8000) | user),
        GuestAccess::paging(PagingOp::Invlpg(Gva(0))),
    ];
    m.run(vec![Script::new(rewrite)], &RunOptions::default(), |_| {});
    let log = m.vm.get_dirty_log(1).unwrap();
    assert_eq!(log[0], 1 << 3, "the store to the leaf's table page");
    // The next walk sets Accessed in that entry: a write to the table page
    // the harvest just cleaned, by the processor, not by a store.
    m.run(
        vec![Script::new(vec![read])],
        &RunOptions::default(),
        |_| {},
    );
    let log = m.vm.get_dirty_log(1).unwrap();
    assert_eq!(
        log[0],
        1 << 3,
        "the walk's Accessed update, logged: {:#x}",
        log[0]
    );
    assert_eq!(count(&log), 1);
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
}
