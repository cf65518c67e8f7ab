//! The arguments of each `vmmu bench` benchmark.

use super::*;

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
    /// Samples of each rate per round, 1 and N interleaved; a round keeps
    /// each rate's best (the machine's noise only ever slows a run down).
    #[arg(long, default_value_t = 3)]
    pub(crate) samples: u32,
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
