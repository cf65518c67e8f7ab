//! The memslot API of the real KVM, call by call, for the differential
//! runner (`vmmu diff`): a default-type VM that is never run, a host buffer
//! for `userspace_addr`, and the raw answers (0 or an errno) of
//! `KVM_SET_USER_MEMORY_REGION`, `KVM_SET_USER_MEMORY_REGION2` and
//! `KVM_CHECK_EXTENSION`.

use kvm_bindings::{kvm_userspace_memory_region, kvm_userspace_memory_region2};
use kvm_ioctls::VmFd;

use crate::error::{KvmError, Result};
use crate::host_mem::HostMemory;

/// Bytes of host memory the cases' regions point into.
pub const BUFFER_BYTES: u64 = 16 << 20;

/// One VM for memslot calls.
#[derive(Debug)]
pub struct MemslotApi {
    vm: VmFd,
    mem: HostMemory,
}

impl MemslotApi {
    /// A default-type VM and its host buffer.
    pub fn new() -> Result<MemslotApi> {
        let kvm = crate::open_kvm()?;
        let vm = kvm.create_vm().map_err(|source| KvmError::Ioctl {
            op: "KVM_CREATE_VM",
            source,
        })?;
        let mem = HostMemory::new(BUFFER_BYTES, false)?;
        Ok(MemslotApi { vm, mem })
    }

    /// Where the host buffer starts (cases give `userspace_addr` relative to it).
    pub fn buffer(&self) -> u64 {
        self.mem.host_addr()
    }

    /// `KVM_SET_USER_MEMORY_REGION` (or, with `region2`, the `2` call with no
    /// guest_memfd: fd -1), returning 0 or the errno.
    pub fn set(
        &self,
        region2: bool,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        userspace_addr: u64,
    ) -> std::result::Result<(), i32> {
        // SAFETY: the VM never runs, so no guest ever reads or writes through
        // these slots; KVM itself only checks the address (access_ok) and
        // looks at no memory behind it. The buffer outlives the VM (field
        // order: `vm` is dropped first).
        unsafe {
            if region2 {
                self.vm
                    .set_user_memory_region2(kvm_userspace_memory_region2 {
                        slot,
                        flags,
                        guest_phys_addr: gpa,
                        memory_size: size,
                        userspace_addr,
                        // No file: fd -1 (a GUEST_MEMFD flag then meets EBADF).
                        guest_memfd: u32::MAX,
                        ..Default::default()
                    })
            } else {
                self.vm.set_user_memory_region(kvm_userspace_memory_region {
                    slot,
                    flags,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr,
                })
            }
        }
        .map_err(|e| e.errno())
    }

    /// `KVM_CHECK_EXTENSION` on the VM.
    pub fn check_extension(&self, cap: u32) -> i32 {
        self.vm.check_extension_raw(cap.into())
    }
}

/// What a guest sees in memory the memslots no longer (or only read-only)
/// back, on the real KVM: one access by a CPL3 guest, then its completion
/// `out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestCase {
    /// The slot is deleted; the guest reads its first word.
    ReadAfterDelete,
    /// The slot is read-only; the guest writes its first word.
    WriteToReadOnly,
    /// The slot is read-only and the host wrote `0x5eed_0000_1234` to its
    /// first word; the guest reads it.
    ReadOfReadOnly,
}

/// The guest physical address the guest cases access.
pub const GUEST_CASE_GPA: u64 = crate::guest::MEASURED_GPA;

/// The word the host writes for [`GuestCase::ReadOfReadOnly`].
pub const READONLY_WORD: u64 = 0x5eed_0000_1234;

/// Run `case` on a fresh VM and describe its first exit: `mmio read|write
/// <addr> len <n>`, `read <value>` (the guest's load completed), or what
/// else happened.
pub fn guest_case(case: GuestCase) -> Result<String> {
    use iced_x86::code_asm::{al, dx, qword_ptr, rax, rdi, CodeAssembler};
    let (kvm, cpuid) = crate::open_kvm_with_cpuid()?;
    let code = {
        let build = || -> std::result::Result<Vec<u8>, iced_x86::IcedError> {
            let mut a = CodeAssembler::new(64)?;
            match case {
                GuestCase::WriteToReadOnly => a.mov(qword_ptr(GUEST_CASE_GPA), rdi)?,
                _ => a.mov(rax, qword_ptr(GUEST_CASE_GPA))?,
            }
            a.out(dx, al)?;
            a.assemble(crate::guest::CODE)
        };
        build().map_err(KvmError::Assemble)?
    };
    let measured = HostMemory::new(crate::host_mem::HUGE_PAGE_SIZE, false)?;
    let mut vm = crate::vm::GuestVm::new(
        &kvm,
        &cpuid,
        &code,
        1,
        crate::host_mem::HUGE_PAGE_SIZE,
        measured,
    )?;
    match case {
        GuestCase::ReadAfterDelete => {
            vm.delete_measured_slot()?;
        }
        GuestCase::WriteToReadOnly => vm.set_measured_readonly()?,
        GuestCase::ReadOfReadOnly => {
            vm.write_measured(0, READONLY_WORD);
            vm.set_measured_readonly()?;
        }
    }
    Ok(match vm.run_once()? {
        crate::vm::GuestExit::Mmio { addr, len, write } => format!(
            "mmio {} {addr:#x} len {len}",
            if write { "write" } else { "read" }
        ),
        crate::vm::GuestExit::Done { rax: value } => format!("read {value:#x}"),
        crate::vm::GuestExit::Other(s) => s,
    })
}
