//! The memslots of an address space by host address: a persistent interval
//! tree, so a notifier's "which slots does this host range touch" costs
//! O(log n + k) however many slots there are and however different their
//! sizes (KVM keeps an interval tree on hva for the same query).
//!
//! A treap keyed by (host start, slot id), each node also holding the
//! largest end below it. Nodes are immutable and shared: a copy of the tree
//! is one reference count, and a change copies only the nodes on the paths
//! it touches (O(log n) expected), which is what lets a memslot set be copied
//! and changed per update without an O(n) cost. Priorities are a hash of the
//! key, so the shape of the tree is a function of its contents.
//!
//! No crate offers a persistent interval tree: `imbl` (used for the other
//! indexes) has ordered maps without augmentation, and the interval-tree
//! crates are mutable in place.

use std::sync::Arc as Shared;

use super::Memslot;
use crate::sync::Arc;
use crate::types::HvaRange;

type Key = (u64, u16);
type Link = Option<Shared<Node>>;

#[derive(Debug)]
struct Node {
    key: Key,
    /// One past the slot's last host byte.
    end: u64,
    slot: Arc<Memslot>,
    prio: u64,
    /// Largest `end` in this subtree.
    max_end: u64,
    left: Link,
    right: Link,
}

fn max_end(l: &Link) -> u64 {
    l.as_ref().map_or(0, |n| n.max_end)
}

/// A copy of `n` with new children.
fn with(n: &Node, left: Link, right: Link) -> Shared<Node> {
    Shared::new(Node {
        key: n.key,
        end: n.end,
        slot: n.slot.clone(),
        prio: n.prio,
        max_end: n.end.max(max_end(&left)).max(max_end(&right)),
        left,
        right,
    })
}

/// Keys below `k` to the left, the rest to the right.
fn split(t: &Link, k: Key) -> (Link, Link) {
    match t {
        None => (None, None),
        Some(n) if n.key < k => {
            let (l, r) = split(&n.right, k);
            (Some(with(n, n.left.clone(), l)), r)
        }
        Some(n) => {
            let (l, r) = split(&n.left, k);
            (l, Some(with(n, r, n.right.clone())))
        }
    }
}

/// Join two trees, every key of `a` below every key of `b`.
fn merge(a: Link, b: Link) -> Link {
    match (a, b) {
        (None, t) | (t, None) => t,
        (Some(a), Some(b)) => Some(if a.prio > b.prio {
            with(&a, a.left.clone(), merge(a.right.clone(), Some(b)))
        } else {
            with(&b, merge(Some(a), b.left.clone()), b.right.clone())
        }),
    }
}

/// The smallest key above `k`.
fn next_key(k: Key) -> Key {
    match k.1.checked_add(1) {
        Some(id) => (k.0, id),
        None => (k.0 + 1, 0),
    }
}

fn prio(k: Key) -> u64 {
    // splitmix64 of the key.
    let mut z = (k.0 ^ (u64::from(k.1) << 48)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The tree (cloning it is O(1)).
#[derive(Debug, Clone, Default)]
pub(crate) struct HvaTree {
    root: Link,
}

impl HvaTree {
    /// Add `slot` (its id must not be in the tree).
    pub(crate) fn insert(&mut self, slot: Arc<Memslot>) {
        let start = slot.userspace_addr.0;
        let key = (start, slot.id);
        let end = start + slot.npages * crate::types::PAGE_SIZE;
        let leaf = Shared::new(Node {
            key,
            end,
            slot,
            prio: prio(key),
            max_end: end,
            left: None,
            right: None,
        });
        let (l, r) = split(&self.root, key);
        // A slot already under this key is replaced.
        let (_, r) = split(&r, next_key(key));
        self.root = merge(merge(l, Some(leaf)), r);
    }

    /// Drop the slot with this host start and id.
    pub(crate) fn remove(&mut self, start: u64, id: u16) {
        let key = (start, id);
        let (l, r) = split(&self.root, key);
        let (_, r) = split(&r, next_key(key));
        self.root = merge(l, r);
    }

    /// Every slot whose host range intersects `range`, in (start, id) order.
    pub(crate) fn for_each_overlap(&self, range: HvaRange, mut f: impl FnMut(&Arc<Memslot>)) {
        fn visit(t: &Link, start: u64, end: u64, f: &mut impl FnMut(&Arc<Memslot>)) {
            let Some(n) = t else { return };
            if n.max_end <= start {
                return;
            }
            visit(&n.left, start, end, f);
            // Everything to the right starts at or after this node.
            if n.key.0 < end {
                if n.end > start {
                    f(&n.slot);
                }
                visit(&n.right, start, end, f);
            }
        }
        if range.start.0 < range.end.0 {
            visit(&self.root, range.start.0, range.end.0, &mut f);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::{classify, Change, MemslotSet, UserMemoryRegion};
    use super::*;
    use crate::types::Hva;

    /// A slot of `pages` pages at host address `hva`.
    fn slot(id: u16, hva: u64, pages: u64) -> Arc<Memslot> {
        let region = UserMemoryRegion {
            slot: u32::from(id),
            flags: 0,
            guest_phys_addr: u64::from(id) << 32,
            memory_size: pages * 4096,
            userspace_addr: hva,
        };
        match classify(&MemslotSet::new(0), &region, 1, 1 << 50) {
            Ok(Change::Create(s)) => s,
            other => panic!("not a create: {other:?}"),
        }
    }

    fn ids(t: &HvaTree, start: u64, end: u64) -> Vec<u16> {
        let mut v = Vec::new();
        t.for_each_overlap(HvaRange::new(Hva(start), Hva(end)), |s| v.push(s.id));
        v
    }

    #[test]
    fn test_overlap_queries_match_a_scan_through_inserts_removes_and_copies() {
        let mut rng = 7u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 33
        };
        let mut t = HvaTree::default();
        let mut all: Vec<(u16, u64, u64)> = Vec::new();
        let mut copies = Vec::new();
        for step in 0..3000u32 {
            if all.len() < 200 && next() % 3 != 0 {
                let id = (step % 30000) as u16;
                // Mostly small slots, a few large ones, aliases allowed.
                let pages = if next() % 16 == 0 {
                    1 + next() % 4096
                } else {
                    1 + next() % 8
                };
                let hva = (next() % 100_000) * 4096;
                t.insert(slot(id, hva, pages));
                all.push((id, hva, hva + pages * 4096));
            } else if !all.is_empty() {
                let (id, hva, _) = all.swap_remove((next() as usize) % all.len());
                t.remove(hva, id);
            }
            if step % 500 == 0 {
                copies.push((t.clone(), all.clone()));
            }
            let a = (next() % 100_000) * 4096;
            let b = a + (1 + next() % 64) * 4096;
            let mut want: Vec<(u64, u16)> = all
                .iter()
                .filter(|(_, s, e)| *s < b && *e > a)
                .map(|(id, s, _)| (*s, *id))
                .collect();
            want.sort();
            let want: Vec<u16> = want.into_iter().map(|(_, id)| id).collect();
            assert_eq!(ids(&t, a, b), want, "step {step}: [{a:#x}, {b:#x})");
        }
        // Copies taken along the way still answer as they did.
        for (c, was) in copies {
            let mut want: Vec<(u64, u16)> = was.iter().map(|(id, s, _)| (*s, *id)).collect();
            want.sort();
            let want: Vec<u16> = want.into_iter().map(|(_, id)| id).collect();
            assert_eq!(ids(&c, 0, u64::MAX), want);
        }
    }

    #[test]
    fn test_one_large_slot_does_not_widen_queries_elsewhere() {
        let mut t = HvaTree::default();
        t.insert(slot(0, 0, 1 << 20));
        for i in 1..1000u16 {
            t.insert(slot(i, (8 << 30) + u64::from(i) * 4096, 1));
        }
        let a = (8 << 30) + 500 * 4096;
        assert_eq!(ids(&t, a, a + 4096), vec![500]);
        assert_eq!(ids(&t, 4096, 8192), vec![0]);
        assert!(ids(&t, 5 << 30, 6 << 30).is_empty());
    }
}
