//! Host memory reclaim: an LRU clock over a region that asks the secondary
//! MMUs whether pages were used (the mmu_notifier aging callbacks, as
//! Linux's `folio_referenced` and MGLRU's look-around do), keeps what was
//! young, and swaps out what stayed old for a whole turn of the clock.
//!
//! The clock is the classic two-handed approximation of Linux's active and
//! inactive lists: each visit ages the page (`clear_young` through the
//! notifier, which the MMU answers lockless since KVM 6.15); a young page is
//! kept and starts again; a page found old is marked, and a page found old
//! at two visits in a row is cold and swapped out (through the usual
//! invalidations: `swap_out` brackets its change with
//! `invalidate_range_start`/`end`). Swapped pages come back on the next
//! access (a refault: the host swaps them in).
//!
//! [`Reclaimer`] runs the clock on a thread whenever the region holds more
//! than its limit, down to a low watermark, as kswapd does for a memory
//! cgroup's limit; [`Lru::sweep`] is one step of it, for callers that want
//! reclaim as a single event (the soak).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmmu::{Hva, HvaRange};

use crate::primary_mmu::HostMmu;

const PAGE: u64 = 4096;
/// Cold pages swapped out together (one invalidation per contiguous run).
const SWAP_BATCH: usize = 64;

/// What reclaim has done.
#[derive(Debug, Default)]
pub struct ReclaimStats {
    /// Clock visits to resident pages.
    pub scanned: AtomicU64,
    /// Aging callbacks that found the page young.
    pub young: AtomicU64,
    /// Pages swapped out.
    pub reclaimed: AtomicU64,
    /// Times the region went over its limit and reclaim ran.
    pub rounds: AtomicU64,
    /// Nanoseconds spent in the aging callbacks.
    pub aging_ns: AtomicU64,
    /// Nanoseconds spent swapping out.
    pub swap_ns: AtomicU64,
}

/// The clock over one region.
#[derive(Debug)]
pub struct Lru {
    base: u64,
    pages: u64,
    hand: u64,
    /// Found old at the last visit.
    old: Vec<bool>,
}

impl Lru {
    /// A clock over `[base, base + pages * 4 KiB)`.
    pub fn new(base: Hva, pages: u64) -> Lru {
        Lru {
            base: base.0,
            pages,
            hand: 0,
            old: vec![false; pages as usize],
        }
    }

    /// Turn the clock until `target` pages were swapped out, or two full turns
    /// found nothing more to take. Returns the pages swapped out.
    pub fn sweep(&mut self, host: &HostMmu, target: u64, stats: &ReclaimStats) -> u64 {
        if self.pages == 0 {
            return 0;
        }
        let mut freed = 0;
        let mut cold: Vec<u64> = Vec::with_capacity(SWAP_BATCH);
        let mut visits = 0;
        while freed < target && visits < 2 * self.pages {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.pages;
            visits += 1;
            let hva = self.base + i * PAGE;
            if !host.is_resident(Hva(hva)) {
                self.old[i as usize] = false;
                continue;
            }
            stats.scanned.fetch_add(1, Ordering::Relaxed);
            let t = Instant::now();
            let young = host.age(HvaRange::new(Hva(hva), Hva(hva + PAGE)));
            stats
                .aging_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if young {
                stats.young.fetch_add(1, Ordering::Relaxed);
                self.old[i as usize] = false;
            } else if self.old[i as usize] {
                self.old[i as usize] = false;
                cold.push(i);
                if cold.len() >= SWAP_BATCH || freed + cold.len() as u64 >= target {
                    freed += self.swap(host, &mut cold, stats);
                }
            } else {
                self.old[i as usize] = true;
            }
        }
        freed + self.swap(host, &mut cold, stats)
    }

    /// Swap out the cold pages gathered, a contiguous run at a time.
    fn swap(&self, host: &HostMmu, cold: &mut Vec<u64>, stats: &ReclaimStats) -> u64 {
        cold.sort_unstable();
        let t = Instant::now();
        let mut n = 0;
        let mut k = 0;
        while k < cold.len() {
            let mut end = k + 1;
            while end < cold.len() && cold[end] == cold[end - 1] + 1 {
                end += 1;
            }
            let start = self.base + cold[k] * PAGE;
            let stop = self.base + (cold[end - 1] + 1) * PAGE;
            n += host.swap_out(HvaRange::new(Hva(start), Hva(stop)));
            k = end;
        }
        cold.clear();
        stats.reclaimed.fetch_add(n, Ordering::Relaxed);
        stats
            .swap_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        n
    }
}

/// A reclaim thread keeping a region under a limit of resident pages.
#[derive(Debug)]
pub struct Reclaimer {
    stop: Arc<AtomicBool>,
    /// What it did (live).
    pub stats: Arc<ReclaimStats>,
    thread: Option<JoinHandle<()>>,
}

impl Reclaimer {
    /// Keep at most `limit` pages of `[base, base + pages * 4 KiB)` resident:
    /// when the region goes over, reclaim down to 15/16 of the limit.
    pub fn start(host: Arc<HostMmu>, base: Hva, pages: u64, limit: u64) -> Reclaimer {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ReclaimStats::default());
        let mut lru = Lru::new(base, pages);
        let (s, st) = (stop.clone(), stats.clone());
        let range = HvaRange::new(base, Hva(base.0 + pages * PAGE));
        let low = limit - limit / 16;
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let resident = host.resident_in(range);
                if resident <= limit {
                    std::thread::sleep(Duration::from_micros(500));
                    continue;
                }
                st.rounds.fetch_add(1, Ordering::Relaxed);
                if lru.sweep(&host, resident - low, &st) == 0 {
                    // Everything is young or pinned: let the guest run.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Reclaimer {
            stop,
            stats,
            thread: Some(thread),
        }
    }

    /// Stop the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_memory::HostMemory;
    use crate::primary_mmu::Backing;

    fn host(pages: u64) -> (Arc<HostMmu>, Hva) {
        let mem = Arc::new(HostMemory::new(64 << 20, true).unwrap());
        let host = Arc::new(HostMmu::new(mem));
        let base = Hva(0x10_0000_0000);
        host.map_region(base, pages * PAGE, Backing::Anonymous)
            .unwrap();
        for p in 0..pages {
            host.write_u64(Hva(base.0 + p * PAGE), p).unwrap();
        }
        (host, base)
    }

    #[test]
    fn test_a_page_is_taken_only_after_two_old_visits_and_keeps_its_data() {
        let (host, base) = host(8);
        let stats = ReclaimStats::default();
        let mut lru = Lru::new(base, 8);
        // No secondary MMU: nothing is ever young. The first turn only marks
        // pages old; the second takes them.
        assert_eq!(lru.sweep(&host, 3, &stats), 3);
        assert_eq!(stats.scanned.load(Ordering::Relaxed), 8 + 3);
        assert_eq!(
            host.resident_in(HvaRange::new(base, Hva(base.0 + 8 * PAGE))),
            5
        );
        // Swapped pages come back with their data.
        for p in 0..8 {
            assert_eq!(host.read_u64(Hva(base.0 + p * PAGE)).unwrap(), p);
        }
        assert_eq!(
            host.resident_in(HvaRange::new(base, Hva(base.0 + 8 * PAGE))),
            8
        );
    }

    #[test]
    fn test_a_sweep_with_nothing_resident_stops_after_two_turns() {
        let mem = Arc::new(HostMemory::new(16 << 20, true).unwrap());
        let host = HostMmu::new(mem);
        let base = Hva(0x10_0000_0000);
        host.map_region(base, 4 * PAGE, Backing::Anonymous).unwrap();
        let stats = ReclaimStats::default();
        assert_eq!(Lru::new(base, 4).sweep(&host, 10, &stats), 0);
        assert_eq!(stats.scanned.load(Ordering::Relaxed), 0);
    }
}
