//! A vCPU's last used memslot (KVM's `vcpu->last_used_slot`): faults come in
//! runs on the same slot (a guest sweeping its memory, a loop over one
//! buffer), and checking the slot the previous fault found costs two loads
//! and two compares, where a lookup descends the gfn tree, about 21 levels
//! at 32k slots and most of them cache misses right after an update copied
//! the tree's paths.

use super::{Memslot, MemslotSet};
use crate::types::Gfn;

/// The slot one vCPU's previous lookup found, and the set it came from.
///
/// It is tied to the set by address and generation: a set's generation only
/// grows while it is published and each update publishes a higher one (and
/// sets of different address spaces never share one), so a set that matches
/// both is the very set the slot was found in, and the slot lives as long as
/// that set does. A set replaced by an update never matches again, which is
/// how the cache empties itself (KVM resets its cache on a generation change).
#[derive(Debug)]
pub(crate) struct LastUsedSlot {
    generation: u64,
    set: *const MemslotSet,
    slot: *const Memslot,
}

// SAFETY: the pointers are only compared, and the slot one is dereferenced
// only while its set (matched by address and generation) is borrowed; moving
// the cache to another thread changes neither.
unsafe impl Send for LastUsedSlot {}

impl Default for LastUsedSlot {
    fn default() -> Self {
        LastUsedSlot {
            generation: 0,
            set: std::ptr::null(),
            slot: std::ptr::null(),
        }
    }
}

impl MemslotSet {
    /// [`MemslotSet::lookup`] through a vCPU's last used slot.
    #[inline]
    pub(crate) fn lookup_cached(&self, last: &mut LastUsedSlot, gfn: Gfn) -> Option<&Memslot> {
        last.lookup(self, gfn)
    }
}

impl LastUsedSlot {
    /// The slot of `slots` holding `gfn`: the cached one if it is from this
    /// set and holds `gfn`, else the set's lookup (remembered for next time).
    /// The same answer as `slots.lookup(gfn)`: gfn ranges of a set never
    /// overlap, so the only slot of the set holding `gfn` is the one found.
    #[inline]
    pub(crate) fn lookup<'s>(&mut self, slots: &'s MemslotSet, gfn: Gfn) -> Option<&'s Memslot> {
        let generation = slots.generation();
        if std::ptr::eq(self.set, slots) && self.generation == generation {
            // SAFETY: `slot` was found in `slots` itself (same address and
            // generation, see the type's comment), which holds a reference
            // to it for at least as long as `'s`.
            if let Some(s) = unsafe { self.slot.as_ref() } {
                if s.contains(gfn) {
                    return Some(s);
                }
            }
        }
        let s: &'s Memslot = slots.lookup(gfn)?;
        *self = LastUsedSlot {
            generation,
            set: slots,
            slot: s,
        };
        Some(s)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::{classify, Change, SetOp, UserMemoryRegion};
    use super::*;
    use crate::sync::Arc;

    /// Slot `id` of 16 pages at gfn `id * 0x100`, at host address `hva`.
    fn slot(id: u32, hva: u64) -> Arc<Memslot> {
        let region = UserMemoryRegion {
            slot: id,
            flags: 0,
            guest_phys_addr: u64::from(id) << 20,
            memory_size: 16 << 12,
            userspace_addr: hva,
        };
        match classify(&MemslotSet::new(0), &region, 1, 1 << 40) {
            Ok(Change::Create(s)) => s,
            other => panic!("not a create: {other:?}"),
        }
    }

    fn two_slots() -> MemslotSet {
        let mut set = MemslotSet::new(0);
        for (id, hva) in [(1, 0x1000_0000), (2, 0x2000_0000)] {
            let s = slot(id, hva);
            set.apply(&SetOp::Insert(s));
        }
        set
    }

    fn hva(s: Option<&Memslot>) -> Option<u64> {
        s.map(|s| s.userspace_addr.0)
    }

    #[test]
    fn test_a_hit_is_the_lookup_and_another_slot_or_a_hole_is_looked_up() {
        let set = two_slots();
        let mut c = LastUsedSlot::default();
        for gfn in [0x100, 0x10f, 0x200, 0x20f, 0x105, 0x300, 0x105, 0x110] {
            let want = set.lookup(Gfn(gfn)).map(|s| &**s as *const Memslot);
            let got = c.lookup(&set, Gfn(gfn)).map(|s| s as *const Memslot);
            assert_eq!(got, want, "gfn {gfn:#x}");
        }
    }

    #[test]
    fn test_a_copy_with_the_same_generation_is_another_set() {
        // The next set starts as a copy of the active one, generation and
        // all; a slot cached from the original must not answer for it.
        let set = two_slots();
        let mut c = LastUsedSlot::default();
        assert_eq!(hva(c.lookup(&set, Gfn(0x100))), Some(0x1000_0000));
        let mut next = set.clone();
        assert_eq!(next.generation(), set.generation());
        next.apply(&SetOp::Replace(1, slot(1, 0x3000_0000)));
        assert_eq!(hva(c.lookup(&next, Gfn(0x100))), Some(0x3000_0000));
        assert_eq!(hva(c.lookup(&set, Gfn(0x100))), Some(0x1000_0000));
    }

    #[test]
    fn test_a_set_changed_in_place_under_a_new_generation_is_looked_up_again() {
        // The same address with other contents (a set freed and another
        // allocated where it was): only the generation tells them apart.
        let mut set = two_slots();
        let mut c = LastUsedSlot::default();
        let old = set.lookup(Gfn(0x100)).cloned();
        assert_eq!(hva(c.lookup(&set, Gfn(0x100))), Some(0x1000_0000));
        set.apply(&SetOp::Replace(1, slot(1, 0x3000_0000)));
        set.set_generation(set.generation() + 1);
        assert_eq!(hva(c.lookup(&set, Gfn(0x100))), Some(0x3000_0000));
        set.apply(&SetOp::Remove(2));
        set.set_generation(set.generation() + 1);
        assert_eq!(hva(c.lookup(&set, Gfn(0x200))), None, "deleted");
        drop(old);
    }
}
