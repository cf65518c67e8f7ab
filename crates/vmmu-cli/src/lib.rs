//! `vmmu`: KVM-selftest scenarios on the vmmu machine model, and benchmarks side
//! by side with the real /dev/kvm.
//!
//! The binary is `src/main.rs`; everything lives here so the argument parser can
//! be fuzzed and tested without running a scenario ([`check_args`]).

mod args;
mod bench;
mod report;
mod scenario;
mod trace;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use args::{BadInput, Common};

#[derive(Parser, Debug)]
#[command(
    name = "vmmu",
    version,
    about = "The x86 KVM MMU in Rust: selftest scenarios, benchmarks, soak runs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a scenario on the machine model.
    Run {
        /// Which scenario.
        scenario: Scenario,
        #[command(flatten)]
        common: Common,
    },
    /// Measure a scenario: vmmu, real KVM (with --vs-kvm) and the plain baseline.
    Bench {
        /// Which benchmark.
        scenario: BenchScenario,
        /// Also run the workload on /dev/kvm.
        #[arg(long)]
        vs_kvm: bool,
        /// Keep the oracle's per-access checks on while measuring.
        #[arg(long)]
        oracle: bool,
        #[command(flatten)]
        common: Common,
    },
    /// The long stress run: host events and memslot churn under writing and
    /// verifying vCPUs, with the oracle on.
    Soak {
        /// Seed of the guest programs and the event mix.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// vCPUs.
        #[arg(short = 'v', long, default_value_t = 2)]
        vcpus: u32,
        /// Memory per vCPU.
        #[arg(short = 'b', long, value_parser = args::parse_size, default_value = "8M")]
        bytes: u64,
        /// Run without EPT A/D bits (access tracking).
        #[arg(long)]
        no_ad: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Scenario {
    /// demand_paging_test.
    DemandPaging,
    /// mmu_stress_test.
    MmuStress,
    /// memslot_modification_stress_test + set_memory_region_test.
    MemslotChurn,
    /// Faults during a storm of overlapping invalidations (pre-check vs none).
    InvalidationStorm,
    /// Fast zaps of roots while vCPUs switch roles.
    Roots,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BenchScenario {
    /// First pass (host memory untouched / pre-touched), warm pass, delete slot.
    DemandPaging,
    /// The storm with and without the pre-check.
    InvalidationStorm,
}

fn check_soak(vcpus: u32, bytes: u64) -> anyhow::Result<()> {
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
    check_soak(vcpus, bytes)?;
    let cfg = vmmu_machine::stress::StressConfig {
        vcpus,
        bytes_per_vcpu: bytes,
        duration: Duration::from_secs(secs),
        seed,
        ad_enabled: !no_ad,
        ..Default::default()
    };
    let r = vmmu_machine::stress::stress(&cfg)?;
    let events: serde_json::Map<String, serde_json::Value> = vmmu_machine::stress::EVENT_NAMES
        .iter()
        .zip(r.events.iter())
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    let total_events: u64 = r.events.iter().sum();
    if json {
        println!(
            "{}",
            serde_json::json!({"scenario": "soak", "seed": seed, "elapsed_ns": r.elapsed.as_nanos() as u64,
                "passes": r.passes, "accesses": r.accesses, "checked_accesses": r.checked, "faults": r.faults,
                "host_events": total_events, "events": events, "violations": r.total_violations, "violation_log": r.log})
        );
    } else {
        println!(
            "soak: seed {seed}, {:.1} s, {} passes, {} guest accesses ({} checked), {} faults, {} host events",
            r.elapsed.as_secs_f64(),
            r.passes,
            r.accesses,
            r.checked,
            r.faults,
            total_events
        );
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

/// Parse `argv` (program name first) and validate it as the command would,
/// without running anything: `Ok` if the command would start, otherwise the one
/// line it would print. Help and version requests count as `Ok`. For the argument
/// parser's fuzz target and tests.
#[doc(hidden)]
pub fn check_args<I, T>(argv: I) -> Result<(), String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            return Ok(())
        }
        Err(e) => {
            return Err(e
                .render()
                .to_string()
                .lines()
                .next()
                .unwrap_or("")
                .to_string())
        }
    };
    let r = match cli.cmd {
        Cmd::Run { scenario, common } => match scenario {
            Scenario::DemandPaging => scenario::demand_paging::validate(&common).map(|_| ()),
            Scenario::MmuStress => scenario::mmu_stress::validate(&common).map(|_| ()),
            Scenario::MemslotChurn => scenario::memslot_churn::validate(&common).map(|_| ()),
            Scenario::InvalidationStorm => {
                scenario::invalidation_storm::validate(&common).map(|_| ())
            }
            Scenario::Roots => scenario::roots::validate(&common).map(|_| ()),
        },
        Cmd::Bench {
            scenario, common, ..
        } => match scenario {
            BenchScenario::DemandPaging => bench::validate_demand_paging(&common),
            BenchScenario::InvalidationStorm => {
                scenario::invalidation_storm::validate(&common).map(|_| ())
            }
        },
        Cmd::Soak { vcpus, bytes, .. } => check_soak(vcpus, bytes),
    };
    r.map_err(|e| e.to_string())
}

/// Parse the command line and run it (the `vmmu` binary).
pub fn run_cli() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::from(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            // One line: clap's first line, without its "error: " prefix.
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("vmmu: {first} (see vmmu --help)");
            return ExitCode::from(2);
        }
    };
    let r = match cli.cmd {
        Cmd::Run { scenario, common } => match scenario {
            Scenario::DemandPaging => scenario::demand_paging::run(&common),
            Scenario::MmuStress => scenario::mmu_stress::run(&common),
            Scenario::MemslotChurn => scenario::memslot_churn::run(&common),
            Scenario::InvalidationStorm => scenario::invalidation_storm::run(&common),
            Scenario::Roots => scenario::roots::run(&common),
        },
        Cmd::Bench {
            scenario,
            vs_kvm,
            oracle,
            common,
        } => match scenario {
            BenchScenario::DemandPaging => bench::demand_paging(&common, vs_kvm, oracle),
            BenchScenario::InvalidationStorm => bench::invalidation_storm(&common, oracle),
        },
        Cmd::Soak {
            seed,
            duration,
            vcpus,
            bytes,
            no_ad,
            json,
        } => soak(seed, duration, vcpus, bytes, no_ad, json),
    };
    match r {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(e) => {
            let bad_input = e.downcast_ref::<BadInput>().is_some();
            eprintln!("vmmu: {e}");
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}
