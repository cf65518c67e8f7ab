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

/// `vmmu run guest-memfd`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct GuestMemfdArgs {
    /// Also run every case on /dev/kvm and compare the answers.
    #[arg(long)]
    pub(crate) vs_kvm: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run reclaim`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct ReclaimArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU.
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "64M")]
    pub(crate) bytes: u64,
    /// Passes over the hot set after the populate.
    #[arg(short = 'i', long = "iterations", default_value_t = 6)]
    pub(crate) iterations: u32,
    /// Pages the host lets the guest keep resident, in percent of its memory.
    #[arg(long = "limit", value_name = "PERCENT", default_value_t = 75)]
    pub(crate) limit_percent: u32,
    /// Aging modes to run: lockless (KVM ≥ 6.15), locked (under mmu_lock,
    /// before) or both.
    #[arg(long = "aging", default_value = "both", value_parser = ["lockless", "locked", "both"])]
    pub(crate) aging: String,
    /// Backing source (swappable memory: anonymous, anonymous_thp, shmem).
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

impl ReclaimArgs {
    /// The scenario's own arguments.
    pub(crate) fn reclaim(&self) -> crate::scenario::reclaim::ReclaimArgs {
        crate::scenario::reclaim::ReclaimArgs {
            limit_percent: self.limit_percent,
            lockless: self.aging != "locked",
            locked: self.aging != "lockless",
        }
    }
}

/// `vmmu run nx-huge-pages`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct NxHugePagesArgs {
    /// Milliseconds between NX recovery passes
    /// (`nx_huge_pages_recovery_period_ms`; 0: an hour / ratio).
    #[arg(
        short = 'p',
        long = "recovery-period",
        value_name = "MS",
        default_value_t = 100
    )]
    pub(crate) period_ms: u64,
    /// `nx_huge_pages_recovery_ratio`: each pass zaps ceil(listed / ratio)
    /// (KVM's default is 60; the selftest's script sets 1).
    #[arg(long = "recovery-ratio", default_value_t = 1)]
    pub(crate) ratio: u32,
    /// The mitigation's settings to run: on, off or both (on, then turned
    /// off at run time).
    #[arg(long = "mitigation", default_value = "both", value_parser = ["on", "off", "both"])]
    pub(crate) mitigation: String,
    /// Backing source: huge host pages (anonymous_thp, anonymous_hugetlb_2mb,
    /// anonymous_hugetlb_1gb).
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous_hugetlb_2mb")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

impl NxHugePagesArgs {
    /// The scenario's own arguments.
    pub(crate) fn nx(&self) -> crate::scenario::nx_huge_pages::NxArgs {
        crate::scenario::nx_huge_pages::NxArgs {
            period_ms: self.period_ms,
            ratio: self.ratio,
            on: self.mitigation != "off",
            off: self.mitigation != "on",
        }
    }
}

/// A scenario with the common flags only.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct PlainArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run private-conversions`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct PrivateConversionsArgs {
    /// Number of vCPUs, each converting its own 2 MiB + 4 KiB.
    #[arg(short = 'n', long = "vcpus", default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// Memslots the guest_memfd is split into.
    #[arg(short = 'm', long = "memslots", default_value_t = 1)]
    pub(crate) memslots: u32,
    /// Backing source of the shared side (see `vmmu run demand-paging --help`).
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run dirty-log`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct DirtyLogArgs {
    /// Iterations (harvests).
    #[arg(short = 'i', long = "iterations", default_value_t = 32)]
    pub(crate) iterations: u32,
    /// Milliseconds between harvests.
    #[arg(
        short = 'I',
        long = "interval",
        value_name = "MS",
        default_value_t = 10
    )]
    pub(crate) interval: u64,
    /// Log mode: dirty-log (KVM_GET_DIRTY_LOG), clear-log (manual protection,
    /// KVM_CLEAR_DIRTY_LOG), dirty-ring (per-vCPU rings, KVM_RESET_DIRTY_RINGS)
    /// or all.
    #[arg(short = 'M', long = "mode", default_value = "all")]
    pub(crate) mode: String,
    /// Dirty ring size in entries (dirty-ring mode).
    #[arg(short = 'c', long = "ring-size", default_value_t = 65536)]
    pub(crate) ring_size: u32,
    /// vmmu: number of vCPUs, each writing its own chunk (the selftest runs one).
    #[arg(long = "vcpus", default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// vmmu: memory per vCPU.
    #[arg(long = "bytes", value_parser = parse_size, default_value = "64M")]
    pub(crate) bytes: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) tracking: TrackingFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run dirty-log-perf`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct DirtyLogPerfArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU.
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "1G")]
    pub(crate) bytes: u64,
    /// Iterations of write pass, get and clear.
    #[arg(short = 'i', long = "iterations", default_value_t = 2)]
    pub(crate) iterations: u32,
    /// Backing source (see `vmmu run demand-paging --help`).
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    /// Memslots the guest memory is split into.
    #[arg(short = 'x', long = "slots", default_value_t = 1)]
    pub(crate) slots: u32,
    /// Use KVM_GET_DIRTY_LOG alone, without manual protection and clear.
    #[arg(short = 'g')]
    pub(crate) get_only: bool,
    /// Seed of the guest programs (the selftest's -r).
    #[arg(short = 'r', long = "random-seed", default_value_t = 1)]
    pub(crate) random_seed: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) tracking: TrackingFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run page-splitting`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct PageSplittingArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU.
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "1G")]
    pub(crate) bytes: u64,
    /// Backing source: huge host pages (anonymous_thp, anonymous_hugetlb_2mb,
    /// anonymous_hugetlb_1gb).
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous_thp")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) tracking: TrackingFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run access`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct AccessArgs {
    /// Run about one case in N, picked pseudo-randomly (1: all of them).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) stride: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run shadow-process-churn`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct ShadowProcessChurnArgs {
    /// Number of vCPUs (each runs its own kernel).
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Guest memory per vCPU (its kernel's frames).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "8M")]
    pub(crate) bytes: u64,
    /// Kernel operations per vCPU (spawn, switch, run, remap, protect, exit).
    #[arg(short = 'i', long = "iterations", default_value_t = 20000)]
    pub(crate) iterations: u32,
    /// Also run a process-churning kernel on /dev/kvm (its CPL0 code is
    /// emulated there: compare counts per operation, not times).
    #[arg(long)]
    pub(crate) vs_kvm: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run access-tracking`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct AccessTrackingArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU.
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "1G")]
    pub(crate) bytes: u64,
    /// Backing source (see `vmmu run demand-paging --help`).
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    /// Overlap guest memory accesses instead of partitioning them per vCPU.
    #[arg(short = 'o', long = "overlap")]
    pub(crate) overlap: bool,
    /// vmmu: age under mmu_lock, taken for write by every aging callback (KVM
    /// before 6.15), instead of locklessly.
    #[arg(long)]
    pub(crate) locked_aging: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run live-migration`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct LiveMigrationArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU.
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "64M")]
    pub(crate) bytes: u64,
    /// Log mode: dirty-log (KVM_GET_DIRTY_LOG), clear-log (manual protection)
    /// or dirty-ring (per-vCPU rings of 65536 entries).
    #[arg(short = 'M', long = "mode", default_value = "dirty-log")]
    pub(crate) mode: String,
    /// Backing source of the source machine's guest memory (see `vmmu run
    /// demand-paging --help`); huge pages show what eager splitting changes.
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    /// Percentage of each vCPU's memory it keeps writing after writing it all once.
    #[arg(long, default_value_t = 10)]
    pub(crate) hot_percent: u32,
    /// Most pre-copy rounds before the stop-and-copy.
    #[arg(long, default_value_t = 10)]
    pub(crate) max_rounds: u32,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) tracking: TrackingFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run demand-paging`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct DemandPagingArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// Memory demand-paged by each vCPU (e.g. 10M, 3G).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "1G")]
    pub(crate) bytes: u64,
    /// Backing source: anonymous, anonymous_thp, anonymous_hugetlb (2M),
    /// anonymous_hugetlb_2mb, anonymous_hugetlb_1gb, shared_hugetlb, shmem.
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    /// Overlap guest memory accesses instead of partitioning them into a separate
    /// region per vCPU (no data verification then).
    #[arg(short = 'o', long = "overlap")]
    pub(crate) overlap: bool,
    /// vmmu: visit pages in random order (the selftest walks them in order).
    #[arg(long)]
    pub(crate) random: bool,
    /// vmmu: percentage of first touches that write (the selftest writes all).
    #[arg(long, default_value_t = 100)]
    pub(crate) write_percent: u32,
    /// vmmu: touch all host memory before the vCPUs start, so faults measure the
    /// MMU rather than host page allocation.
    #[arg(long)]
    pub(crate) prefault_host: bool,
    /// vmmu: touch one 4 KiB page every this many bytes of each vCPU's
    /// memory (e.g. 2M: a sparse guest far larger than the host's memory).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    pub(crate) stride: u64,
    /// vmmu: touch only this much of each vCPU's memory, from its start
    /// (e.g. a dense 1G window of a 256G guest; default: all of it).
    #[arg(long, value_parser = parse_size)]
    pub(crate) touch: Option<u64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run mmu-stress`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct MmuStressArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// vmmu: guest memory written by each vCPU (the selftest sizes memory with
    /// -s slot size and -m max_mem).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "256M")]
    pub(crate) bytes: u64,
    /// Back the memfd with 2 MiB hugetlb pages (else shared memory).
    #[arg(short = 'H', long = "hugetlb")]
    pub(crate) hugetlb: bool,
    /// vmmu: install the same host memory as this many memslots at consecutive
    /// guest addresses (the selftest's aliasing, 1..=512).
    #[arg(long, default_value_t = 1)]
    pub(crate) aliases: u32,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run memslot-perf`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct MemslotPerfArgs {
    /// Memslot counts to run, each on a fresh VM (slot 0 included, as the
    /// selftest's -s counts it), comma-separated.
    #[arg(short = 's', long = "slots", value_delimiter = ',', default_values_t = crate::scenario::memslot_perf::DEFAULT_SLOTS)]
    pub(crate) slots: Vec<u32>,
    /// First sub-test: 0 map, 1 unmap, 2 unmap-chunked, 3 move-active,
    /// 4 move-inactive, 5 rw.
    #[arg(short = 'f', long = "first", default_value_t = 0)]
    pub(crate) first: usize,
    /// Last sub-test (same numbering).
    #[arg(short = 'e', long = "last", default_value_t = 5)]
    pub(crate) last: usize,
    /// Seconds each loop runs (at least one iteration), as the selftest's -l.
    #[arg(
        short = 'l',
        long = "loop-seconds",
        value_name = "SECONDS",
        default_value_t = 1.0
    )]
    pub(crate) seconds: f64,
    /// Also run the loops on /dev/kvm (the loop guest, 512 MiB over the same
    /// slot counts), side by side.
    #[arg(long)]
    pub(crate) vs_kvm: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

impl MemslotPerfArgs {
    /// The scenario's own arguments.
    pub(crate) fn perf(&self) -> crate::scenario::memslot_perf::PerfArgs {
        crate::scenario::memslot_perf::PerfArgs {
            slots: self.slots.clone(),
            first: self.first,
            last: self.last,
            seconds: self.seconds,
            vs_kvm: self.vs_kvm,
        }
    }
}

/// `vmmu run memslot-churn`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct MemslotChurnArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU (e.g. 256M, 1G).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "256M")]
    pub(crate) bytes: u64,
    /// Rounds of memslot changes (each: a dummy slot created and deleted, the
    /// test slot moved away and back, deleted and recreated).
    #[arg(short = 'i', long = "iterations", default_value_t = 10)]
    pub(crate) iterations: u32,
    /// Delay between memslot changes, in microseconds.
    #[arg(short = 'd', long = "delay", value_name = "USEC", default_value_t = 0)]
    pub(crate) delay_us: u64,
    /// Overlap guest memory accesses instead of partitioning them per vCPU.
    #[arg(short = 'o', long = "overlap")]
    pub(crate) overlap: bool,
    /// Memslots the test region is split into.
    #[arg(short = 'x', long = "slots", default_value_t = 1)]
    pub(crate) slots: u32,
    /// vmmu: percentage of the vCPUs' accesses that write.
    #[arg(long, default_value_t = 50)]
    pub(crate) write_percent: u32,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run invalidation-storm`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct InvalidationStormArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU (at least 4M).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "512M")]
    pub(crate) bytes: u64,
    /// Rounds of faults in each phase (without and with the storm).
    #[arg(short = 'i', long = "iterations", default_value_t = 2)]
    pub(crate) iterations: u32,
    /// Backing source (see `vmmu run demand-paging --help`).
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    /// A conversion storm: a software-protected VM whose region is
    /// guest_memfd-backed, the host converting ranges of the hot halves
    /// between private and shared (attributes, then the old side discarded)
    /// instead of migrating them.
    #[arg(long)]
    pub(crate) conversions: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

/// `vmmu run roots`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct RootsArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU.
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "64M")]
    pub(crate) bytes: u64,
    /// Root zaps (half of every root, half of the SMM address space's; with
    /// `--mmu shadow` every root, while the guests' processes zap their own).
    #[arg(short = 'i', long = "iterations", default_value_t = 20)]
    pub(crate) iterations: u32,
    /// Memslots the test region is split into (mirrored into SMM).
    #[arg(short = 'x', long = "slots", default_value_t = 1)]
    pub(crate) slots: u32,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: RunFlags,
}

#[derive(Subcommand, Debug)]
pub(crate) enum BenchCmd {
    /// First pass (host memory untouched / pre-touched), warm pass, slot delete:
    /// vmmu, the real /dev/kvm (with --vs-kvm) and plain first-touch threads.
    DemandPaging(BenchDemandPagingArgs),
    /// The invalidation storm with and without the pre-check.
    InvalidationStorm(BenchStormArgs),
    /// Private/shared conversions per second: 4K and 2M ranges, 1 and 2 vCPUs
    /// converting (guest hypercalls, the VMM's attributes and discard, a
    /// fault on the new side).
    Conversions(BenchConversionsArgs),
    /// Dirty-log calls timed on vmmu and (with --vs-kvm) /dev/kvm, the same
    /// guest write pattern on both and the bitmaps compared page for page.
    DirtyLog(BenchDirtyLogArgs),
    /// NX huge page recovery under the read lock (KVM 6.18) and the write
    /// lock (before): pass time, the vCPU's fault latency during the pass,
    /// and the faults a read takes before and after recovery.
    NxRecovery(BenchNxRecoveryArgs),
    /// One aging pass over populated memory while the vCPUs fault, lockless
    /// (KVM 6.15) and under mmu_lock (before): pass time and the vCPUs'
    /// fault latency during the pass.
    Aging(BenchAgingArgs),
    /// Fault throughput from 1 to N vCPUs against a memory-bound loop from 1
    /// to N threads in the same run: vmmu's scaling as a share of what this
    /// machine gives any N threads.
    Scaling(BenchScalingArgs),
}

/// `vmmu bench scaling`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct BenchScalingArgs {
    /// vCPUs (and loop threads) of the scaled run.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Memory each vCPU faults in (host memory pre-touched).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "512M")]
    pub(crate) bytes: u64,
    /// Each loop thread's private buffer.
    #[arg(long = "loop-bytes", value_parser = parse_size, default_value = "64M")]
    pub(crate) loop_bytes: u64,
    /// Rounds (the median is the headline).
    #[arg(long, default_value_t = 5)]
    pub(crate) rounds: u32,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: BenchFlags,
}

/// `vmmu bench aging`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct BenchAgingArgs {
    /// The aged memory (populated first).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "1G")]
    pub(crate) bytes: u64,
    /// vCPUs faulting during the pass.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Each vCPU's region of first-touch faults.
    #[arg(long = "fault-bytes", value_parser = parse_size, default_value = "128M")]
    pub(crate) fault_bytes: u64,
    /// No EPT A/D bits: aging makes entries access-tracked.
    #[arg(long)]
    pub(crate) no_ad: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: BenchFlags,
}

/// `vmmu bench nx-recovery`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct BenchNxRecoveryArgs {
    /// The region split by fetches (hugetlb 2 MiB pages; a multiple of 2M).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "1G")]
    pub(crate) bytes: u64,
    /// The region the vCPU faults in, page by page, during the pass.
    #[arg(long = "fault-bytes", value_parser = parse_size, default_value = "256M")]
    pub(crate) fault_bytes: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: BenchFlags,
}

/// `vmmu bench dirty-log`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct BenchDirtyLogArgs {
    /// Logged memory in all (a multiple of 2M per vCPU).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "1G")]
    pub(crate) bytes: u64,
    /// vCPUs writing, each its own chunk of the memory (on both sides).
    #[arg(short = 'v', long = "vcpus", default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// The pattern pass writes every this many pages.
    #[arg(long, default_value_t = 3)]
    pub(crate) stride: u64,
    /// Also run it on /dev/kvm.
    #[arg(long)]
    pub(crate) vs_kvm: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) tracking: TrackingFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: BenchFlags,
}

/// `vmmu bench conversions`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct BenchConversionsArgs {
    /// Memory per vCPU (a multiple of 2M).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "64M")]
    pub(crate) bytes: u64,
    /// Rounds of conversions over each vCPU's memory.
    #[arg(short = 'i', long = "iterations", default_value_t = 4)]
    pub(crate) iterations: u32,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: BenchFlags,
}

/// Flags both benchmarks take.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct BenchFlags {
    /// Keep the oracle's per-access checks on while measuring (off by default:
    /// they would be measured too).
    #[arg(long)]
    pub(crate) oracle: bool,
    /// Print one JSON object on stdout and nothing else there.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `vmmu bench demand-paging`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct BenchDemandPagingArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU.
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "512M")]
    pub(crate) bytes: u64,
    /// Host memory of all three sides: anonymous (4 KiB pages) or anonymous_thp.
    #[arg(short = 's', long = "backing", value_parser = parse_backing, default_value = "anonymous")]
    #[serde(serialize_with = "backing_name")]
    pub(crate) backing: Backing,
    /// Also run the workload on /dev/kvm.
    #[arg(long)]
    pub(crate) vs_kvm: bool,
    /// vmmu's MMU: tdp or shadow (the real KVM on these machines runs its
    /// shadow MMU either way, nested); shadow also runs vmmu's TDP MMU in the
    /// same invocation, so each phase shows vmmu shadow, vmmu TDP and KVM.
    #[arg(long, value_name = "KIND", value_parser = parse_mmu, default_value = "tdp")]
    #[serde(serialize_with = "mmu_name")]
    pub(crate) mmu: vmmu::MmuKind,
    /// With `--mmu shadow`: vmmu's guest runs with paging on over a direct
    /// map (1 GiB guest pages), as the real KVM's guest does (2 MiB pages),
    /// so the shadow MMU walks and shadows guest tables on both sides.
    #[arg(long)]
    pub(crate) guest_paging: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: BenchFlags,
}

/// `vmmu bench invalidation-storm`.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct BenchStormArgs {
    /// Number of vCPUs.
    #[arg(short = 'v', long = "vcpus", default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Memory per vCPU (at least 4M).
    #[arg(short = 'b', long = "bytes", value_parser = parse_size, default_value = "512M")]
    pub(crate) bytes: u64,
    /// Rounds of faults in each phase.
    #[arg(short = 'i', long = "iterations", default_value_t = 2)]
    pub(crate) iterations: u32,
    /// Seed of the fault pattern and the storm.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// A conversion storm instead of migrations (see `vmmu run
    /// invalidation-storm --help`).
    #[arg(long)]
    pub(crate) conversions: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) flags: BenchFlags,
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
