//! What a VM reports it supports (`KVM_CHECK_EXTENSION` on the VM fd).

use crate::vm::{Vm, MAX_VCPU_IDS};
use crate::{memslot, MEMORY_ATTRIBUTE_PRIVATE};

/// Capabilities a VM reports (`KVM_CHECK_EXTENSION` on the VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cap {
    /// `KVM_CAP_NR_MEMSLOTS`: memslots per address space.
    NrMemslots,
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`: address spaces.
    MultiAddressSpace,
    /// `KVM_CAP_MAX_VCPU_ID`: one past the largest vCPU id.
    MaxVcpuId,
    /// `KVM_CAP_USER_MEMORY2`: `set_user_memory_region2`.
    UserMemory2,
    /// `KVM_CAP_MEMORY_FAULT_INFO`: memory-fault exits carry gpa, size, flags.
    MemoryFaultInfo,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`: the attributes `set_memory_attributes` takes.
    MemoryAttributes,
    /// `KVM_CAP_GUEST_MEMFD`: `create_guest_memfd`.
    GuestMemfd,
    /// The guest_memfd creation flags supported (6.18).
    GuestMemfdFlags,
    /// `KVM_CAP_VM_TYPES`: a bitmask of the VM types (by `KVM_CREATE_VM` number).
    VmTypes,
}

impl Vm {
    /// `KVM_CHECK_EXTENSION` on this VM.
    pub fn check_extension(&self, cap: Cap) -> u64 {
        let c = &self.inner.config;
        match cap {
            Cap::NrMemslots => memslot::USER_MEM_SLOTS as u64,
            Cap::MultiAddressSpace => c.address_spaces as u64,
            Cap::MaxVcpuId => MAX_VCPU_IDS as u64,
            Cap::UserMemory2 | Cap::MemoryFaultInfo => 1,
            Cap::MemoryAttributes => {
                if c.vm_type.has_private_mem() {
                    MEMORY_ATTRIBUTE_PRIVATE
                } else {
                    0
                }
            }
            Cap::GuestMemfd => self.inner.host.private.is_some() as u64,
            Cap::GuestMemfdFlags => {
                if self.inner.host.private.is_some() {
                    self.guest_memfd_flags()
                } else {
                    0
                }
            }
            Cap::VmTypes => {
                use crate::config::VmType;
                [VmType::Default, VmType::SwProtected, VmType::Snp]
                    .iter()
                    .map(|t| 1u64 << t.kvm_type())
                    .sum()
            }
        }
    }
}
