//! # vmmu-machine: a machine for the vmmu MMU to run in
//!
//! Host physical memory ([`host_memory`]), a host MMU that maps the VMM's address
//! space and fires invalidations around every change ([`primary_mmu`]), vCPUs
//! with a software EPT walker, a TLB and atomic A/D updates ([`cpu`], [`tlb`]),
//! guest programs that read and write real bytes ([`guest`]), and an oracle that
//! checks every access and the final state ([`oracle`]). It uses only the public
//! API of `vmmu`, the same one a hypervisor would use.

pub mod access_test;
pub mod churn_schedule;
pub mod cpu;
pub mod guest;
pub mod guest_oracle;
pub mod host_memory;
pub mod machine;
pub mod nx_recovery;
pub mod oracle;
pub mod paging;
pub mod pcpu;
pub mod primary_mmu;
pub mod processes;
pub mod reclaim;
pub(crate) mod run;
mod run_shadow;
pub mod shadow_cpu;
pub mod stress;
pub(crate) mod sync;
pub mod tlb;
pub mod vmm;

pub use machine::{
    fault_outcome, histogram, BucketCounts, FaultRecord, Machine, MachineConfig, MachineError,
    MemoryFaultPolicy, PhaseCtx, RunOptions, SmmState, TeardownReport, Vcpu, VcpuReport,
    FAULT_OUTCOMES,
};
pub use primary_mmu::{Backing, HostMmu};
