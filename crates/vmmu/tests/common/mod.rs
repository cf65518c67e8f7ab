//! Helpers shared by the core's integration tests: one VM over the tracking
//! test host with an 8 MiB slot at 1 GiB, and the checks every test ends with.
// Each test file uses its own subset of the helpers.
#![allow(dead_code)]

use std::sync::Arc;

use vmmu::testing::TestHost;
use vmmu::{Gpa, Hva, Level, UserMemoryRegion, VcpuMmu, Vm, VmConfig};

pub const GPA: u64 = 1 << 30;
pub const HVA: u64 = 64 << 30;
pub const SIZE: u64 = 8 << 20;

pub fn setup(config: VmConfig) -> (Arc<TestHost>, Vm, VcpuMmu) {
    let host = TestHost::new();
    let vm = Vm::new(config, host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}

pub fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: u32) -> UserMemoryRegion {
    UserMemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    }
}

pub fn gpa(page: u64) -> Gpa {
    Gpa(GPA + page * 4096)
}

pub fn hva(page: u64) -> Hva {
    Hva(HVA + page * 4096)
}

pub fn leaf(vm: &Vm, page: u64) -> Option<(Level, vmmu::Spte)> {
    let gfn = gpa(page).gfn();
    vm.mappings(0)
        .into_iter()
        .find(|(g, l, s)| s.is_shadow_present() && gfn.0 >= g.0 && gfn.0 < g.0 + l.pages())
        .map(|(_, l, s)| (l, s))
}

pub fn teardown(host: Arc<TestHost>, vm: Vm, vcpus: Vec<VcpuMmu>) {
    drop(vcpus);
    drop(vm);
    assert_eq!(host.memory.allocated(), 0, "table pages leaked");
    assert_eq!(host.memory.double_frees(), 0);
    assert_eq!(host.outstanding_refs(), 0, "frame references leaked");
}

pub fn huge_host_vm(config: VmConfig) -> (Arc<TestHost>, Vm, VcpuMmu) {
    let host = TestHost::new();
    host.set_host_level(Level::M2);
    let vm = Vm::new(config, host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}

pub fn vm_of(vm_type: vmmu::VmType, host_level: Level) -> (Arc<TestHost>, Vm, VcpuMmu) {
    let host = TestHost::new();
    host.set_host_level(host_level);
    let vm = Vm::new(
        VmConfig {
            vm_type,
            ..VmConfig::default()
        },
        host.ops(),
    )
    .unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}

pub const PRIVATE: u64 = vmmu::MEMORY_ATTRIBUTE_PRIVATE;
