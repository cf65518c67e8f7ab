//! A memslot set: the slots of one address space, indexed by gfn range,
//! host range and id, and how an update changes it.

use std::ops::ControlFlow;

use imbl::OrdMap;

use super::hva_span_to_gfns;
use super::slot_tree::SlotTree;
use super::Memslot;
use crate::sync::{Arc, AtomicU64, Ordering};
use crate::types::{Gfn, GfnRange, HvaRange, PAGE_SIZE};

/// The memslots of one address space.
///
/// The indexes are persistent trees (the gfn and host-range interval trees
/// of `slot_tree`, an `imbl::OrdMap` from id to first gfn): a copy shares all nodes with
/// its original, and a change copies only the paths to what it changes. An
/// update then costs O(log n) whatever the slot count, also when the retired
/// set is still held by a reader and the next update has to start from a
/// copy (KVM gets the same from its two sets of trees, changed in place).
#[derive(Debug)]
pub struct MemslotSet {
    generation: AtomicU64,
    /// By gfn range; gfn ranges never overlap.
    by_gfn: SlotTree,
    /// By host range; host ranges may overlap (aliases).
    by_hva: SlotTree,
    /// Each slot's first gfn, by id; the slot itself is then the gfn tree's.
    /// Plain numbers, not references to the slots: `imbl` copies a whole
    /// node (up to 64 entries) per level an update changes, and copying
    /// references made each copy 64 reference-count increments (and as many
    /// decrements when the retired set went), a third of a memslot move at
    /// 32k slots.
    by_id: OrdMap<u16, u64>,
    /// Pages of all slots (the shadow MMU's default page limit is a share of
    /// it, asked for on every fault that makes pages).
    pages: u64,
}

impl Clone for MemslotSet {
    fn clone(&self) -> Self {
        MemslotSet {
            generation: AtomicU64::new(self.generation()),
            by_gfn: self.by_gfn.clone(),
            by_hva: self.by_hva.clone(),
            by_id: self.by_id.clone(),
            pages: self.pages,
        }
    }
}

impl MemslotSet {
    pub(crate) fn new(as_id: u16) -> Self {
        MemslotSet {
            generation: AtomicU64::new(as_id as u64),
            by_gfn: SlotTree::default(),
            by_hva: SlotTree::default(),
            by_id: OrdMap::new(),
            pages: 0,
        }
    }

    /// The set's generation (bit 63 set while an update is being published).
    pub fn generation(&self) -> u64 {
        // Acquire: pairs with the Release store that finishes an update.
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn set_generation(&self, gen: u64) {
        self.generation.store(gen, Ordering::Release);
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.by_gfn.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.by_gfn.len() == 0
    }

    /// The slot containing `gfn`.
    ///
    /// Never inlined, so `benches/fault_cost.sh` can count a lookup's
    /// instructions and the lookups per fault (a call costs a few
    /// instructions; KVM's `kvm_vcpu_gfn_to_memslot` is a call too).
    #[inline(never)]
    pub fn lookup(&self, gfn: Gfn) -> Option<&Arc<Memslot>> {
        self.by_gfn.holding(gfn.0)
    }

    /// The slot with this id.
    pub fn by_id(&self, id: u16) -> Option<&Arc<Memslot>> {
        // Every slot has pages (a size of 0 deletes), so its first gfn is
        // its own.
        let gfn = *self.by_id.get(&id)?;
        self.by_gfn.holding(gfn).filter(|s| s.id == id)
    }

    /// All slots in gfn order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Memslot>> {
        self.by_gfn.iter()
    }

    /// Slots whose host range intersects `range`, with the intersecting gfns.
    pub fn for_each_hva_overlap(
        &self,
        range: HvaRange,
        mut f: impl FnMut(&Arc<Memslot>, GfnRange),
    ) {
        // The gfns from the tree's nodes (`Hit`), not from the slots: at 32k
        // slots reading each slot was a cache miss per hit.
        let _ = self
            .by_hva
            .try_for_each_hit(range.start.0, range.end.0, |h| {
                if let Some(g) = hva_span_to_gfns(range, h.start, h.end, h.base) {
                    f(h.slot, g);
                }
                ControlFlow::Continue(())
            });
    }

    /// Whether some slot's host range maps part of `range` (stops at the
    /// first).
    pub fn any_hva_overlap(&self, range: HvaRange) -> bool {
        self.by_hva
            .try_for_each_hit(range.start.0, range.end.0, |h| {
                match hva_span_to_gfns(range, h.start, h.end, h.base) {
                    Some(_) => ControlFlow::Break(()),
                    None => ControlFlow::Continue(()),
                }
            })
            .is_break()
    }

    /// Every slot whose gfns overlap `range`, with the overlapping gfns.
    pub fn for_each_gfn_overlap(
        &self,
        range: GfnRange,
        mut f: impl FnMut(&Arc<Memslot>, GfnRange),
    ) {
        self.by_gfn
            .for_each_overlap(range.start.0, range.end.0, |slot| {
                let start = slot.base_gfn.0.max(range.start.0);
                let end = (slot.base_gfn.0 + slot.npages).min(range.end.0);
                f(slot, GfnRange::new(Gfn(start), Gfn(end)));
            });
    }

    /// The first slot (other than `except`, the slot being changed) whose
    /// gfns overlap `range`.
    pub(super) fn overlapping(
        &self,
        range: GfnRange,
        except: Option<u16>,
    ) -> Option<&Arc<Memslot>> {
        let mut found = None;
        let _ = self
            .by_gfn
            .try_for_each_overlap(range.start.0, range.end.0, |slot| {
                if Some(slot.id) == except {
                    return ControlFlow::Continue(());
                }
                found = Some(slot);
                ControlFlow::Break(())
            });
        found
    }

    fn insert(&mut self, slot: Arc<Memslot>) {
        let (gfn, hva) = (slot.base_gfn.0, slot.userspace_addr.0);
        self.by_gfn
            .insert(gfn, gfn + slot.npages, hva, slot.clone());
        self.by_hva
            .insert(hva, hva + slot.npages * PAGE_SIZE, gfn, slot.clone());
        self.pages += slot.npages;
        self.by_id.insert(slot.id, gfn);
    }

    fn remove(&mut self, id: u16) -> Option<Arc<Memslot>> {
        let slot = self.by_id(id)?.clone();
        self.by_id.remove(&id);
        self.by_gfn.remove(slot.base_gfn.0, slot.id);
        self.by_hva.remove(slot.userspace_addr.0, slot.id);
        self.pages -= slot.npages;
        Some(slot)
    }

    /// Put `slot` in place of slot `id`. An index whose key did not change
    /// (the flags-only update, the invalid copy a delete or move publishes
    /// first, a move's host range) is updated in place: one path copied
    /// instead of a removal and an insertion.
    fn replace(&mut self, id: u16, slot: Arc<Memslot>) {
        let Some(old) = self.by_id(id).cloned() else {
            return self.insert(slot);
        };
        debug_assert_eq!(old.id, slot.id, "a replacement keeps the slot's id");
        let (gfn, hva) = (slot.base_gfn.0, slot.userspace_addr.0);
        if old.base_gfn.0 != gfn {
            self.by_gfn.remove(old.base_gfn.0, id);
        }
        self.by_gfn
            .insert(gfn, gfn + slot.npages, hva, slot.clone());
        if old.userspace_addr.0 != hva {
            self.by_hva.remove(old.userspace_addr.0, id);
        }
        self.by_hva
            .insert(hva, hva + slot.npages * PAGE_SIZE, gfn, slot.clone());
        self.pages = self.pages - old.npages + slot.npages;
        if old.base_gfn.0 != gfn {
            self.by_id.insert(id, gfn);
        }
    }

    /// Pages of all slots together.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Apply one step of an update.
    pub(crate) fn apply(&mut self, op: &SetOp) {
        match op {
            SetOp::Insert(s) => self.insert(s.clone()),
            SetOp::Remove(id) => {
                self.remove(*id);
            }
            SetOp::Replace(id, s) => self.replace(*id, s.clone()),
        }
    }
}

/// One mutation of a set, applied to both copies.
#[derive(Debug, Clone)]
pub(crate) enum SetOp {
    Insert(Arc<Memslot>),
    Remove(u16),
    Replace(u16, Arc<Memslot>),
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::{classify, Change, UserMemoryRegion};
    use super::*;
    use crate::types::Hva;

    /// Slot `id` at `gfn` with `pages` pages at host address `hva`.
    fn slot(id: u32, gfn: u64, pages: u64, hva: u64) -> Arc<Memslot> {
        let region = UserMemoryRegion {
            slot: id,
            flags: 0,
            guest_phys_addr: gfn * PAGE_SIZE,
            memory_size: pages * PAGE_SIZE,
            userspace_addr: hva,
        };
        match classify(&MemslotSet::new(0), &region, 1, 1 << 40) {
            Ok(Change::Create(s)) => s,
            other => panic!("not a create: {other:?}"),
        }
    }

    /// The slots whose host range meets `[start, start + bytes)`, with gfns.
    fn by_hva(set: &MemslotSet, start: u64, bytes: u64) -> Vec<(u16, u64, u64)> {
        let mut v = Vec::new();
        let range = HvaRange::new(Hva(start), Hva(start + bytes));
        set.for_each_hva_overlap(range, |s, g| v.push((s.id, g.start.0, g.end.0)));
        v
    }

    #[test]
    fn test_replace_moves_each_index_whose_key_changed_and_recounts_pages() {
        let mut set = MemslotSet::new(0);
        set.apply(&SetOp::Insert(slot(1, 0x100, 16, 0x1000_0000)));
        set.apply(&SetOp::Insert(slot(2, 0x200, 16, 0x2000_0000)));

        // Same keys (a flags change, an invalid copy): still one entry each.
        set.apply(&SetOp::Replace(1, slot(1, 0x100, 16, 0x1000_0000)));
        assert_eq!((set.len(), set.iter().count(), set.pages()), (2, 2, 32));

        // A move: the gfn key changes, the host range stays.
        set.apply(&SetOp::Replace(1, slot(1, 0x800, 16, 0x1000_0000)));
        assert!(set.lookup(Gfn(0x100)).is_none(), "the old gfns are gone");
        assert_eq!(set.lookup(Gfn(0x80f)).map(|s| s.id), Some(1));
        assert_eq!(set.iter().count(), 2);
        assert_eq!(by_hva(&set, 0x1000_0000, 4096), [(1, 0x800, 0x801)]);

        // Another host range and size: the old one answers nothing any more,
        // the new one to its last page; the page count follows.
        set.apply(&SetOp::Replace(1, slot(1, 0x800, 32, 0x3000_0000)));
        assert!(by_hva(&set, 0x1000_0000, 16 * 4096).is_empty());
        assert_eq!(
            by_hva(&set, 0x3000_0000 + 31 * 4096, 4096),
            [(1, 0x81f, 0x820)]
        );
        assert!(by_hva(&set, 0x3000_0000 + 32 * 4096, 4096).is_empty());
        assert_eq!(set.pages(), 16 + 32);
        assert_eq!(set.lookup(Gfn(0x81f)).map(|s| s.id), Some(1));
        assert!(set.lookup(Gfn(0x820)).is_none());
    }

    /// The host-range queries answer from the trees' nodes: through random
    /// inserts, moves (gfn or host range), resizes and removals, they agree
    /// with asking every slot, hits and gfns alike.
    #[test]
    fn test_host_range_queries_agree_with_every_slot_through_updates() {
        let mut rng = 11u64;
        let mut next = |n: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let mut set = MemslotSet::new(0);
        let mut live: Vec<u16> = Vec::new();
        for step in 0..2000u32 {
            let id = next(64) as u16;
            // Gfns apart per id, so slots never overlap in gfn; host ranges
            // may alias.
            let gfn = u64::from(id) * 0x1000 + next(4) * 0x100;
            let pages = 1 + next(12);
            let hva = 0x1000_0000 + next(256) * PAGE_SIZE;
            let s = slot(u32::from(id), gfn, pages, hva);
            if live.contains(&id) {
                if next(4) == 0 {
                    set.apply(&SetOp::Remove(id));
                    live.retain(|l| *l != id);
                } else {
                    set.apply(&SetOp::Replace(id, s));
                }
            } else {
                set.apply(&SetOp::Insert(s));
                live.push(id);
            }
            let start = 0x1000_0000 + next(300) * PAGE_SIZE + next(4096);
            let range = HvaRange::new(Hva(start), Hva(start + 1 + next(16 * PAGE_SIZE)));
            let mut got = Vec::new();
            set.for_each_hva_overlap(range, |s, g| got.push((s.id, g)));
            let mut want: Vec<_> = set
                .iter()
                .filter_map(|s| {
                    s.hva_range_to_gfns(range)
                        .map(|g| (s.userspace_addr.0, s.id, g))
                })
                .collect();
            want.sort_by_key(|(h, id, _)| (*h, *id));
            let want: Vec<_> = want.into_iter().map(|(_, id, g)| (id, g)).collect();
            assert_eq!(got, want, "step {step}: {range:?}");
            assert_eq!(set.any_hva_overlap(range), !want.is_empty(), "step {step}");
        }
    }
}
