//! Harvesting the dirty log (KVM's `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`
//! and `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
//!
//! A slot with `LOG_DIRTY_PAGES` has a bitmap, one bit per page, set by every
//! write the MMU lets through: a write fault that maps a page writable, and the
//! fast path when it gives back the write permission a harvest took. A harvest
//! takes the bits and write-protects exactly the pages they name, so the next
//! write to each faults and sets its bit again.
//!
//! Without manual protection, [`Vm::get_dirty_log`] does both at once, word by
//! word: exchange the word with 0, write-protect the pages that were set, and
//! flush the TLBs once at the end if any were — the order that guarantees a
//! write after a word was taken is logged next time (it either came before the
//! exchange and is in this snapshot, or it faults on the write-protected page
//! after the flush, or it hit a stale writable TLB entry before the flush and
//! its page is then in this snapshot already, having been set before).
//!
//! With manual protection (`MANUAL_PROTECT_ENABLE`), `get` only copies the
//! bitmap and [`Vm::clear_dirty_log`] clears and re-protects the pages asked
//! for, in 64-page words; with `INITIALLY_SET` enabling logging sets every bit
//! and protects nothing (the first clear does).

use crate::memslot::MemslotSet;
use crate::sync::Ordering;
use crate::tdp::Ctx;
use crate::tdp::RemoteFlush;
use crate::types::{Gfn, GfnRange};
use crate::vm::Vm;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
pub const MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET`.
pub const INITIALLY_SET: u64 = 1 << 1;
/// The flags `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` accepts.
pub const MANUAL_DIRTY_LOG_CAPS: u64 = MANUAL_PROTECT_ENABLE | INITIALLY_SET;

/// Why a dirty-log call was refused. A refused call changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirtyLogError {
    /// The slot number names an address space the VM lacks (EINVAL).
    #[error("slot {slot:#x}: address space {as_id} does not exist (the VM has {spaces})")]
    BadAddressSpace {
        /// The slot number given.
        slot: u32,
        /// Its address space.
        as_id: u16,
        /// Address spaces of the VM.
        spaces: u16,
    },
    /// No such slot, or it does not log dirty pages (ENOENT).
    #[error("slot {slot:#x} does not exist or does not log dirty pages")]
    NotLogging {
        /// The slot number given.
        slot: u32,
    },
    /// `clear_dirty_log` without manual protection enabled (EINVAL).
    #[error("clear_dirty_log needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled first")]
    NotManual,
    /// Unknown manual-protect flags (EINVAL).
    #[error("manual dirty-log flags {flags:#x} are not valid (supported: {supported:#x})")]
    BadFlags {
        /// The flags given.
        flags: u64,
        /// Supported.
        supported: u64,
    },
    /// The pages asked for do not fit the slot or break the 64-page rule
    /// (EINVAL).
    #[error("pages {first}+{num} of a {npages}-page slot: the first page must be a multiple of 64, and the count too unless it reaches the end of the slot")]
    BadRange {
        /// First page.
        first: u64,
        /// Pages.
        num: u64,
        /// Pages in the slot.
        npages: u64,
    },
    /// A ring size that is not a power of two of at least 256 entries (EINVAL).
    #[error("dirty ring of {entries} entries: the size must be a power of two of at least 256")]
    BadRingSize {
        /// Entries asked for.
        entries: u32,
    },
    /// A ring larger than the largest (E2BIG).
    #[error("dirty ring of {entries} entries is larger than {max}")]
    RingTooBig {
        /// Entries asked for.
        entries: u32,
        /// The largest.
        max: u32,
    },
    /// Rings enabled twice, after vCPUs were created, or while a slot logs
    /// into a bitmap (EINVAL).
    #[error("the dirty ring can only be enabled once, before any vCPU exists and while no memslot logs dirty pages")]
    RingTooLate,
    /// A bitmap call on a VM that logs into rings (ENXIO).
    #[error("this VM logs dirty pages into per-vCPU rings: there is no bitmap to get or clear")]
    RingInUse,
    /// The bitmap given is shorter than the pages asked for (EFAULT, as KVM
    /// answers a user buffer it cannot read).
    #[error("the bitmap has {words} words, {needed} are needed for {num} pages")]
    ShortBitmap {
        /// Words given.
        words: usize,
        /// Words needed.
        needed: u64,
        /// Pages asked for.
        num: u64,
    },
}

impl DirtyLogError {
    /// The errno KVM returns for this refusal.
    pub fn errno(&self) -> i32 {
        use crate::errno::*;
        match self {
            DirtyLogError::NotLogging { .. } => ENOENT,
            DirtyLogError::ShortBitmap { .. } => EFAULT,
            DirtyLogError::RingTooBig { .. } => E2BIG,
            DirtyLogError::RingInUse => ENXIO,
            _ => EINVAL,
        }
    }
}

/// Record that `gfn` of `slot` was (or may be) written, KVM's
/// `mark_page_dirty_in_slot`: into the writing vCPU's ring on a VM that logs
/// into rings, else into the slot's bitmap. Slots that do not log ignore it.
///
/// Inlined, so a write fault on a slot that does not log pays one test of
/// the slot's flags; the logging itself stays out of line.
#[inline]
pub(crate) fn mark_page_dirty(
    slot: &crate::Memslot,
    gfn: Gfn,
    ring: Option<&crate::dirty_ring::DirtyRing>,
) {
    if slot.dirty_logging() {
        log_dirty(slot, gfn, ring);
    }
}

#[inline(never)]
fn log_dirty(slot: &crate::Memslot, gfn: Gfn, ring: Option<&crate::dirty_ring::DirtyRing>) {
    match ring {
        Some(r) => r.push(
            (u32::from(slot.as_id()) << 16) | u32::from(slot.id()),
            gfn.0 - slot.base_gfn().0,
        ),
        None => slot.mark_dirty(gfn),
    }
}

impl Vm {
    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)` with `entries` entries
    /// per vCPU (a power of two from 256 to 65536): writes are logged into
    /// each vCPU's ring instead of the slots' bitmaps. Only before any vCPU
    /// exists and while no slot logs; once.
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<(), DirtyLogError> {
        use crate::dirty_ring::{MAX_ENTRIES, MIN_ENTRIES};
        let vm = &*self.inner;
        if entries > MAX_ENTRIES {
            return Err(DirtyLogError::RingTooBig {
                entries,
                max: MAX_ENTRIES,
            });
        }
        if !entries.is_power_of_two() || entries < MIN_ENTRIES {
            return Err(DirtyLogError::BadRingSize { entries });
        }
        // `kvm->lock` (the vCPU list's) outside `slots_lock`, as in KVM: a vCPU
        // created meanwhile either is in the list now or reads the size after
        // it is set.
        let reg = vm.vcpu_registry.lock();
        let _s = vm.slots.lock();
        let logging = (0..vm.config.address_spaces).any(|a| {
            self.memslots(a)
                .is_some_and(|s| s.iter().any(|m| m.dirty_logging()))
        });
        if vm.dirty_ring.load(Ordering::Relaxed) != 0 || !reg.is_empty() || logging {
            return Err(DirtyLogError::RingTooLate);
        }
        vm.dirty_ring.store(entries, Ordering::Relaxed);
        drop(reg);
        Ok(())
    }

    /// The VMM reading vCPU `vcpu_id`'s ring from its fetch index `*fetch`:
    /// each entry marked dirty is handed to `f` (slot number, page offset in
    /// the slot) and marked collected. Returns how many; 0 for a vCPU that
    /// does not exist or a VM without rings.
    pub fn collect_dirty_ring(
        &self,
        vcpu_id: u32,
        fetch: &mut u32,
        f: impl FnMut(u32, u64),
    ) -> u64 {
        let vcpus = self.inner.vcpus.load();
        vcpus
            .iter()
            .find(|v| v.id == vcpu_id)
            .and_then(|v| v.ring.as_ref())
            .map_or(0, |r| r.collect(fetch, f))
    }

    /// `KVM_RESET_DIRTY_RINGS`: free every collected entry of every vCPU's ring
    /// and write-protect its page (64-page runs at a time), flushing once if
    /// anything was protected. Returns how many entries were reset.
    pub fn reset_dirty_rings(&self) -> u64 {
        let vm = &*self.inner;
        let _s = vm.slots.lock();
        let mut n = 0;
        let mut protected = false;
        for v in vm.vcpus.load().iter() {
            let Some(ring) = v.ring.as_ref() else {
                continue;
            };
            // Coalesce consecutive entries of one slot into a 64-page mask, as
            // KVM does.
            let mut run: Option<(u32, u64, u64)> = None;
            let flush_run = |run: Option<(u32, u64, u64)>, protected: &mut bool| {
                if let Some((slot, base, mask)) = run {
                    *protected |= self.protect_slot_masked(slot, base, mask);
                }
            };
            n += ring.reset(|slot, offset| match &mut run {
                Some((s, base, mask)) if *s == slot && offset >= *base && offset < *base + 64 => {
                    *mask |= 1 << (offset - *base);
                }
                _ => {
                    flush_run(run.take(), &mut protected);
                    run = Some((slot, offset & !63, 1 << (offset & 63)));
                }
            });
            flush_run(run, &mut protected);
        }
        if protected {
            vm.flush_remote_tlbs(&vm.stats);
        }
        n
    }

    /// Pages that found their vCPU's ring full (lost to the log): 0 unless
    /// the VMM let a ring fill past its reserve.
    pub fn dirty_ring_overflows(&self) -> u64 {
        self.inner
            .vcpus
            .load()
            .iter()
            .filter_map(|v| v.ring.as_ref())
            .map(|r| r.overflows.load(Ordering::Relaxed))
            .sum()
    }

    fn protect_slot_masked(&self, slot: u32, first: u64, mask: u64) -> bool {
        let Some(set) = self.memslots((slot >> 16) as u16) else {
            return false;
        };
        let Some(s) = set.by_id((slot & 0xffff) as u16) else {
            return false;
        };
        if first >= s.npages() {
            return false;
        }
        self.protect_words(s.as_id(), s.base_gfn(), first, &[mask])
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`: `flags` 0 turns manual
    /// protection off; `MANUAL_PROTECT_ENABLE` (with `INITIALLY_SET` optionally)
    /// turns it on. Applies to slots whose logging is enabled afterwards (for
    /// `INITIALLY_SET`) and to every `get`/`clear` after the call.
    pub fn enable_manual_dirty_log_protect(&self, flags: u64) -> Result<(), DirtyLogError> {
        if flags & !MANUAL_DIRTY_LOG_CAPS != 0 {
            return Err(DirtyLogError::BadFlags {
                flags,
                supported: MANUAL_DIRTY_LOG_CAPS,
            });
        }
        let _s = self.inner.slots.lock();
        self.inner.manual_dirty_log.store(flags, Ordering::Relaxed);
        Ok(())
    }

    /// The manual-protect flags in force.
    pub fn manual_dirty_log_protect(&self) -> u64 {
        self.inner.manual_dirty_log.load(Ordering::Relaxed)
    }

    /// `KVM_GET_DIRTY_LOG` of memslot `slot` (address space in bits 16 and up):
    /// the bitmap, one `u64` per 64 pages. Without manual protection the bits
    /// returned are cleared and their pages write-protected (flushed once);
    /// with it, only copied.
    pub fn get_dirty_log(&self, slot: u32) -> Result<Vec<u64>, DirtyLogError> {
        let vm = &*self.inner;
        if vm.dirty_ring.load(Ordering::Relaxed) != 0 {
            return Err(DirtyLogError::RingInUse);
        }
        let _s = vm.slots.lock();
        let set = self.slot_set(slot)?;
        let (s, bitmap) = logging_slot(&set, slot)?;
        self.sync_dirty_log();
        if self.manual_dirty_log_protect() & MANUAL_PROTECT_ENABLE != 0 {
            return Ok(bitmap.snapshot());
        }
        let base = s.base_gfn();
        let out: Vec<u64> = (0..bitmap.words())
            .map(|i| bitmap.take(i, u64::MAX))
            .collect();
        let protected = self.protect_words(s.as_id(), base, 0, &out);
        if protected {
            vm.flush_remote_tlbs(&vm.stats);
        }
        Ok(out)
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual protection only): for pages
    /// `[first_page, first_page + num_pages)` of `slot`, clear the bits set in
    /// `bitmap` (bit 0 of word 0 is `first_page`) that are set in the log, and
    /// write-protect exactly those pages; flush once if any. `first_page` must
    /// be a multiple of 64, and `num_pages` too unless the range reaches the
    /// end of the slot. Returns how many pages it cleared.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u64,
        bitmap: &[u64],
    ) -> Result<u64, DirtyLogError> {
        let vm = &*self.inner;
        if vm.dirty_ring.load(Ordering::Relaxed) != 0 {
            return Err(DirtyLogError::RingInUse);
        }
        if self.manual_dirty_log_protect() & MANUAL_PROTECT_ENABLE == 0 {
            return Err(DirtyLogError::NotManual);
        }
        let _s = vm.slots.lock();
        let set = self.slot_set(slot)?;
        let (s, log) = logging_slot(&set, slot)?;
        let npages = s.npages();
        self.sync_dirty_log();
        let bad = DirtyLogError::BadRange {
            first: first_page,
            num: num_pages,
            npages,
        };
        if first_page > npages
            || num_pages > npages - first_page
            || (num_pages < npages - first_page && !num_pages.is_multiple_of(64))
            || !first_page.is_multiple_of(64)
        {
            return Err(bad);
        }
        let needed = num_pages.div_ceil(64);
        if (bitmap.len() as u64) < needed {
            return Err(DirtyLogError::ShortBitmap {
                words: bitmap.len(),
                needed,
                num: num_pages,
            });
        }
        let base = s.base_gfn();
        let taken: Vec<u64> = bitmap
            .iter()
            .take(needed as usize)
            .enumerate()
            .map(|(i, &want)| {
                // The last word may cover pages past the range: never touch those.
                let left = num_pages - i as u64 * 64;
                let want = if left < 64 {
                    want & ((1u64 << left) - 1)
                } else {
                    want
                };
                if want == 0 {
                    0
                } else {
                    log.take(((first_page / 64) + i as u64) as usize, want)
                }
            })
            .collect();
        let cleared = taken.iter().map(|w| w.count_ones() as u64).sum();
        let protected = self.protect_words(s.as_id(), base, first_page, &taken);
        if protected {
            vm.flush_remote_tlbs(&vm.stats);
        }
        Ok(cleared)
    }

    /// With PML, kick every vCPU in guest mode so it exits and drains its
    /// page-modification log into the bitmaps (KVM's
    /// `kvm_arch_sync_dirty_log`). Like KVM, it does not wait: a write still
    /// in a log is reported by a later harvest (see [`crate::pml`]).
    fn sync_dirty_log(&self) {
        let vm = &*self.inner;
        if vm.config.pml() {
            vm.make_all_vcpus_request(0, false);
        }
    }

    /// Eager page splitting of `range` in every valid root of `as_id`, under
    /// the read lock (best effort: stops when table memory runs out). Returns
    /// the huge leaves split.
    pub(crate) fn split_huge_pages(&self, as_id: u16, range: GfnRange) -> u64 {
        let vm = &*self.inner;
        let rcu = vm.tdp.rcu.read_lock();
        let ctx = Ctx::new(&vm.stats, &rcu);
        let mut cache = crate::tdp::TableCache::default();
        let mut split = 0;
        {
            let _r = vm.mmu_lock.read(&vm.stats.lock);
            vm.tdp.for_each_root(&ctx, as_id, true, |root| {
                let (n, _out_of_memory) = vm.tdp.split_huge_range(&ctx, root, range, &mut cache);
                split += n;
            });
        }
        cache.drain(&vm.tdp);
        split
    }

    /// Huge pages back in place over `slot` (its logging just turned off):
    /// every table the slot and the host would map huge becomes a huge leaf,
    /// one flush for the lot. Returns the huge leaves made.
    pub(crate) fn recover_huge_pages(&self, slot: &crate::Memslot) -> u64 {
        let vm = &*self.inner;
        let rcu = vm.tdp.rcu.read_lock();
        let ctx = Ctx::new(&vm.stats, &rcu);
        let max = vm.config.max_level;
        let allowed = |gfn: Gfn| {
            if !slot.contains(gfn) {
                // A huge page reaching outside the slot has no huge-page
                // information there (KVM read past `lpage_info`): callers
                // must not ask. Counted, and answered "4 KiB".
                crate::stats::CounterSet::inc(&vm.stats.invariant_violations);
                return crate::types::Level::K4;
            }
            let l = slot.max_mapping_level(gfn, max);
            if l == crate::types::Level::K4 {
                return l;
            }
            l.min(vm.host.primary.mapping_level(slot.gfn_to_hva(gfn)))
        };
        let mut batch = crate::tdp::FlushBatch::default();
        let mut made = 0;
        {
            // A recovered huge leaf takes its bits from one child, as KVM's
            // does: a Dirty bit another child had, or gets while the table is
            // replaced, is not carried over. Logging is off by then, so only
            // checkers care; they learn of it as of any Dirty-bit clearing.
            let _c = vm.clearing_dirty_bits();
            let _r = vm.mmu_lock.read(&vm.stats.lock);
            vm.tdp.for_each_root(&ctx, slot.as_id(), true, |root| {
                made +=
                    vm.tdp
                        .recover_huge_range(&ctx, root, slot.gfn_range(), &allowed, &mut batch);
            });
        }
        batch.flush(vm, &vm.stats);
        made
    }

    fn slot_set(&self, slot: u32) -> Result<std::sync::Arc<MemslotSet>, DirtyLogError> {
        let as_id = (slot >> 16) as u16;
        let spaces = self.inner.config.address_spaces;
        self.memslots(as_id).ok_or(DirtyLogError::BadAddressSpace {
            slot,
            as_id,
            spaces,
        })
    }

    /// Write-protect (or, with PML, clear the Dirty bit of) the pages set in `words` (bit `b` of word `i` is page
    /// `first + 64 * i + b` of the slot at `base`): each run of consecutive set
    /// pages, across words, is one walk of every valid root, all under one
    /// read hold of `mmu_lock` (a fully dirty slot is one walk, not one per
    /// 64 pages). With `INITIALLY_SET` the span is split first. Returns whether
    /// anything changed.
    fn protect_words(&self, as_id: u16, base: Gfn, first: u64, words: &[u64]) -> bool {
        let vm = &*self.inner;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, &w) in words.iter().enumerate() {
            let mut m = w;
            while m != 0 {
                let lo = m.trailing_zeros() as u64;
                let n = (m >> lo).trailing_ones() as u64;
                let start = first + i as u64 * 64 + lo;
                match runs.last_mut() {
                    Some((s, len)) if *s + *len == start => *len += n,
                    _ => runs.push((start, n)),
                }
                m = if lo + n >= 64 {
                    0
                } else {
                    m & !(((1u64 << n) - 1) << lo)
                };
            }
        }
        let (Some(&(lo, _)), Some(&(s, n))) = (runs.first(), runs.last()) else {
            return false;
        };
        if vm.config.eager_page_split && self.manual_dirty_log_protect() & INITIALLY_SET != 0 {
            self.split_huge_pages(as_id, GfnRange::new(base.add(lo), base.add(s + n)));
        }
        let ranges = runs
            .into_iter()
            .map(|(start, n)| GfnRange::new(base.add(start), base.add(start + n)));
        self.protect_ranges(as_id, ranges, vm.config.pml())
    }
}

fn logging_slot(
    set: &MemslotSet,
    slot: u32,
) -> Result<
    (
        &std::sync::Arc<crate::Memslot>,
        &crate::memslot::DirtyBitmap,
    ),
    DirtyLogError,
> {
    let id = (slot & 0xffff) as u16;
    let s = set
        .by_id(id)
        .filter(|s| !s.is_invalid())
        .ok_or(DirtyLogError::NotLogging { slot })?;
    let b = s.dirty_bitmap().ok_or(DirtyLogError::NotLogging { slot })?;
    Ok((s, b))
}
