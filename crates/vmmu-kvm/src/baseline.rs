//! The host's own first-touch cost, without KVM: the yardstick for phase 1.
//!
//! On this nested machine fresh anonymous memory is expensive to touch (freed memory goes
//! back to the outer host, and re-touching costs an outer fault), so KVM's first-touch
//! figures only make sense next to this baseline measured in the same run.

use std::sync::Barrier;
use std::time::Instant;

use crate::demand_paging::{check_fits, MAX_TOTAL_BYTES, MAX_VCPUS};
use crate::error::{KvmError, Result};
use crate::host_mem::{self, HostMemory, PAGE_SIZE};
use crate::vm::span_ns;

/// Checks the shape of a baseline request and returns its total size in bytes.
fn validate(threads: usize, bytes_per_thread: u64) -> Result<u64> {
    if threads == 0 {
        return Err(KvmError::NoVcpus);
    }
    if threads > MAX_VCPUS {
        return Err(KvmError::TooManyVcpus {
            vcpus: threads,
            max: MAX_VCPUS,
        });
    }
    if bytes_per_thread == 0 || !bytes_per_thread.is_multiple_of(PAGE_SIZE) {
        return Err(KvmError::BadChunkSize {
            bytes: bytes_per_thread,
            granule: PAGE_SIZE,
        });
    }
    let total = (threads as u64)
        .checked_mul(bytes_per_thread)
        .ok_or(KvmError::TooLarge {
            total: u64::MAX,
            limit: MAX_TOTAL_BYTES,
        })?;
    if total > MAX_TOTAL_BYTES {
        return Err(KvmError::TooLarge {
            total,
            limit: MAX_TOTAL_BYTES,
        });
    }
    Ok(total)
}

/// Wall nanoseconds for `threads` threads, released together, each writing 8 bytes to
/// every 4 KiB page of its own `bytes_per_thread` of fresh anonymous memory
/// (`MADV_HUGEPAGE` iff `thp`, else `MADV_NOHUGEPAGE`).
///
/// The memory is mapped before the threads are released and unmapped after the clock
/// stops, so only the page faults (allocation and zeroing) are timed.
///
/// # Errors
///
/// A validation error for zero threads, a size that is not a positive multiple of
/// 4 KiB, a total over [`MAX_TOTAL_BYTES`] or over the host's available memory; or the
/// failing `mmap`/`madvise`.
pub fn plain_first_touch(threads: usize, bytes_per_thread: u64, thp: bool) -> Result<u64> {
    let total = validate(threads, bytes_per_thread)?;
    check_fits(total, host_mem::mem_available()?)?;
    let mems = (0..threads)
        .map(|_| HostMemory::new(bytes_per_thread, thp))
        .collect::<Result<Vec<_>>>()?;
    let barrier = Barrier::new(threads);
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = mems
            .iter()
            .map(|mem| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    mem.touch(0, mem.len());
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(index, h)| h.join().map_err(|_| KvmError::ThreadPanicked { index }))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(span_ns(&times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_validate_zero_threads_is_no_vcpus() {
        assert!(matches!(validate(0, PAGE_SIZE), Err(KvmError::NoVcpus)));
    }

    #[test]
    fn test_validate_unaligned_bytes_is_bad_chunk() {
        assert!(matches!(
            validate(1, 100),
            Err(KvmError::BadChunkSize { bytes: 100, .. })
        ));
        assert!(matches!(
            validate(1, 0),
            Err(KvmError::BadChunkSize { bytes: 0, .. })
        ));
    }

    #[test]
    fn test_validate_too_much_is_too_large() {
        assert!(matches!(
            validate(2, MAX_TOTAL_BYTES),
            Err(KvmError::TooLarge { .. })
        ));
        assert!(matches!(
            validate(3, !(PAGE_SIZE - 1)),
            Err(KvmError::TooLarge { .. })
        ));
    }

    #[test]
    fn test_plain_first_touch_small_returns_positive_time() {
        let ns = plain_first_touch(2, 64 * PAGE_SIZE, false).unwrap();
        assert!(ns > 0);
    }
}
