//! The shadow MMU on the machine: the processor walks only the shadow
//! tables, every #PF and paging instruction exits to the MMU, guest stores
//! to shadowed tables are emulated, and the oracle checks each access
//! against the reference walk of the guest's tables and the host's mapping.

mod common;

use common::{machine, GPA};
use vmmu::{Gpa, MmuKind, VmConfig};
use vmmu_machine::access_test::{case_count, AccessTest};
use vmmu_machine::guest::{GuestProgram, Pattern};
use vmmu_machine::{Backing, Machine, MachineConfig};

const MIB: u64 = 1 << 20;

fn shadow_machine(vcpus: u32, bytes: u64) -> Machine {
    shadow_machine_with(vcpus, bytes, VmConfig::default())
}

fn shadow_machine_with(vcpus: u32, bytes: u64, vm: VmConfig) -> Machine {
    machine(
        MachineConfig {
            memory_bytes: 256 * MIB,
            vm: VmConfig {
                mmu: MmuKind::Shadow,
                ..vm
            },
            ..MachineConfig::default()
        },
        vcpus,
        bytes,
        Backing::Anonymous,
    )
}

fn clean(m: &Machine) {
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    assert!(m.oracle.checks() > 0);
}

/// A sample of the `access` cases under shadow paging: the MMU's walker
/// (not the processor's) decides every fault, error code and A/D update,
/// and each agrees with the reference.
#[test]
fn test_shadow_access_cases_sample() {
    let mut m = shadow_machine(1, 16 * MIB);
    let prog = AccessTest::new(Gpa(GPA + 2 * MIB), 61);
    let out = m.run(vec![prog], &Default::default(), |_| {});
    let (p, rep) = out.into_iter().next().unwrap();
    let expect = case_count() / 61;
    assert!(p.cases > expect * 9 / 10, "{} cases", p.cases);
    assert!(p.faulted > 0 && p.faulted < p.cases, "{:?}", p.failed);
    assert_eq!(p.failures, 0, "{:?}", p.failed);
    let c = &rep.counters;
    // Every case rewrites its shadowed tables: emulated stores.
    assert!(c.emulated_writes > p.cases, "{c:?}");
    assert!(c.shadow_pf_exits > p.cases, "{c:?}");
    assert!(c.paging_exits >= p.cases, "{c:?}");
    let s = m.vm.stats();
    assert!(
        s.shadow_guest_faults > 0 && s.shadow_pte_writes > 0,
        "{s:?}"
    );
    clean(&m);
}

/// Paging off: the direct root maps linear = physical; the demand-paging
/// passes see every value they wrote.
#[test]
fn test_shadow_paging_off_demand_paging() {
    let bytes = 8 * MIB;
    let mut m = shadow_machine(2, bytes);
    let models = common::models(2, bytes);
    let models = common::pass(&mut m, models, 0, Pattern::Sequential, 100);
    let _ = common::pass(&mut m, models, 1, Pattern::Random, 50);
    let s = m.vm.stats();
    assert!(s.faults_fixed >= 2 * bytes / 4096, "{s:?}");
    assert_eq!(s.shadow_guest_faults, 0);
    clean(&m);
}

/// Paging on over the direct map the VMM wrote before the first entry: the
/// same passes go through guest tables the MMU shadows (indirect pages, a
/// walk per fault) and still see every value; tables outside every memslot
/// are refused, changing nothing.
#[test]
fn test_shadow_demand_paging_over_a_direct_map() {
    let bytes = 8 * MIB;
    let mut m = shadow_machine(2, bytes);
    let e = m.start_paging_over_direct_map(Gpa(64 * MIB)).unwrap_err();
    assert!(e.to_string().contains("in no memslot"), "{e}");
    assert!(m.vcpus().iter().all(|v| !v.paging.mode().enabled));
    // Room for the first vCPU's tables only: refused, nothing written.
    let tables = 0x20_0000_0000u64;
    m.map(vmmu::Hva(tables + MIB), 8192, Backing::Anonymous)
        .unwrap();
    m.set_memslot(vmmu::UserMemoryRegion {
        slot: 2,
        flags: 0,
        guest_phys_addr: 64 * MIB,
        memory_size: 8192,
        userspace_addr: tables + MIB,
    })
    .unwrap();
    assert!(m.start_paging_over_direct_map(Gpa(64 * MIB)).is_err());
    assert!(m.vcpus().iter().all(|v| !v.paging.mode().enabled));
    m.map(vmmu::Hva(tables), MIB, Backing::Anonymous).unwrap();
    m.set_memslot(vmmu::UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MIB,
        userspace_addr: tables,
    })
    .unwrap();
    m.start_paging_over_direct_map(Gpa(0)).unwrap();
    let models = common::models(2, bytes);
    let models = common::pass(&mut m, models, 0, Pattern::Sequential, 100);
    let _ = common::pass(&mut m, models, 1, Pattern::Random, 50);
    let info = m.vm.shadow_info();
    assert!(info.indirect >= 4, "{info:?}");
    assert!(m.vm.stats().faults_fixed >= 2 * bytes / 4096);
    clean(&m);
}

/// Two vCPUs each run a kernel that spawns, switches, remaps, write-protects
/// and ends processes under shadow paging: every read returns the last
/// stamp, every write to a read-only page faults, the oracle agrees with
/// every access, the process exits zap shadow pages (flooding: a cached
/// root among them, which its vCPU drops alone), and switches between live
/// processes hit the previous-roots cache.
#[test]
fn test_shadow_process_churn() {
    let (m, out) = churn(VmConfig::default(), 3000);
    for (p, rep) in &out {
        assert_eq!(p.mismatches(), 0, "{:?}", p.first_mismatch());
        let c = &p.counters;
        assert!(
            c.spawned > 10 && c.exited > 5 && c.switches > 50 && c.verified_reads > 500,
            "{c:?}"
        );
        assert!(rep.counters.emulated_writes > 0, "{:?}", rep.counters);
    }
    let s = m.vm.stats();
    assert!(s.shadow_flooded > 0 && s.shadow_pages_zapped > 0, "{s:?}");
    assert!(
        s.prev_root_hits > 0 && s.obsolete_roots_dropped > 0,
        "{s:?}"
    );
    assert!(s.prev_roots_kept > 0, "{s:?}");
    // The kernel writes its processes' PTs without exits once they are
    // unsync; INVLPG and flushing CR3 loads sync them.
    assert!(
        s.shadow_unsynced > 0 && s.shadow_synced > 0 && s.shadow_entries_synced > 0,
        "{s:?}"
    );
    clean(&m);
}

type ChurnOut = Vec<(
    vmmu_machine::processes::ProcessChurn,
    vmmu_machine::VcpuReport,
)>;

fn churn(vm: VmConfig, ops: u64) -> (Machine, ChurnOut) {
    use vmmu_machine::processes::ProcessChurn;
    let chunk = 8 * MIB;
    let mut m = shadow_machine_with(2, chunk, vm);
    let progs: Vec<_> = (0..2)
        .map(|v| ProcessChurn::new(v, Gpa(GPA + v as u64 * chunk), chunk, 16, 4, ops, 9))
        .collect();
    let out = m.run(progs, &Default::default(), |_| {});
    (m, out)
}

/// Each rule of the sync, broken on purpose, lets a process use a
/// translation its kernel replaced and flushed: the guest sees a stale
/// value and the oracle reports the access.
#[test]
fn test_shadow_sync_rules_broken_are_caught() {
    type Knob = fn(&mut vmmu::GuardKnobs);
    // (The reuse rule needs a path cut at the right moment; its unit test
    // makes that moment: `test_a_reused_page_with_unsync_pages_below_...`.)
    let knobs: [(&str, Knob); 3] = [
        ("invlpg_skips_sync", |k| k.invlpg_skips_sync = true),
        ("cr3_flush_skips_sync", |k| k.cr3_flush_skips_sync = true),
        ("sync_without_write_protect", |k| {
            k.sync_without_write_protect = true
        }),
    ];
    for (name, set) in knobs {
        let mut vm = VmConfig::default();
        set(&mut vm.knobs);
        let (m, out) = churn(vm, 3000);
        let mismatches: u64 = out.iter().map(|(p, _)| p.mismatches()).sum();
        assert!(
            m.oracle.total() > 0 && mismatches > 0,
            "{name}: not caught ({mismatches} mismatches, oracle {:?})",
            m.oracle.log()
        );
    }
}

/// With unsync off every store to a shadowed table is emulated, and the
/// same guest runs as correctly.
#[test]
fn test_shadow_process_churn_without_unsync() {
    let vm = VmConfig {
        shadow_unsync: false,
        ..VmConfig::default()
    };
    let (m, out) = churn(vm, 2000);
    for (p, _) in &out {
        assert_eq!(p.mismatches(), 0, "{:?}", p.first_mismatch());
    }
    let s = m.vm.stats();
    assert_eq!(s.shadow_unsynced, 0);
    assert!(s.shadow_pte_writes > 0, "{s:?}");
    clean(&m);
}

/// Dirty logging under shadow paging: every page written after a harvest
/// is in the next one (the harvest write-protects through the rmaps).
#[test]
fn test_shadow_dirty_log_reports_every_write() {
    let bytes = 2 * MIB;
    let mut m = shadow_machine(1, bytes);
    m.set_memslot(vmmu::UserMemoryRegion {
        slot: 0,
        flags: vmmu::MemFlags::LOG_DIRTY_PAGES.bits(),
        guest_phys_addr: GPA,
        memory_size: bytes,
        userspace_addr: common::HVA,
    })
    .unwrap();
    let mut models = common::models(1, bytes);
    for pass in 0..3 {
        models = common::pass(&mut m, models, pass, Pattern::Sequential, 100);
        let log = m.vm.get_dirty_log(0).unwrap();
        let set: u32 = log.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set as u64, bytes / 4096, "pass {pass}: {log:x?}");
        let writable =
            m.vm.mappings(0)
                .iter()
                .filter(|(_, _, s)| s.is_writable())
                .count();
        assert_eq!(
            writable, 0,
            "pass {pass}: writable leaves after the harvest"
        );
    }
    clean(&m);
}

/// The host's user-space accessors (what the shadow MMU's emulated stores
/// and its walker's A/D updates use, and the VMM's own loads and stores)
/// never lose a store to a page the host migrates or swaps meanwhile: every
/// value written is what the host's mapping holds right after. (They did:
/// a store to a frame the migration had already copied was dropped with it;
/// the 10-minute shadow soak saw it as two guest translations that disagreed
/// with the tables the guest had written.)
#[test]
fn test_host_word_stores_survive_migration_and_swap() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vmmu::PrimaryMmu;
    let m = shadow_machine(1, 2 * MIB);
    let host = m.host.clone();
    let hva = vmmu::Hva(common::HVA + 0x3008);
    let range = vmmu::HvaRange::new(vmmu::Hva(common::HVA), vmmu::Hva(common::HVA + 0x10000));
    let stop = AtomicBool::new(false);
    let lost = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                if i.is_multiple_of(2) {
                    host.migrate(range);
                } else {
                    host.swap_out(range);
                }
                i += 1;
            }
        });
        let mut lost = Vec::new();
        for v in 1..=20_000u64 {
            if v.is_multiple_of(2) {
                PrimaryMmu::write_u64(&*host, hva, v).unwrap();
            } else {
                host.write_u64(hva, v).unwrap();
            }
            let seen = PrimaryMmu::read_u64(&*host, hva).unwrap();
            if seen != v {
                lost.push((v, seen));
            }
            if v.is_multiple_of(1000) {
                // The walker's compare-exchange too.
                let r = host.cmpxchg_u64(hva, v, v).unwrap();
                assert_eq!(r, Ok(v));
            }
        }
        stop.store(true, Ordering::Release);
        lost
    });
    assert!(
        lost.is_empty(),
        "stores lost (written, then read): {lost:?}"
    );
}
