//! Address newtypes and mapping levels.
//!
//! Guest frame numbers, host frame numbers, guest physical addresses and host
//! virtual addresses are distinct types so that a gfn can never be passed where a
//! pfn is expected (the classic shadow-paging bug). All are plain `u64` inside.

use std::fmt;

/// Size of a base page (4 KiB).
pub const PAGE_SHIFT: u32 = 12;
/// Size of a base page in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Number of entries in one page-table page.
pub const ENTRIES_PER_TABLE: usize = 512;

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident, $fmt:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($fmt, "{:#x}"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

newtype!(
    /// Guest frame number: a guest physical address shifted right by 12.
    Gfn,
    "gfn:"
);
newtype!(
    /// Host physical frame number.
    Pfn,
    "pfn:"
);
newtype!(
    /// Guest physical address.
    Gpa,
    "gpa:"
);
newtype!(
    /// Host virtual address (an address in the VMM's address space).
    Hva,
    "hva:"
);
newtype!(
    /// Guest virtual (linear) address: what a guest with paging on accesses,
    /// translated by its own page tables to a [`Gpa`].
    Gva,
    "gva:"
);

impl Gpa {
    /// The frame this address lies in.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
}

impl Gfn {
    /// The first byte of the frame.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
    /// Round down to the first gfn of the `level`-sized chunk containing it.
    pub const fn align_down(self, level: Level) -> Gfn {
        Gfn(self.0 & !(level.pages() - 1))
    }
    /// `self + n`, saturating at `u64::MAX`.
    pub const fn add(self, n: u64) -> Gfn {
        Gfn(self.0.saturating_add(n))
    }
}

impl Pfn {
    /// Host physical address of the frame.
    pub const fn hpa(self) -> u64 {
        self.0 << PAGE_SHIFT
    }
}

impl Hva {
    /// `self + bytes`.
    pub const fn add(self, bytes: u64) -> Hva {
        Hva(self.0.wrapping_add(bytes))
    }
}

/// A page-table level, 1 (4 KiB leaves) to 5 (the root of a 5-level table).
///
/// Leaves can exist at levels 1 (4 KiB), 2 (2 MiB) and 3 (1 GiB).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level(u8);

impl Level {
    /// 4 KiB mappings.
    pub const K4: Level = Level(1);
    /// 2 MiB mappings.
    pub const M2: Level = Level(2);
    /// 1 GiB mappings.
    pub const G1: Level = Level(3);
    /// The root of a 4-level table.
    pub const L4: Level = Level(4);
    /// The root of a 5-level table.
    pub const L5: Level = Level(5);
    /// The largest level a leaf can be mapped at (1 GiB).
    pub const MAX_HUGE: Level = Level::G1;

    /// Build from a raw level number, `None` unless `1..=5`.
    pub const fn new(level: u8) -> Option<Level> {
        if level >= 1 && level <= 5 {
            Some(Level(level))
        } else {
            None
        }
    }
    /// The raw level number.
    pub const fn get(self) -> u8 {
        self.0
    }
    /// 4 KiB pages covered by one entry at this level.
    pub const fn pages(self) -> u64 {
        1u64 << (9 * (self.0 as u32 - 1))
    }
    /// Bytes covered by one entry at this level.
    pub const fn bytes(self) -> u64 {
        self.pages() << PAGE_SHIFT
    }
    /// Bit position of the gfn index bits for entries of this level.
    pub const fn gfn_shift(self) -> u32 {
        9 * (self.0 as u32 - 1)
    }
    /// Index of the entry covering `gfn` in a table of this level.
    pub const fn index(self, gfn: Gfn) -> usize {
        ((gfn.0 >> self.gfn_shift()) & 511) as usize
    }
    /// One level down, `None` at 4 KiB.
    pub const fn lower(self) -> Option<Level> {
        if self.0 > 1 {
            Some(Level(self.0 - 1))
        } else {
            None
        }
    }
    /// One level up, `None` above level 5.
    pub const fn upper(self) -> Option<Level> {
        if self.0 < 5 {
            Some(Level(self.0 + 1))
        } else {
            None
        }
    }
    /// Whether leaves may exist at this level.
    pub const fn can_be_leaf(self) -> bool {
        self.0 <= Level::MAX_HUGE.0
    }
    /// Human name of a mapping of this size.
    pub const fn name(self) -> &'static str {
        match self.0 {
            1 => "4K",
            2 => "2M",
            3 => "1G",
            4 => "512G",
            _ => "256T",
        }
    }
}

impl fmt::Debug for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Level({})", self.name())
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A half-open range of guest frames `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GfnRange {
    /// First gfn in the range.
    pub start: Gfn,
    /// One past the last gfn.
    pub end: Gfn,
}

impl GfnRange {
    /// `[start, end)`.
    pub const fn new(start: Gfn, end: Gfn) -> GfnRange {
        GfnRange { start, end }
    }
    /// Whether `gfn` lies in the range.
    pub const fn contains(&self, gfn: Gfn) -> bool {
        gfn.0 >= self.start.0 && gfn.0 < self.end.0
    }
    /// Whether the range is empty.
    pub const fn is_empty(&self) -> bool {
        self.end.0 <= self.start.0
    }
}

/// A half-open range of host virtual addresses `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HvaRange {
    /// First byte.
    pub start: Hva,
    /// One past the last byte.
    pub end: Hva,
}

impl HvaRange {
    /// `[start, end)`.
    pub const fn new(start: Hva, end: Hva) -> HvaRange {
        HvaRange { start, end }
    }
    /// Whether the range is empty.
    pub const fn is_empty(&self) -> bool {
        self.end.0 <= self.start.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_level_pages_and_index() {
        assert_eq!(Level::K4.pages(), 1);
        assert_eq!(Level::M2.pages(), 512);
        assert_eq!(Level::G1.pages(), 512 * 512);
        assert_eq!(Level::G1.bytes(), 1 << 30);
        let gfn = Gfn((3 << 18) | (5 << 9) | 7);
        assert_eq!(Level::K4.index(gfn), 7);
        assert_eq!(Level::M2.index(gfn), 5);
        assert_eq!(Level::G1.index(gfn), 3);
        assert_eq!(gfn.align_down(Level::M2), Gfn((3 << 18) | (5 << 9)));
    }

    #[test]
    fn test_level_new_out_of_range_is_none() {
        assert!(Level::new(0).is_none());
        assert!(Level::new(6).is_none());
        assert_eq!(Level::new(3), Some(Level::G1));
    }
}
