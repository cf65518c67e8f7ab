//! A vCPU's TLB: finite, tagged by root, holding 4 KiB, 2 MiB and 1 GiB
//! translations in direct-mapped arrays (one per size, like separate L1 dTLBs).

use vmmu::{Access, Gfn, Level, Pfn};

/// One cached translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    valid: bool,
    root_id: u64,
    /// First gfn of the mapping.
    gfn: u64,
    /// First frame of the mapping.
    pfn: u64,
    perm: u8,
    /// The entry's Dirty bit was set when this was cached (writes through a clean
    /// cached translation must walk again to set D, as hardware does).
    dirty: bool,
}

/// A hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// 4 KiB frame of the accessed gfn.
    pub pfn: Pfn,
    /// Permissions.
    pub perm: Access,
    /// Dirty already set.
    pub dirty: bool,
    /// Size of the mapping.
    pub level: Level,
    /// This walk set the leaf's Dirty bit (the event PML logs). Never true
    /// for a TLB hit.
    pub set_dirty: bool,
}

/// Capacity of each array.
const N4K: usize = 1536;
const N2M: usize = 64;
const N1G: usize = 8;

/// The TLB.
#[derive(Debug)]
pub struct Tlb {
    k4: Box<[Entry]>,
    m2: Box<[Entry]>,
    g1: Box<[Entry]>,
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// Full flushes.
    pub flushes: u64,
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            k4: vec![Entry::default(); N4K].into_boxed_slice(),
            m2: vec![Entry::default(); N2M].into_boxed_slice(),
            g1: vec![Entry::default(); N1G].into_boxed_slice(),
            hits: 0,
            misses: 0,
            flushes: 0,
        }
    }
}

fn slot(gfn_base: u64, level: Level, n: usize) -> usize {
    let x = gfn_base >> level.gfn_shift();
    (x ^ (x >> 11)) as usize % n
}

impl Tlb {
    fn array(&mut self, level: Level) -> &mut [Entry] {
        match level.get() {
            1 => &mut self.k4,
            2 => &mut self.m2,
            _ => &mut self.g1,
        }
    }

    /// Look up `gfn` for `root_id`.
    pub fn lookup(&mut self, root_id: u64, gfn: Gfn) -> Option<Translation> {
        for level in [Level::K4, Level::M2, Level::G1] {
            let base = gfn.align_down(level).0;
            let arr = self.array(level);
            let n = arr.len();
            let e = arr[slot(base, level, n)];
            if e.valid && e.root_id == root_id && e.gfn == base {
                self.hits += 1;
                return Some(Translation {
                    pfn: Pfn(e.pfn + (gfn.0 - base)),
                    perm: Access::from_bits_truncate(e.perm),
                    dirty: e.dirty,
                    level,
                    set_dirty: false,
                });
            }
        }
        self.misses += 1;
        None
    }

    /// Cache a translation of the `level`-sized mapping containing `gfn`.
    pub fn insert(
        &mut self,
        root_id: u64,
        gfn: Gfn,
        pfn: Pfn,
        level: Level,
        perm: Access,
        dirty: bool,
    ) {
        let base = gfn.align_down(level).0;
        let pbase = pfn.0 - (gfn.0 - base);
        let arr = self.array(level);
        let n = arr.len();
        arr[slot(base, level, n)] = Entry {
            valid: true,
            root_id,
            gfn: base,
            pfn: pbase,
            perm: perm.bits(),
            dirty,
        };
    }

    /// Drop every entry.
    pub fn flush_all(&mut self) {
        for arr in [&mut self.k4, &mut self.m2, &mut self.g1] {
            arr.iter_mut().for_each(|e| e.valid = false);
        }
        self.flushes += 1;
    }

    /// Valid entries (for tests).
    pub fn len(&self) -> usize {
        self.k4
            .iter()
            .chain(self.m2.iter())
            .chain(self.g1.iter())
            .filter(|e| e.valid)
            .count()
    }

    /// Whether no entry is valid.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tlb_hit_miss_and_huge_offsets() {
        let mut t = Tlb::default();
        assert!(t.lookup(1, Gfn(0x200)).is_none());
        t.insert(1, Gfn(0x205), Pfn(0x1005), Level::M2, Access::READ, false);
        let h = t.lookup(1, Gfn(0x2ff)).unwrap();
        assert_eq!(h.pfn, Pfn(0x10ff));
        assert_eq!(h.level, Level::M2);
        assert!(t.lookup(2, Gfn(0x2ff)).is_none(), "tagged by root");
        t.flush_all();
        assert!(t.is_empty());
    }

    #[test]
    fn test_tlb_sizes_counts_and_what_an_entry_keeps() {
        let mut t = Tlb::default();
        assert!(t.is_empty());
        assert_eq!(t.len(), 0);
        t.insert(
            1,
            Gfn(7),
            Pfn(0x77),
            Level::K4,
            Access::READ | Access::WRITE,
            true,
        );
        t.insert(
            1,
            Gfn(0x40123),
            Pfn(0x80123),
            Level::G1,
            Access::READ,
            false,
        );
        assert_eq!(t.len(), 2);
        assert!(!t.is_empty());
        let k = t.lookup(1, Gfn(7)).unwrap();
        assert_eq!((k.pfn, k.level, k.dirty), (Pfn(0x77), Level::K4, true));
        assert!(k.perm.contains(Access::WRITE) && !k.set_dirty);
        assert!(
            t.lookup(1, Gfn(8)).is_none(),
            "a 4 KiB entry covers one page"
        );
        let g = t.lookup(1, Gfn(0x40000 + 0x3ffff)).unwrap();
        assert_eq!((g.pfn, g.level), (Pfn(0x80000 + 0x3ffff), Level::G1));
        assert!(!g.perm.contains(Access::WRITE) && !g.dirty);
        assert!(t.lookup(1, Gfn(0x80000)).is_none(), "past the 1 GiB page");
        assert_eq!((t.hits, t.misses), (2, 2));
        // Inserting again replaces (same slot), it does not add.
        t.insert(1, Gfn(7), Pfn(0x99), Level::K4, Access::READ, false);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(1, Gfn(7)).unwrap().pfn, Pfn(0x99));
        t.flush_all();
        assert_eq!((t.len(), t.flushes), (0, 1));
        assert!(t.lookup(1, Gfn(7)).is_none());
    }

    /// The TLB holds as many translations as it has entries, per size: the
    /// capacity the access-tracking scenario's small-guest case depends on.
    #[test]
    fn test_tlb_capacity_per_page_size() {
        let mut t = Tlb::default();
        for g in 0..N4K as u64 {
            t.insert(1, Gfn(g), Pfn(0x10000 + g), Level::K4, Access::READ, false);
        }
        for g in 0..N2M as u64 {
            t.insert(1, Gfn(g << 9), Pfn(g << 9), Level::M2, Access::READ, false);
        }
        assert_eq!(t.len(), N4K + N2M);
        assert!((0..N4K as u64).all(|g| t
            .lookup(1, Gfn(g))
            .is_some_and(|h| h.level == Level::K4 && h.pfn == Pfn(0x10000 + g))));
        // One more 4 KiB page evicts exactly one (direct-mapped).
        t.insert(1, Gfn(N4K as u64), Pfn(1), Level::K4, Access::READ, false);
        assert_eq!(t.len(), N4K + N2M);
    }
}
