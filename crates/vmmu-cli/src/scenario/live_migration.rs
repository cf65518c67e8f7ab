//! `live-migration`: a running multi-vCPU guest is migrated to a destination
//! machine (a second arena, host MMU and VM in the same process) by pre-copy
//! over the dirty log, then stop-and-copy; afterwards the destination's memory
//! must equal the source's byte for byte, every page compared.
//!
//! The guest: each vCPU writes unique values (its id and a counter) to every
//! page of its own chunk once, then only to its hot set (`--hot-percent` of
//! the chunk), at random and as fast as the machine runs it: a working set the
//! pre-copy cannot outrun, so the stop-and-copy sends about the hot set. The
//! migration starts once every vCPU has written its whole chunk (so memory is
//! mapped, huge where the backing allows, as in a guest that has run a while):
//! logging on (timed: with huge pages this is where eager splitting works), a
//! first round sending every page, then rounds sending what the dirty
//! log reports (`-M dirty-log`: get; `clear-log`: get then clear what was
//! reported; `dirty-ring`: every vCPU's ring collected, then reset) until a round finds at most 1 % of the pages dirty or
//! `--max-rounds` is reached; then the vCPUs stop and a final harvest sends
//! the rest. Downtime is that last step: from the stop to the last page sent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use vmmu::dirty_log::MANUAL_PROTECT_ENABLE;
use vmmu::{Gpa, Hva, MemFlags, UserMemoryRegion};
use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram, Rng};
use vmmu_machine::{Backing, Machine, MachineConfig};

use super::{build, REGION_GPA, REGION_HVA};
use crate::args::{BadInput, Common};
use crate::report::Report;

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    let shape = common.shape(2, 64 << 20, 1, Backing::Anonymous)?;
    match common.log_mode.as_deref() {
        None | Some("dirty-log") | Some("clear-log") | Some("dirty-ring") => {}
        Some(m) => anyhow::bail!(BadInput(format!(
            "-M {m}: unknown log mode for migration (valid: dirty-log, clear-log, dirty-ring)"
        ))),
    }
    if common.hot_percent == 0 || common.hot_percent > 100 {
        anyhow::bail!(BadInput(format!(
            "--hot-percent {}: must be 1..=100",
            common.hot_percent
        )));
    }
    if common.max_rounds == 0 || common.max_rounds > 1000 {
        anyhow::bail!(BadInput(format!(
            "--max-rounds {}: must be 1..=1000",
            common.max_rounds
        )));
    }
    Ok(shape)
}

/// One vCPU writing unique values: first every page of its chunk once (so the
/// whole guest holds data), then only pages of its hot set, at random.
struct Worker {
    id: u64,
    first_page: u64,
    pages: u64,
    hot: u64,
    seq: u64,
    stop: Arc<AtomicBool>,
    /// vCPUs that have written their whole chunk once.
    warm: Arc<AtomicU64>,
    rng: Rng,
    failed: u64,
}

impl GuestProgram for Worker {
    fn next(&mut self) -> Option<GuestAccess> {
        if self.stop.load(Ordering::Acquire) {
            return None;
        }
        let p = if self.seq < self.pages {
            self.seq
        } else {
            self.rng.below(self.hot)
        };
        self.seq += 1;
        if self.seq == self.pages + 1 {
            // Release: the chunk's first writes happen before the host sees it warm.
            self.warm.fetch_add(1, Ordering::Release);
        }
        let gpa = REGION_GPA + (self.first_page + p) * 4096;
        Some(GuestAccess::shared(
            Gpa(gpa),
            AccessKind::Write(((self.id + 1) << 48) | self.seq),
        ))
    }
    fn complete(&mut self, _: &GuestAccess, r: AccessResult) {
        if !matches!(r, AccessResult::Memory(_)) {
            self.failed += 1;
        }
    }
    fn mismatches(&self) -> u64 {
        0
    }
}

fn bits(log: &[u64]) -> impl Iterator<Item = u64> + '_ {
    log.iter().enumerate().flat_map(|(w, &v)| {
        (0..64u64)
            .filter(move |b| v & (1 << b) != 0)
            .map(move |b| w as u64 * 64 + b)
    })
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    anyhow::ensure!(shape.slots == 1, "live-migration runs on one memslot");
    let mode = common
        .log_mode
        .clone()
        .unwrap_or_else(|| "dirty-log".into());
    let manual = mode == "clear-log";
    let ring = mode == "dirty-ring";
    let mut c = common.clone();
    c.dirty_ring = if ring { 65536 } else { 0 };
    let mut env = build(&c, shape)?;
    if manual {
        env.m
            .vm
            .enable_manual_dirty_log_protect(MANUAL_PROTECT_ENABLE)?;
    }
    let region = UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: REGION_GPA,
        memory_size: shape.total,
        userspace_addr: REGION_HVA,
    };
    env.m.set_memslot(region)?;
    let logging = UserMemoryRegion {
        flags: MemFlags::LOG_DIRTY_PAGES.bits(),
        ..region
    };
    // The destination: its own arena, host MMU and VM, the same layout.
    let dst = Machine::new(
        MachineConfig {
            memory_bytes: shape.total + shape.total / 64 + (1 << 30),
            ..MachineConfig::default()
        },
        1,
    )?;
    dst.map(Hva(REGION_HVA), shape.total, shape.backing)?;
    dst.set_memslot(UserMemoryRegion { flags: 0, ..region })?;

    let pages = shape.total / 4096;
    let per_vcpu = shape.bytes_per_vcpu / 4096;
    let hot = (per_vcpu * common.hot_percent as u64 / 100).max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let warm = Arc::new(AtomicU64::new(0));
    let progs: Vec<Worker> = (0..shape.vcpus as u64)
        .map(|v| Worker {
            id: v,
            first_page: v * per_vcpu,
            pages: per_vcpu,
            hot,
            seq: 0,
            stop: stop.clone(),
            warm: warm.clone(),
            rng: Rng::new(common.seed ^ (v << 20)),
            failed: 0,
        })
        .collect();
    let threshold = pages / 100;
    let mut sent_per_round: Vec<u64> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let (mut downtime_ns, mut precopy_ns, mut enable_ns) = (0u64, 0u64, 0u64);
    let before = env.m.vm.stats();
    let mut t0 = Instant::now();
    let out = env.m.run(progs, &env.options(&Default::default()), |ctx| {
        // The guest has run over all of its memory: the migration starts.
        while warm.load(Ordering::Acquire) < u64::from(shape.vcpus) && !ctx.done() {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        t0 = Instant::now();
        if let Err(e) = ctx.vm.set_user_memory_region(logging) {
            errors.push(format!("turning logging on: {e}"));
        }
        enable_ns = t0.elapsed().as_nanos() as u64;
        let send = |p: u64, errors: &mut Vec<String>| {
            let hva = Hva(REGION_HVA + p * 4096);
            match ctx.host.read_page(hva) {
                Ok(data) => {
                    if let Err(e) = dst.host.write_page(hva, &data) {
                        errors.push(format!("destination write of page {p}: {e}"));
                    }
                }
                Err(e) => errors.push(format!("source read of page {p}: {e}")),
            }
        };
        let mut fetch = vec![0u32; shape.vcpus as usize];
        let mut harvest = |errors: &mut Vec<String>| -> Vec<u64> {
            if ring {
                // Every vCPU's ring into one bitmap, then reset (which
                // write-protects what was collected).
                let (log, collected, reset) = super::harvest_rings(ctx.vm, &mut fetch, 1, pages);
                if collected != reset {
                    errors.push(format!(
                        "reset {reset} ring entries, {collected} were collected"
                    ));
                }
                return log;
            }
            let log = match ctx.vm.get_dirty_log(1) {
                Ok(l) => l,
                Err(e) => {
                    errors.push(format!("get_dirty_log: {e}"));
                    return Vec::new();
                }
            };
            if manual {
                if let Err(e) = ctx.vm.clear_dirty_log(1, 0, pages, &log) {
                    errors.push(format!("clear_dirty_log: {e}"));
                }
            }
            log
        };
        // Round 0: everything.
        for p in 0..pages {
            send(p, &mut errors);
        }
        sent_per_round.push(pages);
        loop {
            let log = harvest(&mut errors);
            let dirty: Vec<u64> = bits(&log).filter(|p| *p < pages).collect();
            let last =
                dirty.len() as u64 <= threshold || sent_per_round.len() as u32 >= common.max_rounds;
            if last {
                // Stop-and-copy: what this harvest found, and what the vCPUs
                // write until they have stopped, goes in the final round.
                let t_stop = Instant::now();
                precopy_ns = t_stop.duration_since(t0).as_nanos() as u64;
                stop.store(true, Ordering::Release);
                let mut final_pages: std::collections::BTreeSet<u64> = dirty.into_iter().collect();
                // A vCPU held by a full ring only stops once the rings are
                // harvested: keep harvesting until every vCPU is done.
                while !ctx.done() {
                    if ring {
                        final_pages.extend(bits(&harvest(&mut errors)).filter(|p| *p < pages));
                    }
                    std::hint::spin_loop();
                }
                final_pages.extend(bits(&harvest(&mut errors)).filter(|p| *p < pages));
                for &p in &final_pages {
                    send(p, &mut errors);
                }
                sent_per_round.push(final_pages.len() as u64);
                downtime_ns = t_stop.elapsed().as_nanos() as u64;
                break;
            }
            for &p in &dirty {
                send(p, &mut errors);
            }
            sent_per_round.push(dirty.len() as u64);
        }
    });
    // Byte for byte: every page of the destination equals the source's.
    let mut mismatched = 0u64;
    let mut first_mismatch = None;
    for p in 0..pages {
        let hva = Hva(REGION_HVA + p * 4096);
        let (a, b) = (env.m.host.read_page(hva), dst.host.read_page(hva));
        if a.as_deref().ok() != b.as_deref().ok() || a.is_err() {
            mismatched += 1;
            first_mismatch.get_or_insert(p);
        }
    }
    let st = env.m.vm.stats().since(&before);
    let writes: u64 = out.iter().map(|(_, r)| r.counters.accesses).sum();
    let failed: u64 = out.iter().map(|(p, _)| p.failed).sum();
    let sent: u64 = sent_per_round.iter().sum();
    let rounds = sent_per_round.len();
    let mut r = Report::new("live-migration", &shape);
    r.line(format!(
        "log mode {mode}; {} vCPUs writing, {}% hot set; {rounds} rounds (the last one stop-and-copy)",
        shape.vcpus, common.hot_percent
    ));
    r.line(format!(
        "pages sent per round: {:?}; {sent} pages sent for a {pages}-page guest ({:.2}x)",
        sent_per_round,
        sent as f64 / pages as f64
    ));
    r.line(format!(
        "logging on in {:.3} ms ({} huge leaves split eagerly, tracking {}); {} write faults fixed by the fast path, {} Dirty bits cleared",
        enable_ns as f64 / 1e6,
        st.eager_splits,
        common.dirty_tracking.name(),
        st.fast_path_fixed,
        st.dirty_bits_harvested
    ));
    r.line(format!(
        "pre-copy {:.3} s, downtime {:.3} ms; {writes} guest writes ({failed} failed); destination pages different from the source: {mismatched}{}",
        precopy_ns as f64 / 1e9,
        downtime_ns as f64 / 1e6,
        first_mismatch.map(|p| format!(" (first: page {p})")).unwrap_or_default()
    ));
    for e in errors.iter().take(3) {
        r.line(format!("ERROR: {e}"));
    }
    r.put("log_mode", json!(mode));
    r.put("rounds", rounds as u64);
    r.put("pages_sent_per_round", json!(sent_per_round));
    r.put("pages_sent", sent);
    r.put("guest_pages", pages);
    r.put("precopy_ns", precopy_ns);
    r.put("enable_logging_ns", enable_ns);
    r.put("eager_splits", st.eager_splits);
    r.put("fast_path_fixed", st.fast_path_fixed);
    r.put("dirty_bits_cleared", st.dirty_bits_harvested);
    r.put("downtime_ns", downtime_ns);
    r.put("guest_writes", writes);
    r.put("failed_writes", failed);
    r.put("pages_mismatched", mismatched);
    r.put("migration_errors", errors.len() as u64);
    let dst_report = dst.teardown();
    r.put(
        "destination_leaked_pages",
        dst_report.leaked_data_pages + dst_report.leaked_table_pages,
    );
    let code = env.finish(r)?;
    Ok(if mismatched > 0 || failed > 0 || !errors.is_empty() {
        1
    } else {
        code
    })
}
