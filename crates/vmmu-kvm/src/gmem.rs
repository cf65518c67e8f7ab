//! guest_memfd on the real KVM: the calls of the guest_memfd contract
//! (create, `fallocate`, bind through `KVM_SET_USER_MEMORY_REGION2`, the old
//! region call, `mmap` of a shareable file), each answering `Ok` or the errno
//! KVM gave, so the CLI can run the same cases on vmmu and here and compare
//! them one by one.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region, kvm_userspace_memory_region2,
};
use kvm_ioctls::VmFd;

use crate::error::{KvmError, Result};
use crate::host_mem::HostMemory;

/// `KVM_CAP_GUEST_MEMFD`.
pub const KVM_CAP_GUEST_MEMFD: libc::c_ulong = 234;
/// `KVM_CAP_USER_MEMORY2`.
pub const KVM_CAP_USER_MEMORY2: libc::c_ulong = 231;
/// `KVM_CAP_MEMORY_ATTRIBUTES`.
pub const KVM_CAP_MEMORY_ATTRIBUTES: libc::c_ulong = 233;
/// `KVM_CAP_PRE_FAULT_MEMORY`.
pub const KVM_CAP_PRE_FAULT_MEMORY: libc::c_ulong = 236;
/// `KVM_CAP_GUEST_MEMFD_FLAGS` (6.18).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: libc::c_ulong = 244;

/// What this KVM says about guest_memfd and private memory (default VM type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GmemCaps {
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: i32,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: i32,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`.
    pub guest_memfd_flags: i32,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`.
    pub memory_attributes: i32,
    /// `KVM_CAP_PRE_FAULT_MEMORY`.
    pub pre_fault_memory: i32,
}

/// One default-type VM on `/dev/kvm` for guest_memfd calls, with 16 MiB of
/// host memory for the slots' shared side.
pub struct GmemVm {
    vm: VmFd,
    mem: HostMemory,
}

impl std::fmt::Debug for GmemVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmemVm").finish_non_exhaustive()
    }
}

/// A guest_memfd file on the real KVM (closed on drop).
#[derive(Debug)]
pub struct KvmGmem {
    fd: OwnedFd,
    /// Its size.
    pub size: u64,
}

impl KvmGmem {
    fn raw(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `MADV_POPULATE_READ` (Linux 5.14).
const MADV_POPULATE_READ: libc::c_int = 22;

/// Host bytes behind the slots.
const HOST_BYTES: u64 = 16 << 20;

impl GmemVm {
    /// A default-type VM.
    pub fn new() -> Result<GmemVm> {
        let kvm = crate::open_kvm()?;
        let vm = kvm.create_vm().map_err(|source| KvmError::Ioctl {
            op: "KVM_CREATE_VM",
            source,
        })?;
        let mem = HostMemory::new(HOST_BYTES, false)?;
        Ok(GmemVm { vm, mem })
    }

    /// The capabilities, as `KVM_CHECK_EXTENSION` on the VM answers.
    pub fn caps(&self) -> GmemCaps {
        let c = |cap| self.vm.check_extension_raw(cap);
        GmemCaps {
            guest_memfd: c(KVM_CAP_GUEST_MEMFD),
            user_memory2: c(KVM_CAP_USER_MEMORY2),
            guest_memfd_flags: c(KVM_CAP_GUEST_MEMFD_FLAGS),
            memory_attributes: c(KVM_CAP_MEMORY_ATTRIBUTES),
            pre_fault_memory: c(KVM_CAP_PRE_FAULT_MEMORY),
        }
    }

    /// `KVM_CREATE_GUEST_MEMFD`.
    pub fn create(&self, size: u64, flags: u64) -> std::result::Result<KvmGmem, i32> {
        let fd = self
            .vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags,
                ..Default::default()
            })
            .map_err(|e| e.errno())?;
        // SAFETY: KVM just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(KvmGmem { fd, size })
    }

    /// `fallocate(fd, mode, offset, len)`.
    pub fn fallocate(
        &self,
        f: &KvmGmem,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), i32> {
        // SAFETY: a plain system call on a descriptor we own.
        let r =
            unsafe { libc::fallocate(f.raw(), mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    }

    /// `KVM_SET_USER_MEMORY_REGION2` of `size` bytes at `gpa`, its shared
    /// side at the start of this VM's host memory; bound to `file` at
    /// `offset`, or to an invalid descriptor when `file` is `None`.
    pub fn bind(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        file: Option<&KvmGmem>,
        offset: u64,
    ) -> std::result::Result<(), i32> {
        let region = kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.mem.host_addr(),
            guest_memfd_offset: offset,
            guest_memfd: file.map_or(u32::MAX, |f| f.raw() as u32),
            ..Default::default()
        };
        // SAFETY: the shared side is this VM's own mapping, which outlives every
        // slot (slots are deleted before the mapping is dropped with the VM).
        unsafe { self.vm.set_user_memory_region2(region) }.map_err(|e| e.errno())
    }

    /// `KVM_SET_USER_MEMORY_REGION` (the old call).
    pub fn set_region(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
    ) -> std::result::Result<(), i32> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.mem.host_addr(),
        };
        // SAFETY: as in `bind`.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.errno())
    }

    /// Delete a slot.
    pub fn delete(&self, slot: u32) -> std::result::Result<(), i32> {
        self.set_region(slot, 0, 0, 0)
    }

    /// `mmap` the first page of `file` shared, write `value` to its first
    /// word, punch the page out and read it again: (the value read before the
    /// punch, the value after).
    pub fn mmap_punch_roundtrip(
        &self,
        file: &KvmGmem,
        value: u64,
    ) -> std::result::Result<(u64, u64), i32> {
        let page = crate::PAGE_SIZE as usize;
        // SAFETY: a fresh shared mapping of one page of our own descriptor.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.raw(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        let word = p as *mut u64;
        // SAFETY: `word` points at the start of the page just mapped.
        let before = unsafe {
            word.write_volatile(value);
            word.read_volatile()
        };
        let punched = self.fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            page as u64,
        );
        // SAFETY: still mapped (unmapped below).
        let after = unsafe { word.read_volatile() };
        // SAFETY: unmapping exactly what was mapped above.
        unsafe { libc::munmap(p, page) };
        punched.map(|()| (before, after))
    }

    /// `mmap` of `file` shared: `Ok` if it maps (then unmapped), else errno.
    pub fn mmap(&self, file: &KvmGmem) -> std::result::Result<(), i32> {
        self.mmap_touch(file, true, None)
    }

    /// `mmap` two pages of `file` (`shared`: `MAP_SHARED`, else `MAP_PRIVATE`;
    /// the mapping may extend past the file's end) and, with `touch`, fault in
    /// the page at that offset with `MADV_POPULATE_READ`, which reports the
    /// SIGBUS an access would raise as EFAULT instead of raising it. `Ok` if
    /// the mapping (and the touch) succeeded, else the errno.
    pub fn mmap_touch(
        &self,
        file: &KvmGmem,
        shared: bool,
        touch: Option<u64>,
    ) -> std::result::Result<(), i32> {
        let len = 2 * crate::PAGE_SIZE as usize;
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: a fresh mapping of our own descriptor at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.raw(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        let mut r = Ok(());
        if let Some(off) = touch.filter(|o| (*o as usize) < len) {
            let page = off as usize & !(crate::PAGE_SIZE as usize - 1);
            // SAFETY: advice on one page inside the mapping just made; populating
            // never changes what the memory holds.
            let rc = unsafe {
                libc::madvise(
                    p.cast::<u8>().add(page).cast(),
                    crate::PAGE_SIZE as usize,
                    MADV_POPULATE_READ,
                )
            };
            if rc != 0 {
                r = Err(errno());
            }
        }
        // SAFETY: unmapping what was just mapped.
        unsafe { libc::munmap(p, len) };
        r
    }
}

/// What [`guest_on_gmem`] saw: a guest running on guest_memfd-backed shared
/// memory (a slot bound to an `MMAP | INIT_SHARED` file, the host's view being
/// its `mmap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GmemGuestReport {
    /// Pages of the gmem-backed slot.
    pub pages: u64,
    /// Pages the host wrote through its mapping before the guest ran (the
    /// first half), so the guest finds some pages allocated and some not.
    pub host_written_pages: u64,
    /// Pages whose guest write of pass 1 the host read back through the mapping.
    pub pass1_verified: u64,
    /// Pages punched out after pass 1 (the first quarter).
    pub punched_pages: u64,
    /// Of those, pages the host then read as zero.
    pub zero_after_punch: u64,
    /// Pages outside the hole that still held pass 1's value.
    pub kept_after_punch: u64,
    /// Pages whose guest write of pass 2 (after the punch) the host read back.
    pub pass2_verified: u64,
}

/// Run the loop guest (one vCPU writing every page) on a slot bound to an
/// `MMAP | INIT_SHARED` guest_memfd of `bytes` bytes (a multiple of 2 MiB),
/// reading its writes back through the host's `mmap` of the file; punch the
/// first quarter out, check it reads as zeros and the rest is kept, run a
/// second pass and check it again (the guest faults the punched pages anew).
pub fn guest_on_gmem(bytes: u64) -> Result<GmemGuestReport> {
    if bytes == 0 || !bytes.is_multiple_of(crate::HUGE_PAGE_SIZE) || bytes > HOST_BYTES {
        return Err(KvmError::BadChunkSize {
            bytes,
            granule: crate::HUGE_PAGE_SIZE,
        });
    }
    let (kvm, cpuid) = crate::open_kvm_with_cpuid()?;
    let code = crate::guest::assemble_loop()?;
    let page = crate::PAGE_SIZE;
    let pages = bytes / page;
    let mut gvm = crate::vm::GuestVm::new_with_own_gmem(
        &kvm,
        &cpuid,
        &code,
        bytes,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )?;
    let host_written_pages = pages / 2;
    for i in 0..host_written_pages {
        gvm.write_measured(i * page, 0x5a5a_0000 + i);
    }
    let check = |gvm: &crate::vm::GuestVm, pass: u64, range: std::ops::Range<u64>| {
        range
            .filter(|i| {
                gvm.read_measured(i * page) == Some(crate::guest::MEASURED_GPA + i * page + pass)
            })
            .count() as u64
    };
    gvm.run_pass(1)?;
    let pass1_verified = check(&gvm, 1, 0..pages);
    let punched_pages = pages / 4;
    gvm.punch_measured(0, punched_pages * page)
        .map_err(|e| KvmError::HostMemory {
            op: "fallocate(PUNCH_HOLE) on guest_memfd",
            len: punched_pages * page,
            source: std::io::Error::from_raw_os_error(e),
        })?;
    let zero_after_punch = (0..punched_pages)
        .filter(|i| gvm.read_measured(i * page) == Some(0))
        .count() as u64;
    let kept_after_punch = check(&gvm, 1, punched_pages..pages);
    gvm.run_pass(2)?;
    let pass2_verified = check(&gvm, 2, 0..pages);
    Ok(GmemGuestReport {
        pages,
        host_written_pages,
        pass1_verified,
        punched_pages,
        zero_after_punch,
        kept_after_punch,
        pass2_verified,
    })
}

/// `GUEST_MEMFD_FLAG_MMAP`.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
