//! A vCPU's hardware: the EPT page walker and the TLB.
//!
//! The walker reads each entry with an acquire load (entries are published with
//! release stores or compare-and-exchange by the MMU) and, when EPT A/D bits are
//! on, sets Accessed (and Dirty for writes) with a locked update of the entry it
//! read, as the processor does; if the entry changed meanwhile the walk starts
//! over, so a bit is never set on an entry that was zapped or frozen.

use vmmu::spte::ept;
use vmmu::{Access, ErrorCode, Gfn, Gpa, Level, Pfn, Spte};

use crate::host_memory::HostMemory;
use crate::sync::Ordering;
use crate::tlb::{Tlb, Translation};

/// Why an access exited to the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// EPT violation: the translation is missing or forbids the access.
    Violation {
        /// Faulting address.
        gpa: Gpa,
        /// Error code handed to the MMU.
        error: ErrorCode,
    },
    /// EPT misconfiguration: an MMIO entry.
    Misconfig {
        /// Faulting address.
        gpa: Gpa,
    },
    /// The walk followed a frame outside host memory: a corrupted or freed table.
    Wild {
        /// Faulting address.
        gpa: Gpa,
    },
}

/// The walker's view of the loaded root.
#[derive(Clone, Copy, Debug)]
pub struct Mmu {
    /// Root table frame.
    pub root: Pfn,
    /// Root id (TLB tag).
    pub root_id: u64,
    /// Levels.
    pub root_level: Level,
    /// EPT A/D bits enabled.
    pub ad: bool,
}

fn error_code(access: Access, present: bool) -> ErrorCode {
    let mut e = ErrorCode::empty();
    if present {
        e |= ErrorCode::PRESENT;
    }
    if access.contains(Access::WRITE) {
        e |= ErrorCode::WRITE;
    }
    if access.contains(Access::EXEC) {
        e |= ErrorCode::FETCH;
    }
    e
}

/// Walk the tables for `gpa`.
pub fn walk(mem: &HostMemory, mmu: &Mmu, gpa: Gpa, access: Access) -> Result<Translation, Exit> {
    let gfn = gpa.gfn();
    'restart: loop {
        let mut table = mmu.root;
        let mut level = mmu.root_level;
        loop {
            if !mem.contains(table) {
                return Err(Exit::Wild { gpa });
            }
            let sptep = &mem.page(table)[level.index(gfn)];
            let raw = sptep.load(Ordering::Acquire);
            let spte = Spte(raw);
            let rwx = raw & ept::RWX;
            if rwx == 0 {
                return Err(Exit::Violation {
                    gpa,
                    error: error_code(access, false),
                });
            }
            if raw & ept::R == 0 && raw & ept::W != 0 {
                return Err(Exit::Misconfig { gpa });
            }
            let leaf = level == Level::K4 || raw & ept::LARGE != 0;
            if !leaf {
                let Some(lower) = level.lower() else {
                    return Err(Exit::Wild { gpa });
                };
                table = spte.pfn();
                level = lower;
                continue;
            }
            if !spte.allows(access) {
                return Err(Exit::Violation {
                    gpa,
                    error: error_code(access, true),
                });
            }
            let mut dirty = raw & ept::D != 0;
            let mut set_dirty = false;
            if mmu.ad {
                let mut want = ept::A;
                if access.contains(Access::WRITE) {
                    want |= ept::D;
                }
                if raw & want != want {
                    // The processor's locked update of the entry it walked.
                    if sptep
                        .compare_exchange(raw, raw | want, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue 'restart;
                    }
                    set_dirty = !dirty && access.contains(Access::WRITE);
                    dirty |= access.contains(Access::WRITE);
                }
            }
            let offset = gfn.0 & (level.pages() - 1);
            return Ok(Translation {
                pfn: Pfn(spte.pfn().0 + offset),
                perm: spte.permits(),
                dirty,
                level,
                set_dirty,
            });
        }
    }
}

/// How an access was translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// From the TLB.
    Tlb,
    /// By walking the tables (and setting A/D as the access needed).
    Walk,
}

/// Translate through the TLB, walking on a miss (or on a write through a
/// translation cached clean) and caching the result.
pub fn translate(
    mem: &HostMemory,
    tlb: &mut Tlb,
    mmu: &Mmu,
    gpa: Gpa,
    access: Access,
) -> Result<(Translation, Source), Exit> {
    let gfn: Gfn = gpa.gfn();
    if let Some(t) = tlb.lookup(mmu.root_id, gfn) {
        if t.perm.contains(access) && (!access.contains(Access::WRITE) || t.dirty || !mmu.ad) {
            return Ok((t, Source::Tlb));
        }
    }
    let t = walk(mem, mmu, gpa, access)?;
    tlb.insert(mmu.root_id, gfn, t.pfn, t.level, t.perm, t.dirty);
    Ok((t, Source::Walk))
}

/// The leaf entry that maps `gpa` now, read without changing anything (the
/// oracle's view of the tables, not a processor's): `None` if the walk does not
/// reach a present leaf.
pub fn peek_leaf(mem: &HostMemory, mmu: &Mmu, gpa: Gpa) -> Option<(Spte, Level)> {
    let gfn = gpa.gfn();
    let mut table = mmu.root;
    let mut level = mmu.root_level;
    loop {
        if !mem.contains(table) {
            return None;
        }
        let spte = Spte(mem.page(table)[level.index(gfn)].load(Ordering::Acquire));
        if spte.0 & ept::RWX == 0 || !spte.is_shadow_present() {
            return None;
        }
        if level == Level::K4 || spte.0 & ept::LARGE != 0 {
            return Some((spte, level));
        }
        table = spte.pfn();
        level = level.lower()?;
    }
}

#[cfg(test)]
mod tests {
    //! The walker and `translate` on hand-built tables: what each access finds,
    //! which exit it takes, which A/D bits it sets, and when the TLB serves it.

    use super::*;
    use crate::host_memory::{Order, PageState};
    use vmmu::spte::LeafParams;

    struct Tables {
        mem: HostMemory,
        root: Pfn,
        /// Level-3 and level-2 tables on the way to gfn 0 (4 KiB leaves there).
        l3: Pfn,
        l2: Pfn,
        l1: Pfn,
    }

    fn table(mem: &HostMemory) -> Pfn {
        mem.alloc(Order::K4, PageState::Table).unwrap()
    }

    fn set(mem: &HostMemory, t: Pfn, i: usize, s: Spte) {
        mem.page(t)[i].store(s.0, Ordering::Release);
    }

    fn get(mem: &HostMemory, t: Pfn, i: usize) -> Spte {
        Spte(mem.page(t)[i].load(Ordering::Acquire))
    }

    fn leaf(pfn: Pfn, level: Level, writable: bool, ad: bool) -> Spte {
        Spte::leaf(LeafParams {
            pfn,
            level,
            host_writable: writable,
            prefetch: false,
            ad_enabled: ad,
            executable: true,
        })
    }

    fn tables(ad: bool) -> Tables {
        let mem = HostMemory::new(1 << 30, false).unwrap();
        let (root, l3, l2, l1) = (table(&mem), table(&mem), table(&mem), table(&mem));
        set(&mem, root, 0, Spte::table(l3, ad));
        set(&mem, l3, 0, Spte::table(l2, ad));
        set(&mem, l2, 0, Spte::table(l1, ad));
        Tables {
            mem,
            root,
            l3,
            l2,
            l1,
        }
    }

    fn mmu(t: &Tables, ad: bool) -> Mmu {
        Mmu {
            root: t.root,
            root_id: 7,
            root_level: Level::L4,
            ad,
        }
    }

    fn data(t: &Tables) -> Pfn {
        t.mem.alloc(Order::K4, PageState::Data).unwrap()
    }

    #[test]
    fn test_walk_to_a_4k_leaf_sets_accessed_then_dirty_once() {
        let t = tables(true);
        let d = data(&t);
        // A writable leaf as the MMU makes it, then cleaned as a harvest does.
        let clean = Spte(leaf(d, Level::K4, true, true).0 & !(ept::A | ept::D));
        set(&t.mem, t.l1, 5, clean);
        let m = mmu(&t, true);
        let r = walk(&t.mem, &m, Gpa(5 << 12 | 0x18), Access::READ).unwrap();
        assert_eq!(
            (r.pfn, r.level, r.dirty, r.set_dirty),
            (d, Level::K4, false, false)
        );
        assert!(r.perm.contains(Access::WRITE | Access::READ));
        let s = get(&t.mem, t.l1, 5);
        assert!(
            s.0 & ept::A != 0 && s.0 & ept::D == 0,
            "a read sets A only: {s:?}"
        );
        let w = walk(&t.mem, &m, Gpa(5 << 12), Access::WRITE).unwrap();
        assert!(w.dirty && w.set_dirty, "the first write sets D");
        let s = get(&t.mem, t.l1, 5);
        assert!(
            s.0 & ept::D != 0 && s.0 & ept::A != 0,
            "D set, A kept: {s:?}"
        );
        assert_eq!(
            s.0 & !(ept::A | ept::D),
            clean.0 & !(ept::A | ept::D),
            "nothing else changed"
        );
        let w2 = walk(&t.mem, &m, Gpa(5 << 12), Access::WRITE).unwrap();
        assert!(w2.dirty && !w2.set_dirty, "D already set: nothing to log");
    }

    #[test]
    fn test_without_ad_bits_the_walker_sets_nothing() {
        let t = tables(false);
        let d = data(&t);
        let s0 = leaf(d, Level::K4, true, false);
        set(&t.mem, t.l1, 1, s0);
        let m = mmu(&t, false);
        let w = walk(&t.mem, &m, Gpa(1 << 12), Access::WRITE).unwrap();
        assert!(!w.set_dirty);
        assert_eq!(get(&t.mem, t.l1, 1), s0, "the entry is untouched");
    }

    #[test]
    fn test_huge_leaves_translate_with_the_offset_inside() {
        let t = tables(true);
        let big = t.mem.alloc(Order::M2, PageState::Data).unwrap();
        // gfns [512, 1024) by a 2 MiB leaf in the level-2 table's entry 1.
        set(&t.mem, t.l2, 1, leaf(big, Level::M2, true, true));
        let m = mmu(&t, true);
        let r = walk(&t.mem, &m, Gpa((512 + 37) << 12), Access::READ).unwrap();
        assert_eq!((r.pfn, r.level), (Pfn(big.0 + 37), Level::M2));
        let giant = t.mem.alloc(Order::G1, PageState::Data);
        if let Ok(g) = giant {
            // gfns [1 << 18, 2 << 18) by a 1 GiB leaf in the level-3 entry 1.
            set(&t.mem, t.l3, 1, leaf(g, Level::G1, false, true));
            let r = walk(&t.mem, &m, Gpa(((1 << 18) + 1000) << 12), Access::READ).unwrap();
            assert_eq!((r.pfn, r.level), (Pfn(g.0 + 1000), Level::G1));
            assert!(!r.perm.contains(Access::WRITE));
        }
    }

    #[test]
    fn test_exits_say_what_went_wrong() {
        let t = tables(true);
        let d = data(&t);
        set(&t.mem, t.l1, 2, leaf(d, Level::K4, false, true));
        set(&t.mem, t.l1, 3, Spte::mmio(Gfn(3), 0));
        let m = mmu(&t, true);
        // Nothing mapped: a violation without PRESENT, with the access's bits.
        for (access, bits) in [
            (Access::READ, ErrorCode::empty()),
            (Access::WRITE, ErrorCode::WRITE),
            (Access::EXEC, ErrorCode::FETCH),
        ] {
            assert_eq!(
                walk(&t.mem, &m, Gpa(9 << 12), access),
                Err(Exit::Violation {
                    gpa: Gpa(9 << 12),
                    error: bits
                })
            );
        }
        // Mapped read-only: a write is a violation with PRESENT.
        assert_eq!(
            walk(&t.mem, &m, Gpa(2 << 12), Access::WRITE),
            Err(Exit::Violation {
                gpa: Gpa(2 << 12),
                error: ErrorCode::PRESENT | ErrorCode::WRITE
            })
        );
        assert!(walk(&t.mem, &m, Gpa(2 << 12), Access::READ).is_ok());
        // An execute-only leaf (no R, no W) is valid: fetches go through,
        // reads are violations; only W without R is a misconfiguration.
        let xo = Spte((leaf(d, Level::K4, false, true).0 & !(ept::R | ept::W)) | ept::X);
        set(&t.mem, t.l1, 8, xo);
        assert!(walk(&t.mem, &m, Gpa(8 << 12), Access::EXEC).is_ok());
        assert_eq!(
            walk(&t.mem, &m, Gpa(8 << 12), Access::READ),
            Err(Exit::Violation {
                gpa: Gpa(8 << 12),
                error: ErrorCode::PRESENT
            })
        );
        // An MMIO entry is a misconfiguration.
        assert_eq!(
            walk(&t.mem, &m, Gpa(3 << 12), Access::READ),
            Err(Exit::Misconfig { gpa: Gpa(3 << 12) })
        );
        // A link to a frame outside host memory: a wild walk, not a crash.
        set(&t.mem, t.l2, 2, Spte::table(Pfn(1), true));
        assert_eq!(
            walk(&t.mem, &m, Gpa(1024 << 12), Access::READ),
            Err(Exit::Wild {
                gpa: Gpa(1024 << 12)
            })
        );
        assert_eq!(peek_leaf(&t.mem, &m, Gpa(1024 << 12)), None);
    }

    #[test]
    fn test_translate_serves_from_the_tlb_until_a_write_needs_d() {
        let t = tables(true);
        let d = data(&t);
        let clean = Spte(leaf(d, Level::K4, true, true).0 & !ept::D);
        set(&t.mem, t.l1, 4, clean);
        let m = mmu(&t, true);
        let mut tlb = Tlb::default();
        let g = Gpa(4 << 12);
        assert_eq!(
            translate(&t.mem, &mut tlb, &m, g, Access::READ).unwrap().1,
            Source::Walk
        );
        assert_eq!(
            translate(&t.mem, &mut tlb, &m, g, Access::READ).unwrap().1,
            Source::Tlb
        );
        // Cached clean: the write walks to set D, and is cached dirty after.
        let (w, src) = translate(&t.mem, &mut tlb, &m, g, Access::WRITE).unwrap();
        assert_eq!(src, Source::Walk);
        assert!(w.set_dirty);
        assert_eq!(
            translate(&t.mem, &mut tlb, &m, g, Access::WRITE).unwrap().1,
            Source::Tlb
        );
        // The TLB keeps the old translation after the entry goes (no flush yet).
        set(&t.mem, t.l1, 4, Spte::NONPRESENT);
        assert!(translate(&t.mem, &mut tlb, &m, g, Access::WRITE).is_ok());
        tlb.flush_all();
        assert!(translate(&t.mem, &mut tlb, &m, g, Access::WRITE).is_err());
        // Another root's translations are not this one's.
        set(&t.mem, t.l1, 4, clean);
        let _ = translate(&t.mem, &mut tlb, &m, g, Access::READ).unwrap();
        let other = Mmu { root_id: 8, ..m };
        assert_eq!(
            translate(&t.mem, &mut tlb, &other, g, Access::READ)
                .unwrap()
                .1,
            Source::Walk
        );
        // Without A/D bits a write through a cached translation needs no walk.
        let t2 = tables(false);
        let d2 = data(&t2);
        set(&t2.mem, t2.l1, 4, leaf(d2, Level::K4, true, false));
        let m2 = mmu(&t2, false);
        let mut tlb2 = Tlb::default();
        let _ = translate(&t2.mem, &mut tlb2, &m2, g, Access::READ).unwrap();
        assert_eq!(
            translate(&t2.mem, &mut tlb2, &m2, g, Access::WRITE)
                .unwrap()
                .1,
            Source::Tlb
        );
        // A cached translation that does not allow the access walks again.
        set(&t2.mem, t2.l1, 5, leaf(d2, Level::K4, false, false));
        let g5 = Gpa(5 << 12);
        let _ = translate(&t2.mem, &mut tlb2, &m2, g5, Access::READ).unwrap();
        assert!(translate(&t2.mem, &mut tlb2, &m2, g5, Access::WRITE).is_err());
    }

    #[test]
    fn test_peek_leaf_reads_without_setting_bits() {
        let t = tables(true);
        let d = data(&t);
        let clean = Spte(leaf(d, Level::K4, true, true).0 & !(ept::A | ept::D));
        set(&t.mem, t.l1, 6, clean);
        let m = mmu(&t, true);
        assert_eq!(
            peek_leaf(&t.mem, &m, Gpa(6 << 12)),
            Some((clean, Level::K4))
        );
        assert_eq!(get(&t.mem, t.l1, 6), clean, "no A set by a peek");
        assert_eq!(peek_leaf(&t.mem, &m, Gpa(7 << 12)), None);
        set(&t.mem, t.l1, 7, Spte::mmio(Gfn(7), 0));
        assert_eq!(peek_leaf(&t.mem, &m, Gpa(7 << 12)), None, "MMIO is no leaf");
        // An access-tracked entry (RWX cleared, still the MMU's) is not present
        // to the processor.
        let tracked = Spte(leaf(d, Level::K4, true, false).0 & !ept::RWX);
        assert!(tracked.is_shadow_present());
        set(&t.mem, t.l1, 9, tracked);
        assert_eq!(peek_leaf(&t.mem, &m, Gpa(9 << 12)), None);
        let big = t.mem.alloc(Order::M2, PageState::Data).unwrap();
        set(&t.mem, t.l2, 1, leaf(big, Level::M2, true, true));
        assert_eq!(
            peek_leaf(&t.mem, &m, Gpa(600 << 12)).map(|x| x.1),
            Some(Level::M2)
        );
    }
}
