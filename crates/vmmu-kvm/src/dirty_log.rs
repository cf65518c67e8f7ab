//! Dirty logging on the real KVM, for `vmmu bench dirty-log`: the loop guest
//! dirties a known pattern of pages with logging on, and the harvested bitmap
//! and the calls' times are reported, to be compared with vmmu's.

use crate::error::{KvmError, Result};
use crate::host_mem::HostMemory;
use crate::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// What [`kvm_dirty_log`] measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmDirtyLogRun {
    /// Pages of the logged slot.
    pub pages: u64,
    /// `KVM_SET_USER_MEMORY_REGION` turning logging on (every page mapped).
    pub enable_ns: u64,
    /// A guest pass writing every page, logging on.
    pub write_pass_ns: u64,
    /// `KVM_GET_DIRTY_LOG` with every page dirty.
    pub get_all_ns: u64,
    /// `KVM_GET_DIRTY_LOG` with no page dirty.
    pub get_none_ns: u64,
    /// With manual protection: `KVM_CLEAR_DIRTY_LOG` of every page, all dirty.
    pub clear_all_ns: u64,
    /// The bitmap after a pass over every `stride`-th page.
    pub pattern_bitmap: Vec<u64>,
}

fn ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `vcpus` vCPUs over `bytes` (a multiple of 2 MiB per vCPU) of anonymous
/// memory, each on its own chunk: a pass maps every page, logging is turned on
/// (timed), a pass writes every `stride`-th page of each chunk (a multiple of
/// 4 KiB) and the bitmap is taken, then a pass over every page (timed) and two
/// gets (all dirty, then none; timed).
pub fn kvm_dirty_log(bytes: u64, stride: u64, vcpus: usize) -> Result<KvmDirtyLogRun> {
    let per_vcpu = bytes / vcpus.max(1) as u64;
    if vcpus == 0
        || per_vcpu == 0
        || !per_vcpu.is_multiple_of(HUGE_PAGE_SIZE)
        || per_vcpu * vcpus as u64 != bytes
        || bytes > crate::MAX_TOTAL_BYTES
    {
        return Err(KvmError::BadChunkSize {
            bytes,
            granule: HUGE_PAGE_SIZE,
        });
    }
    if stride == 0 || !stride.is_multiple_of(PAGE_SIZE) {
        return Err(KvmError::BadChunkSize {
            bytes: stride,
            granule: PAGE_SIZE,
        });
    }
    let (kvm, cpuid) = crate::open_kvm_with_cpuid()?;
    let code = crate::guest::assemble_loop()?;
    let mem = HostMemory::new(bytes, false)?;
    let mut vm = crate::vm::GuestVm::new(&kvm, &cpuid, &code, vcpus, per_vcpu, mem)?;
    vm.run_pass(1)?;
    let enable_ns = ns(vm.set_measured_logging(true)?);
    // Logging starts clean.
    let _ = vm.get_measured_dirty_log()?;
    vm.set_stride(stride)?;
    vm.run_pass(2)?;
    let (pattern_bitmap, _) = vm.get_measured_dirty_log()?;
    vm.set_stride(PAGE_SIZE)?;
    let write_pass_ns = vm.run_pass(3)?;
    let (_, all) = vm.get_measured_dirty_log()?;
    let (_, none) = vm.get_measured_dirty_log()?;
    vm.verify(3)?;
    // Manual protection: a pass dirties everything, get copies, clear protects.
    vm.enable_manual_protect()?;
    vm.run_pass(4)?;
    let (log, _) = vm.get_measured_dirty_log()?;
    let clear = vm.clear_measured_dirty_log(&log)?;
    Ok(KvmDirtyLogRun {
        pages: bytes / PAGE_SIZE,
        enable_ns,
        write_pass_ns,
        get_all_ns: ns(all),
        get_none_ns: ns(none),
        clear_all_ns: ns(clear),
        pattern_bitmap,
    })
}

/// The clear-log mode (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) on the real KVM,
/// for `vmmu diff`: one vCPU over `bytes`; a pass maps every page; manual
/// protection on, logging on; a get and a clear of what it reports; a pass
/// over every `first`-th page, a get, and a clear of only the first half of
/// the slot's bits; a pass over every `second`-th page; the bitmap of the
/// last get (dirty pages of the second pass, plus the first pass's pages in
/// the half that was not cleared).
pub fn kvm_clear_log_bitmap(bytes: u64, first: u64, second: u64) -> Result<Vec<u64>> {
    let (kvm, cpuid) = crate::open_kvm_with_cpuid()?;
    let code = crate::guest::assemble_loop()?;
    let mem = HostMemory::new(bytes, false)?;
    let mut vm = crate::vm::GuestVm::new(&kvm, &cpuid, &code, 1, bytes, mem)?;
    vm.run_pass(1)?;
    vm.enable_manual_protect()?;
    vm.set_measured_logging(true)?;
    let (log, _) = vm.get_measured_dirty_log()?;
    vm.clear_measured_dirty_log(&log)?;
    vm.set_stride(first * PAGE_SIZE)?;
    vm.run_pass(2)?;
    let (mut log, _) = vm.get_measured_dirty_log()?;
    let half = log.len() / 2;
    for w in &mut log[half..] {
        *w = 0;
    }
    vm.clear_measured_dirty_log(&log)?;
    vm.set_stride(second * PAGE_SIZE)?;
    vm.run_pass(3)?;
    let (last, _) = vm.get_measured_dirty_log()?;
    Ok(last)
}

/// The ring mode (`KVM_CAP_DIRTY_LOG_RING`) on the real KVM, for `vmmu
/// diff`: one vCPU over `bytes` with a ring of `entries`; a pass maps every
/// page; logging on; a pass over every `stride`-th page; the ring's entries
/// for the measured slot, harvested (and reset), as a bitmap.
pub fn kvm_ring_bitmap(bytes: u64, stride: u64, entries: u32) -> Result<Vec<u64>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    let (kvm, cpuid) = crate::open_kvm_with_cpuid()?;
    let code = crate::guest::assemble_loop()?;
    let mem = HostMemory::new(bytes, false)?;
    // One entry is `struct kvm_dirty_gfn`: flags (u32), slot (u32), offset (u64).
    let ring_bytes = entries * 16;
    let mut vm = crate::vm::GuestVm::new_with_ring(&kvm, &cpuid, &code, mem, ring_bytes)?;
    vm.run_pass(1)?;
    vm.set_measured_logging(true)?;
    vm.set_stride(stride * PAGE_SIZE)?;
    vm.run_pass(2)?;
    let vcpu = vm.vcpu0().ok_or(KvmError::ThreadPanicked { index: 0 })?;
    use std::os::fd::AsRawFd;
    // KVM_DIRTY_LOG_PAGE_OFFSET (64) pages into the vCPU's mapping.
    let offset = 64 * PAGE_SIZE as libc::off_t;
    // SAFETY: a shared mapping of the vCPU's ring as KVM documents it, checked
    // for MAP_FAILED; unmapped below before the VM goes away.
    let ring = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ring_bytes as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu.as_raw_fd(),
            offset,
        )
    };
    if ring == libc::MAP_FAILED {
        return Err(KvmError::Ioctl {
            op: "mmap(dirty ring)",
            source: kvm_ioctls::Error::last(),
        });
    }
    let pages = bytes / PAGE_SIZE;
    let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
    for i in 0..entries as usize {
        // SAFETY: entry `i` lies inside the mapping (entries * 16 bytes); the
        // flags word is shared with KVM, so it is read and written atomically.
        let (flags, slot, off) = unsafe {
            let e = (ring as *mut u8).add(i * 16);
            let flags = &*(e as *const AtomicU32);
            let f = flags.load(Ordering::Acquire);
            if f & 1 == 0 {
                break;
            }
            let slot = std::ptr::read_volatile(e.add(4) as *const u32);
            let off = std::ptr::read_volatile(e.add(8) as *const u64);
            // Collected: KVM_DIRTY_GFN_F_RESET, so the reset re-protects it.
            flags.store(2, Ordering::Release);
            (f, slot, off)
        };
        let _ = flags;
        if slot == crate::vm::MEASURED_SLOT && off < pages {
            bitmap[(off / 64) as usize] |= 1 << (off % 64);
        }
    }
    // _IO(KVMIO, 0xc7): KVM_RESET_DIRTY_RINGS.
    // SAFETY: a KVM ioctl without argument on our VM fd.
    let r = unsafe { libc::ioctl(vm.vm_fd().as_raw_fd(), 0xAEC7 as _) };
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(ring, ring_bytes as usize) };
    if r < 0 {
        return Err(KvmError::Ioctl {
            op: "KVM_RESET_DIRTY_RINGS",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(bitmap)
}
