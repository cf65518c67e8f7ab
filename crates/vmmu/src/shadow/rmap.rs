//! Reverse maps: from a gfn to every leaf SPTE that maps it (KVM's
//! `slot->arch.rmap`).
//!
//! One list per (address space, level, gfn of the level's chunk): a 2 MiB
//! leaf is listed under its 2 MiB-aligned gfn at level 2. Only leaves are
//! listed; non-leaf entries are found through each page's parent list.
//!
//! KVM keeps these arrays in the memslots. Here they are one ordered map for
//! the VM, keyed by gfn: a memslot delete or move zaps every shadow page
//! anyway (the fast zap), so nothing ties a list to its slot, and an ordered
//! map answers range walks (invalidations, dirty logging) without visiting
//! the gfns nothing maps.

use std::collections::BTreeMap;

use crate::types::{Gfn, GfnRange, Level, Pfn};

/// Where an SPTE lives: its table page and index.
pub(crate) type SptePos = (Pfn, u16);

/// Every rmap of a VM.
#[derive(Debug, Default)]
pub(crate) struct Rmap {
    lists: BTreeMap<(u16, u8, u64), Vec<SptePos>>,
    /// Entries in all lists (the `pages_*` statistics' sum).
    len: usize,
}

impl Rmap {
    fn key(as_id: u16, level: Level, gfn: Gfn) -> (u16, u8, u64) {
        (as_id, level.get(), gfn.align_down(level).0)
    }

    /// Record that the leaf at `pos` maps `gfn` at `level`.
    pub(crate) fn add(&mut self, as_id: u16, level: Level, gfn: Gfn, pos: SptePos) {
        let list = self.lists.entry(Self::key(as_id, level, gfn)).or_default();
        debug_assert!(!list.contains(&pos), "leaf {pos:?} listed twice");
        list.push(pos);
        self.len += 1;
    }

    /// Forget the leaf at `pos`. Returns whether it was listed.
    pub(crate) fn remove(&mut self, as_id: u16, level: Level, gfn: Gfn, pos: SptePos) -> bool {
        let key = Self::key(as_id, level, gfn);
        let Some(list) = self.lists.get_mut(&key) else {
            return false;
        };
        let Some(i) = list.iter().position(|p| *p == pos) else {
            return false;
        };
        list.swap_remove(i);
        if list.is_empty() {
            self.lists.remove(&key);
        }
        self.len -= 1;
        true
    }

    /// The leaves mapping `gfn` at `level` (its chunk at that level).
    pub(crate) fn get(&self, as_id: u16, level: Level, gfn: Gfn) -> Vec<SptePos> {
        self.lists
            .get(&Self::key(as_id, level, gfn))
            .cloned()
            .unwrap_or_default()
    }

    /// Every leaf at `level` whose chunk overlaps `range`.
    pub(crate) fn in_range(&self, as_id: u16, level: Level, range: GfnRange) -> Vec<SptePos> {
        if range.is_empty() {
            return Vec::new();
        }
        let lo = (as_id, level.get(), range.start.align_down(level).0);
        let hi = (as_id, level.get(), range.end.0);
        self.lists
            .range(lo..hi)
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    }

    /// Leaves listed in all.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The longest list (KVM's `max_mmu_rmap_size`).
    pub(crate) fn longest(&self) -> usize {
        self.lists.values().map(Vec::len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rmap_lists_by_chunk_and_range() {
        let mut r = Rmap::default();
        r.add(0, Level::K4, Gfn(5), (Pfn(1), 5));
        r.add(0, Level::K4, Gfn(5), (Pfn(2), 5));
        r.add(0, Level::M2, Gfn(0x234), (Pfn(3), 1));
        r.add(1, Level::K4, Gfn(5), (Pfn(4), 5));
        assert_eq!(r.get(0, Level::K4, Gfn(5)).len(), 2);
        assert_eq!(r.get(0, Level::M2, Gfn(0x3ff)), vec![(Pfn(3), 1)]);
        assert_eq!(r.get(1, Level::K4, Gfn(5)), vec![(Pfn(4), 5)]);
        let range = GfnRange::new(Gfn(0x300), Gfn(0x301));
        assert_eq!(r.in_range(0, Level::M2, range), vec![(Pfn(3), 1)]);
        assert!(r.in_range(0, Level::K4, range).is_empty());
        assert!(r.remove(0, Level::K4, Gfn(5), (Pfn(1), 5)));
        assert!(!r.remove(0, Level::K4, Gfn(5), (Pfn(1), 5)));
        assert_eq!(r.len(), 3);
        assert_eq!(r.longest(), 1);
    }
}
