//! Anonymous host memory that backs guest memory (or that plain threads first-touch).
//!
//! The mapping is `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`, so nothing is allocated
//! until first touch: that first touch is exactly what the "untouched host memory" phase
//! measures. The usable range is aligned to 2 MiB because both THP and KVM's huge
//! mappings need the host virtual address and the guest physical address to agree
//! modulo 2 MiB; without alignment `MADV_HUGEPAGE` would silently give 4 KiB entries.

use std::io;
use std::ptr::{self, NonNull};

use crate::error::{KvmError, Result};

/// 4 KiB: the page granule touched and counted.
pub const PAGE_SIZE: u64 = 4096;
/// 2 MiB: guest page size and THP size.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// An owned anonymous mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct HostMemory {
    /// Start of the whole mapping (for `munmap`).
    map: NonNull<u8>,
    /// Length of the whole mapping.
    map_len: usize,
    /// 2 MiB-aligned start of the usable range.
    ptr: NonNull<u8>,
    /// Length of the usable range.
    len: usize,
}

// SAFETY: `HostMemory` exclusively owns its mapping; the raw pointers are never shared
// outside it except as addresses handed to KVM, and all access goes through volatile
// reads/writes of plain integers, which are valid from any thread.
unsafe impl Send for HostMemory {}
// SAFETY: as above; concurrent `&self` accesses from threads only ever touch disjoint
// pages (each vCPU or thread owns its chunk), and volatile integer accesses to
// anonymous memory cannot produce invalid values.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// Maps `len` bytes of fresh anonymous memory, advising THP on or off.
    pub(crate) fn new(len: u64, thp: bool) -> Result<Self> {
        let too_big = |_| KvmError::TooLarge {
            total: len,
            limit: isize::MAX as u64,
        };
        let len_usize = usize::try_from(len).map_err(too_big)?;
        let map_len = len_usize
            .checked_add(HUGE_PAGE_SIZE as usize)
            .ok_or(KvmError::TooLarge {
                total: len,
                limit: isize::MAX as u64,
            })?;
        // SAFETY: an anonymous private mapping at a kernel-chosen address aliases no
        // existing Rust object; the result is checked for MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(KvmError::HostMemory {
                op: "mmap",
                len,
                source: io::Error::last_os_error(),
            });
        }
        let map = NonNull::new(raw.cast::<u8>()).ok_or(KvmError::HostMemory {
            op: "mmap",
            len,
            source: io::Error::from(io::ErrorKind::AddrNotAvailable),
        })?;
        let misalign = (map.as_ptr() as usize).wrapping_neg() & (HUGE_PAGE_SIZE as usize - 1);
        // SAFETY: `misalign < 2 MiB` and the mapping is `len + 2 MiB` long, so the
        // aligned pointer and `len` bytes after it stay inside the mapping.
        let ptr = unsafe { NonNull::new_unchecked(map.as_ptr().add(misalign)) };
        let mem = Self {
            map,
            map_len,
            ptr,
            len: len_usize,
        };

        let advice = if thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: the range lies inside our own mapping; madvise with these hints does
        // not change its contents.
        let rc = unsafe { libc::madvise(mem.ptr.as_ptr().cast(), mem.len, advice) };
        if rc != 0 {
            return Err(KvmError::HostMemory {
                op: "madvise",
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(mem)
    }

    /// Maps `len` bytes of descriptor `fd` shared (a guest_memfd created with
    /// MMAP): the host's view of memory the guest reaches through the file.
    pub(crate) fn map_shared(fd: std::os::fd::RawFd, len: u64) -> Result<Self> {
        let len_usize = usize::try_from(len).map_err(|_| KvmError::TooLarge {
            total: len,
            limit: isize::MAX as u64,
        })?;
        // SAFETY: a shared mapping of a descriptor the caller owns, at a
        // kernel-chosen address (aliasing no Rust object); checked below.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(KvmError::HostMemory {
                op: "mmap (guest_memfd)",
                len,
                source: io::Error::last_os_error(),
            });
        }
        let map = NonNull::new(raw.cast::<u8>()).ok_or(KvmError::HostMemory {
            op: "mmap (guest_memfd)",
            len,
            source: io::Error::from(io::ErrorKind::AddrNotAvailable),
        })?;
        Ok(Self {
            map,
            map_len: len_usize,
            ptr: map,
            len: len_usize,
        })
    }

    /// Host virtual address of the usable range, for `kvm_userspace_memory_region`.
    pub(crate) fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length of the usable range.
    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    /// Writes 8 bytes to every 4 KiB page of `[offset, offset + len)`, faulting it in.
    ///
    /// Out-of-range parts are ignored (callers pass ranges they computed from `len()`).
    pub(crate) fn touch(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.len());
        let mut at = offset;
        while at < end {
            // SAFETY: `at < self.len` and is 4 KiB aligned, so the 8-byte write is inside
            // the mapping and aligned; the memory is plain integers owned by us.
            unsafe {
                self.ptr
                    .as_ptr()
                    .add(at as usize)
                    .cast::<u64>()
                    .write_volatile(at)
            };
            at += PAGE_SIZE;
        }
    }

    /// `MADV_DONTNEED` over `[offset, offset + len)` (clamped to the range):
    /// the host drops the pages, which fires KVM's invalidation notifiers.
    pub(crate) fn dontneed(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.len());
        if offset >= end {
            return Ok(());
        }
        // SAFETY: the range lies inside our own mapping (clamped above); dropping
        // its pages only makes later reads see zeroes.
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(offset as usize).cast(),
                (end - offset) as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(KvmError::BadConfig(format!(
                "madvise(MADV_DONTNEED) of {:#x} bytes at offset {offset:#x}: {}",
                end - offset,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Copies `bytes` to the start of the usable range.
    pub(crate) fn write_bytes(&self, bytes: &[u8]) {
        let n = bytes.len().min(self.len);
        // SAFETY: at most `self.len` bytes are copied into our own mapping, which cannot
        // overlap the source slice (a Rust object elsewhere in memory).
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr(), n) };
    }

    /// Writes the 8-byte `value` at `offset` (ignored unless 8-byte aligned and
    /// in range).
    pub(crate) fn write_u64(&self, offset: u64, value: u64) {
        if !offset.is_multiple_of(8) || offset.checked_add(8).is_none_or(|e| e > self.len()) {
            return;
        }
        // SAFETY: bounds and alignment checked above; plain integer memory we own.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset as usize)
                .cast::<u64>()
                .write_volatile(value)
        };
    }

    /// Reads the 8-byte value at `offset` (which must be 8-byte aligned and in range).
    pub(crate) fn read_u64(&self, offset: u64) -> Option<u64> {
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > self.len() {
            return None;
        }
        // SAFETY: bounds and alignment were checked above; volatile because the guest
        // writes this memory behind the compiler's back.
        Some(unsafe {
            self.ptr
                .as_ptr()
                .add(offset as usize)
                .cast::<u64>()
                .read_volatile()
        })
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` describe exactly the mapping created in `new`, and no
        // reference into it outlives `self`. Callers drop the VM (and its memslots)
        // before the memory; see `GuestVm`'s field order.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub(crate) fn mem_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(KvmError::MemInfo)?;
    parse_mem_available(&text).ok_or_else(|| {
        KvmError::MemInfo(io::Error::new(
            io::ErrorKind::InvalidData,
            "no MemAvailable line",
        ))
    })
}

fn parse_mem_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_mem_available_present_returns_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
    }

    #[test]
    fn test_parse_mem_available_missing_returns_none() {
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn test_host_memory_touch_then_read_is_aligned_and_marked() {
        let mem = HostMemory::new(4 * PAGE_SIZE, false).unwrap();

        mem.touch(0, mem.len());

        assert_eq!(mem.host_addr() % HUGE_PAGE_SIZE, 0);
        assert_eq!(mem.read_u64(2 * PAGE_SIZE), Some(2 * PAGE_SIZE));
        assert_eq!(mem.read_u64(mem.len()), None);
        assert_eq!(mem.read_u64(3), None);
    }
}
