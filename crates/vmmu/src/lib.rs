//! # vmmu: the x86 KVM MMU as a Rust library
//!
//! vmmu is a second-stage ("TDP", EPT-format) MMU that behaves like Linux KVM's
//! x86 TDP MMU: lockless parallel page faults under a read-held `mmu_lock` with
//! compare-and-exchange, the mmu_notifier invalidation protocol with the pre-check
//! that retries a fault before it touches the host or the lock, refcounted roots
//! kept until explicitly invalidated, memslots with lock-free readers, RCU-freed
//! tables, and KVM's lock hierarchy checked at run time in tests.
//!
//! A hypervisor embeds it through three small traits ([`TableMemory`],
//! [`PrimaryMmu`], [`Kick`]); see `vmmu-machine` for a complete machine model.
//!
//! ```
//! use vmmu::{testing::TestHost, ErrorCode, Gpa, RetPf, UserMemoryRegion, Vm, VmConfig};
//!
//! let host = TestHost::new();
//! let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
//! // 2 MiB of guest memory at gpa 1 GiB, backed by host addresses at 64 GiB.
//! vm.set_user_memory_region(UserMemoryRegion {
//!     slot: 0,
//!     flags: 0,
//!     guest_phys_addr: 1 << 30,
//!     memory_size: 2 << 20,
//!     userspace_addr: 64 << 30,
//! })
//! .unwrap();
//! let mut vcpu = vm.create_vcpu(0).unwrap();
//! let entry = vcpu.prepare_entry().unwrap(); // loads a root; entry.root is the EPT pointer
//! assert!(entry.flush_tlb);
//! // The guest's first write to gpa 1 GiB + 8 KiB exits with an EPT violation:
//! let r = vcpu.page_fault(Gpa((1 << 30) + 0x2000), ErrorCode::WRITE).unwrap();
//! assert_eq!(r, RetPf::Fixed);
//! assert_eq!(vm.mappings(0).len(), 1);
//! // An access outside every memslot is MMIO: emulate.
//! assert_eq!(vcpu.page_fault(Gpa(0x1000), ErrorCode::empty()).unwrap(), RetPf::Emulate);
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod attributes;
pub mod caps;
pub mod config;
pub mod dirty_log;
pub mod dirty_ring;
pub mod errno;
pub mod fault;
pub mod gmem;
pub mod host;
pub mod memslot;
pub mod notifier;
pub mod nx_huge_pages;
pub mod pml;
pub mod prefault;
pub mod request;
pub mod root;
pub(crate) mod shadow;
pub mod spte;
pub mod stats;
pub mod sync;
pub(crate) mod tdp;
pub mod testing;
pub mod types;
pub mod vcpu;
pub mod vm;

pub use attributes::{AttributeError, MEMORY_ATTRIBUTE_PRIVATE};
pub use caps::Cap;
pub use config::{DirtyTracking, GuardKnobs, HookPoint, MmuKind, TestHooks, VmConfig, VmType};
pub use dirty_log::DirtyLogError;
pub use fault::{ErrorCode, FaultError, RetPf};
pub use gmem::{GmemError, GuestMemfd, PrivatePage};
pub use host::{
    FaultinRequest, HostFaultError, HostOps, HostPfn, Kick, LinearTables, PrimaryMmu,
    PrivateMemory, Table, TableMemory, TableMemoryError,
};
pub use memslot::{MemFlags, Memslot, MemslotError, MemslotSet, UserMemoryRegion};
pub use notifier::Invalidation;
pub use nx_huge_pages::NxRecovery;
pub use prefault::{PreFaultError, PreFaultRange, VcpuSignal};
pub use root::{Role, RootFilter};
pub use shadow::fault::GvaFault;
pub use shadow::limit::MIN_ALLOC_PAGES as SHADOW_MIN_ALLOC_PAGES;
pub use shadow::paging::CR3_NOFLUSH;
pub use shadow::track::FLOOD_WRITES;
pub use shadow::walk::GuestPaging;
pub use shadow::ShadowInfo;
pub use spte::{Access, Spte};
pub use stats::Stats;
pub use types::{Gfn, GfnRange, Gpa, Gva, Hva, HvaRange, Level, Pfn, PAGE_SIZE};
pub use vcpu::{Entry, VcpuMmu};
pub use vm::{RootInfo, Vm, VmError};
