//! Memory attributes: which guest frames are private (KVM's `mem_attr_array`).
//!
//! A range map from gfn ranges to attribute bits; a gfn absent from the map has no
//! attributes (shared). Writers serialise on `slots_lock`, build a new map and
//! publish it whole; readers (faults) load the current map without blocking and
//! may see the old one, which is what the invalidation protocol around a change
//! accounts for (`Vm::set_memory_attributes`).
//!
//! The map is a `rangemap::RangeMap`, which keeps adjacent ranges with equal
//! values merged, so a guest that converts its memory page by page still costs a
//! handful of ranges, and "is this whole range uniform" is a walk over the few
//! ranges that overlap it.

use std::ops::Range;

use rangemap::RangeMap;

use crate::config::HookPoint;
use crate::memslot::Memslot;
use crate::stats::CounterSet;
use crate::sync::{Arc, Snapshot};
use crate::tdp::{Ctx, FlushBatch};
use crate::types::{Gfn, GfnRange, Level, PAGE_SIZE};

/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
pub const MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;

/// Why `set_memory_attributes` was refused (each `EINVAL`, as KVM answers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributeError {
    /// Attribute bits other than the supported ones (any, on a VM type without
    /// private memory).
    #[error("Unsupported memory attributes {attributes:#x} (supported: {supported:#x})")]
    InvalidAttributes {
        /// The attributes given.
        attributes: u64,
        /// The attributes the VM supports.
        supported: u64,
    },
    /// Non-zero flags (none are defined).
    #[error("Memory attribute flags {0:#x} must be 0")]
    InvalidFlags(u64),
    /// Address or size not page aligned.
    #[error("Memory attribute range {address:#x}+{size:#x} is not page aligned")]
    Unaligned {
        /// Start.
        address: u64,
        /// Size.
        size: u64,
    },
    /// An empty range, or one that wraps.
    #[error("Memory attribute range {address:#x}+{size:#x} is empty or wraps")]
    BadRange {
        /// Start.
        address: u64,
        /// Size.
        size: u64,
    },
}

impl AttributeError {
    /// The errno `KVM_SET_MEMORY_ATTRIBUTES` returns.
    pub fn errno(&self) -> i32 {
        crate::errno::EINVAL
    }
}

/// The attribute map of a VM.
#[derive(Debug)]
pub(crate) struct Attributes {
    map: Snapshot<RangeMap<u64, u64>>,
}

fn range(r: GfnRange) -> Range<u64> {
    r.start.0..r.end.0
}

impl Attributes {
    pub(crate) fn new() -> Self {
        Attributes {
            map: Snapshot::new(Arc::new(RangeMap::new())),
        }
    }

    /// The attributes of `gfn` (lock-free).
    pub(crate) fn get(&self, gfn: Gfn) -> u64 {
        self.map.load().get(&gfn.0).copied().unwrap_or(0)
    }

    /// Whether `gfn` is private.
    pub(crate) fn is_private(&self, gfn: Gfn) -> bool {
        self.get(gfn) & MEMORY_ATTRIBUTE_PRIVATE != 0
    }

    /// Whether every gfn of `r` has exactly `attrs` (KVM's
    /// `kvm_range_has_memory_attributes`).
    pub(crate) fn range_has(&self, r: GfnRange, attrs: u64) -> bool {
        uniform_as(&self.map.load(), r, attrs)
    }

    /// Whether every gfn of `r` has the same attributes.
    pub(crate) fn is_uniform(&self, r: GfnRange) -> bool {
        let map = self.map.load();
        let first = map.get(&r.start.0).copied().unwrap_or(0);
        uniform_as(&map, r, first)
    }

    /// Give every gfn of `r` the attributes `attrs`. Callers hold `slots_lock`.
    pub(crate) fn store(&self, r: GfnRange, attrs: u64) {
        let mut next = (*self.map.load_full()).clone();
        if attrs == 0 {
            next.remove(range(r));
        } else {
            next.insert(range(r), attrs);
        }
        self.map.swap(Arc::new(next));
    }

    /// The gfns inside `within` where the attributes change (range boundaries),
    /// for finding the huge pages that may be mixed.
    pub(crate) fn boundaries(&self, within: GfnRange) -> Vec<Gfn> {
        let map = self.map.load();
        let mut out = Vec::new();
        for (r, _) in map.overlapping(range(within)) {
            for b in [r.start, r.end] {
                if b > within.start.0 && b < within.end.0 {
                    out.push(Gfn(b));
                }
            }
        }
        out
    }
}

fn uniform_as(map: &RangeMap<u64, u64>, r: GfnRange, attrs: u64) -> bool {
    if r.is_empty() {
        return true;
    }
    let want = range(r);
    if attrs == 0 {
        // Shared everywhere: nothing of the range is in the map.
        return map.overlapping(&want).next().is_none();
    }
    // Covered without gaps, every piece with `attrs`.
    map.gaps(&want).next().is_none() && map.overlapping(&want).all(|(_, v)| *v == attrs)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn g(a: u64, b: u64) -> GfnRange {
        GfnRange::new(Gfn(a), Gfn(b))
    }

    #[test]
    fn test_attributes_store_merge_and_query() {
        let a = Attributes::new();
        assert!(a.range_has(g(0, 100), 0));
        a.store(g(10, 20), MEMORY_ATTRIBUTE_PRIVATE);
        a.store(g(20, 30), MEMORY_ATTRIBUTE_PRIVATE);
        assert!(a.is_private(Gfn(10)) && a.is_private(Gfn(29)));
        assert!(!a.is_private(Gfn(30)) && !a.is_private(Gfn(9)));
        assert!(a.range_has(g(10, 30), MEMORY_ATTRIBUTE_PRIVATE));
        assert!(!a.range_has(g(9, 30), MEMORY_ATTRIBUTE_PRIVATE));
        assert!(!a.range_has(g(0, 11), 0));
        assert!(a.is_uniform(g(12, 25)) && !a.is_uniform(g(0, 12)));
        assert_eq!(a.boundaries(g(0, 100)), vec![Gfn(10), Gfn(30)]);
        // Back to shared in the middle: two private ranges remain.
        a.store(g(15, 16), 0);
        assert!(!a.is_private(Gfn(15)) && a.is_private(Gfn(16)));
        assert_eq!(
            a.boundaries(g(0, 100)),
            vec![Gfn(10), Gfn(15), Gfn(16), Gfn(30)]
        );
    }
}

impl crate::vm::Vm {
    /// `KVM_SET_MEMORY_ATTRIBUTES`: give the gfns of `[address, address + size)`
    /// the attributes `attributes` (`MEMORY_ATTRIBUTE_PRIVATE` or 0). Refused
    /// (EINVAL, nothing changed) for unsupported attributes (any, on a VM type
    /// without private memory), non-zero flags, an empty, wrapping or unaligned
    /// range.
    ///
    /// Atomic with respect to faults (reference §7.4): with `slots_lock` held, an
    /// invalidation begins over the range in every memslot it intersects and
    /// their mappings of it are zapped; the new attributes are stored; the
    /// invalidation ends and the huge-page mixed flags are recomputed. A fault
    /// that read the old attributes either finished before the zap (and was
    /// zapped) or finds the invalidation in progress or the sequence moved, and
    /// retries. A change to what the range already has touches nothing.
    pub fn set_memory_attributes(
        &self,
        address: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> Result<(), AttributeError> {
        let vm = &*self.inner;
        let supported = if vm.config.vm_type.has_private_mem() {
            MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        };
        if flags != 0 {
            return Err(AttributeError::InvalidFlags(flags));
        }
        if attributes & !supported != 0 {
            return Err(AttributeError::InvalidAttributes {
                attributes,
                supported,
            });
        }
        let end = address.checked_add(size).filter(|_| size > 0);
        let Some(end) = end else {
            return Err(AttributeError::BadRange { address, size });
        };
        if !address.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(AttributeError::Unaligned { address, size });
        }
        let range = GfnRange::new(Gfn(address / PAGE_SIZE), Gfn(end / PAGE_SIZE));
        let _s = vm.slots.lock();
        if vm.attrs.range_has(range, attributes) {
            return Ok(());
        }
        CounterSet::inc(&vm.stats.attribute_changes);
        let mut hits: Vec<(u16, GfnRange, Arc<Memslot>)> = Vec::new();
        for (as_id, set) in vm.memslots.iter().enumerate() {
            set.load()
                .for_each_gfn_overlap(range, |slot, g| hits.push((as_id as u16, g, slot.clone())));
        }
        let rcu = vm.tdp.rcu.read_lock();
        let ctx = Ctx::new(&vm.stats, &rcu);
        if !hits.is_empty() {
            let mut w = vm.mmu_lock.write(&vm.stats.lock);
            vm.inval.begin(&w);
            let mut batch = FlushBatch::default();
            for (as_id, g, slot) in &hits {
                vm.inval.range_add(*g, &w);
                if !vm.config.knobs.skip_hugepage_range_add {
                    for chunk in huge_chunks_around(slot, *g) {
                        vm.inval.range_add(chunk, &w);
                    }
                }
                if !vm.config.knobs.skip_conversion_zap {
                    vm.unmap_gfn_range(&ctx, &mut w, *as_id, *g, &mut batch);
                }
            }
            batch.flush(vm, &vm.stats);
        }
        vm.config.hooks.run(HookPoint::AttributesZapped {
            start: range.start,
            end: range.end,
        });
        vm.attrs.store(range, attributes);
        if !hits.is_empty() {
            let w = vm.mmu_lock.write(&vm.stats.lock);
            vm.inval.end(&w);
            for (_, g, slot) in &hits {
                vm.update_mixed(slot, *g);
            }
            drop(w);
        }
        Ok(())
    }

    /// The memory attributes of `gfn` (0: shared, or `MEMORY_ATTRIBUTE_PRIVATE`).
    pub fn memory_attributes(&self, gfn: Gfn) -> u64 {
        self.inner.attrs.get(gfn)
    }
}

/// The huge-page chunks at the head and tail of `changed` (a change's part in
/// `slot`) that could be mapped huge now: wholly inside the slot, not marked
/// mixed, and not wholly inside `changed` (those the zap covers). They join
/// the change's invalidation (KVM's `kvm_arch_pre_set_memory_attributes`):
/// until the mixed flags are recomputed after the change, a fault on one of
/// their gfns whose attribute does not change would otherwise pass the
/// locked check and map the whole chunk huge over the changed gfns.
fn huge_chunks_around(slot: &Memslot, changed: GfnRange) -> Vec<GfnRange> {
    let sr = slot.gfn_range();
    let mut out = Vec::new();
    if changed.start.0 >= changed.end.0 {
        return out;
    }
    for level in [Level::M2, Level::G1] {
        let pages = level.pages();
        let head = changed.start.align_down(level);
        let tail = Gfn(changed.end.0 - 1).align_down(level);
        for (i, c) in [head, tail].into_iter().enumerate() {
            if i == 1 && c == head {
                break;
            }
            let chunk = GfnRange::new(c, c.add(pages));
            let inside_slot = chunk.start.0 >= sr.start.0 && chunk.end.0 <= sr.end.0;
            let covered = chunk.start.0 >= changed.start.0 && chunk.end.0 <= changed.end.0;
            if inside_slot && !covered && !slot.is_mixed(c, level) {
                out.push(chunk);
            }
        }
    }
    out
}

#[cfg(all(test, not(loom)))]
mod huge_chunk_tests {
    use super::*;
    use crate::memslot::{classify, Change, MemslotSet, UserMemoryRegion};

    /// A 4 GiB slot at gfn 0 (so 2 MiB and 1 GiB chunks lie wholly in it).
    fn slot() -> Arc<Memslot> {
        let region = UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 4 << 30,
            userspace_addr: 1 << 40,
        };
        match classify(&MemslotSet::new(0), &region, 1, 1 << 34) {
            Ok(Change::Create(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    fn r(start: u64, end: u64) -> GfnRange {
        GfnRange::new(Gfn(start), Gfn(end))
    }

    #[test]
    fn test_huge_chunks_around_a_change_are_its_head_and_tail_that_could_be_huge() {
        let s = slot();
        let g1 = Level::G1.pages();
        // One page inside a chunk: that 2 MiB chunk and its 1 GiB chunk.
        assert_eq!(
            huge_chunks_around(&s, r(700, 701)),
            vec![r(512, 1024), r(0, g1)]
        );
        // Spanning two 2 MiB chunks: head and tail, once each.
        assert_eq!(
            huge_chunks_around(&s, r(1000, 1030)),
            vec![r(512, 1024), r(1024, 1536), r(0, g1)]
        );
        // A whole 2 MiB chunk changes: the zap covers it, only its 1 GiB chunk.
        assert_eq!(huge_chunks_around(&s, r(512, 1024)), vec![r(0, g1)]);
        // The tail in the second 1 GiB chunk.
        assert_eq!(
            huge_chunks_around(&s, r(g1 - 1, g1 + 1)),
            vec![r(g1 - 512, g1), r(g1, g1 + 512), r(0, g1), r(g1, 2 * g1)]
        );
        // A chunk already marked mixed cannot be huge: left out.
        s.set_mixed(Gfn(512), Level::M2, true);
        assert_eq!(huge_chunks_around(&s, r(700, 701)), vec![r(0, g1)]);
        // Nothing for an empty range.
        assert!(huge_chunks_around(&s, r(5, 5)).is_empty());
    }

    #[test]
    fn test_huge_chunks_around_a_change_stay_inside_the_slot() {
        // A slot of 3 MiB at gfn 256: only the 2 MiB chunk at 512 lies in it.
        let region = UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 256 << 12,
            memory_size: 3 << 20,
            userspace_addr: (1 << 40) + (256 << 12),
        };
        let s = match classify(&MemslotSet::new(0), &region, 1, 1 << 34) {
            Ok(Change::Create(s)) => s,
            other => panic!("{other:?}"),
        };
        assert!(huge_chunks_around(&s, r(300, 301)).is_empty());
        assert_eq!(huge_chunks_around(&s, r(600, 601)), vec![r(512, 1024)]);
    }
}
