//! The command line: one subcommand per scenario, each with the flags of the
//! selftest it re-creates and its own defaults (shown by `--help`).
//!
//! Flags mean what they mean in the selftest a scenario re-creates; where vmmu
//! adds something the selftest does not have, the flag is long-only so it cannot
//! clash with a selftest letter. A flag a scenario does not use is refused
//! (clap's "unexpected argument", turned into one line by [`crate::errors`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use vmmu_machine::Backing;

use crate::args::{parse_backing, parse_size, Common};

mod bench_args;
mod run_args;

pub(crate) use bench_args::*;
pub(crate) use run_args::*;

#[derive(Parser, Debug)]
#[command(
    name = "vmmu",
    version,
    about = "The x86 KVM MMU in Rust: selftest scenarios, benchmarks, soak runs",
    propagate_version = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Run a scenario on the machine model.
    #[command(
        subcommand_value_name = "SCENARIO",
        subcommand_help_heading = "Scenarios"
    )]
    Run {
        #[command(subcommand)]
        scenario: RunCmd,
    },
    /// Measure: vmmu, the real /dev/kvm (with --vs-kvm) and the plain baseline.
    #[command(
        subcommand_value_name = "BENCHMARK",
        subcommand_help_heading = "Benchmarks"
    )]
    Bench {
        #[command(subcommand)]
        benchmark: BenchCmd,
    },
    /// The long stress run: host events and memslot churn under writing and
    /// verifying vCPUs, with the oracle on.
    Soak(SoakArgs),
    /// One self-contained HTML page with plots from the --json output of runs
    /// and benchmarks (several runs are also compared).
    Report(ReportArgs),
    /// Historical KVM MMU bugs re-created as test-only switches: `vmmu bugs`
    /// lists them with their upstream fixes; `vmmu bugs run [NAME]` puts
    /// each back and runs the detector that catches it.
    Bugs(BugsArgs),
    /// The same memslot calls and capability queries on vmmu and on this
    /// machine's /dev/kvm (or a recording of it): a parity table; exits
    /// non-zero on any mismatch.
    Diff(DiffArgs),
}

/// `vmmu diff`.
#[derive(Args, Debug, Clone)]
pub(crate) struct DiffArgs {
    /// Write the real KVM's answers to FILE (needs /dev/kvm).
    #[arg(long, value_name = "FILE")]
    pub(crate) record: Option<PathBuf>,
    /// Compare against a recording instead of /dev/kvm (without /dev/kvm,
    /// the recording committed with the source is used).
    #[arg(long, value_name = "FILE")]
    pub(crate) answers: Option<PathBuf>,
    /// Print one JSON object on stdout and nothing else there.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `vmmu bugs`.
#[derive(Args, Debug, Clone)]
pub(crate) struct BugsArgs {
    /// `list` the bugs, or `run` their detectors with each bug put back.
    #[arg(value_parser = ["list", "run"], default_value = "list")]
    pub(crate) action: String,
    /// One bug (default: all of them).
    pub(crate) name: Option<String>,
    /// Only the detectors that run in this process (no cargo, no source tree).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Print one JSON object on stdout and nothing else there.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `vmmu report`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ReportArgs {
    /// Files holding `vmmu run|bench|soak ... --json` output (one object per
    /// file or per line).
    #[arg(value_name = "RUN.json", required = true)]
    pub(crate) runs: Vec<PathBuf>,
    /// The page to write.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        default_value = "report.html"
    )]
    pub(crate) output: PathBuf,
    /// A trace written with `--trace`: adds fault latency over time.
    #[arg(long, value_name = "TRACE.json")]
    pub(crate) trace: Option<PathBuf>,
}

/// Flags every scenario takes: the MMU's configuration and the output.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct RunFlags {
    /// Seed of everything random (guest programs, host events).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Print one JSON object on stdout and nothing else there.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write a Chrome trace-event timeline (opens in Perfetto).
    #[arg(long, value_name = "FILE")]
    pub(crate) trace: Option<PathBuf>,
    /// Faults recorded per vCPU and run in the trace (the rest are counted and
    /// the cut is marked).
    #[arg(long, value_name = "N", default_value_t = crate::trace::FAULTS_PER_VCPU)]
    pub(crate) trace_limit: usize,
    /// Skip the oracle's per-access checks (faster; data and leak checks remain).
    #[arg(long)]
    pub(crate) no_oracle: bool,
    /// Turn off the fault pre-check (KVM before 6.9), to measure what it buys.
    #[arg(long)]
    pub(crate) no_precheck: bool,
    /// Run without EPT A/D bits (pages aged by access tracking).
    #[arg(long)]
    pub(crate) no_ad: bool,
    /// The MMU: tdp (two-dimensional paging, the TDP MMU; the default but
    /// for shadow-process-churn) or shadow (KVM's tdp=off: the MMU shadows
    /// the guest's own page tables).
    #[arg(long, value_name = "KIND", value_parser = parse_mmu)]
    #[serde(serialize_with = "mmu_name_opt")]
    pub(crate) mmu: Option<vmmu::MmuKind>,
    /// Shadow MMU: keep every shadowed guest table write-protected (no unsync
    /// pages: each guest store to one is emulated), to measure what unsync
    /// buys.
    #[arg(long)]
    pub(crate) no_unsync: bool,
    /// Shadow MMU: the page limit (KVM_SET_NR_MMU_PAGES, at least 64;
    /// default 2 % of guest memory's pages).
    #[arg(long, value_name = "N")]
    pub(crate) nr_mmu_pages: Option<u64>,
    /// Shadow MMU: start the vCPUs with paging on over a direct map of guest
    /// memory (1 GiB guest pages, tables in a 1 MiB slot at GPA 0), so the
    /// MMU shadows real guest tables instead of running KVM's nonpaging mode.
    #[arg(long)]
    pub(crate) guest_paging: bool,
}

fn mmu_name_opt<S: serde::Serializer>(m: &Option<vmmu::MmuKind>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.name()),
        None => s.serialize_none(),
    }
}

fn parse_mmu(s: &str) -> Result<vmmu::MmuKind, String> {
    match s {
        "tdp" => Ok(vmmu::MmuKind::Tdp),
        "shadow" => Ok(vmmu::MmuKind::Shadow),
        _ => Err(format!("unknown MMU '{s}' (valid: tdp, shadow)")),
    }
}

fn mmu_name<S: serde::Serializer>(m: &vmmu::MmuKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.name())
}

/// How dirty logging catches writes: the flags of every dirty-logging
/// scenario and benchmark (KVM's `enable_pml` and `eager_page_split` module
/// parameters).
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct TrackingFlags {
    /// How logged pages catch writes: write-protect (KVM without PML: the next
    /// write faults) or pml (Intel's page-modification logging: Dirty bits
    /// cleared, the processor logs the write, drained at vCPU exits).
    #[arg(long = "tracking", value_name = "HOW", value_parser = parse_tracking, default_value = "write-protect")]
    #[serde(serialize_with = "tracking_name")]
    pub(crate) tracking: vmmu::DirtyTracking,
    /// Do not split huge pages when logging turns on (KVM's
    /// eager_page_split=N): the first write to each splits it in the fault path.
    #[arg(long)]
    pub(crate) no_eager_split: bool,
}

impl TrackingFlags {
    fn apply(&self, c: Common) -> Common {
        Common {
            dirty_tracking: self.tracking,
            no_eager_split: self.no_eager_split,
            ..c
        }
    }
}

fn parse_tracking(s: &str) -> Result<vmmu::DirtyTracking, String> {
    match s {
        "write-protect" | "wp" => Ok(vmmu::DirtyTracking::WriteProtect),
        "pml" | "d-bit" => Ok(vmmu::DirtyTracking::Pml),
        _ => Err(format!(
            "unknown dirty tracking '{s}' (valid: write-protect, pml)"
        )),
    }
}

fn tracking_name<S: serde::Serializer>(t: &vmmu::DirtyTracking, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.name())
}

impl RunFlags {
    fn common(&self) -> Common {
        Common {
            seed: self.seed,
            json: self.json,
            trace: self.trace.clone(),
            trace_limit: self.trace_limit,
            no_oracle: self.no_oracle,
            no_precheck: self.no_precheck,
            no_ad: self.no_ad,
            mmu: self.mmu.unwrap_or_default(),
            no_unsync: self.no_unsync,
            nr_mmu_pages: self.nr_mmu_pages,
            guest_paging: self.guest_paging,
            ..Common::default()
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum RunCmd {
    /// demand_paging_test: every vCPU faults in its memory once, then a verify
    /// pass reads it back.
    DemandPaging(DemandPagingArgs),
    /// mmu_stress_test: write, reset the MMU context, rewrite, read, mprotect
    /// read-only (every store must fail with EFAULT), read-write again.
    MmuStress(MmuStressArgs),
    /// memslot_modification_stress_test plus set_memory_region_test: slots are
    /// created, deleted and moved under running vCPUs.
    MemslotChurn(MemslotChurnArgs),
    /// Faults inside and outside a migration storm, with and without the
    /// invalidation pre-check (the design discussion behind KVM 6.9's pre-check).
    InvalidationStorm(InvalidationStormArgs),
    /// Fast zaps of roots while vCPUs switch roles (the free-obsolete-roots and
    /// preserve-roots discussions).
    Roots(RootsArgs),
    /// private_mem_conversions_test: guest-requested conversions both ways over
    /// whole chunks and odd/even 4 KiB frames inside 2 MiB, host writes through
    /// the shared path, punch-holes read back as zeros; vCPUs in parallel.
    PrivateConversions(PrivateConversionsArgs),
    /// dirty_log_test: vCPUs write the iteration number into random pages while
    /// the host harvests the dirty log (get, or get and clear) every interval;
    /// no write may go unreported.
    DirtyLog(DirtyLogArgs),
    /// A running guest migrated to a second machine by pre-copy over the dirty
    /// log and a final stop-and-copy; the destination must equal the source
    /// byte for byte (no KVM selftest does this end to end).
    LiveMigration(LiveMigrationArgs),
    /// x86/dirty_log_page_splitting_test: huge mappings split eagerly when
    /// logging turns on and recovered in place when it turns off; the leaves
    /// at each level after every step.
    PageSplitting(PageSplittingArgs),
    /// Guests running many short-lived processes under the shadow MMU, with
    /// the fix that frees only obsolete roots and without it: root loads,
    /// previous-root hits, roots zapped, fault rate (the free-obsolete-roots
    /// discussion; no KVM selftest).
    ShadowProcessChurn(ShadowProcessChurnArgs),
    /// kvm-unit-tests' access test: every combination of guest PTE/PDE bits,
    /// paging mode and access, through the guest's own page tables, against a
    /// reference walk (fault or not, error code, A/D bits).
    Access(AccessArgs),
    /// access_tracking_perf_test (page_idle): memory marked idle through the
    /// aging callbacks, then written and read; the pages seen accessed are
    /// counted at each mark; aging while the vCPUs read.
    AccessTracking(AccessTrackingArgs),
    /// dirty_log_perf_test: populate, logging on, per iteration a write pass,
    /// get and clear of every slot's log, logging off; its timing lines.
    DirtyLogPerf(DirtyLogPerfArgs),
    /// private_mem_kvm_exits_test: a slot deleted under a private page, and a
    /// private attribute on a plain slot, each end in a memory-fault exit with
    /// the page's gpa, size 4096 and the PRIVATE flag.
    PrivateExits(PlainArgs),
    /// pre_fault_memory_test: three KVM_PRE_FAULT_MEMORY calls raced by a slot
    /// delete, on a default, a software-protected and a private VM.
    Prefault(PlainArgs),
    /// x86/nx_huge_pages_test: reads and fetches over four 2 MiB pages with
    /// the iTLB-multihit mitigation on and off; 2 MiB pages and
    /// nx_lpage_splits after each step, recovery periods, run-time toggles.
    NxHugePages(NxHugePagesArgs),
    /// A working set larger than the host memory it may keep: the host's
    /// reclaim loop ages pages through the MMU and swaps out the cold ones;
    /// pages reclaimed, refaults and fault latency with lockless and locked
    /// aging (no selftest).
    Reclaim(ReclaimArgs),
    /// memslot_perf_test: 512 MiB over 10 to 32764 memslots; map, unmap,
    /// unmap-chunked, move-active, move-inactive and rw loops, each slot
    /// count on a fresh VM, time per iteration and its growth with the count.
    MemslotPerf(MemslotPerfArgs),
    /// guest_memfd_test: the guest_memfd contract case by case (creation sizes
    /// and flags, fallocate modes and bounds, bind errors, mmap), with
    /// --vs-kvm side by side with /dev/kvm; and the punch-hole invalidation count.
    GuestMemfd(GuestMemfdArgs),
}

/// `vmmu soak`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct SoakArgs {
    /// Seed of the guest programs and the event mix.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// How long to run, in seconds (at least 1).
    #[arg(long, default_value_t = 60)]
    pub(crate) duration: u64,
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU (a multiple of 2M, at most 4G).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "8M")]
    pub(crate) bytes: u64,
    /// Run without EPT A/D bits (access tracking).
    #[arg(long)]
    pub(crate) no_ad: bool,
    /// Guests with paging on: kernels spawning, switching and ending processes
    /// (host events that would rewrite guest memory are left out).
    #[arg(long)]
    pub(crate) guest_paging: bool,
    /// The VM type to soak; `all` splits the duration between the three (the
    /// private types add conversions and punch-holes to the host events);
    /// with `--mmu shadow`, `all` is the default type alone.
    #[arg(long, value_enum, default_value_t = SoakVmType::All)]
    pub(crate) vm_type: SoakVmType,
    /// The MMU: tdp or shadow (shadow paging; only the default VM type).
    #[arg(long, value_name = "KIND", value_parser = parse_mmu, default_value = "tdp")]
    #[serde(serialize_with = "mmu_name")]
    pub(crate) mmu: vmmu::MmuKind,
    /// How the slot's dirty logging (turned on, harvested and off among the
    /// host events) catches writes: write-protect or pml.
    #[arg(long = "tracking", value_name = "HOW", value_parser = parse_tracking, default_value = "write-protect")]
    #[serde(serialize_with = "tracking_name")]
    pub(crate) tracking: vmmu::DirtyTracking,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `vmmu soak --vm-type`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SoakVmType {
    /// Each type in turn.
    All,
    /// No private memory.
    Default,
    /// Software-protected: the attributes decide each fault's side.
    #[value(name = "sw_protected")]
    SwProtected,
    /// SNP-like: the guests mark their accesses private or shared.
    Snp,
}

impl RunCmd {
    /// The scenario's name, as typed.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            RunCmd::DemandPaging(_) => "demand-paging",
            RunCmd::MmuStress(_) => "mmu-stress",
            RunCmd::MemslotChurn(_) => "memslot-churn",
            RunCmd::InvalidationStorm(_) => "invalidation-storm",
            RunCmd::Roots(_) => "roots",
            RunCmd::PrivateConversions(_) => "private-conversions",
            RunCmd::PrivateExits(_) => "private-exits",
            RunCmd::DirtyLog(_) => "dirty-log",
            RunCmd::LiveMigration(_) => "live-migration",
            RunCmd::PageSplitting(_) => "page-splitting",
            RunCmd::Access(_) => "access",
            RunCmd::ShadowProcessChurn(_) => "shadow-process-churn",
            RunCmd::AccessTracking(_) => "access-tracking",
            RunCmd::DirtyLogPerf(_) => "dirty-log-perf",
            RunCmd::Prefault(_) => "prefault",
            RunCmd::GuestMemfd(_) => "guest-memfd",
            RunCmd::MemslotPerf(_) => "memslot-perf",
            RunCmd::NxHugePages(_) => "nx-huge-pages",
            RunCmd::Reclaim(_) => "reclaim",
        }
    }

    /// The resolved flags the scenario code works with.
    pub(crate) fn common(&self) -> Common {
        match self {
            RunCmd::DemandPaging(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                backing: Some(a.backing),
                overlap: a.overlap,
                random: a.random,
                write_percent: Some(a.write_percent),
                prefault_host: a.prefault_host,
                touch_stride: Some(a.stride),
                touch_bytes: a.touch,
                ..a.flags.common()
            },
            RunCmd::MmuStress(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                backing: Some(if a.hugetlb {
                    Backing::Hugetlb2M
                } else {
                    Backing::Shmem
                }),
                aliases: Some(a.aliases),
                ..a.flags.common()
            },
            RunCmd::MemslotChurn(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                iterations: Some(a.iterations),
                delay_us: a.delay_us,
                overlap: a.overlap,
                slots: Some(a.slots),
                write_percent: Some(a.write_percent),
                ..a.flags.common()
            },
            RunCmd::InvalidationStorm(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                iterations: Some(a.iterations),
                backing: Some(a.backing),
                conversions: a.conversions,
                ..a.flags.common()
            },
            RunCmd::Roots(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                iterations: Some(a.iterations),
                slots: Some(a.slots),
                ..a.flags.common()
            },
            RunCmd::PrivateConversions(a) => Common {
                vcpus: Some(a.vcpus),
                slots: Some(a.memslots),
                backing: Some(a.backing),
                ..a.flags.common()
            },
            RunCmd::PrivateExits(a) | RunCmd::Prefault(a) => a.flags.common(),
            RunCmd::DirtyLog(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                iterations: Some(a.iterations),
                interval_ms: a.interval,
                log_mode: Some(a.mode.clone()),
                ring_entries: a.ring_size,
                ..a.tracking.apply(a.flags.common())
            },
            RunCmd::DirtyLogPerf(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                iterations: Some(a.iterations),
                backing: Some(a.backing),
                slots: Some(a.slots),
                no_manual_protect: a.get_only,
                seed: a.random_seed,
                ..a.tracking.apply(a.flags.common())
            },
            RunCmd::Access(a) => Common {
                stride: Some(a.stride),
                ..a.flags.common()
            },
            RunCmd::ShadowProcessChurn(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                iterations: Some(a.iterations),
                mmu: a.flags.mmu.unwrap_or(vmmu::MmuKind::Shadow),
                ..a.flags.common()
            },
            RunCmd::AccessTracking(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                backing: Some(a.backing),
                overlap: a.overlap,
                locked_aging: a.locked_aging,
                ..a.flags.common()
            },
            RunCmd::PageSplitting(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                backing: Some(a.backing),
                ..a.tracking.apply(a.flags.common())
            },
            RunCmd::LiveMigration(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                backing: Some(a.backing),
                log_mode: Some(a.mode.clone()),
                hot_percent: a.hot_percent,
                max_rounds: a.max_rounds,
                ..a.tracking.apply(a.flags.common())
            },
            RunCmd::GuestMemfd(a) => a.flags.common(),
            RunCmd::MemslotPerf(a) => a.flags.common(),
            RunCmd::Reclaim(a) => Common {
                vcpus: Some(a.vcpus),
                bytes: Some(a.bytes),
                iterations: Some(a.iterations),
                backing: Some(a.backing),
                locked_aging: a.aging == "locked",
                ..a.flags.common()
            },
            RunCmd::NxHugePages(a) => Common {
                backing: Some(a.backing),
                nx_huge_pages: a.mitigation != "off",
                ..a.flags.common()
            },
        }
    }
}

fn backing_name<S: serde::Serializer>(b: &Backing, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(b.name())
}

impl RunCmd {
    /// Every flag with its value (defaults included), for the JSON report.
    pub(crate) fn flags_json(&self) -> serde_json::Value {
        let v = match self {
            RunCmd::DemandPaging(a) => serde_json::to_value(a),
            RunCmd::MmuStress(a) => serde_json::to_value(a),
            RunCmd::MemslotChurn(a) => serde_json::to_value(a),
            RunCmd::InvalidationStorm(a) => serde_json::to_value(a),
            RunCmd::Roots(a) => serde_json::to_value(a),
            RunCmd::PrivateConversions(a) => serde_json::to_value(a),
            RunCmd::PrivateExits(a) | RunCmd::Prefault(a) => serde_json::to_value(a),
            RunCmd::DirtyLog(a) => serde_json::to_value(a),
            RunCmd::LiveMigration(a) => serde_json::to_value(a),
            RunCmd::PageSplitting(a) => serde_json::to_value(a),
            RunCmd::Access(a) => serde_json::to_value(a),
            RunCmd::ShadowProcessChurn(a) => serde_json::to_value(a),
            RunCmd::AccessTracking(a) => serde_json::to_value(a),
            RunCmd::DirtyLogPerf(a) => serde_json::to_value(a),
            RunCmd::GuestMemfd(a) => serde_json::to_value(a),
            RunCmd::MemslotPerf(a) => serde_json::to_value(a),
            RunCmd::NxHugePages(a) => serde_json::to_value(a),
            RunCmd::Reclaim(a) => serde_json::to_value(a),
        };
        v.unwrap_or_default()
    }
}

/// Selftest flags a scenario's selftest has and vmmu does not model, with why:
/// refused with that reason rather than clap's bare "unexpected argument".
pub(crate) fn unmodelled_flag(scenario: &str, flag: &str) -> Option<&'static str> {
    let flag = flag.split('=').next().unwrap_or(flag);
    Some(match (scenario, flag) {
        ("demand-paging", "-u" | "-a" | "-d" | "-r") => {
            "userfaultfd is not modelled: the host populates pages on first touch (see --prefault-host)"
        }
        (_, "-c") => "vCPU threads are not pinned to CPUs in the machine model",
        (s, "-m") if s != "private-conversions" => {
            "only the 4-level/5-level EPT guest mode exists here"
        }
        ("memslot-churn", "-q") => {
            "the slot-zap-all quirk cannot be turned off yet: deletes and moves zap every root"
        }
        ("memslot-perf", "-r") => {
            "one run per slot count here: repeat the command for a best of several"
        }
        ("memslot-perf", "-q") => {
            "the slot-zap-all quirk cannot be turned off yet: moves zap every root"
        }
        ("memslot-perf", "-d" | "-t") => {
            "the data is always checked here (the oracle and the guest's reads), and no alarm is needed"
        }
        ("mmu-stress", "-s") => {
            "the machine sizes mmu-stress memory with -b per vCPU and --aliases, not a slot size"
        }
        _ => return None,
    })
}
