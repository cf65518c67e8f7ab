//! The 64-bit second-stage page-table entry (SPTE), EPT layout.
//!
//! Every bit KVM uses is named here, and every transformation of an entry (build a
//! leaf, build a table link, mark for access tracking, restore, write-protect, build
//! an MMIO entry) is a pure function on [`Spte`]. The rest of the MMU never pokes at
//! bits directly, so an NPT layout can later be added behind the same methods.
//!
//! Hardware bits follow the Intel SDM, Vol. 3C §29.3.2 ("EPT Translation Mechanism",
//! tables 29-2..29-6 in recent editions). The software bits live in bits the
//! processor ignores (11, 52..=62) and mirror KVM's choices so that a KVM developer
//! reading a dump sees familiar values.

use bitflags::bitflags;

use crate::types::{Gfn, Level, Pfn, PAGE_SHIFT};

/// Bit masks of the EPT entry format.
pub mod ept {
    /// Read access (bit 0). An entry with bits 2:0 all clear is not present.
    pub const R: u64 = 1 << 0;
    /// Write access (bit 1).
    pub const W: u64 = 1 << 1;
    /// Execute access (bit 2).
    pub const X: u64 = 1 << 2;
    /// The read/write/execute group.
    pub const RWX: u64 = R | W | X;
    /// Memory type field of a leaf (bits 5:3).
    pub const MT_SHIFT: u32 = 3;
    /// Write-back memory type.
    pub const MT_WB: u64 = 6;
    /// Ignore-PAT (bit 6), leaves only.
    pub const IPAT: u64 = 1 << 6;
    /// Leaf at level 2 or 3 (bit 7).
    pub const LARGE: u64 = 1 << 7;
    /// Accessed (bit 8), set by the processor when EPT A/D bits are enabled.
    pub const A: u64 = 1 << 8;
    /// Dirty (bit 9), set by the processor on writes when A/D bits are enabled.
    pub const D: u64 = 1 << 9;
    /// Shadow paging only: user/supervisor (bit 10). Shadow tables keep this
    /// one entry layout, and the processor in shadow mode reads R as present,
    /// W, X (NX clear) and this bit as U/S. TDP entries never set it.
    pub const USER: u64 = 1 << 10;
    /// Software: "KVM considers this a real mapping" (bit 11, ignored by hardware).
    pub const MMU_PRESENT: u64 = 1 << 11;
    /// Physical frame bits 51:12.
    pub const PFN_MASK: u64 = ((1u64 << 52) - 1) & !0xfff;
    /// Software: A/D type field (bits 53:52). 0 = hardware A/D enabled.
    pub const AD_TYPE_MASK: u64 = 3 << 52;
    /// A/D type "disabled": the entry is aged by access tracking instead.
    pub const AD_DISABLED: u64 = 1 << 52;
    /// Software: saved R and X bits of an access-tracked entry start here (54, 56).
    pub const ACC_TRACK_SAVED_SHIFT: u32 = 54;
    /// The R and X bits that access tracking saves (W is deliberately not saved).
    pub const ACC_TRACK_SAVED_BITS: u64 = R | X;
    /// Software: the host allows writes to this page (bit 57).
    pub const HOST_WRITABLE: u64 = 1 << 57;
    /// Software: the MMU allows writes; may be made W without `mmu_lock` (bit 58).
    pub const MMU_WRITABLE: u64 = 1 << 58;
    /// Software, table links only: the table exists because the NX huge page
    /// mitigation kept an instruction fetch from mapping this entry's range
    /// huge, and it is on the VM's list of possible NX huge pages (bit 59;
    /// KVM keeps this as `nx_huge_page_disallowed` in the child page).
    pub const NX_HUGE_DISALLOWED: u64 = 1 << 59;
    /// Suppress #VE (bit 63); set in every not-present entry.
    pub const SUPPRESS_VE: u64 = 1 << 63;
    /// Value of an entry that maps nothing.
    pub const NONPRESENT: u64 = SUPPRESS_VE;
    /// Sentinel stored while one thread owns an entry for a multi-step change.
    /// No RWX bits (not present to hardware), no pfn, no MMU-present bit, and never
    /// equal to an MMIO value.
    pub const FROZEN: u64 = SUPPRESS_VE | 0x5a0;
    /// MMIO entries are W+X without R: an EPT misconfiguration, so the processor
    /// exits with a distinct reason instead of walking further.
    pub const MMIO_VALUE: u64 = W | X;
    /// Bits compared against [`MMIO_VALUE`].
    pub const MMIO_MASK: u64 = RWX | SUPPRESS_VE;
}

/// Number of memslot-generation bits stored in an MMIO entry.
pub const MMIO_GEN_BITS: u32 = 19;
const MMIO_GEN_LOW_BITS: u32 = 8;
const MMIO_GEN_LOW_SHIFT: u32 = 3;
const MMIO_GEN_HIGH_SHIFT: u32 = 52;
/// Mask applied to a memslot generation before storing it in an MMIO entry.
pub const MMIO_GEN_MASK: u64 = (1 << MMIO_GEN_BITS) - 1;

bitflags! {
    /// Kinds of access, as a guest makes them and as an entry permits them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Access: u8 {
        /// Load.
        const READ = 1;
        /// Store.
        const WRITE = 2;
        /// Instruction fetch.
        const EXEC = 4;
    }
}

/// One second-stage page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Spte(pub u64);

impl std::fmt::Debug for Spte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spte({:#018x}", self.0)?;
        if self.is_frozen() {
            write!(f, " FROZEN")?;
        } else if self.is_mmio() {
            write!(f, " MMIO gfn={:#x}", self.mmio_gfn().0)?;
        } else if self.is_shadow_present() {
            write!(f, " pfn={:#x}", self.pfn().0)?;
            for (bit, name) in [
                (ept::R, "R"),
                (ept::W, "W"),
                (ept::X, "X"),
                (ept::LARGE, "L"),
                (ept::A, "A"),
                (ept::D, "D"),
                (ept::HOST_WRITABLE, "Hw"),
                (ept::MMU_WRITABLE, "Mw"),
            ] {
                if self.0 & bit != 0 {
                    write!(f, " {name}")?;
                }
            }
        }
        write!(f, ")")
    }
}

/// What a leaf entry is built from.
#[derive(Clone, Copy, Debug)]
pub struct LeafParams {
    /// Frame mapped (aligned to the level).
    pub pfn: Pfn,
    /// Level of the leaf.
    pub level: Level,
    /// The host allows writes (slot not read-only, host mapping writable).
    pub host_writable: bool,
    /// Create the entry "old" (not accessed), as KVM does for prefetches.
    pub prefetch: bool,
    /// Hardware A/D bits are in use; otherwise the entry is aged by access tracking.
    pub ad_enabled: bool,
    /// Allow execution (false for the NX huge page workaround).
    pub executable: bool,
}

impl Spte {
    /// The not-present value new tables are filled with.
    pub const NONPRESENT: Spte = Spte(ept::NONPRESENT);
    /// The frozen sentinel.
    pub const FROZEN: Spte = Spte(ept::FROZEN);

    /// Build a leaf entry following KVM's `make_spte` for direct (TDP) mappings.
    #[inline(always)]
    pub fn leaf(p: LeafParams) -> Spte {
        let mut v = ept::MMU_PRESENT | ept::R;
        if !p.ad_enabled {
            v |= ept::AD_DISABLED;
        }
        if p.executable {
            v |= ept::X;
        }
        if p.level > Level::K4 {
            v |= ept::LARGE;
        }
        v |= (ept::MT_WB << ept::MT_SHIFT) | ept::IPAT;
        v |= p.pfn.hpa() & ept::PFN_MASK;
        if !p.prefetch {
            v |= ept::A;
        }
        if p.host_writable {
            // A writable TDP entry is created dirty: the page may be written
            // without another exit, so it must be treated as written now.
            v |= ept::HOST_WRITABLE | ept::MMU_WRITABLE | ept::W | ept::D;
        }
        let s = Spte(v);
        if p.prefetch {
            s.mark_old()
        } else {
            s
        }
    }

    /// Build a non-leaf entry linking a child table. Upper levels are fully
    /// permissive; the leaf decides.
    pub fn table(child: Pfn, ad_enabled: bool) -> Spte {
        let mut v = ept::MMU_PRESENT | ept::RWX | (child.hpa() & ept::PFN_MASK);
        if ad_enabled {
            v |= ept::A;
        } else {
            v |= ept::AD_DISABLED;
        }
        Spte(v)
    }

    /// This table link marked as standing for a possible NX huge page.
    pub const fn with_nx_disallowed(self) -> Spte {
        Spte(self.0 | ept::NX_HUGE_DISALLOWED)
    }

    /// This table link without the NX huge page mark.
    pub const fn without_nx_disallowed(self) -> Spte {
        Spte(self.0 & !ept::NX_HUGE_DISALLOWED)
    }

    /// A table link whose table stands for a possible NX huge page: faults
    /// that would map its range huge go below it instead, until the NX
    /// recovery worker zaps it.
    pub const fn is_nx_disallowed(self, level: Level) -> bool {
        self.is_table(level) && self.0 & ept::NX_HUGE_DISALLOWED != 0
    }

    /// Build a shadow-paging leaf: a [`Spte::leaf`] whose rights are cut down
    /// to what the guest's entries allow (`write`, `user`, `exec`). Without
    /// `write` the entry is neither writable nor MMU-writable (a write must
    /// fault: the guest forbids it, its entry is clean, or the gfn is a guest
    /// page table).
    pub fn shadow_leaf(p: LeafParams, write: bool, user: bool, exec: bool) -> Spte {
        let mut s = Spte::leaf(LeafParams {
            executable: p.executable && exec,
            ..p
        });
        if !write {
            s = Spte(s.0 & !(ept::W | ept::MMU_WRITABLE | ept::D));
        }
        if user {
            s = Spte(s.0 | ept::USER);
        }
        s
    }

    /// A shadow leaf with its rights narrowed or widened to (`write`,
    /// `user`, `exec`); frame, A/D and the other bits stay. Without `write`
    /// the entry loses W and MMU-writable (nothing may make it writable
    /// without a fault); with it the write bits stay as they are, as a sync
    /// never grants a write right the leaf did not have.
    pub fn with_shadow_rights(self, write: bool, user: bool, exec: bool) -> Spte {
        let mut v = self.0 & !(ept::USER | ept::X);
        if !write {
            v &= !(ept::W | ept::MMU_WRITABLE);
        }
        if user {
            v |= ept::USER;
        }
        if exec {
            v |= ept::X;
        }
        Spte(v)
    }

    /// Build a shadow-paging non-leaf entry: fully permissive (U/S included);
    /// the leaf decides.
    pub fn shadow_table(child: Pfn, ad_enabled: bool) -> Spte {
        Spte(Spte::table(child, ad_enabled).0 | ept::USER)
    }

    /// Shadow paging: the entry allows user-mode accesses.
    pub fn is_user(self) -> bool {
        self.0 & ept::USER != 0
    }

    /// Build an MMIO entry caching "gfn has no memslot" for memslot generation `gen`.
    pub fn mmio(gfn: Gfn, gen: u64) -> Spte {
        let gen = gen & MMIO_GEN_MASK;
        let low = gen & ((1 << MMIO_GEN_LOW_BITS) - 1);
        let high = gen >> MMIO_GEN_LOW_BITS;
        Spte(
            ept::MMIO_VALUE
                | (low << MMIO_GEN_LOW_SHIFT)
                | (high << MMIO_GEN_HIGH_SHIFT)
                | ((gfn.0 << PAGE_SHIFT) & ept::PFN_MASK),
        )
    }

    /// The raw value.
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// KVM installed this entry (leaf or table); false for not-present, MMIO, frozen.
    pub const fn is_shadow_present(self) -> bool {
        self.0 & ept::MMU_PRESENT != 0
    }
    /// The frozen sentinel.
    pub const fn is_frozen(self) -> bool {
        self.0 == ept::FROZEN
    }
    /// An MMIO entry.
    pub const fn is_mmio(self) -> bool {
        self.0 & ept::MMIO_MASK == ept::MMIO_VALUE
    }
    /// A present entry that maps a page at `level` (as opposed to linking a table).
    pub const fn is_leaf(self, level: Level) -> bool {
        self.is_shadow_present() && (level.get() == 1 || self.0 & ept::LARGE != 0)
    }
    /// A present entry linking a child table.
    pub const fn is_table(self, level: Level) -> bool {
        self.is_shadow_present() && level.get() > 1 && self.0 & ept::LARGE == 0
    }
    /// Frame mapped by a leaf, or the child table of a non-leaf.
    pub const fn pfn(self) -> Pfn {
        Pfn((self.0 & ept::PFN_MASK) >> PAGE_SHIFT)
    }
    /// Hardware execute permission.
    pub const fn is_executable(self) -> bool {
        self.0 & ept::X != 0
    }
    /// Hardware write permission.
    pub const fn is_writable(self) -> bool {
        self.0 & ept::W != 0
    }
    /// The host allows writes.
    pub const fn is_host_writable(self) -> bool {
        self.0 & ept::HOST_WRITABLE != 0
    }
    /// The MMU allows writes (W may be set without `mmu_lock`).
    pub const fn is_mmu_writable(self) -> bool {
        self.0 & ept::MMU_WRITABLE != 0
    }
    /// Hardware A/D bits are used for this entry.
    pub const fn ad_enabled(self) -> bool {
        self.0 & ept::AD_TYPE_MASK == 0
    }
    /// Accessed ("young").
    pub const fn is_accessed(self) -> bool {
        self.0 & ept::A != 0
    }
    /// Dirty.
    pub const fn is_dirty(self) -> bool {
        self.0 & ept::D != 0
    }
    /// A present entry with A/D disabled whose R/W/X bits were stripped so the next
    /// access faults and reports it (access tracking).
    pub const fn is_access_tracked(self) -> bool {
        self.is_shadow_present() && !self.ad_enabled() && self.0 & ept::RWX == 0
    }

    /// The accesses this entry lets hardware perform.
    pub fn permits(self) -> Access {
        let mut a = Access::empty();
        if self.0 & ept::R != 0 {
            a |= Access::READ;
        }
        if self.0 & ept::W != 0 {
            a |= Access::WRITE;
        }
        if self.0 & ept::X != 0 {
            a |= Access::EXEC;
        }
        a
    }

    /// Whether every access in `want` is allowed.
    pub fn allows(self, want: Access) -> bool {
        self.permits().contains(want)
    }

    /// Mark an entry "old" so aging can tell whether it is used again: clear A when
    /// A/D are enabled, otherwise save R/X and strip all permissions.
    pub fn mark_old(self) -> Spte {
        if self.ad_enabled() {
            return Spte(self.0 & !ept::A);
        }
        if self.is_access_tracked() {
            return self;
        }
        let saved = (self.0 & ept::ACC_TRACK_SAVED_BITS) << ept::ACC_TRACK_SAVED_SHIFT;
        Spte((self.0 & !(ept::RWX | ept::A)) | saved)
    }

    /// Undo [`Spte::mark_old`] for an access-tracked entry: restore R/X (never W)
    /// and mark it accessed.
    pub fn restore_access_tracked(self) -> Spte {
        let saved = (self.0 >> ept::ACC_TRACK_SAVED_SHIFT) & ept::ACC_TRACK_SAVED_BITS;
        let cleared = self.0 & !(ept::ACC_TRACK_SAVED_BITS << ept::ACC_TRACK_SAVED_SHIFT);
        Spte(cleared | saved | ept::A)
    }

    /// Clear hardware W but keep MMU-writable: write-protection for dirty logging,
    /// undone by the fast page-fault path without `mmu_lock`.
    pub fn write_protect(self) -> Spte {
        Spte(self.0 & !ept::W)
    }

    /// Clear W and MMU-writable: only a locked path may make it writable again.
    pub fn write_protect_mmu(self) -> Spte {
        Spte(self.0 & !(ept::W | ept::MMU_WRITABLE))
    }

    /// Set W (and D) on an MMU-writable entry.
    pub fn make_writable(self) -> Spte {
        debug_assert!(self.is_mmu_writable());
        Spte(self.0 | ept::W | ept::D)
    }

    /// Give a leaf execute permission (a 4 KiB child of a split huge leaf that the
    /// NX mitigation had made non-executable). An access-tracked entry gets the
    /// saved X bit instead, so it stays not-present until its next access.
    pub fn make_executable(self) -> Spte {
        if self.is_access_tracked() {
            Spte(self.0 | (ept::X << ept::ACC_TRACK_SAVED_SHIFT))
        } else {
            Spte(self.0 | ept::X)
        }
    }

    /// A huge leaf at `level` (2 MiB or 1 GiB) built from this 4 KiB or huge
    /// child leaf: the same permissions and A/D bits, the frame aligned down to
    /// the huge page (KVM's `make_huge_spte`, for recovering huge pages in
    /// place when dirty logging is turned off).
    pub fn huge_from_child(self, level: Level) -> Spte {
        let pfn = Pfn(self.pfn().0 & !(level.pages() - 1));
        Spte((self.0 & !ept::PFN_MASK) | (pfn.hpa() & ept::PFN_MASK) | ept::LARGE)
    }

    /// Without execute permission (the NX mitigation on a huge leaf).
    pub fn make_non_executable(self) -> Spte {
        Spte(self.0 & !ept::X & !(ept::X << ept::ACC_TRACK_SAVED_SHIFT))
    }

    /// Child `index` of this huge leaf when split into a table of `child_level`.
    pub fn split_child(self, child_level: Level, index: usize) -> Spte {
        let pfn = Pfn(self.pfn().0 + index as u64 * child_level.pages());
        let mut v = (self.0 & !ept::PFN_MASK) | (pfn.hpa() & ept::PFN_MASK);
        if child_level == Level::K4 {
            v &= !ept::LARGE;
        }
        Spte(v)
    }

    /// The gfn cached in an MMIO entry.
    pub const fn mmio_gfn(self) -> Gfn {
        Gfn((self.0 & ept::PFN_MASK) >> PAGE_SHIFT)
    }

    /// The memslot generation stored in an MMIO entry.
    pub const fn mmio_gen(self) -> u64 {
        let low = (self.0 >> MMIO_GEN_LOW_SHIFT) & ((1 << MMIO_GEN_LOW_BITS) - 1);
        let high =
            (self.0 >> MMIO_GEN_HIGH_SHIFT) & ((1 << (MMIO_GEN_BITS - MMIO_GEN_LOW_BITS)) - 1);
        low | (high << MMIO_GEN_LOW_BITS)
    }

    /// Whether a writer must replace this entry atomically because other agents may
    /// change it without `mmu_lock`: the processor setting D on a W entry, the fast
    /// page-fault path setting W on an MMU-writable entry or restoring an
    /// access-tracked one. (KVM's `spte_needs_atomic_update`; A alone is excluded,
    /// a lost A only makes a page look older.)
    pub const fn needs_atomic_update(self) -> bool {
        if !self.is_shadow_present() {
            return false;
        }
        (self.is_mmu_writable() && !self.is_writable())
            || !self.ad_enabled()
            || (self.is_writable() && !self.is_dirty())
    }

    /// Only four combinations of host-writable / MMU-writable / W are legal:
    /// 111 (writable), 110 (write-protected, fast-path fixable), 100 (protected by
    /// the shadow MMU), 000 (read-only host mapping).
    pub const fn writable_bits_are_legal(self) -> bool {
        let h = self.is_host_writable();
        let m = self.is_mmu_writable();
        let w = self.is_writable();
        matches!(
            (h, m, w),
            (true, true, true) | (true, true, false) | (true, false, false) | (false, false, false)
        )
    }
}

/// A leaf change needs an immediate remote TLB flush iff the old entry could be used
/// by hardware for something the new one no longer allows: a present leaf goes away,
/// changes frame, or an MMU-writable entry loses writability.
pub fn leaf_change_needs_flush(old: Spte, new: Spte) -> bool {
    if !old.is_shadow_present() {
        return false;
    }
    if !new.is_shadow_present() || old.pfn() != new.pfn() {
        return true;
    }
    old.is_mmu_writable() && !new.is_mmu_writable()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(level: Level, writable: bool, ad: bool) -> Spte {
        Spte::leaf(LeafParams {
            pfn: Pfn(0x1234 & !(level.pages() - 1)),
            level,
            host_writable: writable,
            prefetch: false,
            ad_enabled: ad,
            executable: true,
        })
    }

    #[test]
    fn test_spte_nonpresent_and_frozen_are_not_present_to_hardware() {
        for s in [Spte::NONPRESENT, Spte::FROZEN] {
            assert_eq!(s.raw() & ept::RWX, 0);
            assert!(!s.is_shadow_present());
            assert!(!s.is_mmio());
            assert_eq!(s.pfn(), Pfn(0));
        }
        assert!(Spte::FROZEN.is_frozen());
        assert!(!Spte::NONPRESENT.is_frozen());
    }

    #[test]
    fn test_spte_writable_leaf_has_all_write_bits_and_is_legal() {
        let s = leaf(Level::K4, true, true);
        assert!(s.is_shadow_present() && s.is_leaf(Level::K4));
        assert!(s.is_writable() && s.is_mmu_writable() && s.is_host_writable());
        assert!(s.is_accessed() && s.is_dirty());
        assert!(s.writable_bits_are_legal());
        assert_eq!(s.pfn(), Pfn(0x1234));
        assert_eq!(s.permits(), Access::READ | Access::WRITE | Access::EXEC);
    }

    #[test]
    fn test_spte_readonly_leaf_is_not_writable() {
        let s = leaf(Level::K4, false, true);
        assert!(!s.is_writable() && !s.is_mmu_writable() && !s.is_host_writable());
        assert!(s.writable_bits_are_legal());
        assert!(!s.allows(Access::WRITE));
        assert!(s.allows(Access::READ));
    }

    #[test]
    fn test_spte_huge_leaf_sets_large_bit_and_splits_into_children() {
        let s = leaf(Level::M2, true, true);
        assert!(s.is_leaf(Level::M2));
        assert!(!s.is_table(Level::M2));
        let c = s.split_child(Level::K4, 7);
        assert!(c.is_leaf(Level::K4));
        assert_eq!(c.raw() & ept::LARGE, 0);
        assert_eq!(c.pfn(), Pfn(s.pfn().0 + 7));
        let g = leaf(Level::G1, true, true);
        let c2 = g.split_child(Level::M2, 3);
        assert!(c2.is_leaf(Level::M2));
        assert_eq!(c2.pfn(), Pfn(g.pfn().0 + 3 * 512));
    }

    #[test]
    fn test_spte_table_link_is_permissive_non_leaf() {
        let t = Spte::table(Pfn(99), true);
        assert!(t.is_table(Level::L4));
        assert!(!t.is_leaf(Level::M2));
        assert_eq!(t.pfn(), Pfn(99));
        assert_eq!(t.permits(), Access::all());
    }

    #[test]
    fn test_spte_mmio_roundtrips_gfn_and_generation() {
        for gen in [0u64, 1, 0xff, 0x100, 0x7ffff, 0x12345] {
            let s = Spte::mmio(Gfn(0xabcde), gen);
            assert!(s.is_mmio());
            assert!(!s.is_shadow_present());
            assert_eq!(s.mmio_gfn(), Gfn(0xabcde));
            assert_eq!(s.mmio_gen(), gen & MMIO_GEN_MASK);
            assert!(!s.allows(Access::READ), "MMIO entries must fault");
        }
        assert_eq!(Spte::mmio(Gfn(1), 1 << 19).mmio_gen(), 0);
    }

    #[test]
    fn test_spte_access_tracking_saves_rx_and_restores_without_w() {
        let s = leaf(Level::K4, true, false);
        let old = s.mark_old();
        assert!(old.is_access_tracked());
        assert!(old.is_shadow_present());
        assert_eq!(old.raw() & ept::RWX, 0);
        assert!(!old.is_accessed());
        let back = old.restore_access_tracked();
        assert!(back.allows(Access::READ | Access::EXEC));
        assert!(
            !back.is_writable(),
            "W is never restored by access tracking"
        );
        assert!(back.is_mmu_writable());
        assert!(back.is_accessed());
        assert_eq!(back.make_writable().permits(), Access::all());
        assert_eq!(back.pfn(), s.pfn());
    }

    #[test]
    fn test_spte_mark_old_with_ad_only_clears_accessed() {
        let s = leaf(Level::K4, true, true);
        let old = s.mark_old();
        assert!(!old.is_accessed());
        assert_eq!(old.raw() | ept::A, s.raw());
    }

    #[test]
    fn test_spte_write_protect_keeps_mmu_writable() {
        let s = leaf(Level::K4, true, true).write_protect();
        assert!(!s.is_writable() && s.is_mmu_writable());
        assert!(s.writable_bits_are_legal());
        assert!(s.needs_atomic_update());
        let p = s.write_protect_mmu();
        assert!(!p.is_mmu_writable() && p.is_host_writable());
        assert!(p.writable_bits_are_legal());
        assert!(!Spte(ept::MMU_PRESENT | ept::W).writable_bits_are_legal());
    }

    #[test]
    fn test_spte_needs_atomic_update_rules() {
        let w = leaf(Level::K4, true, true);
        assert!(
            !w.needs_atomic_update(),
            "W+D: nothing can change it locklessly"
        );
        let w_clean = Spte(w.raw() & !ept::D);
        assert!(w_clean.needs_atomic_update(), "CPU may set D");
        let ro = leaf(Level::K4, false, true);
        assert!(!ro.needs_atomic_update());
        assert!(leaf(Level::K4, false, false).needs_atomic_update());
        assert!(!Spte::NONPRESENT.needs_atomic_update());
    }

    #[test]
    fn test_leaf_change_needs_flush() {
        let w = leaf(Level::K4, true, true);
        assert!(leaf_change_needs_flush(w, Spte::NONPRESENT));
        assert!(leaf_change_needs_flush(w, w.write_protect_mmu()));
        assert!(!leaf_change_needs_flush(w, w.write_protect()));
        assert!(!leaf_change_needs_flush(Spte::NONPRESENT, w));
        assert!(!leaf_change_needs_flush(w, w.mark_old()));
    }
}
