//! Microbenchmarks of the MMU core. Each bench measures one named path:
//!
//! - `fault_4k_resident`: one 4 KiB write fault through the slow path (pre-check,
//!   memslot lookup, host faultin, `mmu_lock` for read, walk, leaf install) into
//!   tables that already exist, with the frame already resident in the host.
//! - `fault_2m`: the same, installing a 2 MiB leaf.
//! - `fault_4k_private`: `fault_4k_resident` on a software-protected VM whose
//!   slot is private, the frames already allocated in its guest_memfd: the
//!   private path (attribute lookup, guest_memfd page lookup) instead of the
//!   host's. Compare with `fault_4k_resident` of the same run.
//! - `fast_path_fix`: a present write fault on a write-protected, MMU-writable
//!   4 KiB entry, fixed by the lockless fast path.
//! - `zap_1g_4k`: `zap_gfn_range` over 1 GiB mapped with 262144 4 KiB leaves.
//! - `invalidate_nothing_mapped/{in_slot,no_slot}`: an mmu_notifier
//!   `invalidate_range_start` + `invalidate_range_end` pair over 2 MiB where
//!   nothing is mapped, inside a memslot or outside every memslot.
//! - `memslot_lookup/{10,509,32764}`: `MemslotSet::lookup` of a random gfn.
//! - `memslot_move/{10,509,32764}`: a memslot moved away and back.
//!
//! The host is deliberately trivial ([`BenchHost`]): frames are computed from the
//! host address, and table pages come from a preallocated arena, so the numbers
//! are the MMU's own work. Every bench checks outside the timed region that the
//! expected thing happened (leaf counts, fast-path counters), so none can
//! silently measure a no-op.

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use vmmu::memslot::USER_MEM_SLOTS;
use vmmu::{ErrorCode, Gfn, Gpa, Hva, HvaRange, Level, UserMemoryRegion, Vm, VmConfig, PAGE_SIZE};

mod common;
use common::*;

/// Shared body of `fault_4k_resident` and `fault_2m`: per batch, fault up to
/// `batch` distinct pages of `level` size (timed), then zap them (not timed).
/// The tables are built once beforehand and survive leaf zaps, so every timed
/// fault installs exactly one leaf into existing tables.
fn bench_fault(c: &mut Criterion, name: &str, level: Level, batch: u64) {
    let page = level.bytes();
    let g = Guest::new(level, batch * page, 1024);
    let s = bench_fault_on(c, name, level, batch, g);
    assert_eq!(s.private_faults, 0);
}

fn bench_fault_on(
    c: &mut Criterion,
    name: &str,
    level: Level,
    batch: u64,
    mut g: Guest,
) -> vmmu::Stats {
    let page = level.bytes();

    // Build the tables, check one leaf per fault at the right level, zap.
    assert_eq!(g.fault_pages(page, batch, ErrorCode::WRITE), batch);
    let s = g.vm.stats();
    assert_eq!(s.present(level), batch, "{name}: leaves after populate");
    assert_eq!(
        s.present(Level::K4) + s.present(Level::M2) + s.present(Level::G1),
        batch
    );
    let tables = s.tables_allocated;
    g.zap_slot();
    assert_eq!(g.vm.stats().present(level), 0, "{name}: leaves after zap");
    let host_pages = g.host.allocated.load(Ordering::Relaxed);

    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(batch);
                let start = Instant::now();
                let fixed = g.fault_pages(page, n, ErrorCode::WRITE);
                total += start.elapsed();
                assert_eq!(fixed, n, "{name}: faults not fixed");
                assert_eq!(g.vm.stats().present(level), n, "{name}: leaves mapped");
                g.zap_slot();
                left -= n;
            }
            total
        })
    });

    let s = g.vm.stats();
    assert_eq!(
        s.tables_allocated, tables,
        "{name}: timed faults linked new tables"
    );
    assert_eq!(
        g.host.allocated.load(Ordering::Relaxed),
        host_pages,
        "{name}: table pages allocated while measuring"
    );
    assert_eq!(s.present(level), 0);
    assert_eq!(s.faults_retry, 0, "{name}: faults retried");
    s
}

/// Timed: one `page_fault(gpa, WRITE)` on a not-present 4 KiB page whose frame the
/// host has resident (host mapping level 4K), installing a 4 KiB leaf into
/// existing tables. Batches of 4096 consecutive pages (16 MiB); the zap between
/// batches is not timed.
fn fault_4k_resident(c: &mut Criterion) {
    bench_fault(c, "fault_4k_resident", Level::K4, 4096);
}

/// Timed: `fault_4k_resident` on private memory: a 4 KiB write fault on a
/// software-protected VM whose gfn is private, its frame already in the
/// guest_memfd, installing a 4 KiB leaf into existing tables.
fn fault_4k_private(c: &mut Criterion) {
    let (g, file) = Guest::new_private(4096 * PAGE_SIZE, 1024);
    let s = bench_fault_on(c, "fault_4k_private", Level::K4, 4096, g);
    assert_eq!(s.private_faults, s.faults_fixed, "every fault was private");
    assert_eq!(file.allocated_pages(), 4096, "the file kept its pages");
}

/// Timed: one `page_fault(gpa, WRITE)` on a not-present 2 MiB-aligned region with
/// a 2 MiB host mapping, installing a 2 MiB leaf into an existing directory.
/// Batches of 256 consecutive 2 MiB pages (512 MiB); the zap is not timed.
fn fault_2m(c: &mut Criterion) {
    bench_fault(c, "fault_2m", Level::M2, 256);
}

/// Timed: one `page_fault(gpa, PRESENT | WRITE)` on a 4 KiB leaf that
/// `write_protect_gfn_range` made read-only (MMU-writable kept), which the lockless
/// fast path makes writable with one compare-and-exchange. Batches of 4096 pages;
/// re-protecting them between batches is not timed.
fn fast_path_fix(c: &mut Criterion) {
    const BATCH: u64 = 4096;
    let ec = ErrorCode::PRESENT | ErrorCode::WRITE;
    let mut g = Guest::new(Level::K4, BATCH * PAGE_SIZE, 64);
    assert_eq!(g.fault_pages(PAGE_SIZE, BATCH, ErrorCode::WRITE), BATCH);

    // Sanity: protection applies to every leaf and the fast path fixes them.
    let before = g.vm.stats();
    g.vm.write_protect_gfn_range(0, g.slot)
        .expect("valid range");
    g.vcpu.prepare_entry().expect("re-enter");
    let s = g.vm.stats();
    assert_eq!(
        s.entries_write_protected - before.entries_write_protected,
        BATCH
    );
    let fast = g.vcpu.stats().fast_path_fixed;
    assert_eq!(g.fault_pages(PAGE_SIZE, BATCH, ec), BATCH);
    let s = g.vm.stats();
    assert_eq!(g.vcpu.stats().fast_path_fixed - fast, BATCH);
    assert_eq!(s.leaves_mapped_4k, before.leaves_mapped_4k, "slow path ran");
    assert_eq!(s.present(Level::K4), BATCH);

    c.bench_function("fast_path_fix", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                let range = g.range(PAGE_SIZE, n);
                g.vm.write_protect_gfn_range(0, range).expect("valid range");
                g.vcpu.prepare_entry().expect("re-enter");
                let fast = g.vcpu.stats().fast_path_fixed;
                let start = Instant::now();
                let fixed = g.fault_pages(PAGE_SIZE, n, ec);
                total += start.elapsed();
                assert_eq!(fixed, n, "fast_path_fix: faults not fixed");
                assert_eq!(g.vcpu.stats().fast_path_fixed - fast, n, "not fast path");
                left -= n;
            }
            total
        })
    });

    let s = g.vm.stats();
    assert_eq!(s.leaves_mapped_4k, before.leaves_mapped_4k, "slow path ran");
    assert_eq!(s.present(Level::K4), BATCH);
}

/// Timed: one `zap_gfn_range` over 1 GiB mapped entirely with 4 KiB leaves
/// (262144 leaves; includes the remote-flush request and any `mmu_lock` yields).
/// Re-populating by faulting every page is not timed. Leaf tables survive the
/// zap, so every iteration zaps the same shape.
fn zap_1g_4k(c: &mut Criterion) {
    const PAGES: u64 = GIB / PAGE_SIZE;
    let mut g = Guest::new(Level::K4, GIB, 1024);
    c.bench_function("zap_1g_4k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                assert_eq!(g.fault_pages(PAGE_SIZE, PAGES, ErrorCode::WRITE), PAGES);
                let before = g.vm.stats();
                assert_eq!(before.present(Level::K4), PAGES, "zap_1g_4k: populate");
                let start = Instant::now();
                g.vm.zap_gfn_range(0, g.slot).expect("valid range");
                total += start.elapsed();
                let s = g.vm.stats();
                assert_eq!(s.present(Level::K4), 0, "zap_1g_4k: leaves left");
                assert_eq!(s.leaves_zapped - before.leaves_zapped, PAGES);
                g.vcpu.prepare_entry().expect("re-enter");
            }
            total
        })
    });
    let s = g.vm.stats();
    assert_eq!(s.invariant_violations, 0);
}

/// Timed: `invalidate_range_start` + `invalidate_range_end` over 2 MiB of host
/// addresses where nothing is mapped. The VM has one 1 GiB memslot whose first
/// 2 MiB are mapped (so the root has tables down to that region) and a loaded
/// root. `in_slot`: the range is the slot's second 2 MiB (takes `mmu_lock` for
/// write twice, walks and finds nothing). `no_slot`: the range overlaps no memslot
/// (no lock, no walk).
fn invalidate_nothing_mapped(c: &mut Criterion) {
    const MAPPED: u64 = MIB2 / PAGE_SIZE;
    let mut g = Guest::new(Level::K4, GIB, 64);
    assert_eq!(g.fault_pages(PAGE_SIZE, MAPPED, ErrorCode::WRITE), MAPPED);
    let in_slot = HvaRange::new(Hva(HVA_BASE + MIB2), Hva(HVA_BASE + 2 * MIB2));
    let no_slot = HvaRange::new(Hva(HVA_BASE + 2 * GIB), Hva(HVA_BASE + 2 * GIB + MIB2));
    let vm = g.vm.clone();

    for (range, hits_slot) in [(in_slot, 1), (no_slot, 0)] {
        let before = vm.stats();
        let inv = vm.invalidate_range_start(range);
        inv.end();
        let s = vm.stats();
        assert_eq!(s.invalidations - before.invalidations, 1);
        assert_eq!(
            s.invalidations_with_slots - before.invalidations_with_slots,
            hits_slot
        );
        assert_eq!(s.leaves_zapped, before.leaves_zapped);
        assert_eq!(vm.invalidations_in_progress(), 0);
    }

    let before = vm.stats();
    let mut group = c.benchmark_group("invalidate_nothing_mapped");
    group.bench_function("in_slot", |b| {
        b.iter(|| {
            let inv = vm.invalidate_range_start(black_box(in_slot));
            inv.end();
        })
    });
    group.bench_function("no_slot", |b| {
        b.iter(|| {
            let inv = vm.invalidate_range_start(black_box(no_slot));
            inv.end();
        })
    });
    group.finish();

    let s = vm.stats();
    assert_eq!(s.leaves_zapped, before.leaves_zapped);
    assert_eq!(s.present(Level::K4), MAPPED);
    assert_eq!(vm.invalidations_in_progress(), 0);
}

/// xorshift64*: deterministic, dependency-free random numbers.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// A VM with `n` one-page slots placed every other page from `GPA_BASE`.
fn one_page_slots(n: u32) -> (std::sync::Arc<BenchHost>, Vm) {
    let host = BenchHost::new(16, Level::K4);
    let vm = Vm::new(VmConfig::default(), host.ops()).expect("create VM");
    let t = Instant::now();
    for i in 0..u64::from(n) {
        vm.set_user_memory_region(one_page_slot(i as u32, GPA_BASE + 2 * i * PAGE_SIZE))
            .expect("create memslot");
    }
    let created = t.elapsed();
    if created > Duration::from_secs(1) {
        eprintln!("creating {n} slots took {created:.2?}");
    }
    (host, vm)
}

/// Slot `i` of [`one_page_slots`], at `gpa`.
fn one_page_slot(i: u32, gpa: u64) -> UserMemoryRegion {
    UserMemoryRegion {
        slot: i,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: PAGE_SIZE,
        userspace_addr: HVA_BASE + u64::from(i) * PAGE_SIZE,
    }
}

/// Timed: one `MemslotSet::lookup(gfn)` hitting a slot, for a set of 10, 509 or
/// 32764 (`USER_MEM_SLOTS`) one-page slots placed every other page (so each
/// lookup must check containment). The gfns are drawn uniformly over the slots
/// from a precomputed table of 16384; creating the slots is not measured.
fn memslot_lookup(c: &mut Criterion) {
    const GFNS: usize = 1 << 14;
    let base = Gpa(GPA_BASE).gfn();
    let mut group = c.benchmark_group("memslot_lookup");
    for n in [10u32, 509, USER_MEM_SLOTS] {
        let (host, vm) = one_page_slots(n);
        let set = vm.memslots(0).expect("address space 0");
        assert_eq!(set.len(), n as usize);

        let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(n);
        let gfns: Vec<Gfn> = (0..GFNS)
            .map(|_| base.add(2 * (next_random(&mut rng) % u64::from(n))))
            .collect();
        for &gfn in &gfns {
            let slot = set.lookup(gfn).expect("gfn in a slot");
            assert!(slot.contains(gfn));
            assert_eq!(slot.base_gfn(), gfn);
        }
        assert!(set.lookup(base.add(1)).is_none(), "hole between slots");

        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &gfns, |b, gfns| {
            b.iter(|| {
                let gfn = gfns[i % GFNS];
                i = i.wrapping_add(1);
                set.lookup(black_box(gfn))
            })
        });
        drop(set);
        drop(vm);
        assert_eq!(host.allocated.load(Ordering::Relaxed), 0);
    }
    group.finish();
}

/// Timed: a `KVM_SET_USER_MEMORY_REGION` move of the last of 10, 509 or 32764
/// one-page slots to a free gpa and back (memslot_perf_test's move loops
/// without their guest): each move publishes two sets (the slot marked
/// invalid, then moved) and zaps the roots, nothing being mapped.
fn memslot_move(c: &mut Criterion) {
    let mut group = c.benchmark_group("memslot_move");
    for n in [10u32, 509, USER_MEM_SLOTS] {
        let (host, vm) = one_page_slots(n);
        let last = n - 1;
        let home = GPA_BASE + 2 * u64::from(last) * PAGE_SIZE;
        let away = GPA_BASE + 2 * u64::from(n) * PAGE_SIZE;
        let before = vm.stats().memslot_updates;
        let mut moves = 0u64;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                vm.set_user_memory_region(one_page_slot(last, away))
                    .expect("move away");
                vm.set_user_memory_region(one_page_slot(last, home))
                    .expect("move back");
                moves += 2;
            })
        });
        assert_eq!(
            vm.stats().memslot_updates - before,
            2 * moves,
            "two sets per move"
        );
        let set = vm.memslots(0).expect("address space 0");
        assert_eq!(set.len(), n as usize);
        let slot = set.lookup(Gpa(home).gfn()).expect("slot back home");
        assert_eq!(slot.slot_number(), last);
        assert!(set.lookup(Gpa(away).gfn()).is_none());
        drop(set);
        drop(vm);
        assert_eq!(host.allocated.load(Ordering::Relaxed), 0);
    }
    group.finish();
}

/// A logged write fault: a write to a page a dirty-log harvest write-protected,
/// fixed by the fast path, which gives the write permission back and marks
/// the page in the slot's bitmap. The harvest between batches is not timed.
fn logged_write_fault(c: &mut Criterion) {
    const BATCH: u64 = 4096;
    let ec = ErrorCode::PRESENT | ErrorCode::WRITE;
    let mut g = Guest::new(Level::K4, BATCH * PAGE_SIZE, 64);
    assert_eq!(g.fault_pages(PAGE_SIZE, BATCH, ErrorCode::WRITE), BATCH);
    g.vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags: vmmu::MemFlags::LOG_DIRTY_PAGES.bits(),
        guest_phys_addr: GPA_BASE,
        memory_size: BATCH * PAGE_SIZE,
        userspace_addr: HVA_BASE,
    })
    .expect("turn logging on");
    let log = g.vm.get_dirty_log(0).expect("harvest");
    assert!(
        log.iter().all(|w| *w == 0),
        "nothing written since logging began"
    );
    let mut measured = 0u64;
    c.bench_function("logged_write_fault", |b| {
        b.iter_custom(|iters| {
            measured += iters;
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                // Every page was written: the harvest takes and protects all.
                let _ = g.vm.get_dirty_log(0).expect("harvest");
                g.vcpu.prepare_entry().expect("re-enter");
                let fast = g.vcpu.stats().fast_path_fixed;
                let start = Instant::now();
                let fixed = g.fault_pages(PAGE_SIZE, n, ec);
                total += start.elapsed();
                assert_eq!(fixed, n, "logged_write_fault: faults not fixed");
                assert_eq!(g.vcpu.stats().fast_path_fixed - fast, n, "not fast path");
                left -= n;
            }
            total
        })
    });
    // (Nothing ran when a filter left this bench out.)
    let log = g.vm.get_dirty_log(0).expect("harvest");
    assert_eq!(
        log.iter().any(|w| *w != 0),
        measured > 0,
        "the writes were logged"
    );
}

criterion_group!(
    benches,
    fault_4k_resident,
    fault_4k_private,
    fault_2m,
    fast_path_fix,
    logged_write_fault,
    invalidate_nothing_mapped,
    memslot_lookup,
    memslot_move
);
criterion_group! {
    name = zap;
    // Each iteration re-populates 262144 pages untimed (several times the timed
    // zap). Criterion sizes the warm-up and the iteration counts by the wall time
    // of `iter_custom` calls, populate included: 3 s gives 10 linear samples of
    // 110 iterations in all (about 4 s of wall time) without a "cannot complete"
    // warning.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = zap_1g_4k
}
criterion_main!(benches, zap);
