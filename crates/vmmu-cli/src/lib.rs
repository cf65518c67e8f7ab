//! `vmmu`: KVM-selftest scenarios on the vmmu machine model, and benchmarks side
//! by side with the real /dev/kvm.
//!
//! The binary is `src/main.rs`; everything lives here so the argument parser can
//! be fuzzed and tested without running a scenario ([`check_args`]).

mod args;
mod bench;
mod cli;
mod errors;
mod report;
mod scenario;
mod trace;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use args::BadInput;
use cli::{BenchCmd, Cli, Cmd, RunCmd};

fn check_soak(duration: u64, vcpus: u32, bytes: u64) -> anyhow::Result<()> {
    if duration == 0 {
        anyhow::bail!(BadInput(
            "--duration 0: a soak runs for at least 1 second".into()
        ));
    }
    if vcpus == 0 || vcpus > 64 {
        anyhow::bail!(BadInput(format!("-v {vcpus}: vCPUs must be 1..=64")));
    }
    if !bytes.is_multiple_of(2 << 20) || bytes > 4 << 30 {
        anyhow::bail!(BadInput(format!(
            "-b {}: soak memory per vCPU must be a multiple of 2M, at most 4G",
            args::human(bytes)
        )));
    }
    Ok(())
}

fn soak(
    seed: u64,
    secs: u64,
    vcpus: u32,
    bytes: u64,
    no_ad: bool,
    json: bool,
) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    check_soak(secs, vcpus, bytes)?;
    let config = report::config_json(
        "soak",
        serde_json::json!({"seed": seed, "duration": secs, "vcpus": vcpus, "bytes": bytes, "no_ad": no_ad, "json": json}),
        &vmmu::VmConfig {
            ad_enabled: !no_ad,
            ..vmmu::VmConfig::default()
        },
        true,
    );
    // Ctrl-C finishes the current pass and prints the summary.
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = stop.clone();
    let _ = ctrlc::set_handler(move || on_signal.store(true, Ordering::Relaxed));
    let progress = Arc::new(vmmu_machine::stress::StressProgress::default());
    let cfg = vmmu_machine::stress::StressConfig {
        vcpus,
        bytes_per_vcpu: bytes,
        duration: Duration::from_secs(secs),
        seed,
        ad_enabled: !no_ad,
        stop: Some(stop.clone()),
        progress: Some(progress.clone()),
        ..Default::default()
    };
    let done = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        // Progress on stderr while it runs, when stderr is a terminal.
        if std::io::stderr().is_terminal() && !json {
            let (progress, done, stop) = (&progress, &done, &stop);
            s.spawn(move || {
                let t0 = std::time::Instant::now();
                let bar = indicatif::ProgressBar::new(secs);
                if let Ok(style) =
                    indicatif::ProgressStyle::with_template("soak [{bar:30}] {pos}/{len} s  {msg}")
                {
                    bar.set_style(style.progress_chars("=> "));
                }
                while !done.load(Ordering::Relaxed) {
                    bar.set_position(t0.elapsed().as_secs().min(secs));
                    bar.set_message(format!(
                        "{} passes, {} accesses, {} violations{}",
                        progress.passes.load(Ordering::Relaxed),
                        progress.accesses.load(Ordering::Relaxed),
                        progress.violations.load(Ordering::Relaxed),
                        if stop.load(Ordering::Relaxed) {
                            " (stopping)"
                        } else {
                            ""
                        }
                    ));
                    std::thread::sleep(Duration::from_millis(200));
                }
                bar.finish_and_clear();
            });
        }
        let r = vmmu_machine::stress::stress(&cfg);
        done.store(true, Ordering::Relaxed);
        r
    })?;
    let events: serde_json::Map<String, serde_json::Value> = vmmu_machine::stress::EVENT_NAMES
        .iter()
        .zip(r.events.iter())
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    let total_events: u64 = r.events.iter().sum();
    let st = &r.stats;
    let causes: serde_json::Map<String, serde_json::Value> = st
        .retries_by_cause()
        .iter()
        .map(|(k, n)| (k.to_string(), serde_json::json!(n)))
        .collect();
    let faults = serde_json::json!({
        "fixed": st.faults_fixed, "spurious": st.faults_spurious, "retry": st.faults_retry,
        "emulate": st.faults_emulate, "write_protected": st.faults_write_protected,
        "error": st.faults_error, "fast_path_fixed": st.fast_path_fixed,
        "retries_by_cause": causes,
    });
    if json {
        println!(
            "{}",
            serde_json::json!({"mode": "soak", "scenario": "soak", "config": config,
                "seed": seed, "elapsed_ns": r.elapsed.as_nanos() as u64, "interrupted": r.interrupted,
                "passes": r.passes, "accesses": r.accesses, "checked_accesses": r.checked, "faults": r.faults,
                "faults_by_outcome": faults,
                "host_events": total_events, "events": events, "violations": r.total_violations, "violation_log": r.log})
        );
    } else {
        println!(
            "soak: seed {seed}, {:.1} s{}, {} passes, {} guest accesses ({} checked by the oracle), {} host events",
            r.elapsed.as_secs_f64(),
            if r.interrupted { " (interrupted)" } else { "" },
            r.passes,
            r.accesses,
            r.checked,
            total_events
        );
        println!(
            "faults: {} ({:.2} per guest access): fixed {}, spurious {}, retried {}, emulated {}, errors {}; fast-path fixes {}",
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
            "retries by cause: {}",
            st.retries_by_cause()
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("host events:");
        for (k, v) in vmmu_machine::stress::EVENT_NAMES
            .iter()
            .zip(r.events.iter())
        {
            println!("  {k:<26} {v}");
        }
        println!("violations: {}", r.total_violations);
        for l in &r.log {
            println!("violation: {l}");
        }
    }
    Ok(if r.total_violations > 0 { 1 } else { 0 })
}

/// Check a scenario's flags without running it.
fn validate_run(cmd: &RunCmd) -> anyhow::Result<()> {
    let common = cmd.common();
    match cmd {
        RunCmd::DemandPaging(_) => scenario::demand_paging::validate(&common).map(|_| ()),
        RunCmd::MmuStress(_) => scenario::mmu_stress::validate(&common).map(|_| ()),
        RunCmd::MemslotChurn(_) => scenario::memslot_churn::validate(&common).map(|_| ()),
        RunCmd::InvalidationStorm(_) => scenario::invalidation_storm::validate(&common).map(|_| ()),
        RunCmd::Roots(_) => scenario::roots::validate(&common).map(|_| ()),
    }?;
    check_trace_path(&common)
}

/// A trace file that cannot be written is refused before the run, not after
/// it (when the run's output would be lost).
fn check_trace_path(common: &args::Common) -> anyhow::Result<()> {
    if let Some(path) = &common.trace {
        let probe = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path);
        if let Err(e) = probe {
            anyhow::bail!(BadInput(format!(
                "--trace {}: cannot write it: {e}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Parse `argv` (program name first) and validate it as the command would,
/// without running anything: `Ok` if the command would start, otherwise the one
/// line it would print. Help and version requests count as `Ok`. For the argument
/// parser's fuzz target and tests. (A `--trace` path is not probed here.)
#[doc(hidden)]
pub fn check_args<I, T>(argv: I) -> Result<(), String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    let text: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            return Ok(())
        }
        Err(e) => return Err(errors::one_line(&e, &text)),
    };
    let r = match &cli.cmd {
        Cmd::Run { scenario: cmd } => {
            let common = cmd.common();
            match cmd {
                RunCmd::DemandPaging(_) => scenario::demand_paging::validate(&common).map(|_| ()),
                RunCmd::MmuStress(_) => scenario::mmu_stress::validate(&common).map(|_| ()),
                RunCmd::MemslotChurn(_) => scenario::memslot_churn::validate(&common).map(|_| ()),
                RunCmd::InvalidationStorm(_) => {
                    scenario::invalidation_storm::validate(&common).map(|_| ())
                }
                RunCmd::Roots(_) => scenario::roots::validate(&common).map(|_| ()),
            }
        }
        Cmd::Bench {
            benchmark: BenchCmd::DemandPaging(a),
        } => bench::validate_demand_paging(a),
        Cmd::Bench {
            benchmark: BenchCmd::InvalidationStorm(a),
        } => bench::validate_storm(a),
        Cmd::Soak(a) => check_soak(a.duration, a.vcpus, a.bytes),
    };
    r.map_err(|e| errors::single_line(&e.to_string()))
}

/// Parse the command line and run it (the `vmmu` binary).
pub fn run_cli() -> ExitCode {
    use clap::error::ErrorKind;
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            eprintln!("{}", errors::one_line(&e, &argv));
            return ExitCode::from(2);
        }
    };
    let at = match &cli.cmd {
        Cmd::Run { scenario } => format!("run {}", scenario.name()),
        Cmd::Bench {
            benchmark: BenchCmd::DemandPaging(_),
        } => "bench demand-paging".into(),
        Cmd::Bench {
            benchmark: BenchCmd::InvalidationStorm(_),
        } => "bench invalidation-storm".into(),
        Cmd::Soak(_) => "soak".into(),
    };
    let r = match cli.cmd {
        Cmd::Run { scenario: cmd } => validate_run(&cmd).and_then(|()| {
            let mut common = cmd.common();
            common.config = report::config_json(
                &format!("run {}", cmd.name()),
                cmd.flags_json(),
                &scenario::vm_config(&common),
                !common.no_oracle,
            );
            match cmd {
                RunCmd::DemandPaging(_) => scenario::demand_paging::run(&common),
                RunCmd::MmuStress(_) => scenario::mmu_stress::run(&common),
                RunCmd::MemslotChurn(_) => scenario::memslot_churn::run(&common),
                RunCmd::InvalidationStorm(_) => scenario::invalidation_storm::run(&common),
                RunCmd::Roots(_) => scenario::roots::run(&common),
            }
        }),
        Cmd::Bench {
            benchmark: BenchCmd::DemandPaging(a),
        } => bench::demand_paging(&a),
        Cmd::Bench {
            benchmark: BenchCmd::InvalidationStorm(a),
        } => bench::invalidation_storm(&a),
        Cmd::Soak(a) => soak(a.seed, a.duration, a.vcpus, a.bytes, a.no_ad, a.json),
    };
    match r {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(e) => {
            let bad_input = e.downcast_ref::<BadInput>().is_some();
            eprintln!("vmmu {at}: {}", errors::single_line(&e.to_string()));
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}
