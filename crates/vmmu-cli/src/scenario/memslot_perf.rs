//! `memslot-perf` (memslot_perf_test): 512 MiB + 64 KiB of guest memory at
//! GPA 256 MiB split over as many memslots as asked (slot 0 apart, as the
//! selftest keeps its code there; the remainder goes to the last slot), then
//! six loops timed per iteration:
//! - `map`: the host drops one 16 MiB half of a 32 MiB area (`MADV_DONTNEED`)
//!   and the guest writes every page of the other, then they swap: fault-in
//!   through many slots;
//! - `unmap` and `unmap-chunked`: over 128 MiB faulted in once, the guest
//!   writes one page of a half and the host drops the other half 4 KiB (or
//!   2 MiB) at a time: notifier invalidations through many slots;
//! - `move-active` and `move-inactive`: the last slot moves above the test
//!   area and back (two `KVM_SET_USER_MEMORY_REGION` moves per iteration)
//!   while the guest writes and reads 64 KiB straddling that slot's start
//!   (MMIO exits allowed only inside the moved slot), or 64 KiB of the first
//!   slot (no MMIO exit allowed);
//! - `rw`: over the 512 MiB faulted in once, the guest writes every page,
//!   the host reads each page back through its own mapping, the guest reads
//!   every page: lookups and translation with many slots.
//!
//! Each loop runs for `-l` seconds (at least one iteration) and reports the
//! mean time per iteration, as the selftest does. Differences from it: the
//! steps of `map` and `unmap` take turns instead of running at once behind a
//! shared flag, one run per slot count (no best of `-r`), and the data is
//! checked always (the oracle on every access, the guest's reads against what
//! it wrote).

use std::time::{Duration, Instant};

use serde_json::json;
use vmmu::{Gpa, Hva, HvaRange, UserMemoryRegion};
use vmmu_machine::guest::{Pass, Pattern, RefModel};
use vmmu_machine::{Backing, Machine, MachineConfig};

use vmmu_kvm::memslot_perf::more;

use super::{vm_config, Env};
use crate::args::{BadInput, Common};
use crate::report::Report;

/// The sub-tests, in the selftest's order (its `-f`/`-e` indices).
pub const TESTS: [&str; 6] = [
    "map",
    "unmap",
    "unmap-chunked",
    "move-active",
    "move-inactive",
    "rw",
];
/// Slot counts run by default (the and the selftest's usual ones;
/// 32764 is `KVM_CAP_NR_MEMSLOTS` on x86).
pub const DEFAULT_SLOTS: [u32; 4] = [10, 509, 4096, 32764];

const PAGE: u64 = 4096;
const TEST_GPA: u64 = 256 << 20;
const SYNC_BYTES: u64 = 64 << 10;
const TEST_BYTES: u64 = (512 << 20) + SYNC_BYTES;
const TEST_HVA: u64 = 0x100_0000_0000;
/// Slot 0: where the selftest's code lives.
const SLOT0_HVA: u64 = 0x0ff_0000_0000;
const SLOT0_BYTES: u64 = 1 << 20;
const MAP_HALF: u64 = 16 << 20;
const UNMAP_HALF: u64 = 64 << 20;
const MOVE_WINDOW: u64 = 64 << 10;
/// Where the moved slot goes: above the test area.
const MOVE_DEST_GPA: u64 = 1 << 30;
const _: () = assert!(MOVE_DEST_GPA >= TEST_GPA + TEST_BYTES);

/// What `vmmu run memslot-perf` was asked for.
#[derive(Clone, Debug)]
pub struct PerfArgs {
    /// Slot counts to run, each on a fresh VM (slot 0 included).
    pub slots: Vec<u32>,
    /// First and last sub-test index.
    pub first: usize,
    /// Last sub-test index.
    pub last: usize,
    /// How long each loop runs (at least one iteration).
    pub seconds: f64,
    /// Also run the loops on /dev/kvm.
    pub vs_kvm: bool,
}

/// The test slots (ids 1..n): gpa and size, the remainder in the last (the
/// same split as the KVM side's).
fn layout(n: u32) -> Vec<(u64, u64)> {
    vmmu_kvm::memslot_perf::layout(TEST_GPA, TEST_BYTES, n)
}

/// Check the flags (before anything is allocated).
pub fn validate(common: &Common, a: &PerfArgs) -> anyhow::Result<()> {
    if common.mmu == vmmu::MmuKind::Shadow || common.guest_paging {
        anyhow::bail!(BadInput(
            "memslot-perf --mmu shadow/--guest-paging: the loops run on the TDP MMU with guest paging off here (drop the flag)".into()
        ));
    }
    if a.first > a.last || a.last >= TESTS.len() {
        anyhow::bail!(BadInput(format!(
            "-f {} -e {}: sub-tests are 0..={} ({}), first at most last",
            a.first,
            a.last,
            TESTS.len() - 1,
            TESTS.join(", ")
        )));
    }
    if !(a.seconds > 0.0 && a.seconds <= 3600.0) {
        anyhow::bail!(BadInput(format!(
            "-l {}: each loop runs for more than 0 and at most 3600 seconds",
            a.seconds
        )));
    }
    let moves = (a.first..=a.last).any(|t| TESTS[t].starts_with("move"));
    for &n in &a.slots {
        let max = vmmu::memslot::USER_MEM_SLOTS;
        let min = if moves { 3 } else { 2 };
        if n < min || n > max {
            anyhow::bail!(BadInput(format!(
                "-s {n}: between {min} and {max} memslots (slot 0 and at least {} test slot{}; the move tests move the last one and write the first)",
                min - 1,
                if min > 2 { "s" } else { "" }
            )));
        }
        if moves && layout(n).last().is_some_and(|l| l.1 < MOVE_WINDOW / 2) {
            anyhow::bail!(BadInput(format!(
                "-s {n}: the last slot is smaller than half the 64 KiB the move tests write"
            )));
        }
    }
    if a.slots.is_empty() {
        anyhow::bail!(BadInput("-s: at least one slot count".into()));
    }
    Ok(())
}

/// The shape the report shows: one vCPU over the test area.
fn shape(a: &PerfArgs) -> crate::args::Shape {
    crate::args::Shape {
        vcpus: 1,
        bytes_per_vcpu: TEST_BYTES,
        total: TEST_BYTES,
        backing: Backing::Anonymous,
        slots: a.slots.iter().copied().max().unwrap_or(1),
        write_percent: 100,
        iterations: 1,
        touch_stride: PAGE,
        touch_bytes: TEST_BYTES,
    }
}

/// One slot count's figures.
struct Row {
    slots: u32,
    setup_ns: u64,
    tests: Vec<(&'static str, Loop)>,
    mismatches: u64,
    first_mismatch: Option<String>,
}

/// What one loop did.
#[derive(Clone, Copy, Debug, Default)]
struct Loop {
    /// Time in the timed steps.
    ns: u64,
    iterations: u64,
    /// Guest accesses and their MMIO exits.
    accesses: u64,
    mmio: u64,
}

impl Loop {
    fn per_iteration(&self) -> u64 {
        self.ns / self.iterations.max(1)
    }
}

fn hva_of(gpa: u64) -> u64 {
    TEST_HVA + (gpa - TEST_GPA)
}

fn region(slot: u32, gpa: u64, size: u64) -> UserMemoryRegion {
    UserMemoryRegion {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva_of(gpa),
    }
}

/// Pass number `n` of the one vCPU over `model`'s pages, in order, writing
/// `write_percent` of them and checking what it reads.
fn pass(n: u32, model: RefModel, write_percent: u32) -> Pass {
    Pass::new(0, n, Pattern::Sequential, write_percent, true, model, 1)
}

/// Run `prog` to completion; its mismatches are added to `row`.
fn run_pass(env: &mut Env, prog: Pass, row: &mut Row) -> (RefModel, u64, u64) {
    let opts = vmmu_machine::RunOptions::default();
    let mut out = env.m.run(vec![prog], &opts, |_| {});
    let (p, r) = out.remove(0);
    note(row, &p);
    (p.into_model(), r.counters.accesses, r.counters.mmio)
}

fn note(row: &mut Row, p: &Pass) {
    use vmmu_machine::guest::GuestProgram;
    row.mismatches += p.mismatches();
    if row.first_mismatch.is_none() {
        row.first_mismatch = p.first_mismatch();
    }
}

fn dontneed(env: &Env, gpa: u64, bytes: u64, chunk: u64) {
    let mut at = 0;
    while at < bytes {
        let len = chunk.min(bytes - at);
        env.m.host.madvise_dontneed(HvaRange::new(
            Hva(hva_of(gpa + at)),
            Hva(hva_of(gpa + at) + len),
        ));
        at += len;
    }
}

fn test_map(env: &mut Env, budget: Duration, row: &mut Row) -> Loop {
    let halves = [TEST_GPA + SYNC_BYTES, TEST_GPA + SYNC_BYTES + MAP_HALF];
    let (mut l, mut last) = (Loop::default(), None);
    let t0 = Instant::now();
    while more(t0, l.iterations, budget) {
        let i = l.iterations as usize;
        let (write, drop) = (halves[i % 2], halves[(i + 1) % 2]);
        dontneed(env, drop, MAP_HALF, MAP_HALF);
        let model = RefModel::new(Gpa(write), MAP_HALF / PAGE);
        let (m, a, _) = run_pass(env, pass(i as u32 + 1, model, 100), row);
        l.accesses += a;
        l.iterations += 1;
        last = Some(m);
    }
    l.ns = t0.elapsed().as_nanos() as u64;
    // The selftest's -d: what the guest wrote last is there.
    if let Some(m) = last {
        run_pass(env, pass(l.iterations as u32 + 1, m, 0), row);
    }
    l
}

fn test_unmap(env: &mut Env, budget: Duration, chunk: u64, row: &mut Row) -> Loop {
    let base = TEST_GPA + SYNC_BYTES;
    // Fault the whole area in once (not timed).
    let all = RefModel::new(Gpa(base), 2 * UNMAP_HALF / PAGE);
    run_pass(env, pass(1, all, 100), row);
    let halves = [base, base + UNMAP_HALF];
    let mut l = Loop::default();
    let t0 = Instant::now();
    while more(t0, l.iterations, budget) {
        let i = l.iterations as usize;
        let (touch, drop) = (halves[i % 2], halves[(i + 1) % 2]);
        let one = RefModel::new(Gpa(touch), 1);
        let (_, a, _) = run_pass(env, pass(i as u32 + 2, one, 100), row);
        l.accesses += a;
        dontneed(env, drop, UNMAP_HALF, chunk);
        l.iterations += 1;
    }
    l.ns = t0.elapsed().as_nanos() as u64;
    l
}

fn test_move(
    env: &mut Env,
    layout: &[(u64, u64)],
    budget: Duration,
    active: bool,
    row: &mut Row,
) -> anyhow::Result<Loop> {
    let (gpa, size) = *layout
        .last()
        .ok_or_else(|| anyhow::anyhow!("no test slot"))?;
    let id = layout.len() as u32;
    let window = if active {
        gpa - MOVE_WINDOW / 2
    } else {
        TEST_GPA
    };
    let prog = pass(1, RefModel::new(Gpa(window), MOVE_WINDOW / PAGE), 50)
        .repeating()
        .with_mmio_allowed(Gpa(gpa), Gpa(gpa + size));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let opts = vmmu_machine::RunOptions {
        stop: Some(stop.clone()),
        progress: Some(progress.clone()),
        ..vmmu_machine::RunOptions::default()
    };
    let mut l = Loop::default();
    let mut err = None;
    let mut out = env.m.run(vec![prog], &opts, |ctx| {
        let res: anyhow::Result<()> = (|| {
            // The guest runs first (as the selftest waits for its vCPU to
            // start): on a busy machine a short loop could otherwise end
            // before the vCPU thread made a single access.
            while progress.load(std::sync::atomic::Ordering::Relaxed) == 0 && !ctx.done() {
                std::thread::yield_now();
            }
            let t0 = Instant::now();
            while more(t0, l.iterations, budget) {
                let t = Instant::now();
                ctx.vm.set_user_memory_region(UserMemoryRegion {
                    guest_phys_addr: MOVE_DEST_GPA,
                    ..region(id, gpa, size)
                })?;
                ctx.vm.set_user_memory_region(region(id, gpa, size))?;
                l.ns += t.elapsed().as_nanos() as u64;
                l.iterations += 1;
            }
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Release);
        err = res.err();
    });
    if let Some(e) = err {
        return Err(e);
    }
    let (p, r) = out.remove(0);
    note(row, &p);
    l.accesses = r.counters.accesses;
    l.mmio = r.counters.mmio;
    Ok(l)
}

fn test_rw(env: &mut Env, budget: Duration, row: &mut Row) -> anyhow::Result<Loop> {
    let pages = TEST_BYTES / PAGE;
    // Fault the memory in first (not timed): the loop measures lookups and
    // translation, not the first faults.
    let (mut model, _, _) = run_pass(env, pass(1, RefModel::new(Gpa(TEST_GPA), pages), 100), row);
    let mut l = Loop::default();
    let t0 = Instant::now();
    while more(t0, l.iterations, budget) {
        let i = l.iterations as u32 + 1;
        let (m, a, _) = run_pass(env, pass(2 * i + 1, model, 100), row);
        l.accesses += a;
        // The host reads back every page the guest wrote.
        for (k, want) in m.expected.iter().enumerate() {
            let got = env
                .m
                .host
                .read_u64(Hva(TEST_HVA + k as u64 * PAGE))
                .map_err(|e| anyhow::anyhow!("host read of page {k}: {e}"))?;
            if got != *want {
                row.mismatches += 1;
                if row.first_mismatch.is_none() {
                    row.first_mismatch = Some(format!(
                        "rw: the host read {got:#x} from page {k}, the guest wrote {want:#x}"
                    ));
                }
            }
        }
        let (m, a, _) = run_pass(env, pass(2 * i + 2, m, 0), row);
        l.accesses += a;
        l.iterations += 1;
        model = m;
    }
    l.ns = t0.elapsed().as_nanos() as u64;
    Ok(l)
}

/// One slot count on a fresh VM.
fn one(common: &Common, a: &PerfArgs, n: u32, last: bool) -> anyhow::Result<(Row, Option<Env>)> {
    let cfg = MachineConfig {
        memory_bytes: TEST_BYTES + TEST_BYTES / 64 + (1 << 30),
        vm: vm_config(common),
        oracle: !common.no_oracle,
        poison: true,
        dirty_ring: 0,
    };
    let m = Machine::new(cfg, 1)?;
    m.map(Hva(SLOT0_HVA), SLOT0_BYTES, Backing::Anonymous)?;
    m.set_memslot(UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: SLOT0_BYTES,
        userspace_addr: SLOT0_HVA,
    })?;
    m.map(Hva(TEST_HVA), TEST_BYTES, Backing::Anonymous)?;
    let slots = layout(n);
    let t0 = Instant::now();
    for (i, (gpa, size)) in slots.iter().enumerate() {
        m.set_memslot(region(i as u32 + 1, *gpa, *size))?;
    }
    let setup_ns = t0.elapsed().as_nanos() as u64;
    let quiet = Common {
        quiet: !last,
        ..common.clone()
    };
    let mut env = Env::new(m, shape(a), &quiet, None);
    let mut row = Row {
        slots: n,
        setup_ns,
        tests: Vec::new(),
        mismatches: 0,
        first_mismatch: None,
    };
    let it = Duration::from_secs_f64(a.seconds);
    for &name in &TESTS[a.first..=a.last] {
        let l = match name {
            "map" => test_map(&mut env, it, &mut row),
            "unmap" => test_unmap(&mut env, it, PAGE, &mut row),
            "unmap-chunked" => test_unmap(&mut env, it, 2 << 20, &mut row),
            "move-active" => test_move(&mut env, &slots, it, true, &mut row)?,
            "move-inactive" => test_move(&mut env, &slots, it, false, &mut row)?,
            _ => test_rw(&mut env, it, &mut row)?,
        };
        row.tests.push((name, l));
    }
    if last {
        return Ok((row, Some(env)));
    }
    let (_, violations) = env.finish_counted(Report::new("memslot-perf", &shape(a)))?;
    anyhow::ensure!(
        violations == 0,
        "memslot-perf -s {n}: {violations} oracle violations"
    );
    Ok((row, None))
}

/// A slot count's figures on one side: slots, setup ns, each loop's ns per
/// iteration.
type SideRow = (u32, u64, Vec<(&'static str, u64)>);

/// One side's table: a line per slot count (setup, then each loop's time
/// per iteration) and the growth from the smallest count to the largest;
/// returns the growth per loop.
fn table(
    r: &mut Report,
    side: &str,
    rows: &[SideRow],
) -> serde_json::Map<String, serde_json::Value> {
    let mut header = format!("{side:<5} {:>7} {:>12}", "slots", "slot setup");
    for (name, _) in rows.first().map(|x| x.2.as_slice()).unwrap_or_default() {
        header += &format!(" {name:>14}");
    }
    r.line(header + "   (per iteration)");
    for (slots, setup, loops) in rows {
        let mut l = format!("{side:<5} {slots:>7} {:>10.3}ms", *setup as f64 / 1e6);
        for (_, ns) in loops {
            l += &format!(" {:>12.1}µs", *ns as f64 / 1e3);
        }
        r.line(l);
    }
    let mut growth = serde_json::Map::new();
    let lo = rows.iter().min_by_key(|x| x.0);
    let hi = rows.iter().max_by_key(|x| x.0);
    if let (Some(lo), Some(hi)) = (lo, hi) {
        if lo.0 != hi.0 {
            let mut l = format!("{side:<5} {:>7} {:>12}", "ratio", "");
            for ((name, a), (_, b)) in lo.2.iter().zip(&hi.2) {
                let ratio = *b as f64 / (*a).max(1) as f64;
                l += &format!(" {ratio:>13.2}×");
                growth.insert(name.to_string(), json!((ratio * 100.0).round() / 100.0));
            }
            r.line(format!(
                "{l}   ({} slots over {}; flat is at most 1.2×)",
                hi.0, lo.0
            ));
        }
    }
    growth
}

/// Run it; returns the exit code.
pub fn run(common: &Common, a: &PerfArgs) -> anyhow::Result<i32> {
    validate(common, a)?;
    let mut rows = Vec::new();
    let mut env = None;
    for (i, &n) in a.slots.iter().enumerate() {
        let (row, e) = one(common, a, n, i + 1 == a.slots.len())?;
        rows.push(row);
        env = e;
    }
    let env = env.ok_or_else(|| anyhow::anyhow!("no slot count ran"))?;
    let names = &TESTS[a.first..=a.last];
    let budget = Duration::from_secs_f64(a.seconds);
    let kvm = if a.vs_kvm {
        let mut k = Vec::new();
        for &n in &a.slots {
            k.push(
                vmmu_kvm::memslot_perf::kvm_memslot_perf(n, names, budget)
                    .map_err(|e| anyhow::anyhow!("--vs-kvm: {n} memslots: {e}"))?,
            );
        }
        Some(k)
    } else {
        None
    };
    let mut r = Report::new("memslot-perf", &shape(a));
    r.line(format!(
        "Testing {} for {} s each, slots {:?}",
        names.join(", "),
        a.seconds,
        a.slots
    ));
    let ours: Vec<_> = rows
        .iter()
        .map(|x| {
            let loops = x.tests.iter().map(|(n, l)| (*n, l.per_iteration()));
            (x.slots, x.setup_ns, loops.collect())
        })
        .collect();
    let growth = table(&mut r, "vmmu", &ours);
    let mismatches: u64 = rows.iter().map(|x| x.mismatches).sum();
    if let Some(m) = rows.iter().find_map(|x| x.first_mismatch.clone()) {
        r.line(format!(
            "FAIL: {mismatches} data or MMIO mismatches; first: {m}"
        ));
    }
    r.put(
        "rows",
        json!(rows
            .iter()
            .map(|row| json!({
                "slots": row.slots,
                "slot_setup_ns": row.setup_ns,
                "tests": row.tests.iter().map(|(name, x)| json!({
                    "name": name,
                    "ns_per_iteration": x.per_iteration(),
                    "iterations": x.iterations,
                    "guest_accesses": x.accesses,
                    "mmio_exits": x.mmio,
                })).collect::<Vec<_>>(),
                "mismatches": row.mismatches,
            }))
            .collect::<Vec<_>>()),
    );
    r.put(
        "ratio_largest_to_smallest",
        serde_json::Value::Object(growth),
    );
    if let Some(k) = &kvm {
        let theirs: Vec<_> = k
            .iter()
            .map(|x| {
                let loops = x.loops.iter().map(|l| (l.name, l.ns / l.iterations.max(1)));
                (x.slots, x.setup_ns, loops.collect())
            })
            .collect();
        let growth = table(&mut r, "kvm", &theirs);
        r.put(
            "kvm_rows",
            json!(k
                .iter()
                .map(|x| json!({
                    "slots": x.slots,
                    "slot_setup_ns": x.setup_ns,
                    "tests": x.loops.iter().map(|l| json!({
                        "name": l.name,
                        "ns_per_iteration": l.ns / l.iterations.max(1),
                        "iterations": l.iterations,
                        "mmio_exits": l.mmio,
                    })).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>()),
        );
        r.put(
            "kvm_ratio_largest_to_smallest",
            serde_json::Value::Object(growth),
        );
    }
    r.put("mismatches", mismatches);
    let (code, _) = env.finish_counted(r)?;
    Ok(if mismatches > 0 { 1 } else { code })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_layout_covers_the_area_with_the_remainder_last() {
        for n in [2, 10, 509, 4096, 32764] {
            let l = layout(n);
            assert_eq!(l.len() as u32, n - 1);
            assert_eq!(l[0].0, TEST_GPA);
            let end = l.iter().fold(TEST_GPA, |at, (gpa, size)| {
                assert_eq!(*gpa, at, "slots are contiguous");
                assert!(*size >= PAGE && size % PAGE == 0);
                gpa + size
            });
            assert_eq!(end, TEST_GPA + TEST_BYTES);
            assert!(l.last().unwrap().1 >= l[0].1);
        }
    }
}
