//! The host's own events on its memory: page migration, swap-out, KSM
//! merging, transparent huge page splits and collapses, mprotect and aging.
//! Each one runs its change between `invalidate_range_start` and `_end` on
//! every secondary MMU, as Linux's mmu_notifier callers do.

use super::*;

impl HostMmu {
    /// Migrate the pages of `range` to new frames (NUMA balancing, compaction).
    /// Pages with an extra reference (pinned by an in-flight fault) are skipped,
    /// as Linux does. Huge pages move as a whole.
    pub fn migrate(&self, range: HvaRange) -> u64 {
        self.bracket(range, || {
            let mut moved = 0;
            self.with_regions(range, |r| {
                let _s = r.reshape.lock();
                let mut hva = range.start.0.max(r.start);
                let end = range.end.0.min(r.start + r.pages * PAGE);
                while hva < end {
                    let idx = r.idx(hva);
                    let e = r.entries[idx].load(Ordering::Acquire);
                    let (order, n) = if e & HUGE_1G != 0 {
                        (Order::G1, 512 * 512)
                    } else if e & HUGE_2M != 0 {
                        (Order::M2, 512)
                    } else {
                        (Order::K4, 1)
                    };
                    let first = idx & !(n - 1);
                    hva = r.start + (first + n) as u64 * PAGE;
                    if e & PRESENT == 0 || e & KSM != 0 {
                        continue;
                    }
                    let old = Pfn((e & FRAME) - (idx - first) as u64);
                    if (0..n as u64).any(|k| self.mem.refcount(Pfn(old.0 + k)) != 1) {
                        self.stats.migrate_busy.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let Ok(new) = self.mem.alloc(order, PageState::Data) else {
                        continue;
                    };
                    for k in 0..n {
                        let _l = r.lock(first + k);
                        let cur = r.entries[first + k].load(Ordering::Acquire);
                        self.mem
                            .copy_page(Pfn(old.0 + k as u64), Pfn(new.0 + k as u64));
                        r.entries[first + k]
                            .store((cur & !FRAME) | (new.0 + k as u64), Ordering::Release);
                    }
                    for k in 0..n as u64 {
                        self.mem.put(Pfn(old.0 + k));
                    }
                    moved += n as u64;
                }
            });
            self.stats.migrated.fetch_add(moved, Ordering::Relaxed);
            moved
        })
    }

    /// Swap out the unpinned 4 KiB pages of `range` (huge pages are split first).
    pub fn swap_out(&self, range: HvaRange) -> u64 {
        let n = self.for_each_small_page(range, |r, i, e, pfn| {
            let data: Box<[u64]> = self
                .mem
                .page(pfn)
                .iter()
                .map(|w| w.load(Ordering::Relaxed))
                .collect();
            let slot = self.next_swap.fetch_add(1, Ordering::Relaxed);
            self.swap.lock().insert(slot, data);
            r.entries[i].store(SWAPPED | slot | (e & PROT_RO), Ordering::Release);
            self.mem.put(pfn);
            true
        });
        self.stats.swapped_out.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// KSM: merge unpinned 4 KiB pages of `range` whose contents are identical
    /// into one read-only frame; a later write copies it again. Like KSM's
    /// unstable tree, a page is only shared once a second page with the same
    /// contents turns up (here, or in the stable tree from earlier scans); stable
    /// pages nobody maps any more are dropped first.
    pub fn ksm_merge(&self, range: HvaRange) -> u64 {
        self.ksm_prune();
        let mut unstable: HashMap<Vec<u64>, (u64, usize, Pfn)> = HashMap::new();
        let n = self.for_each_small_page(range, |r, i, e, pfn| {
            let content: Vec<u64> = self
                .mem
                .page(pfn)
                .iter()
                .map(|w| w.load(Ordering::Relaxed))
                .collect();
            let mut ksm = self.ksm.lock();
            let stable = match ksm.get(&content) {
                Some(s) => *s,
                None => match unstable.remove(&content) {
                    // A twin seen earlier in this scan (same region): it becomes
                    // the stable copy, read-only, with a reference of the tree's.
                    Some((start, j, first)) if start == r.start && j != i => {
                        let _l = (j / 512 != i / 512).then(|| r.lock(j));
                        let ej = r.entries[j].load(Ordering::Acquire);
                        if ej & (PRESENT | KSM | HUGE_2M | HUGE_1G) != PRESENT
                            || ej & FRAME != first.0
                        {
                            return false;
                        }
                        r.entries[j]
                            .store(PRESENT | KSM | first.0 | (ej & PROT_RO), Ordering::Release);
                        self.mem.get(first);
                        ksm.insert(content, first);
                        first
                    }
                    _ => {
                        unstable.insert(content, (r.start, i, pfn));
                        return false;
                    }
                },
            };
            if stable != pfn {
                self.mem.get(stable);
                self.mem.put(pfn);
            }
            r.entries[i].store(PRESENT | KSM | stable.0 | (e & PROT_RO), Ordering::Release);
            true
        });
        self.stats.ksm_merged.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Drop stable pages only the tree still references.
    fn ksm_prune(&self) {
        self.ksm.lock().retain(|_, pfn| {
            if self.mem.refcount(*pfn) == 1 {
                self.mem.put(*pfn);
                false
            } else {
                true
            }
        });
    }

    /// Inside one invalidation of `range`, run `f` on every present, unpinned,
    /// ordinary 4 KiB page (huge pages cut by the range are split first; KSM and
    /// hugetlbfs pages are left alone), holding its page-table lock. Returns how
    /// many calls returned true.
    fn for_each_small_page(
        &self,
        range: HvaRange,
        mut f: impl FnMut(&Region, usize, u64, Pfn) -> bool,
    ) -> u64 {
        self.bracket(range, || {
            let mut n = 0;
            self.with_regions(range, |r| {
                if matches!(r.backing, Backing::Hugetlb2M | Backing::Hugetlb1G) {
                    return; // hugetlbfs is never swapped or merged
                }
                let _s = r.reshape.lock();
                self.split_range(r, range);
                let mut hva = range.start.0.max(r.start);
                let end = range.end.0.min(r.start + r.pages * PAGE);
                while hva < end {
                    let i = r.idx(hva);
                    hva += PAGE;
                    let _l = r.lock(i);
                    let e = r.entries[i].load(Ordering::Acquire);
                    if e & PRESENT == 0 || e & (KSM | HUGE_2M | HUGE_1G) != 0 {
                        continue;
                    }
                    let pfn = Pfn(e & FRAME);
                    if self.mem.refcount(pfn) == 1 && f(r, i, e, pfn) {
                        n += 1;
                    }
                }
            });
            n
        })
    }

    /// Forget KSM's stable tree (its own references); merged pages stay shared
    /// until written or unmapped.
    pub fn ksm_release(&self) {
        for (_, pfn) in self.ksm.lock().drain() {
            self.mem.put(pfn);
        }
    }

    /// Split every huge page intersecting `range` into 4 KiB mappings.
    pub fn thp_split(&self, range: HvaRange) {
        self.bracket(range, || {
            self.with_regions(range, |r| {
                let _s = r.reshape.lock();
                let mut hva = range.start.0.max(r.start) & !((2 << 20) - 1);
                let end = range.end.0.min(r.start + r.pages * PAGE);
                while hva < end {
                    self.split_at(r, r.idx(hva.max(r.start)));
                    hva += 2 << 20;
                }
            });
        });
    }

    /// khugepaged: collapse each fully populated, unpinned 2 MiB chunk of a THP
    /// region in `range` into one huge page.
    pub fn thp_collapse(&self, range: HvaRange) -> u64 {
        self.bracket(range, || {
            let mut n = 0;
            self.with_regions(range, |r| {
                if r.backing != Backing::AnonymousThp {
                    return;
                }
                let _s = r.reshape.lock();
                // Whole, aligned 2 MiB chunks only.
                let mut hva = range.start.0.max(r.start).div_ceil(2 << 20) * (2 << 20);
                let end = range.end.0.min(r.start + r.pages * PAGE);
                while hva + (2 << 20) <= end {
                    let first = r.idx(hva);
                    hva += 2 << 20;
                    // One protection for all of it, like one VMA: a huge page
                    // has a single write permission in every page table.
                    let prot0 = r.entries[first].load(Ordering::Acquire) & PROT_RO;
                    let ok = (first..first + 512).all(|i| {
                        let e = r.entries[i].load(Ordering::Acquire);
                        e & PRESENT != 0
                            && e & (KSM | HUGE_2M) == 0
                            && e & PROT_RO == prot0
                            && self.mem.refcount(Pfn(e & FRAME)) == 1
                    });
                    if !ok {
                        continue;
                    }
                    let Ok(new) = self.mem.alloc(Order::M2, PageState::Data) else {
                        continue;
                    };
                    let _l = r.lock(first);
                    for k in 0..512 {
                        let e = r.entries[first + k].load(Ordering::Acquire);
                        self.mem.copy_page(Pfn(e & FRAME), Pfn(new.0 + k as u64));
                        let ro = e & PROT_RO;
                        r.entries[first + k].store(
                            PRESENT
                                | HUGE_2M
                                | (new.0 + k as u64)
                                | ro
                                | if ro != 0 { 0 } else { WRITE },
                            Ordering::Release,
                        );
                        self.mem.put(Pfn(e & FRAME));
                    }
                    n += 1;
                }
            });
            self.stats.thp_collapses.fetch_add(n, Ordering::Relaxed);
            n
        })
    }

    /// `mprotect`: make `range` read-only or writable again.
    pub fn mprotect(&self, range: HvaRange, writable: bool) {
        self.stats.mprotects.fetch_add(1, Ordering::Relaxed);
        self.bracket(range, || {
            self.for_each_page_locked(range, |r, i| {
                let e = r.entries[i].load(Ordering::Acquire);
                let new = if writable {
                    e & !PROT_RO
                } else {
                    (e | PROT_RO) & !WRITE
                };
                r.entries[i].store(new, Ordering::Release);
            });
        });
    }

    /// Age `range` through the secondary MMUs (page_idle / MGLRU); returns
    /// whether any page was young.
    pub fn age(&self, range: HvaRange) -> bool {
        self.stats.aging.fetch_add(1, Ordering::Relaxed);
        let mut young = false;
        for s in self.secondaries.load().iter() {
            young |= s.clear_young(range);
        }
        young
    }
}
