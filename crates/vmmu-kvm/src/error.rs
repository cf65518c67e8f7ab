//! The crate's error type.
//!
//! One enum covers the crate's public entry points because every failure ends in the
//! same place (a CLI line next to vmmu's own figures). The stats-fd parser keeps its own
//! [`StatsError`](crate::stats::StatsError) because it is tested on synthetic buffers
//! apart from any VM; it is wrapped here with the name of the fd it came from.

use std::io;

use crate::stats::StatsError;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, KvmError>;

/// Why a measurement on real KVM could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened: no KVM on this host, or no permission.
    #[error("KVM is unavailable: cannot open {path}")]
    Unavailable {
        /// The device path that was tried.
        path: &'static str,
        /// Why the open failed.
        #[source]
        source: io::Error,
    },

    /// This KVM does not offer a capability the call needs (it reports 0).
    #[error("This KVM has no {what} ({cap} is 0)")]
    Unsupported {
        /// What the capability gives, in words.
        what: &'static str,
        /// The capability's name.
        cap: &'static str,
    },

    /// The configuration asked for no vCPUs (or no host threads).
    #[error("At least one vCPU is needed, got 0")]
    NoVcpus,

    /// A workload parameter outside what it accepts (the message names both).
    #[error("{0}")]
    BadConfig(String),

    /// More vCPUs than this crate is willing to start.
    #[error("Too many vCPUs: {vcpus} (at most {max})")]
    TooManyVcpus {
        /// Requested vCPU count.
        vcpus: usize,
        /// This crate's limit.
        max: usize,
    },

    /// The per-vCPU size is zero or not a multiple of the required granule.
    #[error("Bytes per vCPU must be a positive multiple of {granule:#x}, got {bytes:#x}")]
    BadChunkSize {
        /// Requested bytes per vCPU (or per thread).
        bytes: u64,
        /// The granule it must be a multiple of (2 MiB for guests, 4 KiB for plain threads).
        granule: u64,
    },

    /// The total size overflows or exceeds the crate's sanity limit.
    #[error("Total size {total:#x} exceeds the limit of {limit:#x} bytes")]
    TooLarge {
        /// Requested total (saturated at `u64::MAX` on overflow).
        total: u64,
        /// The limit.
        limit: u64,
    },

    /// The host does not have enough available memory for the requested size.
    #[error("Not enough host memory: need {needed} bytes, {available} available")]
    InsufficientMemory {
        /// Bytes needed (workload plus headroom).
        needed: u64,
        /// `MemAvailable` from `/proc/meminfo`.
        available: u64,
    },

    /// The guest's top physical address does not fit the vCPU's MAXPHYADDR.
    #[error(
        "Guest physical address {top:#x} needs more than the vCPU's {maxphyaddr} address bits"
    )]
    BeyondMaxPhyAddr {
        /// One past the last measured GPA.
        top: u64,
        /// The vCPU's physical address width from CPUID 0x8000_0008.
        maxphyaddr: u32,
    },

    /// `/proc/meminfo` could not be read or parsed.
    #[error("Cannot read MemAvailable from /proc/meminfo")]
    MemInfo(#[source] io::Error),

    /// A KVM ioctl failed.
    #[error("KVM ioctl {op} failed")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },

    /// `mmap` or `madvise` of host memory failed.
    #[error("Host memory {op} of {len:#x} bytes failed")]
    HostMemory {
        /// `mmap` or `madvise`.
        op: &'static str,
        /// Length of the mapping.
        len: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// A binary statistics fd could not be opened or parsed.
    #[error("KVM statistics of {what} unusable")]
    Stats {
        /// "VM" or "vCPU n".
        what: String,
        /// The cause.
        #[source]
        source: StatsError,
    },

    /// The run-time assembler rejected the guest program.
    #[error("Cannot assemble the guest program")]
    Assemble(#[source] iced_x86::IcedError),

    /// A vCPU exited for a reason the workload never causes.
    #[error("vCPU {vcpu} exited unexpectedly at rip {rip:#x}: {exit}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: usize,
        /// The exit, as text.
        exit: String,
        /// Guest RIP after the exit (0 if it could not be read).
        rip: u64,
    },

    /// The guest's completion port write carried the wrong pass number.
    #[error("vCPU {vcpu} reported pass {found}, expected pass {expected}")]
    WrongPass {
        /// vCPU index.
        vcpu: usize,
        /// Pass number the host expected.
        expected: u8,
        /// Pass number the guest sent.
        found: u8,
    },

    /// A page of guest memory does not hold the marker the guest should have written.
    #[error("Page at GPA {gpa:#x} holds {found:#x}, expected marker {expected:#x}")]
    MarkerMismatch {
        /// Guest physical address of the page.
        gpa: u64,
        /// Marker expected (GPA plus pass number).
        expected: u64,
        /// Value found.
        found: u64,
    },

    /// A worker thread panicked.
    #[error("Worker thread {index} panicked")]
    ThreadPanicked {
        /// vCPU or thread index.
        index: usize,
    },
}
