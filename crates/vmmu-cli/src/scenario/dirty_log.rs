//! `dirty-log` (dirty_log_test): vCPUs write the current iteration number into
//! random pages of their own chunk while the host harvests the dirty log every
//! interval, in each log mode: `dirty-log` (`KVM_GET_DIRTY_LOG`, which clears
//! and re-protects), `clear-log` (manual protection: `get` copies, then
//! `KVM_CLEAR_DIRTY_LOG` clears and re-protects exactly what was reported) and
//! `dirty-ring` (per-vCPU rings: every vCPU's ring collected, then
//! `KVM_RESET_DIRTY_RINGS`, which must reset exactly as many entries as were
//! collected; a vCPU whose ring fills exits and waits for the harvest).
//!
//! After each harvest the host reads every page through its own mapping and
//! checks the selftest's invariants, made exact for several vCPUs:
//! - a page reported dirty holds a value written since the previous harvest
//!   (this iteration's number, or one of the two before if its vCPU read the
//!   number just before the host bumped it; older only if that vCPU was held
//!   up, by a full ring, between reading the number and writing it), or the
//!   value it held at the last check (the page is logged by the fault that
//!   makes it writable, before the store lands);
//! - **no write is lost**: a page whose value changed since the previous check
//!   and that this harvest did not report must be reported by the next one
//!   (the write landed after its bitmap word was taken), and after the vCPUs
//!   stop a final harvest must report every page still owed. With PML
//!   (`--tracking pml`) a write waits in its vCPU's log until the vCPU next
//!   exits (a harvest kicks it but, as in KVM, does not wait), so an owed page
//!   stays owed until it is reported, counted as deferred; the final harvest,
//!   after every vCPU has exited, is as strict as ever.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmmu::dirty_log::MANUAL_PROTECT_ENABLE;
use vmmu::{Gpa, Hva, MemFlags, UserMemoryRegion};
use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram, Rng};
use vmmu_machine::Backing;

use super::{build, REGION_GPA, REGION_HVA};
use crate::args::{BadInput, Common};
use crate::report::Report;

/// The log modes, by the selftest's names.
pub const MODES: [&str; 3] = ["dirty-log", "clear-log", "dirty-ring"];

/// Check the flags (before anything is allocated).
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    let shape = common.shape(1, 64 << 20, 32, Backing::Anonymous)?;
    if let Some(m) = &common.log_mode {
        if !MODES.contains(&m.as_str()) && m != "all" {
            anyhow::bail!(BadInput(format!(
                "-M {m}: unknown log mode (valid: dirty-log, clear-log, dirty-ring, all)"
            )));
        }
    }
    let c = common.ring_entries;
    if !(vmmu::dirty_ring::MIN_ENTRIES..=vmmu::dirty_ring::MAX_ENTRIES).contains(&c)
        || !c.is_power_of_two()
    {
        anyhow::bail!(BadInput(format!(
            "-c {c}: the ring size must be a power of two from 256 to 65536 entries"
        )));
    }
    if common.interval_ms == 0 || common.interval_ms > 10_000 {
        anyhow::bail!(BadInput(format!(
            "-I {}: the interval must be 1..=10000 ms",
            common.interval_ms
        )));
    }
    Ok(shape)
}

/// One vCPU: writes `iteration` into random pages of its chunk until stopped.
struct Writer {
    first_page: u64,
    pages: u64,
    iteration: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    rng: Rng,
    failed: u64,
    /// Writes of this vCPU that landed two or more harvests after their value
    /// was read (a vCPU held up by a full ring): the pages they hit may hold
    /// older values, which the stale check then excuses.
    late: Arc<AtomicU64>,
    /// The value of the write this vCPU has in flight (u64::MAX: none); it
    /// may land before `complete` counts it late.
    inflight: Arc<AtomicU64>,
}

impl GuestProgram for Writer {
    fn next(&mut self) -> Option<GuestAccess> {
        if self.stop.load(Ordering::Acquire) {
            return None;
        }
        let p = self.first_page + self.rng.below(self.pages);
        let v = self.iteration.load(Ordering::Acquire);
        self.inflight.store(v, Ordering::Release);
        Some(GuestAccess::shared(
            Gpa(REGION_GPA + p * 4096),
            AccessKind::Write(v),
        ))
    }
    fn complete(&mut self, a: &GuestAccess, r: AccessResult) {
        if !matches!(r, AccessResult::Memory(_)) {
            self.failed += 1;
        }
        if let AccessKind::Write(v) = a.kind {
            if self.iteration.load(Ordering::Acquire) > v + 1 {
                self.late.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.inflight.store(u64::MAX, Ordering::Release);
    }
    fn mismatches(&self) -> u64 {
        0
    }
}

/// What one mode's run found.
#[derive(Default)]
struct ModeResult {
    rounds: u64,
    reported: u64,
    lost: u64,
    deferred: u64,
    stale: u64,
    first_error: Option<String>,
    harvest_ns: Vec<u64>,
    writes: u64,
    failed_writes: u64,
    fast_path_fixed: u64,
    write_protected: u64,
    ring_collected: u64,
    ring_full_exits: u64,
    pml_full_exits: u64,
    ring_overflows: u64,
    stats: vmmu::Stats,
    violations: u64,
    violation_log: Vec<String>,
    checked: u64,
    leaked: u64,
    leaked_data: u64,
    leaked_tables: u64,
    kinds: Vec<(&'static str, u64)>,
}

impl ModeResult {
    fn error(&mut self, what: String) {
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }
}

fn bit(log: &[u64], p: u64) -> bool {
    log.get((p / 64) as usize)
        .is_some_and(|w| w & (1 << (p % 64)) != 0)
}

fn one_mode(common: &Common, shape: crate::args::Shape, mode: &str) -> anyhow::Result<ModeResult> {
    let ring = mode == "dirty-ring";
    let pml = common.dirty_tracking == vmmu::DirtyTracking::Pml;
    let mut c = common.clone();
    c.dirty_ring = if ring { common.ring_entries } else { 0 };
    let mut env = build(&c, shape)?;
    let manual = mode == "clear-log";
    if manual {
        env.m
            .vm
            .enable_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE)?;
    }
    // One slot over the region, logging.
    let region = UserMemoryRegion {
        slot: 1,
        flags: MemFlags::LOG_DIRTY_PAGES.bits(),
        guest_phys_addr: REGION_GPA,
        memory_size: shape.total,
        userspace_addr: REGION_HVA,
    };
    anyhow::ensure!(
        shape.slots == 1,
        "dirty-log runs on one memslot (-x is not taken)"
    );
    env.m.set_memslot(region)?;
    let pages = shape.total / 4096;
    let per_vcpu = shape.bytes_per_vcpu / 4096;
    let iteration = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let late: Vec<Arc<AtomicU64>> = (0..shape.vcpus)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let inflight: Vec<Arc<AtomicU64>> = (0..shape.vcpus)
        .map(|_| Arc::new(AtomicU64::new(u64::MAX)))
        .collect();
    let progs: Vec<Writer> = (0..shape.vcpus as u64)
        .map(|v| Writer {
            first_page: v * per_vcpu,
            pages: per_vcpu,
            iteration: iteration.clone(),
            stop: stop.clone(),
            rng: Rng::new(common.seed ^ (v << 24) ^ mode.len() as u64),
            failed: 0,
            late: late[v as usize].clone(),
            inflight: inflight[v as usize].clone(),
        })
        .collect();
    let interval = Duration::from_millis(common.interval_ms);
    let mut res = ModeResult::default();
    let before = env.m.vm.stats();
    let opts = vmmu_machine::RunOptions::default();
    let out = env.m.run(progs, &opts, |ctx| {
        let vm = ctx.vm;
        let mut fetch = vec![0u32; shape.vcpus as usize];
        let mut harvest = |res: &mut ModeResult| -> Option<Vec<u64>> {
            let t = Instant::now();
            if ring {
                // Collect every vCPU's ring (the slot's pages set in a
                // bitmap), then reset: the reset must free exactly as many
                // entries as were collected.
                let (log, collected, reset) = super::harvest_rings(vm, &mut fetch, 1, pages);
                res.ring_collected += collected;
                if reset != collected {
                    res.error(format!("reset {reset} ring entries, {collected} were collected"));
                }
                res.harvest_ns.push(t.elapsed().as_nanos() as u64);
                return Some(log);
            }
            let log = match vm.get_dirty_log(1) {
                Ok(l) => l,
                Err(e) => {
                    res.error(format!("get_dirty_log: {e}"));
                    return None;
                }
            };
            if manual {
                if let Err(e) = vm.clear_dirty_log(1, 0, pages, &log) {
                    res.error(format!("clear_dirty_log: {e}"));
                    return None;
                }
            }
            res.harvest_ns.push(t.elapsed().as_nanos() as u64);
            Some(log)
        };
        let read = |p: u64| ctx.host.read_u64(Hva(REGION_HVA + p * 4096)).unwrap_or(0);
        let mut last = vec![0u64; pages as usize];
        let mut owed: BTreeSet<u64> = BTreeSet::new();
        for _ in 0..shape.iterations {
            std::thread::sleep(interval);
            let Some(log) = harvest(&mut res) else { break };
            let k = iteration.load(Ordering::Acquire);
            res.rounds += 1;
            for p in std::mem::take(&mut owed) {
                if !bit(&log, p) && pml {
                    // Still in a vCPU's page-modification log.
                    res.deferred += 1;
                    owed.insert(p);
                } else if !bit(&log, p) {
                    res.lost += 1;
                    res.error(format!(
                        "page {p} changed after harvest {} took its word but harvest {} did not report it",
                        res.rounds - 1,
                        res.rounds
                    ));
                }
            }
            for p in 0..pages {
                let v = read(p);
                let reported = bit(&log, p);
                if reported {
                    res.reported += 1;
                    let owner = (p / per_vcpu) as usize;
                    // A page is logged when its write fault makes it writable,
                    // before the store lands: unchanged since the last check
                    // is fine too (the store will fault again and be logged).
                    let excused = late[owner].load(Ordering::Acquire) > 0
                        || inflight[owner].load(Ordering::Acquire) == v
                        || v == last[p as usize];
                    if (v + 2 < k && !excused) || v > k {
                        res.stale += 1;
                        res.error(format!(
                            "page {p} reported in iteration {k} holds {v}: not written since the last harvest"
                        ));
                    }
                } else if v != last[p as usize] {
                    // Written after this harvest took the word: the next one
                    // must report it.
                    owed.insert(p);
                }
                last[p as usize] = v;
            }
            iteration.fetch_add(1, Ordering::AcqRel);
        }
        // Stop the vCPUs; a last harvest must report everything still owed and
        // every page written since the last check.
        stop.store(true, Ordering::Release);
        // A vCPU waiting on a full ring only finishes once the rings are
        // reset: keep harvesting until every vCPU is done, then once more.
        let mut after_stop = vec![0u64; pages.div_ceil(64) as usize];
        while !ctx.done() {
            std::thread::sleep(Duration::from_millis(1));
            if ring {
                if let Some(log) = harvest(&mut res) {
                    for (a, b) in after_stop.iter_mut().zip(&log) {
                        *a |= b;
                    }
                }
            }
        }
        if let Some(mut log) = harvest(&mut res) {
            for (a, b) in log.iter_mut().zip(&after_stop) {
                *a |= b;
            }
            for p in 0..pages {
                let changed = read(p) != last[p as usize];
                if (owed.contains(&p) || changed) && !bit(&log, p) {
                    res.lost += 1;
                    res.error(format!(
                        "page {p} was written but the final harvest did not report it"
                    ));
                }
            }
        }
    });
    let st = env.m.vm.stats().since(&before);
    for (p, rep) in &out {
        res.writes += rep.counters.accesses;
        res.failed_writes += p.failed;
        res.ring_full_exits += rep.counters.dirty_ring_full_exits;
        res.pml_full_exits += rep.counters.pml_full_exits;
    }
    res.ring_overflows = env.m.vm.dirty_ring_overflows();
    res.fast_path_fixed = st.fast_path_fixed;
    res.write_protected = st.entries_write_protected;
    res.stats = env.m.vm.stats();
    res.violations = env.m.oracle.total();
    res.violation_log = env.m.oracle.log();
    res.checked = env.m.oracle.checks();
    res.kinds = env.m.oracle.by_kind();
    let t = env.m.teardown();
    res.leaked = t.leaked_data_pages + t.leaked_table_pages + t.double_frees;
    res.leaked_data = t.leaked_data_pages;
    res.leaked_tables = t.leaked_table_pages;
    Ok(res)
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let modes: Vec<&str> = match common.log_mode.as_deref() {
        None | Some("all") => MODES.to_vec(),
        Some(m) => vec![m],
    };
    let mut r = Report::new("dirty-log", &shape);
    let mut runs = Vec::new();
    let mut bad = 0u64;
    let (mut violations, mut checked, mut leaked) = (0u64, 0u64, 0u64);
    let (mut leaked_data, mut leaked_tables) = (0u64, 0u64);
    for mode in modes {
        r.line(format!("Testing Log Mode '{mode}'"));
        let m = one_mode(common, shape, mode)?;
        let mut h = m.harvest_ns.clone();
        h.sort_unstable();
        let p50 = h.get(h.len() / 2).copied().unwrap_or(0);
        r.line(format!(
            "Iterations: {}, pages reported: {} ({:.1} per harvest), lost writes: {}, stale reports: {}; harvest p50 {} us; {} writes ({} failed), {} fast-path fixes, {} entries write-protected",
            m.rounds,
            m.reported,
            m.reported as f64 / m.rounds.max(1) as f64,
            m.lost,
            m.stale,
            p50 / 1000,
            m.writes,
            m.failed_writes,
            m.fast_path_fixed,
            m.write_protected
        ));
        if let Some(e) = &m.first_error {
            r.line(format!("FIRST ERROR: {e}"));
        }
        if common.dirty_tracking == vmmu::DirtyTracking::Pml {
            r.line(format!(
                "PML: {} Dirty bits cleared by harvests, {} log entries drained at exits, {} log-full exits, {} reports deferred to a later harvest",
                m.stats.dirty_bits_harvested, m.stats.pml_entries_flushed, m.pml_full_exits, m.deferred
            ));
        }
        if mode == "dirty-ring" {
            r.line(format!(
                "dirty ring: {} entries collected (and reset), {} ring-full exits, {} overflows",
                m.ring_collected, m.ring_full_exits, m.ring_overflows
            ));
        }
        bad += m.lost
            + m.stale
            + m.failed_writes
            + m.ring_overflows
            + u64::from(m.first_error.is_some());
        violations += m.violations;
        checked += m.checked;
        leaked += m.leaked;
        leaked_data += m.leaked_data;
        leaked_tables += m.leaked_tables;
        if r.violation_kinds.is_empty() {
            r.violation_kinds = m.kinds.clone();
        } else {
            for (acc, (_, n)) in r.violation_kinds.iter_mut().zip(m.kinds.iter()) {
                acc.1 += n;
            }
        }
        r.violation_log.extend(m.violation_log.iter().cloned());
        r.stats = m.stats;
        runs.push(json!({
            "mode": mode, "iterations": m.rounds, "pages_reported": m.reported,
            "lost_writes": m.lost, "stale_reports": m.stale, "writes": m.writes,
            "failed_writes": m.failed_writes, "harvest_p50_ns": p50,
            "fast_path_fixed": m.fast_path_fixed, "entries_write_protected": m.write_protected,
            "ring_entries_collected": m.ring_collected, "ring_full_exits": m.ring_full_exits,
            "ring_overflows": m.ring_overflows,
            "dirty_bits_cleared": m.stats.dirty_bits_harvested,
            "pml_entries_drained": m.stats.pml_entries_flushed,
            "pml_full_exits": m.pml_full_exits, "deferred_reports": m.deferred,
            "first_error": m.first_error,
        }));
    }
    r.put("log_modes", serde_json::Value::Array(runs));
    r.put("dirty_log_errors", bad);
    r.put("leaked_data_pages", leaked_data);
    r.put("leaked_table_pages", leaked_tables);
    r.put("oracle_checked_accesses", checked);
    r.config = common.config.clone();
    r.violations = violations;
    if !common.quiet {
        r.print(common.json);
    }
    Ok(if bad + violations + leaked > 0 { 1 } else { 0 })
}
