//! Guest paging on the machine (TDP MMU underneath): the processor walks the
//! guest's own tables then the second stage, caches the result in its TLB by
//! PCID, and honours the guest's flushes; the oracle's reference walk agrees
//! with every access the guest could not have been served stale.

mod common;

use common::{machine, GPA};
use vmmu::{ErrorCode, Gpa, Gva};
use vmmu_machine::access_test::{case_count, AccessTest};
use vmmu_machine::guest::{
    AccessKind, AccessResult, GuestAccess, GuestProgram, Invpcid, PagingOp, Script,
};
use vmmu_machine::paging::{pte, LinearAccess, LinearOp, PagingMode, CR3_NOFLUSH};
use vmmu_machine::{Backing, Machine, MachineConfig};

const MIB: u64 = 1 << 20;

fn read(gva: u64) -> GuestAccess {
    GuestAccess::linear(
        Gva(gva),
        LinearAccess {
            op: LinearOp::Read,
            user: true,
            ac: false,
        },
    )
}

fn write(gva: u64, v: u64) -> GuestAccess {
    GuestAccess::linear(
        Gva(gva),
        LinearAccess {
            op: LinearOp::Write(v),
            user: true,
            ac: false,
        },
    )
}

fn pte_write(gpa: u64, value: u64, space: u64) -> GuestAccess {
    GuestAccess::shared(
        Gpa(gpa),
        AccessKind::PteWrite {
            value,
            space: Gpa(space),
        },
    )
}

fn phys_write(gpa: u64, v: u64) -> GuestAccess {
    GuestAccess::shared(Gpa(gpa), AccessKind::Write(v))
}

fn op(o: PagingOp) -> GuestAccess {
    GuestAccess::paging(o)
}

/// One address space: PML4 at `root`, its PDPT, PD and PT in the three pages
/// after it, mapping linear page `i` (from 0) to `frames[i]` user-writable.
fn space(root: u64, frames: &[u64]) -> Vec<GuestAccess> {
    let flags = pte::P | pte::W | pte::U;
    let mut v = vec![
        pte_write(root, (root + 0x1000) | flags, root),
        pte_write(root + 0x1000, (root + 0x2000) | flags, root),
        pte_write(root + 0x2000, (root + 0x3000) | flags, root),
    ];
    for (i, f) in frames.iter().enumerate() {
        v.push(pte_write(root + 0x3000 + i as u64 * 8, f | flags, root));
    }
    v
}

fn run(m: &mut Machine, script: Vec<GuestAccess>) -> Vec<AccessResult> {
    let out = m.run(vec![Script::new(script)], &Default::default(), |_| {});
    out.into_iter()
        .next()
        .map(|(s, _)| s.results.into_iter().map(|(_, r)| r).collect())
        .unwrap_or_default()
}

fn small_machine() -> Machine {
    machine(
        MachineConfig {
            memory_bytes: 256 * MIB,
            ..MachineConfig::default()
        },
        1,
        16 * MIB,
        Backing::Anonymous,
    )
}

/// A remap without a flush may still be served from the TLB; after INVLPG it
/// must not be. The oracle sees both and reports nothing.
#[test]
fn test_stale_translation_until_invlpg() {
    let mut m = small_machine();
    let root = GPA + MIB;
    let (a, b) = (GPA + 4 * MIB, GPA + 5 * MIB);
    let mut s = vec![phys_write(a, 0xaaaa), phys_write(b, 0xbbbb)];
    s.push(op(PagingOp::SetMode(PagingMode::long_mode())));
    s.push(op(PagingOp::LoadCr3(root)));
    s.extend(space(root, &[a]));
    let n = s.len();
    s.push(read(0)); // a
    s.push(pte_write(root + 0x3000, b | pte::P | pte::W | pte::U, root));
    s.push(read(0)); // still a, from the TLB
    s.push(op(PagingOp::Invlpg(Gva(0))));
    s.push(read(0)); // b
    let r = run(&mut m, s);
    assert_eq!(r[n], AccessResult::Memory(0xaaaa));
    assert_eq!(
        r[n + 2],
        AccessResult::Memory(0xaaaa),
        "no flush yet: the cached translation"
    );
    assert_eq!(
        r[n + 4],
        AccessResult::Memory(0xbbbb),
        "after INVLPG the new one"
    );
    clean(&m);
}

/// The oracle checked accesses and found nothing.
fn clean(m: &Machine) {
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    assert!(m.oracle.checks() > 0);
}

/// Guest faults carry the architectural error code; A and D are set in the
/// guest's entries by the walk (D only by a write).
#[test]
fn test_guest_faults_and_accessed_dirty_bits() {
    let mut m = small_machine();
    let root = GPA + MIB;
    let a = GPA + 4 * MIB;
    let mut s = vec![
        op(PagingOp::SetMode(PagingMode::long_mode())),
        op(PagingOp::LoadCr3(root)),
    ];
    s.extend(space(root, &[a]));
    let n = s.len() - 6;
    s.push(read(0x1000)); // 6: not present
    s.push(read(0)); // 7
    s.push(GuestAccess::shared(Gpa(root + 0x3000), AccessKind::Read)); // 8: A, no D
    s.push(write(0, 1)); // 9
    s.push(GuestAccess::shared(Gpa(root + 0x3000), AccessKind::Read)); // 10: A and D
    s.push(pte_write(root + 0x3000, a | pte::P | pte::U, root)); // read-only
    s.push(op(PagingOp::Invlpg(Gva(0))));
    s.push(write(0, 2)); // 13: protection fault
    s.push(GuestAccess::linear(
        Gva(0),
        LinearAccess {
            op: LinearOp::Fetch,
            user: false,
            ac: false,
        },
    )); // 14: fine (NX clear)
    let r: Vec<_> = run(&mut m, s).split_off(n);
    assert_eq!(r[6], AccessResult::PageFault(ErrorCode::USER));
    let pt = |i: usize| match r[i] {
        AccessResult::Memory(v) => v,
        ref o => panic!("{o:?}"),
    };
    assert_eq!(pt(8) & (pte::A | pte::D), pte::A);
    assert_eq!(pt(10) & (pte::A | pte::D), pte::A | pte::D);
    assert_eq!(
        r[13],
        AccessResult::PageFault(ErrorCode::PRESENT | ErrorCode::WRITE | ErrorCode::USER)
    );
    assert!(matches!(r[14], AccessResult::Memory(_)));
    clean(&m);
}

/// Translations are tagged by PCID: a CR3 load with the no-flush bit keeps
/// the other space's cached translations, one without it drops them, and
/// INVPCID drops one PCID's.
#[test]
fn test_pcid_tagged_translations_and_invpcid() {
    let mut m = small_machine();
    let (r1, r2) = (GPA + MIB, GPA + 2 * MIB);
    let (a, b, c) = (GPA + 4 * MIB, GPA + 5 * MIB, GPA + 6 * MIB);
    let mut s = vec![
        phys_write(a, 0xa),
        phys_write(b, 0xb),
        phys_write(c, 0xc),
        op(PagingOp::SetMode(PagingMode::long_mode())),
    ];
    s.extend(space(r1, &[a]));
    s.extend(space(r2, &[b]));
    let n = s.len();
    s.push(op(PagingOp::LoadCr3(r1 | 1)));
    s.push(read(0)); // n+1: a
    s.push(op(PagingOp::LoadCr3(r2 | 2)));
    s.push(read(0)); // n+3: b
                     // Space 1 remaps page 0 to c, without a flush; switching back with the
                     // no-flush bit finds the old translation.
    s.push(pte_write(r1 + 0x3000, c | pte::P | pte::W | pte::U, r1));
    s.push(op(PagingOp::LoadCr3(r1 | 1 | CR3_NOFLUSH)));
    s.push(read(0)); // n+6: a (stale, allowed)
    s.push(op(PagingOp::Invpcid(Invpcid::Context(1))));
    s.push(read(0)); // n+8: c
    s.push(op(PagingOp::LoadCr3(r2 | 2 | CR3_NOFLUSH)));
    s.push(read(0)); // n+10: b
    let r = run(&mut m, s);
    assert_eq!(r[n + 1], AccessResult::Memory(0xa));
    assert_eq!(r[n + 3], AccessResult::Memory(0xb));
    assert_eq!(r[n + 6], AccessResult::Memory(0xa));
    assert_eq!(r[n + 8], AccessResult::Memory(0xc));
    assert_eq!(r[n + 10], AccessResult::Memory(0xb));
    clean(&m);
}

/// A sample of the `access` cases (about one in 61) on the TDP MMU: the machine's
/// walker agrees with the reference on each, and the oracle sees no
/// violation.
#[test]
fn test_access_cases_sample() {
    let mut m = small_machine();
    let prog = AccessTest::new(Gpa(GPA + 2 * MIB), 61);
    let out = m.run(vec![prog], &Default::default(), |_| {});
    let (p, _) = out.into_iter().next().unwrap();
    let expect = case_count() / 61;
    assert!(
        p.cases > expect * 9 / 10 && p.cases < expect * 11 / 10,
        "{} cases",
        p.cases
    );
    assert!(
        p.faulted > 0 && p.faulted < p.cases,
        "{} of {} faulted; {:?}",
        p.faulted,
        p.cases,
        p.failed
    );
    assert_eq!(p.failures, 0, "{:?}", p.failed);
    clean(&m);
}

/// Two vCPUs each run a kernel that spawns, switches, remaps, write-protects
/// and ends processes, while the host keeps migrating and swapping out the
/// guest's memory (tables and data pages move and fault back in): every read
/// returns the last stamp, every write to a read-only page faults, and the
/// oracle's reference walk agrees with every access.
#[test]
fn test_process_churn_under_host_invalidations() {
    use std::sync::atomic::Ordering;
    use vmmu_machine::processes::ProcessChurn;
    let chunk = 8 * MIB;
    let mut m = machine(
        MachineConfig {
            memory_bytes: 256 * MIB,
            ..MachineConfig::default()
        },
        2,
        chunk,
        Backing::Anonymous,
    );
    let progs: Vec<_> = (0..2)
        .map(|v| ProcessChurn::new(v, Gpa(GPA + v as u64 * chunk), chunk, 16, 4, 3000, 9))
        .collect();
    let zaps = std::sync::atomic::AtomicU64::new(0);
    let out = m.run(progs, &Default::default(), |ctx| {
        let mut i = 0u64;
        while ctx.running.load(Ordering::Acquire) > 0 {
            // Move or swap out 64 KiB somewhere in the guest's memory.
            let off = ((i * 0x13_3000) % (2 * chunk - 0x10000)) & !0xfff;
            let hva = vmmu::Hva(common::HVA + off);
            let range = vmmu::HvaRange::new(hva, hva.add(0x10000));
            if i.is_multiple_of(2) {
                ctx.host.migrate(range);
            } else {
                ctx.host.swap_out(range);
            }
            zaps.fetch_add(1, Ordering::Relaxed);
            i += 1;
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    });
    for (p, _) in &out {
        assert_eq!(p.mismatches(), 0, "{:?}", p.first_mismatch());
        let c = &p.counters;
        assert!(
            c.spawned > 10 && c.exited > 5 && c.switches > 50 && c.verified_reads > 500,
            "{c:?}"
        );
    }
    assert!(zaps.load(Ordering::Relaxed) > 0);
    clean(&m);
}

/// A 1 GiB guest page (PDPTE with PS) over memory the second stage maps
/// with smaller pages: accesses anywhere in it reach the right offset, the
/// TLB caches it in pieces, and one INVLPG anywhere in the guest page drops
/// them all (a remap of the PDPTE is seen on every piece afterwards).
#[test]
fn test_one_gib_guest_page_and_invlpg_of_all_its_pieces() {
    let mut m = small_machine();
    let root = GPA + MIB;
    let user = pte::P | pte::W | pte::U;
    let mut s = vec![
        phys_write(GPA + 0x5000, 0x55),
        phys_write(GPA + 0x20_7000, 0x77),
        op(PagingOp::SetMode(PagingMode::long_mode())),
        op(PagingOp::LoadCr3(root)),
        pte_write(root, (root + 0x1000) | user, root),
        // gva [0, 1 GiB) -> gpa [1 GiB, 2 GiB): the memslot's first 16 MiB.
        pte_write(root + 0x1000, GPA | pte::PS | user, root),
    ];
    let n = s.len();
    s.push(read(0x5000));
    s.push(read(0x20_7000));
    // Unmap the 1 GiB page without a flush, then flush with one INVLPG far
    // from both addresses read: both must fault afterwards.
    s.push(pte_write(root + 0x1000, 0, root));
    s.push(op(PagingOp::Invlpg(Gva(0x3000_0000))));
    s.push(read(0x5000));
    s.push(read(0x20_7000));
    let r = run(&mut m, s);
    assert_eq!(r[n], AccessResult::Memory(0x55));
    assert_eq!(r[n + 1], AccessResult::Memory(0x77));
    assert_eq!(r[n + 4], AccessResult::PageFault(ErrorCode::USER));
    assert_eq!(r[n + 5], AccessResult::PageFault(ErrorCode::USER));
    clean(&m);
}
