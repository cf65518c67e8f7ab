//! Runs vmmu's demand-paging workload on this host's real `/dev/kvm` and measures it,
//! so the CLI can print vmmu's figures next to real KVM's.
//!
//! # What this measures here
//!
//! On the project's machines `/dev/kvm` is the nested `kvm_pvm` backend, which runs
//! guests on KVM's **shadow** MMU (`/sys/module/kvm/parameters/tdp_mmu` is `N`). A
//! side-by-side is therefore vmmu against KVM's shadow MMU under nesting, not against
//! the TDP MMU on bare metal; [`KvmInfo::description`] says which it was and reports
//! must repeat it.
//!
//! That backend runs only 64-bit CPL3 guest code natively (everything else goes through
//! KVM's instruction emulator), so the guest here starts directly in long mode at CPL3;
//! see [`guest`] for the setup. Each report says whether the guest was emulated
//! ([`DemandPagingReport::emulated_guest`]): if it was, the figures are not MMU figures.
//!
//! # Example
//!
//! ```no_run
//! use vmmu_kvm::{run_demand_paging, DemandPagingConfig};
//!
//! let cfg = DemandPagingConfig { vcpus: 2, bytes_per_vcpu: 512 << 20, host_thp: false };
//! match run_demand_paging(&cfg) {
//!     Ok(r) => println!("warm pass: {:.1} ns/page", r.warm.ns_per_page()),
//!     Err(e) => eprintln!("{e}"),
//! }
//! ```

use std::io;

use kvm_ioctls::Kvm;

mod baseline;
mod demand_paging;
pub mod dirty_log;
mod error;
pub mod gmem;
pub mod guest;
mod host_mem;
pub mod memslot_api;
pub mod memslot_perf;
pub mod process_churn;
mod stats;
mod vm;

pub use baseline::plain_first_touch;
pub use demand_paging::{
    run_demand_paging, Counters, DemandPagingConfig, DemandPagingReport, Phase, MAX_TOTAL_BYTES,
    MAX_VCPUS, MEMORY_HEADROOM,
};
pub use error::{KvmError, Result};
pub use host_mem::{HUGE_PAGE_SIZE, PAGE_SIZE};
pub use stats::StatsError;

/// The KVM device path.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// What KVM this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmInfo {
    /// `KVM_GET_API_VERSION` (12 on every kernel since 2.6.22).
    pub api_version: i32,
    /// `/sys/module/kvm/parameters/tdp_mmu`, if readable. `false` with the `kvm_pvm`
    /// backend (shadow paging); `true` does not by itself prove TDP is in use, since
    /// `ept`/`npt` may be off.
    pub tdp_mmu: Option<bool>,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)`: a bitmask of the VM types this
    /// KVM creates (bit 0 the default type), `None` when the capability is absent.
    pub vm_types: Option<u32>,
    /// The CPU vendor (`vendor_id` in /proc/cpuinfo).
    pub cpu_vendor: String,
    /// One line naming the backend and the MMU it uses, for report headers.
    pub description: String,
}

/// `KVM_CAP_VM_TYPES` (Linux 6.8).
const KVM_CAP_VM_TYPES: libc::c_ulong = 235;

/// The names of the x86 VM types in a `KVM_CAP_VM_TYPES` mask.
pub fn vm_type_names(mask: u32) -> Vec<&'static str> {
    const NAMES: [&str; 5] = ["default", "sw_protected", "sev", "sev_es", "snp"];
    (0..32)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| NAMES.get(b as usize).copied().unwrap_or("unknown"))
        .collect()
}

fn cpu_vendor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("vendor_id"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Opens `/dev/kvm`, mapping failure to [`KvmError::Unavailable`].
/// `/dev/kvm` and the CPUID it supports (what every guest here is given).
pub(crate) fn open_kvm_with_cpuid() -> Result<(Kvm, kvm_bindings::CpuId)> {
    let kvm = open_kvm()?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| KvmError::Ioctl {
            op: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    Ok((kvm, cpuid))
}

pub(crate) fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| KvmError::Unavailable {
        path: KVM_DEVICE,
        source: io::Error::from_raw_os_error(e.errno()),
    })
}

fn read_param(module: &str, param: &str) -> Option<String> {
    let path = format!("/sys/module/{module}/parameters/{param}");
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn parse_bool_param(s: &str) -> Option<bool> {
    match s {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// Names the backend module and whether it uses shadow paging.
fn describe(api_version: i32, tdp_mmu: Option<bool>) -> String {
    let loaded = |m: &str| std::path::Path::new(&format!("/sys/module/{m}")).exists();
    let param_on = |m: &str, p: &str| read_param(m, p).and_then(|s| parse_bool_param(&s));
    let (backend, mmu) = if loaded("kvm_pvm") {
        ("kvm_pvm (nested)", "shadow MMU")
    } else if loaded("kvm_intel") {
        let tdp = param_on("kvm_intel", "ept").unwrap_or(true);
        (
            "kvm_intel",
            if !tdp {
                "shadow MMU"
            } else {
                tdp_name(tdp_mmu)
            },
        )
    } else if loaded("kvm_amd") {
        let tdp = param_on("kvm_amd", "npt").unwrap_or(true);
        (
            "kvm_amd",
            if !tdp {
                "shadow MMU"
            } else {
                tdp_name(tdp_mmu)
            },
        )
    } else {
        ("unknown backend", "unknown MMU")
    };
    let param = match tdp_mmu {
        Some(true) => "Y",
        Some(false) => "N",
        None => "?",
    };
    format!("KVM API {api_version}, {backend}, {mmu} (tdp_mmu={param})")
}

fn tdp_name(tdp_mmu: Option<bool>) -> &'static str {
    match tdp_mmu {
        Some(false) => "legacy TDP MMU",
        _ => "TDP MMU",
    }
}

pub(crate) fn kvm_info(kvm: &Kvm) -> KvmInfo {
    let api_version = kvm.get_api_version();
    let tdp_mmu = read_param("kvm", "tdp_mmu").and_then(|s| parse_bool_param(&s));
    let raw = kvm.check_extension_raw(KVM_CAP_VM_TYPES);
    let vm_types = (raw > 0).then_some(raw as u32);
    let cpu_vendor = cpu_vendor();
    let types = vm_types.map_or("VM types not reported".to_string(), |m| {
        format!("VM types {}", vm_type_names(m).join("+"))
    });
    KvmInfo {
        api_version,
        tdp_mmu,
        vm_types,
        description: format!("{}, {types}, {cpu_vendor}", describe(api_version, tdp_mmu)),
        cpu_vendor,
    }
}

/// Opens `/dev/kvm` and says what KVM this host has.
///
/// # Errors
///
/// [`KvmError::Unavailable`] if the device cannot be opened (absent, or no permission).
pub fn kvm_available() -> Result<KvmInfo> {
    let kvm = open_kvm()?;
    Ok(kvm_info(&kvm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_bool_param_values() {
        assert_eq!(parse_bool_param("Y"), Some(true));
        assert_eq!(parse_bool_param("N"), Some(false));
        assert_eq!(parse_bool_param("maybe"), None);
    }

    #[test]
    fn test_vm_type_names_follow_the_uapi_numbers() {
        assert_eq!(vm_type_names(1), vec!["default"]);
        assert_eq!(vm_type_names(0b11), vec!["default", "sw_protected"]);
        assert_eq!(vm_type_names(1 << 4), vec!["snp"]);
    }

    #[test]
    fn test_unavailable_error_is_one_line() {
        let e = KvmError::Unavailable {
            path: KVM_DEVICE,
            source: io::Error::from_raw_os_error(2),
        };
        let msg = e.to_string();
        assert_eq!(msg, "KVM is unavailable: cannot open /dev/kvm");
        assert!(!msg.contains('\n'));
    }
}
