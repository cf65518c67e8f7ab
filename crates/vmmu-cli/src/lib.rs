//! `vmmu`: KVM-selftest scenarios on the vmmu machine model, and benchmarks side
//! by side with the real /dev/kvm.
//!
//! The binary is `src/main.rs`; everything lives here so the argument parser can
//! be fuzzed and tested without running a scenario ([`check_args`]).

mod args;
mod bench;
mod bug_zoo;
mod bugs;
mod cli;
mod diff;
mod diff_cases;
mod errors;
mod html;
mod report;
mod scenario;
mod soak;
mod trace;

use std::process::ExitCode;

use clap::Parser;

use args::BadInput;
use cli::{BenchCmd, Cli, Cmd, RunCmd};

/// Check a scenario's flags without running it (nothing is allocated).
fn validate_scenario(cmd: &RunCmd) -> anyhow::Result<()> {
    let common = cmd.common();
    match cmd {
        RunCmd::DemandPaging(_) => scenario::demand_paging::validate(&common).map(|_| ()),
        RunCmd::MmuStress(_) => scenario::mmu_stress::validate(&common).map(|_| ()),
        RunCmd::MemslotChurn(_) => scenario::memslot_churn::validate(&common).map(|_| ()),
        RunCmd::InvalidationStorm(_) => scenario::invalidation_storm::validate(&common).map(|_| ()),
        RunCmd::Roots(_) => scenario::roots::validate(&common).map(|_| ()),
        RunCmd::PrivateConversions(_) => {
            scenario::private_conversions::validate(&common).map(|_| ())
        }
        RunCmd::PrivateExits(_) => scenario::private_exits::validate(&common).map(|_| ()),
        RunCmd::DirtyLog(_) => scenario::dirty_log::validate(&common).map(|_| ()),
        RunCmd::LiveMigration(_) => scenario::live_migration::validate(&common).map(|_| ()),
        RunCmd::PageSplitting(_) => scenario::page_splitting::validate(&common).map(|_| ()),
        RunCmd::Access(_) => scenario::access::validate(&common).map(|_| ()),
        RunCmd::ShadowProcessChurn(_) => {
            scenario::shadow_process_churn::validate(&common).map(|_| ())
        }
        RunCmd::AccessTracking(_) => scenario::access_tracking::validate(&common).map(|_| ()),
        RunCmd::DirtyLogPerf(_) => scenario::dirty_log_perf::validate(&common).map(|_| ()),
        RunCmd::Prefault(_) => scenario::prefault::validate(&common).map(|_| ()),
        RunCmd::GuestMemfd(_) => scenario::guest_memfd::validate(&common).map(|_| ()),
        RunCmd::MemslotPerf(a) => scenario::memslot_perf::validate(&common, &a.perf()),
        RunCmd::NxHugePages(a) => scenario::nx_huge_pages::validate(&common, &a.nx()).map(|_| ()),
        RunCmd::Reclaim(a) => scenario::reclaim::validate(&common, &a.reclaim()).map(|_| ()),
    }
}

/// Check a scenario's flags and its trace file before running it.
fn validate_run(cmd: &RunCmd) -> anyhow::Result<()> {
    validate_scenario(cmd)?;
    check_trace_path(&cmd.common())
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

/// Check a benchmark's flags before anything is allocated.
fn validate_bench(b: &BenchCmd) -> anyhow::Result<()> {
    match b {
        BenchCmd::DemandPaging(a) => bench::validate_demand_paging(a),
        BenchCmd::InvalidationStorm(a) => bench::validate_storm(a),
        BenchCmd::Conversions(a) => bench::conversions::validate(a),
        BenchCmd::DirtyLog(a) => bench::dirty_log::validate(a),
        BenchCmd::NxRecovery(a) => bench::nx_recovery::validate(a),
        BenchCmd::Aging(a) => bench::aging::validate(a),
        BenchCmd::Scaling(a) => bench::scaling::validate(a),
    }
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
        Cmd::Run { scenario: cmd } => validate_scenario(cmd),
        Cmd::Bench { benchmark } => validate_bench(benchmark),
        Cmd::Soak(a) => soak::check(a),
        Cmd::Report(_) | Cmd::Bugs(_) | Cmd::Diff(_) => Ok(()),
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
        Cmd::Bench {
            benchmark: BenchCmd::Conversions(_),
        } => "bench conversions".into(),
        Cmd::Bench {
            benchmark: BenchCmd::DirtyLog(_),
        } => "bench dirty-log".into(),
        Cmd::Bench {
            benchmark: BenchCmd::NxRecovery(_),
        } => "bench nx-recovery".into(),
        Cmd::Bench {
            benchmark: BenchCmd::Aging(_),
        } => "bench aging".into(),
        Cmd::Bench {
            benchmark: BenchCmd::Scaling(_),
        } => "bench scaling".into(),
        Cmd::Soak(_) => "soak".into(),
        Cmd::Report(_) => "report".into(),
        Cmd::Bugs(_) => "bugs".into(),
        Cmd::Diff(_) => "diff".into(),
    };
    // The load before anything runs, for the record; a benchmark warns when
    // the machine is too busy for its figures.
    // (A refused benchmark prints its one line only.)
    let busy = report::note_start();
    if let (Some(w), Cmd::Bench { benchmark }) = (&busy, &cli.cmd) {
        if validate_bench(benchmark).is_ok() {
            eprintln!("{w}");
        }
    }
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
                RunCmd::PrivateConversions(_) => scenario::private_conversions::run(&common),
                RunCmd::PrivateExits(_) => scenario::private_exits::run(&common),
                RunCmd::DirtyLog(_) => scenario::dirty_log::run(&common),
                RunCmd::LiveMigration(_) => scenario::live_migration::run(&common),
                RunCmd::PageSplitting(_) => scenario::page_splitting::run(&common),
                RunCmd::Access(_) => scenario::access::run(&common),
                RunCmd::ShadowProcessChurn(a) => {
                    scenario::shadow_process_churn::run(&common, a.vs_kvm)
                }
                RunCmd::AccessTracking(_) => scenario::access_tracking::run(&common),
                RunCmd::DirtyLogPerf(_) => scenario::dirty_log_perf::run(&common),
                RunCmd::Prefault(_) => scenario::prefault::run(&common),
                RunCmd::GuestMemfd(a) => scenario::guest_memfd::run(&common, a.vs_kvm),
                RunCmd::MemslotPerf(a) => scenario::memslot_perf::run(&common, &a.perf()),
                RunCmd::NxHugePages(a) => scenario::nx_huge_pages::run(&common, &a.nx()),
                RunCmd::Reclaim(a) => scenario::reclaim::run(&common, &a.reclaim()),
            }
        }),
        Cmd::Bench {
            benchmark: BenchCmd::DemandPaging(a),
        } => bench::demand_paging(&a),
        Cmd::Bench {
            benchmark: BenchCmd::InvalidationStorm(a),
        } => bench::invalidation_storm(&a),
        Cmd::Bench {
            benchmark: BenchCmd::Conversions(a),
        } => bench::conversions::run(&a),
        Cmd::Bench {
            benchmark: BenchCmd::DirtyLog(a),
        } => bench::dirty_log::run(&a),
        Cmd::Bench {
            benchmark: BenchCmd::NxRecovery(a),
        } => bench::nx_recovery::run(&a),
        Cmd::Bench {
            benchmark: BenchCmd::Aging(a),
        } => bench::aging::run(&a),
        Cmd::Bench {
            benchmark: BenchCmd::Scaling(a),
        } => bench::scaling::run(&a),
        Cmd::Soak(a) => soak::run(&a),
        Cmd::Report(a) => html::run(&a.runs, a.trace.as_deref(), &a.output),
        Cmd::Bugs(a) => bugs::run(&a),
        Cmd::Diff(a) => diff::run(&a),
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
