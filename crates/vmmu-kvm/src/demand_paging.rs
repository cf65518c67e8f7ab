//! The demand-paging workload on real KVM, its phases and its report.
//!
//! The phases mirror what vmmu's own demand-paging run measures, so the CLI can print
//! both side by side:
//!
//! 1. **First pass over untouched host memory**: a fresh VM over fresh anonymous host
//!    memory. Each first guest write costs a KVM page fault *and* a host page
//!    allocation (and, on a nested host, an outer fault too).
//! 2. **First pass with host memory already touched**: a second fresh VM whose backing
//!    memory the host wrote before creating the memslot, so only KVM's own fault path is
//!    measured (with 4 KiB host pages KVM's shadow MMU prefetches neighbours, so expect
//!    about one fault per 8 pages).
//! 3. **Warm pass**: the loop again on the VM of phase 2, everything mapped: the cost of
//!    the guest's writes alone, and the floor under the other two.
//! 4. **Delete the populated slot**: the time of the `KVM_SET_USER_MEMORY_REGION` that
//!    removes the measured slot, which zaps every mapping of it.
//!
//! Counters are the deltas of KVM's binary statistics over each phase, summed over the
//! VM and all vCPUs. The figures are only meaningful if the guest ran natively, so the
//! report carries `emulated_guest`, computed from the `insn_emulation` statistic.

use std::collections::BTreeMap;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};

use crate::error::{KvmError, Result};
use crate::guest::{self, MAX_MEASURED_BYTES, MEASURED_GPA};
use crate::host_mem::{self, HostMemory, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::stats::{self, Snapshot};
use crate::vm::GuestVm;
use crate::{kvm_info, open_kvm, KvmInfo};

/// Most vCPUs one run starts (each is a host thread on a 2-core machine, after all).
pub const MAX_VCPUS: usize = 64;
/// Most guest memory one run maps (and, for the baseline, most host memory it touches).
pub const MAX_TOTAL_BYTES: u64 = 64 << 30;
/// Host memory left free on top of the workload, for KVM's page tables and the rest of
/// the system.
pub const MEMORY_HEADROOM: u64 = 512 << 20;
/// Emulated instructions tolerated per phase regardless of size (the guest's first
/// instructions, stray host events).
const EMULATION_SLACK: u64 = 32;
/// Emulated instructions tolerated per 64 pages; a fully emulated guest shows about 4
/// per page, a native one about none.
const EMULATION_PER_64_PAGES: u64 = 1;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandPagingConfig {
    /// vCPUs, each in its own thread, each owning a disjoint chunk of the measured slot.
    pub vcpus: usize,
    /// Bytes of guest memory per vCPU; a positive multiple of 2 MiB because the guest
    /// maps it with 2 MiB pages.
    pub bytes_per_vcpu: u64,
    /// Back guest memory with transparent huge pages (`MADV_HUGEPAGE`) instead of
    /// 4 KiB pages (`MADV_NOHUGEPAGE`). With THP, KVM maps 2 MiB entries and populating
    /// gets about 10x cheaper; compare like with like.
    pub host_thp: bool,
}

impl DemandPagingConfig {
    /// Checks the shape of the request (not the host's free memory) and returns the
    /// total guest memory in bytes.
    pub fn validate(&self) -> Result<u64> {
        if self.vcpus == 0 {
            return Err(KvmError::NoVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(KvmError::TooManyVcpus {
                vcpus: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if self.bytes_per_vcpu == 0 || !self.bytes_per_vcpu.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(KvmError::BadChunkSize {
                bytes: self.bytes_per_vcpu,
                granule: HUGE_PAGE_SIZE,
            });
        }
        let limit = MAX_TOTAL_BYTES.min(MAX_MEASURED_BYTES);
        let total =
            (self.vcpus as u64)
                .checked_mul(self.bytes_per_vcpu)
                .ok_or(KvmError::TooLarge {
                    total: u64::MAX,
                    limit,
                })?;
        if total > limit {
            return Err(KvmError::TooLarge { total, limit });
        }
        Ok(total)
    }
}

/// Fails unless `bytes` plus [`MEMORY_HEADROOM`] fit in `available`.
pub(crate) fn check_fits(bytes: u64, available: u64) -> Result<()> {
    let needed = bytes.saturating_add(MEMORY_HEADROOM);
    if needed > available {
        return Err(KvmError::InsufficientMemory { needed, available });
    }
    Ok(())
}

/// KVM statistics deltas over one phase, summed over the VM and all its vCPUs.
///
/// Gauges (`pages_4k`, `pages_2m`) are reported as their growth over the phase
/// (saturating at 0), i.e. the mappings the phase created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Page faults KVM fixed by installing a mapping.
    pub pf_fixed: u64,
    /// Page faults KVM took (all kinds).
    pub pf_taken: u64,
    /// Page faults fixed on the lockless fast path.
    pub pf_fast: u64,
    /// Faults that found the mapping already present.
    pub pf_spurious: u64,
    /// Faults that needed instruction emulation.
    pub pf_emulate: u64,
    /// Faults reflected into the guest (should stay 0: the guest never faults).
    pub pf_guest: u64,
    /// VM exits of every kind.
    pub exits: u64,
    /// Port I/O exits (one per vCPU per pass: the completion signal).
    pub io_exits: u64,
    /// Exits caused by pending host signals.
    pub signal_exits: u64,
    /// Instructions KVM emulated; near 0 when the guest runs natively.
    pub insn_emulation: u64,
    /// Instructions KVM failed to emulate.
    pub insn_emulation_fail: u64,
    /// Guest TLB flushes KVM performed for vCPUs.
    pub tlb_flush: u64,
    /// 4 KiB (shadow) mappings created.
    pub pages_4k: u64,
    /// 2 MiB mappings created.
    pub pages_2m: u64,
    /// Remote TLB flushes issued.
    pub remote_tlb_flush: u64,
    /// Remote TLB flushes requested.
    pub remote_tlb_flush_requests: u64,
    /// Shadow pages zapped.
    pub mmu_shadow_zapped: u64,
    /// Shadow-page cache misses (new shadow pages allocated).
    pub mmu_cache_miss: u64,
    /// Every non-zero delta by KVM's own name, including those above.
    pub all: BTreeMap<String, u64>,
}

impl Counters {
    fn from_delta(d: &Snapshot) -> Self {
        let g = |k: &str| d.get(k).copied().unwrap_or(0);
        Self {
            pf_fixed: g("pf_fixed"),
            pf_taken: g("pf_taken"),
            pf_fast: g("pf_fast"),
            pf_spurious: g("pf_spurious"),
            pf_emulate: g("pf_emulate"),
            pf_guest: g("pf_guest"),
            exits: g("exits"),
            io_exits: g("io_exits"),
            signal_exits: g("signal_exits"),
            insn_emulation: g("insn_emulation"),
            insn_emulation_fail: g("insn_emulation_fail"),
            tlb_flush: g("tlb_flush"),
            pages_4k: g("pages_4k"),
            pages_2m: g("pages_2m"),
            remote_tlb_flush: g("remote_tlb_flush"),
            remote_tlb_flush_requests: g("remote_tlb_flush_requests"),
            mmu_shadow_zapped: g("mmu_shadow_zapped"),
            mmu_cache_miss: g("mmu_cache_miss"),
            all: d
                .iter()
                .filter(|(_, &v)| v != 0)
                .map(|(k, &v)| (k.clone(), v))
                .collect(),
        }
    }
}

/// One measured phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// What was measured, in words.
    pub name: String,
    /// From releasing the vCPUs to the last one signalling completion.
    pub wall_ns: u64,
    /// 4 KiB pages written (over all vCPUs).
    pub pages: u64,
    /// KVM statistics deltas over the phase.
    pub counters: Counters,
}

impl Phase {
    /// Wall time per 4 KiB page (the figure the reference table uses).
    pub fn ns_per_page(&self) -> f64 {
        if self.pages == 0 {
            0.0
        } else {
            self.wall_ns as f64 / self.pages as f64
        }
    }

    /// Whether the phase's emulated-instruction count shows the guest was emulated.
    fn looks_emulated(&self) -> bool {
        let c = &self.counters;
        let allowed = EMULATION_SLACK + self.pages / 64 * EMULATION_PER_64_PAGES;
        c.insn_emulation + c.insn_emulation_fail > allowed
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct DemandPagingReport {
    /// The configuration that ran.
    pub config: DemandPagingConfig,
    /// Which KVM this was (on this machine: the nested shadow MMU; say so in reports).
    pub backend: KvmInfo,
    /// Phase 1: fresh VM over fresh host memory.
    pub first_touch_untouched_host: Phase,
    /// Phase 2: fresh VM over host memory the host already touched.
    pub first_touch_pretouched_host: Phase,
    /// Phase 3: the loop again, everything mapped.
    pub warm: Phase,
    /// Wall time of the host's single-threaded pre-touch before phase 2 (for context).
    pub host_pretouch_ns: u64,
    /// Time of the ioctl deleting the populated measured slot of phase 2's VM.
    pub delete_populated_slot_ns: u64,
    /// True if KVM's statistics show the guest's instructions were emulated rather than
    /// run natively: the timings then measure the emulator and must not be reported as
    /// MMU figures.
    pub emulated_guest: bool,
    /// Plausibility problems found in the counters (empty when all looked as expected).
    pub warnings: Vec<String>,
}

fn guest_maxphyaddr(cpuid: &CpuId) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| e.eax & 0xFF)
        .filter(|&bits| bits != 0)
        // KVM's default when CPUID does not say.
        .unwrap_or(36)
}

/// Runs one phase: snapshot, pass, snapshot, verify.
fn measure(vm: &mut GuestVm, name: &str, pass: u8, pages: u64) -> Result<Phase> {
    let before = vm.snapshot()?;
    let wall_ns = vm.run_pass(pass)?;
    let after = vm.snapshot()?;
    vm.verify(pass)?;
    Ok(Phase {
        name: name.to_owned(),
        wall_ns,
        pages,
        counters: Counters::from_delta(&stats::delta(&before, &after)),
    })
}

fn plausibility_warnings(report: &DemandPagingReport, have_emulation_stat: bool) -> Vec<String> {
    let mut w = Vec::new();
    if !have_emulation_stat {
        w.push("KVM exposes no insn_emulation statistic: native execution not verified".into());
    }
    for p in [
        &report.first_touch_untouched_host,
        &report.first_touch_pretouched_host,
    ] {
        let c = &p.counters;
        if c.pf_fixed == 0 {
            w.push(format!("{}: KVM counted no fixed faults", p.name));
        }
        if c.pf_fixed > 2 * p.pages + 64 {
            w.push(format!(
                "{}: {} fixed faults for {} pages",
                p.name, c.pf_fixed, p.pages
            ));
        }
    }
    let warm = &report.warm;
    if warm.counters.pf_fixed > 64 + warm.pages / 512 {
        w.push(format!(
            "{}: still {} fixed faults",
            warm.name, warm.counters.pf_fixed
        ));
    }
    for p in [
        &report.first_touch_untouched_host,
        &report.first_touch_pretouched_host,
        warm,
    ] {
        if p.looks_emulated() {
            w.push(format!(
                "{}: {} instructions emulated for {} pages: guest not running natively",
                p.name, p.counters.insn_emulation, p.pages
            ));
        }
    }
    w
}

/// Runs the demand-paging workload on the real `/dev/kvm` and measures its phases.
///
/// Each vCPU runs in its own thread; all are released together by a barrier. The guest
/// is 64-bit CPL3 code (see [`crate::guest`] for why and how), writes 8 bytes to every
/// 4 KiB page of its chunk in order, and signals completion with an `out` to a port
/// (`KVM_EXIT_IO`). After every pass the host checks that every page holds the marker
/// the guest wrote, so a pass that skipped pages fails with
/// [`KvmError::MarkerMismatch`] rather than reporting a fast time.
///
/// # Errors
///
/// [`KvmError::Unavailable`] if `/dev/kvm` cannot be opened; a validation error for a
/// bad configuration or too little host memory; otherwise the failing ioctl, exit or
/// check.
pub fn run_demand_paging(cfg: &DemandPagingConfig) -> Result<DemandPagingReport> {
    let total = cfg.validate()?;
    check_fits(total, host_mem::mem_available()?)?;
    let kvm = open_kvm()?;
    let max_vcpus = kvm.get_max_vcpus();
    if cfg.vcpus > max_vcpus {
        return Err(KvmError::TooManyVcpus {
            vcpus: cfg.vcpus,
            max: max_vcpus,
        });
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| KvmError::Ioctl {
            op: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    let maxphyaddr = guest_maxphyaddr(&cpuid);
    let top = MEASURED_GPA + total;
    if maxphyaddr < 64 && top > 1u64 << maxphyaddr {
        return Err(KvmError::BeyondMaxPhyAddr { top, maxphyaddr });
    }
    let code = guest::assemble_loop()?;
    let pages = total / PAGE_SIZE;
    let new_vm = |mem| GuestVm::new(&kvm, &cpuid, &code, cfg.vcpus, cfg.bytes_per_vcpu, mem);

    // Phase 1. The VM is dropped (and its memory unmapped) before phase 2 allocates.
    let untouched = {
        let mut vm = new_vm(HostMemory::new(total, cfg.host_thp)?)?;
        measure(&mut vm, "first pass over untouched host memory", 1, pages)?
    };

    // Phases 2-4 on one VM.
    let mem = HostMemory::new(total, cfg.host_thp)?;
    let t = std::time::Instant::now();
    mem.touch(0, total);
    let host_pretouch_ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut vm = new_vm(mem)?;
    let pretouched = measure(
        &mut vm,
        "first pass with host memory already touched",
        1,
        pages,
    )?;
    let warm = measure(&mut vm, "warm pass", 2, pages)?;
    let delete = vm.delete_measured_slot()?;
    let have_emulation_stat = vm.snapshot()?.contains_key("insn_emulation");
    drop(vm);

    let mut report = DemandPagingReport {
        config: *cfg,
        backend: kvm_info(&kvm),
        first_touch_untouched_host: untouched,
        first_touch_pretouched_host: pretouched,
        warm,
        host_pretouch_ns,
        delete_populated_slot_ns: u64::try_from(delete.as_nanos()).unwrap_or(u64::MAX),
        emulated_guest: false,
        warnings: Vec::new(),
    };
    report.emulated_guest = [
        &report.first_touch_untouched_host,
        &report.first_touch_pretouched_host,
        &report.warm,
    ]
    .iter()
    .any(|p| p.looks_emulated());
    report.warnings = plausibility_warnings(&report, have_emulation_stat);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vcpus: usize, bytes_per_vcpu: u64) -> DemandPagingConfig {
        DemandPagingConfig {
            vcpus,
            bytes_per_vcpu,
            host_thp: false,
        }
    }

    #[test]
    fn test_validate_zero_vcpus_is_no_vcpus() {
        assert!(matches!(
            cfg(0, HUGE_PAGE_SIZE).validate(),
            Err(KvmError::NoVcpus)
        ));
    }

    #[test]
    fn test_validate_too_many_vcpus_is_rejected() {
        let err = cfg(MAX_VCPUS + 1, HUGE_PAGE_SIZE).validate().unwrap_err();
        assert!(matches!(err, KvmError::TooManyVcpus { vcpus, .. } if vcpus == MAX_VCPUS + 1));
    }

    #[test]
    fn test_validate_zero_bytes_is_bad_chunk() {
        assert!(matches!(
            cfg(1, 0).validate(),
            Err(KvmError::BadChunkSize { bytes: 0, .. })
        ));
    }

    #[test]
    fn test_validate_unaligned_bytes_is_bad_chunk() {
        let err = cfg(1, HUGE_PAGE_SIZE + PAGE_SIZE).validate().unwrap_err();
        assert!(matches!(
            err,
            KvmError::BadChunkSize {
                granule: HUGE_PAGE_SIZE,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_total_over_limit_is_too_large() {
        let err = cfg(2, 32 << 30 | HUGE_PAGE_SIZE).validate().unwrap_err();
        assert!(matches!(
            err,
            KvmError::TooLarge {
                limit: MAX_TOTAL_BYTES,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_overflowing_total_is_too_large() {
        let huge = u64::MAX - (HUGE_PAGE_SIZE - 1);
        let err = cfg(4, huge).validate().unwrap_err();
        assert!(matches!(
            err,
            KvmError::TooLarge {
                total: u64::MAX,
                ..
            }
        ));
    }

    #[test]
    fn test_validate_good_config_returns_total() {
        assert_eq!(cfg(2, 512 << 20).validate().unwrap(), 1 << 30);
        assert_eq!(cfg(1, MAX_TOTAL_BYTES).validate().unwrap(), MAX_TOTAL_BYTES);
    }

    #[test]
    fn test_check_fits_short_memory_is_insufficient() {
        let err = check_fits(1 << 30, 1 << 30).unwrap_err();
        assert!(
            matches!(err, KvmError::InsufficientMemory { needed, .. } if needed == (1 << 30) + MEMORY_HEADROOM)
        );
        assert!(check_fits(1 << 30, 2 << 30).is_ok());
    }

    #[test]
    fn test_phase_many_emulations_looks_emulated() {
        let mut p = Phase {
            name: "p".into(),
            wall_ns: 10,
            pages: 16384,
            counters: Counters::default(),
        };
        p.counters.insn_emulation = 4 * 16384;
        assert!(p.looks_emulated());
        p.counters.insn_emulation = 3;
        assert!(!p.looks_emulated());
        assert!((p.ns_per_page() - 10.0 / 16384.0).abs() < 1e-12);
    }

    #[test]
    fn test_counters_from_delta_maps_names_and_keeps_nonzero() {
        let d = Snapshot::from([
            ("pf_fixed".into(), 5),
            ("exits".into(), 9),
            ("halt_exits".into(), 0),
        ]);
        let c = Counters::from_delta(&d);
        assert_eq!((c.pf_fixed, c.exits, c.pages_2m), (5, 9, 0));
        assert_eq!(c.all.len(), 2);
    }
}
