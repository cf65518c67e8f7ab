//! `vmmu soak`: the stress run with the oracle on, for as long as asked, once
//! per VM type (private memory included), with a progress bar and a summary
//! that Ctrl-C still prints.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use vmmu::VmType;
use vmmu_machine::stress::{stress, StressConfig, StressProgress, StressReport, EVENT_NAMES};

use crate::args::{self, BadInput};
use crate::cli::{SoakArgs, SoakVmType};
use crate::report;

/// Refuse what a soak cannot run.
pub(crate) fn check(a: &SoakArgs) -> anyhow::Result<()> {
    let types = types(a);
    if a.mmu == vmmu::MmuKind::Shadow {
        if types.iter().any(|t| t.has_private_mem()) {
            anyhow::bail!(BadInput(
                "--mmu shadow with a private-memory VM type: private memory needs the TDP MMU (use --vm-type default)".into()
            ));
        }
        if a.tracking == vmmu::DirtyTracking::Pml {
            anyhow::bail!(BadInput(
                "--mmu shadow with --tracking pml: PML logs second-stage writes and shadow paging has no second stage (use --tracking write-protect)".into()
            ));
        }
    }
    if a.duration < types.len() as u64 {
        anyhow::bail!(BadInput(format!(
            "--duration {}: a soak runs each VM type for at least 1 second ({} type{} here)",
            a.duration,
            types.len(),
            if types.len() == 1 { "" } else { "s" }
        )));
    }
    if a.vcpus == 0 || a.vcpus > 64 {
        anyhow::bail!(BadInput(format!("-v {}: vCPUs must be 1..=64", a.vcpus)));
    }
    if a.tracking == vmmu::DirtyTracking::Pml && a.no_ad {
        anyhow::bail!(BadInput(
            "--tracking pml with --no-ad: PML logs the writes that set EPT Dirty bits, so it needs A/D bits (drop one of the two)".into()
        ));
    }
    if !a.bytes.is_multiple_of(2 << 20) || a.bytes > 4 << 30 {
        anyhow::bail!(BadInput(format!(
            "-b {}: soak memory per vCPU must be a multiple of 2M, at most 4G",
            args::human(a.bytes)
        )));
    }
    Ok(())
}

fn types(a: &SoakArgs) -> Vec<VmType> {
    match a.vm_type {
        // Shadow paging has no private memory: `all` is the one type it has.
        SoakVmType::All if a.mmu == vmmu::MmuKind::Shadow => vec![VmType::Default],
        SoakVmType::All => VmType::ALL.to_vec(),
        SoakVmType::Default => vec![VmType::Default],
        SoakVmType::SwProtected => vec![VmType::SwProtected],
        SoakVmType::Snp => vec![VmType::Snp],
    }
}

/// Run the soak; exit code 1 if the oracle saw anything.
pub(crate) fn run(a: &SoakArgs) -> anyhow::Result<i32> {
    check(a)?;
    let types = types(a);
    let config = report::config_json(
        "soak",
        serde_json::to_value(a)?,
        &vmmu::VmConfig {
            ad_enabled: !a.no_ad,
            vm_type: types[0],
            dirty_tracking: a.tracking,
            mmu: a.mmu,
            ..vmmu::VmConfig::default()
        },
        true,
    );
    // Ctrl-C finishes the current pass and prints the summary.
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = stop.clone();
    let _ = ctrlc::set_handler(move || on_signal.store(true, Ordering::Relaxed));
    // The duration split evenly between the types (the last one takes what
    // the division leaves).
    let n = types.len() as u64;
    let secs: Vec<u64> = (0..n)
        .map(|i| a.duration / n + u64::from(i + 1 == n) * (a.duration % n))
        .collect();
    let progress: Vec<Arc<StressProgress>> = types
        .iter()
        .map(|_| Arc::new(StressProgress::default()))
        .collect();
    let current = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let reports = std::thread::scope(|s| -> anyhow::Result<Vec<StressReport>> {
        if std::io::stderr().is_terminal() && !a.json {
            let (progress, done, stop, current, types) =
                (&progress, &done, &stop, &current, &types);
            let total = a.duration;
            s.spawn(move || progress_bar(total, types, progress, current, done, stop));
        }
        let mut out = Vec::new();
        for (i, t) in types.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            current.store(i, Ordering::Relaxed);
            let cfg = StressConfig {
                vcpus: a.vcpus,
                bytes_per_vcpu: a.bytes,
                duration: Duration::from_secs(secs[i]),
                seed: a.seed,
                ad_enabled: !a.no_ad,
                stop: Some(stop.clone()),
                progress: Some(progress[i].clone()),
                vm_type: *t,
                dirty_tracking: a.tracking,
                guest_paging: a.guest_paging,
                mmu: a.mmu,
                ..Default::default()
            };
            match stress(&cfg) {
                Ok(r) => out.push(r),
                Err(e) => {
                    done.store(true, Ordering::Relaxed);
                    return Err(e.into());
                }
            }
        }
        done.store(true, Ordering::Relaxed);
        Ok(out)
    })?;
    let interrupted = stop.load(Ordering::Relaxed);
    // The host block as of the end (the load after beside the one before).
    let mut config = config;
    if let Some(c) = config.as_object_mut() {
        c.insert("host".into(), report::host_json());
    }
    let violations: u64 = reports.iter().map(|r| r.total_violations).sum();
    if a.json {
        println!("{}", summary_json(a, config, &types, &reports, interrupted));
    } else {
        for (t, r) in types.iter().zip(&reports) {
            print_run(a.seed, *t, r);
        }
        if reports.len() < types.len() {
            println!(
                "not run (interrupted): {}",
                types[reports.len()..]
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!("violations: {violations}");
    }
    Ok(i32::from(violations > 0))
}

fn progress_bar(
    total: u64,
    types: &[VmType],
    progress: &[Arc<StressProgress>],
    current: &AtomicUsize,
    done: &AtomicBool,
    stop: &AtomicBool,
) {
    let t0 = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("soak [{bar:30}] {pos}/{len} s  {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    while !done.load(Ordering::Relaxed) {
        let i = current.load(Ordering::Relaxed).min(types.len() - 1);
        let p = &progress[i];
        let violations: u64 = progress
            .iter()
            .map(|p| p.violations.load(Ordering::Relaxed))
            .sum();
        bar.set_position(t0.elapsed().as_secs().min(total));
        bar.set_message(format!(
            "{}: {} passes, {} accesses; {} violations{}",
            types[i].name(),
            p.passes.load(Ordering::Relaxed),
            p.accesses.load(Ordering::Relaxed),
            violations,
            if stop.load(Ordering::Relaxed) {
                " (stopping)"
            } else {
                ""
            }
        ));
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
}

fn events_json(events: &[u64]) -> Map<String, Value> {
    EVENT_NAMES
        .iter()
        .zip(events)
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

fn summary_json(
    a: &SoakArgs,
    config: Value,
    types: &[VmType],
    reports: &[StressReport],
    interrupted: bool,
) -> Value {
    let sum = |f: &dyn Fn(&StressReport) -> u64| reports.iter().map(f).sum::<u64>();
    let mut events = [0u64; vmmu_machine::stress::EVENTS];
    let mut stats = vmmu::Stats::default();
    for r in reports {
        for (t, n) in events.iter_mut().zip(r.events) {
            *t += n;
        }
        add_stats(&mut stats, &r.stats);
    }
    let causes: Map<String, Value> = stats
        .retries_by_cause()
        .iter()
        .map(|(k, n)| (k.to_string(), json!(n)))
        .collect();
    let runs: Vec<Value> = types
        .iter()
        .zip(reports)
        .map(|(t, r)| {
            json!({
                "vm_type": t.name(), "elapsed_ns": r.elapsed.as_nanos() as u64,
                "passes": r.passes, "accesses": r.accesses, "checked_accesses": r.checked,
                "faults": r.faults, "private_faults": r.stats.private_faults,
                "attribute_changes": r.stats.attribute_changes,
                "gmem_invalidations": r.stats.gmem_invalidations,
                "nx_huge_pages": {
                    "tables_listed": r.stats.nx_pages_tracked,
                    "recovered": r.stats.nx_recovered,
                    "recovery_passes": r.stats.nx_recovery_passes,
                    "faults_below_listed": r.stats.nx_disallowed_adjusts,
                },
                "conversions_on_exit": r.conversions,
                "vmm_conversions": {"to_private": r.vmm_conversions.0, "to_shared": r.vmm_conversions.1},
                "events": events_json(&r.events),
                "violations": r.total_violations, "violation_log": r.log,
            })
        })
        .collect();
    json!({
        "mode": "soak", "scenario": "soak", "config": config, "seed": a.seed,
        "elapsed_ns": sum(&|r| r.elapsed.as_nanos() as u64), "interrupted": interrupted,
        "passes": sum(&|r| r.passes), "accesses": sum(&|r| r.accesses),
        "checked_accesses": sum(&|r| r.checked), "faults": sum(&|r| r.faults),
        "faults_by_outcome": {
            "fixed": stats.faults_fixed, "spurious": stats.faults_spurious,
            "retry": stats.faults_retry, "emulate": stats.faults_emulate,
            "write_protected": stats.faults_write_protected, "error": stats.faults_error,
            "fast_path_fixed": stats.fast_path_fixed, "retries_by_cause": causes,
        },
        "host_events": events.iter().sum::<u64>(), "events": events_json(&events),
        "violations": sum(&|r| r.total_violations),
        "violation_log": reports.iter().flat_map(|r| r.log.iter().cloned()).collect::<Vec<_>>(),
        "runs": runs,
    })
}

/// Add every counter of `b` into `a`.
fn add_stats(a: &mut vmmu::Stats, b: &vmmu::Stats) {
    let c = vmmu::stats::CounterSet::default();
    c.absorb(a);
    c.absorb(b);
    let mut sum = vmmu::Stats::default();
    c.accumulate(&mut sum);
    *a = sum;
}

fn print_run(seed: u64, t: VmType, r: &StressReport) {
    let st = &r.stats;
    println!(
        "soak {}: seed {seed}, {:.1} s{}, {} passes, {} guest accesses ({} checked by the oracle), {} host events",
        t.name(),
        r.elapsed.as_secs_f64(),
        if r.interrupted { " (interrupted)" } else { "" },
        r.passes,
        r.accesses,
        r.checked,
        r.events.iter().sum::<u64>()
    );
    println!(
        "  faults: {} ({:.2} per guest access): fixed {}, spurious {}, retried {}, emulated {}, errors {}; fast-path fixes {}",
        r.faults,
        r.faults as f64 / r.accesses.max(1) as f64,
        st.faults_fixed,
        st.faults_spurious,
        st.faults_retry,
        st.faults_emulate,
        st.faults_error,
        st.fast_path_fixed
    );
    println!(
        "  retries by cause: {}",
        st.retries_by_cause()
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  nx huge pages: {} tables listed by fetches, {} zapped by {} recovery passes, {} faults went below a listed table",
        st.nx_pages_tracked, st.nx_recovered, st.nx_recovery_passes, st.nx_disallowed_adjusts
    );
    if t.has_private_mem() {
        println!(
            "  private: {} private faults, {} attribute changes, {} guest_memfd invalidations, \
             conversions {} to private / {} to shared ({} of them on memory-fault exits)",
            st.private_faults,
            st.attribute_changes,
            st.gmem_invalidations,
            r.vmm_conversions.0,
            r.vmm_conversions.1,
            r.conversions
        );
    }
    println!(
        "  host events: {}",
        EVENT_NAMES
            .iter()
            .zip(r.events.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  violations: {}", r.total_violations);
    for l in &r.log {
        println!("  violation: {l}");
    }
}
