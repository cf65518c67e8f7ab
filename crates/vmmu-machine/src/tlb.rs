//! A vCPU's TLB: finite, tagged by root, holding 4 KiB, 2 MiB and 1 GiB
//! translations in direct-mapped arrays (one per size, like separate L1 dTLBs).
//!
//! Two kinds of entries share the arrays, as in a processor with a second
//! stage: guest-physical ones (gfn to frame, used while guest paging is off)
//! and combined ones (a linear page of one PCID, or global, to the guest
//! physical page and the frame). Combined entries are flushed by the guest's
//! own instructions (INVLPG, INVPCID, CR3 loads); every kind by the
//! hypervisor's full flush.

use vmmu::{Access, Gfn, Gpa, Gva, Level, Pfn};

/// One cached translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// The TLB's flush epoch when this was cached: valid while it is the
    /// current one (0: never filled or dropped).
    epoch: u64,
    root_id: u64,
    /// 0: a guest-physical entry; else a combined one of PCID `space - 1`.
    space: u32,
    /// First gfn (guest-physical) or linear page number (combined) of the
    /// mapping.
    gfn: u64,
    /// Combined entries: the first guest frame of the mapping.
    guest_gfn: u64,
    /// Combined entries: what the guest's tables said.
    guest: LinearEntry,
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

/// What a combined entry keeps of the guest's walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearEntry {
    /// Guest rights accumulated down the walk (`paging::acc`).
    pub rights: u8,
    /// The guest leaf was dirty (a write through a clean one walks again).
    pub guest_dirty: bool,
    /// A global translation: any PCID hits it, and only INVLPG or a flush of
    /// global translations removes it.
    pub global: bool,
    /// Size of the guest's page: INVLPG anywhere in it removes the entry.
    pub guest_level: Level,
}

impl Default for LinearEntry {
    fn default() -> Self {
        LinearEntry {
            rights: 0,
            guest_dirty: false,
            global: false,
            guest_level: Level::K4,
        }
    }
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
    /// The current flush epoch: a full flush starts a new one, so it costs
    /// O(1) instead of a write to every entry (128 KiB of them: with a
    /// remote flush every few microseconds in an invalidation storm, the
    /// model's own flushes were most of a fault's latency).
    epoch: u64,
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
            epoch: 1,
        }
    }
}

fn slot(gfn_base: u64, level: Level, n: usize) -> usize {
    let x = gfn_base >> level.gfn_shift();
    (x ^ (x >> 11)) as usize % n
}

/// The slot of a combined entry: the PCID is part of the index, so the same
/// page of two address spaces can be cached at once.
fn linear_slot(page_base: u64, level: Level, n: usize, space: u32) -> usize {
    (slot(page_base, level, n) + space as usize * 389) % n
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
        let epoch = self.epoch;
        for level in [Level::K4, Level::M2, Level::G1] {
            let base = gfn.align_down(level).0;
            let arr = self.array(level);
            let n = arr.len();
            let e = arr[slot(base, level, n)];
            if e.epoch == epoch && e.space == 0 && e.root_id == root_id && e.gfn == base {
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
        let epoch = self.epoch;
        let arr = self.array(level);
        let n = arr.len();
        arr[slot(base, level, n)] = Entry {
            epoch,
            root_id,
            gfn: base,
            pfn: pbase,
            perm: perm.bits(),
            dirty,
            ..Entry::default()
        };
    }

    /// Look up the combined translation of `gva` for PCID `pcid` (or a global
    /// one): what the guest's walk said, the second-stage part, and the guest
    /// physical address.
    pub fn lookup_linear(
        &mut self,
        root_id: u64,
        pcid: u16,
        gva: Gva,
    ) -> Option<(LinearEntry, Translation, Gpa)> {
        let page = gva.0 >> 12;
        let epoch = self.epoch;
        for level in [Level::K4, Level::M2, Level::G1] {
            let base = page & !(level.pages() - 1);
            let arr = self.array(level);
            let n = arr.len();
            // A global translation sits where any PCID looks for it.
            let e = arr[linear_slot(base, level, n, pcid as u32 + 1)];
            let e = if e.epoch == epoch && e.space == pcid as u32 + 1 {
                e
            } else {
                arr[linear_slot(base, level, n, 0)]
            };
            let tagged = e.space == pcid as u32 + 1 || (e.space != 0 && e.guest.global);
            if e.epoch == epoch && tagged && e.root_id == root_id && e.gfn == base {
                self.hits += 1;
                let off = page - base;
                let t = Translation {
                    pfn: Pfn(e.pfn + off),
                    perm: Access::from_bits_truncate(e.perm),
                    dirty: e.dirty,
                    level,
                    set_dirty: false,
                };
                let gpa = Gpa(((e.guest_gfn + off) << 12) | (gva.0 & 0xfff));
                return Some((e.guest, t, gpa));
            }
        }
        self.misses += 1;
        None
    }

    /// Cache the combined translation of `gva` (to `gpa`, then `t`), at the
    /// smaller of the guest's and the second stage's page sizes.
    pub fn insert_linear(
        &mut self,
        root_id: u64,
        pcid: u16,
        gva: Gva,
        gpa: Gpa,
        t: &Translation,
        guest: LinearEntry,
    ) {
        let level = guest.guest_level.min(t.level);
        let pages = level.pages();
        let page = gva.0 >> 12;
        let base = page & !(pages - 1);
        let off = page - base;
        let epoch = self.epoch;
        let arr = self.array(level);
        let n = arr.len();
        let tag = if guest.global { 0 } else { pcid as u32 + 1 };
        arr[linear_slot(base, level, n, tag)] = Entry {
            epoch,
            root_id,
            space: pcid as u32 + 1,
            gfn: base,
            guest_gfn: (gpa.0 >> 12) - off,
            guest,
            pfn: t.pfn.0 - off,
            perm: t.perm.bits(),
            dirty: t.dirty,
        };
    }

    fn retain(&mut self, keep: impl Fn(&Entry) -> bool) {
        let epoch = self.epoch;
        for arr in [&mut self.k4, &mut self.m2, &mut self.g1] {
            arr.iter_mut()
                .filter(|e| e.epoch == epoch && !keep(e))
                .for_each(|e| e.epoch = 0);
        }
    }

    /// INVLPG: drop the combined translations of the guest page holding `gva`
    /// for `pcid`, and global ones (every piece of a guest huge page, whatever
    /// size it was cached at). With `global` false (INVPCID's single-address
    /// form) global translations stay.
    pub fn invalidate_page(&mut self, pcid: u16, gva: Gva, global: bool) {
        let page = gva.0 >> 12;
        self.retain(|e| {
            let tagged = e.space != 0
                && if e.guest.global {
                    global
                } else {
                    e.space == pcid as u32 + 1
                };
            let mask = !(e.guest.guest_level.pages() - 1);
            !tagged || (e.gfn & mask) != (page & mask)
        });
    }

    /// Drop the combined translations of one PCID (`Some`) or of all, keeping
    /// global ones unless `global`.
    pub fn flush_linear(&mut self, pcid: Option<u16>, global: bool) {
        self.retain(|e| {
            if e.space == 0 || (e.guest.global && !global) {
                return true;
            }
            pcid.is_some_and(|p| e.space != p as u32 + 1)
        });
    }

    /// Drop every entry.
    pub fn flush_all(&mut self) {
        // Every entry cached before is of an older epoch now. (At one flush
        // per nanosecond the count would wrap after 584 years.)
        self.epoch += 1;
        self.flushes += 1;
    }

    /// Valid entries (for tests).
    pub fn len(&self) -> usize {
        self.k4
            .iter()
            .chain(self.m2.iter())
            .chain(self.g1.iter())
            .filter(|e| e.epoch == self.epoch)
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

    fn t4k(pfn: u64) -> Translation {
        Translation {
            pfn: Pfn(pfn),
            perm: Access::READ | Access::WRITE,
            dirty: true,
            level: Level::K4,
            set_dirty: false,
        }
    }

    fn guest(level: Level, global: bool) -> LinearEntry {
        LinearEntry {
            rights: 7,
            guest_dirty: true,
            global,
            guest_level: level,
        }
    }

    /// Combined entries: tagged by PCID, global ones seen from any PCID; an
    /// INVLPG anywhere in a guest 2 MiB page drops every 4 KiB piece of it
    /// (the second stage mapped it with small pages), for that PCID only.
    #[test]
    fn test_linear_entries_pcid_global_and_invlpg_of_a_huge_guest_page() {
        let mut t = Tlb::default();
        let base = 0x4000_0000u64; // 2 MiB aligned
        for i in 0..4u64 {
            let gva = Gva(base + i * 4096);
            t.insert_linear(
                1,
                5,
                gva,
                Gpa(0x20_0000 + i * 4096),
                &t4k(0x900 + i),
                guest(Level::M2, false),
            );
            t.insert_linear(
                1,
                6,
                gva,
                Gpa(0x60_0000 + i * 4096),
                &t4k(0xa00 + i),
                guest(Level::M2, false),
            );
        }
        let (e, tr, gpa) = t.lookup_linear(1, 5, Gva(base + 2 * 4096 + 8)).unwrap();
        assert_eq!(
            (tr.pfn, gpa, e.guest_level),
            (Pfn(0x902), Gpa(0x20_2008), Level::M2)
        );
        assert!(t.lookup_linear(1, 7, Gva(base)).is_none(), "another PCID");
        assert!(t.lookup_linear(2, 5, Gva(base)).is_none(), "another root");
        t.invalidate_page(5, Gva(base + 0x1f_f000), true);
        assert!((0..4).all(|i| t.lookup_linear(1, 5, Gva(base + i * 4096)).is_none()));
        assert!((0..4).all(|i| t.lookup_linear(1, 6, Gva(base + i * 4096)).is_some()));
        // Global translations: found from any PCID; kept by a PCID flush and
        // INVPCID's single-address form, dropped by INVLPG or a global flush.
        let g = Gva(0x7000_0000);
        t.insert_linear(1, 6, g, Gpa(0x1000), &t4k(0x77), guest(Level::K4, true));
        assert!(t.lookup_linear(1, 9, g).is_some());
        t.flush_linear(Some(6), false);
        assert!(t.lookup_linear(1, 6, Gva(base)).is_none());
        assert!(t.lookup_linear(1, 6, g).is_some());
        t.invalidate_page(6, g, false);
        assert!(t.lookup_linear(1, 6, g).is_some());
        t.flush_linear(None, false);
        assert!(t.lookup_linear(1, 6, g).is_some());
        t.invalidate_page(3, g, true);
        assert!(t.lookup_linear(1, 6, g).is_none());
        t.insert_linear(1, 6, g, Gpa(0x1000), &t4k(0x77), guest(Level::K4, true));
        t.flush_linear(None, true);
        assert!(t.is_empty());
        // Guest-physical entries are not linear ones.
        t.insert(1, Gfn(0x123), Pfn(0x456), Level::K4, Access::READ, false);
        assert!(t.lookup_linear(1, 0, Gva(0x123 << 12)).is_none());
        t.flush_linear(None, true);
        assert!(
            t.lookup(1, Gfn(0x123)).is_some(),
            "a linear flush keeps guest-physical entries"
        );
    }
}
