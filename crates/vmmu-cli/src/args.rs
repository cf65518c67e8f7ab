//! Flags shared by the scenarios (the selftests' conventions) and their
//! validation against this machine, done before anything is allocated.

use std::path::PathBuf;

use vmmu_machine::Backing;

/// The flags of a run, resolved: what the scenario code works with. Built from
/// a scenario's command-line arguments (`crate::cli`), which carry each
/// scenario's defaults; `None` means the scenario does not take that flag.
#[derive(Debug, Clone, Default)]
pub struct Common {
    /// Number of vCPUs.
    pub vcpus: Option<u32>,
    /// Guest memory per vCPU.
    pub bytes: Option<u64>,
    /// Iterations (passes, or operations for churn scenarios).
    pub iterations: Option<u32>,
    /// Run one case in this many (`access`).
    pub stride: Option<u64>,
    /// Bytes from one touched page to the next in each vCPU's chunk
    /// (demand-paging's `--stride`; 4 KiB: every page).
    pub touch_stride: Option<u64>,
    /// Bytes of each vCPU's chunk touched, from its start (demand-paging's
    /// `--touch`; the whole chunk by default).
    pub touch_bytes: Option<u64>,
    /// Backing source.
    pub backing: Option<Backing>,
    /// Number of memslots the test region is split into.
    pub slots: Option<u32>,
    /// Aliased memslots of the same host memory (mmu-stress).
    pub aliases: Option<u32>,
    /// Percentage of accesses that are writes.
    pub write_percent: Option<u32>,
    /// Delay between memslot changes, microseconds (memslot-churn).
    pub delay_us: u64,
    /// Visit pages in random order.
    pub random: bool,
    /// Every vCPU walks the whole region (no data verification then).
    pub overlap: bool,
    /// Seed of everything random.
    pub seed: u64,
    /// Print one JSON object on stdout and nothing else there.
    pub json: bool,
    /// Write a Chrome trace-event timeline.
    pub trace: Option<PathBuf>,
    /// Faults recorded per vCPU and run in the trace.
    pub trace_limit: usize,
    /// Skip the oracle's per-access checks.
    pub no_oracle: bool,
    /// Turn off the fault pre-check.
    pub no_precheck: bool,
    /// Run without EPT A/D bits.
    pub no_ad: bool,
    /// The MMU (`--mmu`).
    pub mmu: vmmu::MmuKind,
    /// Shadow MMU: drop every root on a root zap (before the fix).
    pub legacy_root_reload: bool,
    /// Shadow MMU: no unsync pages (`--no-unsync`).
    pub no_unsync: bool,
    /// Shadow MMU: the page limit (`--nr-mmu-pages`).
    pub nr_mmu_pages: Option<u64>,
    /// Shadow MMU: vCPUs start with paging on over a direct map (`--guest-paging`).
    pub guest_paging: bool,
    /// Touch all host memory before the vCPUs start (demand-paging).
    pub prefault_host: bool,
    /// Print nothing (benchmarks collect the figures themselves).
    pub quiet: bool,
    /// dirty-log: milliseconds between harvests (`-I`).
    pub interval_ms: u64,
    /// dirty-log: the log mode (`-M`), `None` for all.
    pub log_mode: Option<String>,
    /// Entries of each vCPU's dirty ring (0: bitmaps); set by the dirty-ring mode.
    pub dirty_ring: u32,
    /// dirty-log: the ring size asked for with `-c`.
    pub ring_entries: u32,
    /// dirty-log-perf: `-g`, KVM_GET_DIRTY_LOG alone (no manual protection).
    pub no_manual_protect: bool,
    /// live-migration: percentage of each vCPU's memory it keeps writing.
    pub hot_percent: u32,
    /// live-migration: most pre-copy rounds before the stop-and-copy.
    pub max_rounds: u32,
    /// Dirty logging: how writes are caught (`--tracking`).
    pub dirty_tracking: vmmu::DirtyTracking,
    /// Dirty logging: no eager page splitting (`--no-eager-split`).
    pub no_eager_split: bool,
    /// access-tracking: age under `mmu_lock` (before KVM 6.15).
    pub locked_aging: bool,
    /// The iTLB-multihit mitigation (`nx_huge_pages`) on at VM creation.
    pub nx_huge_pages: bool,
    /// invalidation-storm: conversions between private and shared (a
    /// software-protected VM on guest_memfd) instead of host migrations.
    pub conversions: bool,
    /// The configuration block of the JSON report (`report::config_json`).
    pub config: serde_json::Value,
}

/// A refused argument: one line, non-zero exit.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Parse `512M`, `1G`, `4096`, `2m`, `64K`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix '{c}' in '{s}' (use K, M, G or T)"
                    ))
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512M, 1G)"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("'{s}' is not a positive size that fits 64 bits"))
}

/// The backing names `-s` accepts: the selftests' (`backing_src_help`) and
/// vmmu's short ones.
pub const BACKING_NAMES: &str =
    "anonymous, anonymous_thp, anonymous_hugetlb, anonymous_hugetlb_2mb, \
anonymous_hugetlb_1gb, shared_hugetlb, shmem (also hugetlb2m, hugetlb1g)";

/// Parse a backing source name.
pub fn parse_backing(s: &str) -> Result<Backing, String> {
    Backing::parse(s).ok_or_else(|| format!("unknown backing '{s}' (valid: {BACKING_NAMES})"))
}

/// Bytes the kernel says are available.
pub fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

/// A size as a person would write it, exactly: `1 GiB`, `1.5 GiB` only when
/// exact, `1000 bytes` for a size that is not a whole number of KiB.
pub fn human(bytes: u64) -> String {
    for (unit, name) in [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ] {
        if bytes >= unit {
            if bytes.is_multiple_of(unit) {
                return format!("{} {name}", bytes / unit);
            }
            if (bytes * 2).is_multiple_of(unit) {
                return format!("{}.5 {name}", bytes / unit);
            }
        }
    }
    if bytes.is_multiple_of(1 << 10) {
        return format!("{} KiB", bytes >> 10);
    }
    format!("{bytes} bytes")
}

/// Largest guest memory a run may touch on this machine: the arena is reserved
/// lazily, but every page a scenario touches is real memory.
pub const MAX_GUEST_BYTES: u64 = 64 << 30;
/// Largest guest memory a sparse run (`--stride`, `--touch`) may have: only
/// address space is reserved for it, plus 8 bytes of host page table per
/// 4 KiB of it (committed where touched).
pub const MAX_SPARSE_GUEST_BYTES: u64 = 1 << 40;

/// The resolved shape of a run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// vCPUs.
    pub vcpus: u32,
    /// Bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// Total guest bytes.
    pub total: u64,
    /// Backing.
    pub backing: Backing,
    /// Memslots.
    pub slots: u32,
    /// Write percentage.
    pub write_percent: u32,
    /// Iterations.
    pub iterations: u32,
    /// Bytes from one touched page to the next (4 KiB: dense).
    pub touch_stride: u64,
    /// Bytes of each vCPU's chunk touched, from its start.
    pub touch_bytes: u64,
}

impl Shape {
    /// Pages each vCPU touches.
    pub fn touched_pages_per_vcpu(&self) -> u64 {
        self.touch_bytes.div_ceil(self.touch_stride)
    }
    /// Whether only part of the guest memory is touched.
    pub fn sparse(&self) -> bool {
        self.touch_stride > 4096 || self.touch_bytes < self.bytes_per_vcpu
    }
    /// Host memory the touches populate: one backing page per touched page
    /// when the stride spans backing pages, else the whole touched window.
    pub fn host_bytes(&self) -> u64 {
        let align = self.backing.alignment();
        let per_vcpu = if self.touch_stride >= align {
            self.touched_pages_per_vcpu() * align
        } else {
            self.touch_bytes.div_ceil(align) * align
        };
        per_vcpu * self.vcpus as u64
    }
}

impl Common {
    /// Resolve flags against the scenario's defaults and check they fit.
    pub fn shape(
        &self,
        vcpus: u32,
        bytes: u64,
        iterations: u32,
        backing: Backing,
    ) -> Result<Shape, BadInput> {
        let vcpus = self.vcpus.unwrap_or(vcpus);
        let bytes_per_vcpu = self.bytes.unwrap_or(bytes);
        let backing = self.backing.unwrap_or(backing);
        let iterations = self.iterations.unwrap_or(iterations);
        let slots = self.slots.unwrap_or(1);
        let write_percent = self.write_percent.unwrap_or(100);
        if vcpus == 0 || vcpus > 64 {
            return Err(BadInput(format!("-v {vcpus}: vCPUs must be 1..=64")));
        }
        if self.dirty_tracking == vmmu::DirtyTracking::Pml && self.no_ad {
            return Err(BadInput(
                "--tracking pml with --no-ad: PML logs the writes that set EPT Dirty bits, so it needs A/D bits (drop one of the two)".into(),
            ));
        }
        if self.mmu == vmmu::MmuKind::Shadow && self.dirty_tracking == vmmu::DirtyTracking::Pml {
            return Err(BadInput(
                "--mmu shadow with --tracking pml: PML logs second-stage writes and shadow paging has no second stage (use --tracking write-protect)".into(),
            ));
        }
        if self.mmu != vmmu::MmuKind::Shadow && (self.no_unsync || self.nr_mmu_pages.is_some()) {
            let flag = if self.no_unsync {
                "--no-unsync"
            } else {
                "--nr-mmu-pages"
            };
            return Err(BadInput(format!(
                "{flag} without --mmu shadow: unsync pages and the page limit are the shadow MMU's (add --mmu shadow)"
            )));
        }
        if self.mmu != vmmu::MmuKind::Shadow && self.guest_paging {
            return Err(BadInput(
                "--guest-paging without --mmu shadow: under the TDP MMU the guests' physical accesses take the second stage only, so guest paging changes nothing there (add --mmu shadow)".into(),
            ));
        }
        if let Some(n) = self
            .nr_mmu_pages
            .filter(|n| *n < vmmu::SHADOW_MIN_ALLOC_PAGES)
        {
            return Err(BadInput(format!(
                "--nr-mmu-pages {n}: the shadow page limit is at least {} (KVM_MIN_ALLOC_MMU_PAGES)",
                vmmu::SHADOW_MIN_ALLOC_PAGES
            )));
        }
        if self.mmu == vmmu::MmuKind::Shadow && self.conversions {
            return Err(BadInput(
                "--mmu shadow with --conversions: private memory needs the TDP MMU (drop one of the two)".into(),
            ));
        }
        if iterations == 0 {
            return Err(BadInput("-i 0: at least one iteration is needed".into()));
        }
        if write_percent > 100 {
            return Err(BadInput(format!(
                "-w {write_percent}: a percentage must be 0..=100"
            )));
        }
        let align = backing.alignment();
        if !bytes_per_vcpu.is_multiple_of(align) {
            return Err(BadInput(format!(
                "-b {}: must be a multiple of the {} page size of -s {}",
                human(bytes_per_vcpu),
                human(align),
                backing.name()
            )));
        }
        let touch_stride = self.touch_stride.unwrap_or(4096);
        let touch_bytes = self.touch_bytes.unwrap_or(bytes_per_vcpu);
        if touch_stride == 0 || !touch_stride.is_multiple_of(4096) || touch_stride > bytes_per_vcpu
        {
            return Err(BadInput(format!(
                "--stride {}: the distance between touched pages must be a multiple of 4 KiB, at most -b ({})",
                human(touch_stride),
                human(bytes_per_vcpu)
            )));
        }
        if touch_bytes == 0 || !touch_bytes.is_multiple_of(4096) || touch_bytes > bytes_per_vcpu {
            return Err(BadInput(format!(
                "--touch {}: the touched part of each vCPU's memory must be a multiple of 4 KiB, at most -b ({})",
                human(touch_bytes),
                human(bytes_per_vcpu)
            )));
        }
        let total = (vcpus as u64).saturating_mul(bytes_per_vcpu);
        let shape = Shape {
            vcpus,
            bytes_per_vcpu,
            total,
            backing,
            slots,
            write_percent,
            iterations,
            touch_stride,
            touch_bytes,
        };
        if shape.sparse() && self.overlap {
            return Err(BadInput(
                "--stride/--touch with -o: a sparse guest gives each vCPU its own chunk (drop one of the two)".into(),
            ));
        }
        let touched = shape.host_bytes();
        let avail = mem_available();
        // Touched memory, the tables over it, and the host page table of
        // the whole guest (8 bytes per 4 KiB page, committed where touched).
        let need = touched
            .saturating_add(touched / 128)
            .saturating_add(total / 512)
            .saturating_add(256 << 20);
        let limit = if shape.sparse() {
            MAX_SPARSE_GUEST_BYTES
        } else {
            MAX_GUEST_BYTES
        };
        if total > limit || touched > MAX_GUEST_BYTES || need > avail {
            return Err(BadInput(format!(
                "-v {vcpus} -b {}: {} of guest memory, {} of it touched, does not fit this machine ({} available; limits {} touched, {} in all with --stride/--touch)",
                human(bytes_per_vcpu),
                human(total),
                human(touched),
                human(avail),
                human(MAX_GUEST_BYTES),
                human(MAX_SPARSE_GUEST_BYTES)
            )));
        }
        let pages = total / 4096;
        if slots == 0 {
            return Err(BadInput("-x 0: at least one memslot is needed".into()));
        }
        if !pages.is_multiple_of(slots as u64) || !(total / slots as u64).is_multiple_of(align) {
            return Err(BadInput(format!(
                "-x {slots}: the {pages} pages must split evenly into {slots} memslots"
            )));
        }
        if slots > vmmu::memslot::USER_MEM_SLOTS - 8 {
            return Err(BadInput(format!(
                "-x {slots}: at most {} memslots",
                vmmu::memslot::USER_MEM_SLOTS - 8
            )));
        }
        Ok(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_suffixes_and_errors() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn test_human_sizes_are_exact() {
        assert_eq!(human(1000), "1000 bytes");
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(3 << 20), "3 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human((1 << 30) + 4096), "1048580 KiB");
    }

    #[test]
    fn test_backing_accepts_selftest_names() {
        for name in [
            "anonymous_hugetlb",
            "anonymous_hugetlb_2mb",
            "shared_hugetlb",
        ] {
            assert_eq!(parse_backing(name).unwrap(), Backing::Hugetlb2M, "{name}");
        }
        assert_eq!(
            parse_backing("anonymous_hugetlb_1gb").unwrap(),
            Backing::Hugetlb1G
        );
        let e = parse_backing("hugepages").unwrap_err();
        assert!(
            e.contains("anonymous_hugetlb_2mb") && e.contains("shmem"),
            "{e}"
        );
    }
}
