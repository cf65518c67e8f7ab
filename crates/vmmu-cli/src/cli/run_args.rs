//! The arguments of each `vmmu run` scenario.

use super::*;

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
