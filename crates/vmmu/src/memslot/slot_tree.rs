//! The memslots of an address space by range: a persistent interval tree,
//! one by guest frame and one by host address. "Which slot holds this gfn"
//! is one descent, and "which slots does this range touch" (a notifier's
//! host range, a new slot's gfns) costs O(log n + k) however many slots
//! there are and however different their sizes (KVM keeps an rbtree on gfn
//! and an interval tree on hva for the same queries).
//!
//! A treap keyed by (start, slot id), each node also holding the largest end
//! below it; starts and ends are in the tree's own unit (gfns or bytes). Nodes are immutable and shared: a copy of the tree
//! is one reference count, and a change copies only the nodes on the paths
//! it touches (O(log n) expected), which is what lets a memslot set be copied
//! and changed per update without an O(n) cost. Priorities are a hash of the
//! key, so the shape of the tree is a function of its contents.
//!
//! No crate offers a persistent interval tree: `imbl` (used for the id
//! index) has ordered maps without augmentation (and its lookups build a
//! two-cursor range with heap-allocated stacks, too slow for every fault),
//! and the interval-tree crates are mutable in place.

use std::ops::ControlFlow;
use std::sync::Arc as Shared;

use arrayvec::ArrayVec;

use super::Memslot;
use crate::sync::Arc;

type Key = (u64, u16);
type Link = Option<Shared<Node>>;

#[derive(Debug)]
struct Node {
    key: Key,
    /// One past the slot's last unit.
    end: u64,
    /// Where the slot starts in the other index's unit (its first gfn in
    /// the host-range tree, its host address in the gfn tree): a query
    /// turns a hit into the other unit from the node alone. Reading the
    /// slot for it was a cache miss per hit at 32k slots, a third of
    /// memslot-perf's unmap-chunked loop in `perf` samples.
    base: u64,
    slot: Arc<Memslot>,
    prio: u64,
    /// Largest `end` in this subtree.
    max_end: u64,
    left: Link,
    right: Link,
}

/// Depth of the overlap walk's own stack (a treap of 32k slots is some
/// twenty levels deep, forty at the unluckiest).
const STACK: usize = 48;

/// The recursive overlap walk of `n`'s subtree, for what lies below the
/// iterative walk's stack.
fn visit_overlaps<'a>(
    n: &'a Node,
    start: u64,
    end: u64,
    f: &mut impl FnMut(&'a Node) -> ControlFlow<()>,
) -> ControlFlow<()> {
    if n.max_end <= start {
        return ControlFlow::Continue(());
    }
    if let Some(l) = n.left.as_deref() {
        visit_overlaps(l, start, end, f)?;
    }
    // Everything to the right starts at or after this node.
    if n.key.0 < end {
        if n.end > start {
            f(n)?;
        }
        if let Some(r) = n.right.as_deref() {
            visit_overlaps(r, start, end, f)?;
        }
    }
    ControlFlow::Continue(())
}

fn max_end(l: &Link) -> u64 {
    l.as_ref().map_or(0, |n| n.max_end)
}

/// A copy of `n` with new children.
fn with(n: &Node, left: Link, right: Link) -> Shared<Node> {
    Shared::new(Node {
        key: n.key,
        end: n.end,
        base: n.base,
        slot: n.slot.clone(),
        prio: n.prio,
        max_end: n.end.max(max_end(&left)).max(max_end(&right)),
        left,
        right,
    })
}

/// `t` with `leaf` added, or put in place of the node with the same key
/// (which keeps its children: the key, and so the priority, is the same).
///
/// Copies only the nodes on the search path, plus the ones the rotations
/// that restore the heap order move (O(1) expected): a copy per level, not
/// the three or four paths a split-and-merge insert copies.
fn insert(t: &Link, leaf: Shared<Node>) -> Shared<Node> {
    let Some(n) = t else { return leaf };
    if leaf.key == n.key {
        return with(&leaf, n.left.clone(), n.right.clone());
    }
    if leaf.key < n.key {
        let l = insert(&n.left, leaf);
        if l.prio > n.prio {
            // Rotate right: the new child rises above `n`.
            let down = with(n, l.right.clone(), n.right.clone());
            with(&l, l.left.clone(), Some(down))
        } else {
            with(n, Some(l), n.right.clone())
        }
    } else {
        let r = insert(&n.right, leaf);
        if r.prio > n.prio {
            let down = with(n, n.left.clone(), r.left.clone());
            with(&r, Some(down), r.right.clone())
        } else {
            with(n, n.left.clone(), Some(r))
        }
    }
}

/// `t` without the node keyed `k`, or `None` if there is none (nothing is
/// copied then). The path to it is copied and its two subtrees are merged.
fn remove(t: &Link, k: Key) -> Option<Link> {
    let n = t.as_ref()?;
    Some(if k == n.key {
        merge(n.left.clone(), n.right.clone())
    } else if k < n.key {
        Some(with(n, remove(&n.left, k)?, n.right.clone()))
    } else {
        Some(with(n, n.left.clone(), remove(&n.right, k)?))
    })
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

fn prio(k: Key) -> u64 {
    // splitmix64 of the key.
    let mut z = (k.0 ^ (u64::from(k.1) << 48)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A slot an overlap query found, with its range and base as the tree
/// keeps them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hit<'a> {
    pub(crate) slot: &'a Arc<Memslot>,
    /// The slot's first unit in this tree.
    pub(crate) start: u64,
    /// One past its last.
    pub(crate) end: u64,
    /// Its first unit in the other tree.
    pub(crate) base: u64,
}

/// The tree (cloning it is O(1)).
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotTree {
    root: Link,
    len: usize,
}

impl SlotTree {
    /// Slots in the tree.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Add `slot` over `[start, end)`, starting at `base` in the other
    /// index's unit (its id must not be in the tree under this start).
    pub(crate) fn insert(&mut self, start: u64, end: u64, base: u64, slot: Arc<Memslot>) {
        let key = (start, slot.id);
        let leaf = Shared::new(Node {
            key,
            end,
            base,
            slot,
            prio: prio(key),
            max_end: end,
            left: None,
            right: None,
        });
        let replaced = self.holding_key(key);
        self.len += usize::from(!replaced);
        self.root = Some(insert(&self.root, leaf));
    }

    /// Drop the slot with this start and id.
    pub(crate) fn remove(&mut self, start: u64, id: u16) {
        if let Some(root) = remove(&self.root, (start, id)) {
            self.root = root;
            self.len -= 1;
        }
    }

    /// Whether a node is keyed `k`.
    fn holding_key(&self, k: Key) -> bool {
        let mut t = &self.root;
        while let Some(n) = t {
            if k == n.key {
                return true;
            }
            t = if k < n.key { &n.left } else { &n.right };
        }
        false
    }

    /// The slot holding `point`, if the slots are disjoint (the gfn tree):
    /// the one with the last start at or below it, if it reaches that far.
    pub(crate) fn holding(&self, point: u64) -> Option<&Arc<Memslot>> {
        let mut best: Option<&Node> = None;
        let mut t = &self.root;
        while let Some(n) = t {
            if n.key.0 <= point {
                best = Some(n);
                t = &n.right;
            } else {
                t = &n.left;
            }
        }
        best.filter(|n| point < n.end).map(|n| &n.slot)
    }

    /// Every slot whose range intersects `[start, end)`, in (start, id) order.
    pub(crate) fn for_each_overlap(&self, start: u64, end: u64, mut f: impl FnMut(&Arc<Memslot>)) {
        let _ = self.try_for_each_overlap(start, end, |s| {
            f(s);
            ControlFlow::Continue(())
        });
    }

    /// [`SlotTree::for_each_overlap`] that stops at the first `Break` (a
    /// question answered by the first slot found need not visit the rest:
    /// a 2 MiB host range spans 128 slots at memslot-perf's 32k).
    pub(crate) fn try_for_each_overlap<'a>(
        &'a self,
        start: u64,
        end: u64,
        mut f: impl FnMut(&'a Arc<Memslot>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        self.walk(start, end, |n| f(&n.slot))
    }

    /// [`SlotTree::try_for_each_overlap`] that hands over each hit's range
    /// and base from the tree's own node, without reading the slot.
    pub(crate) fn try_for_each_hit<'a>(
        &'a self,
        start: u64,
        end: u64,
        mut f: impl FnMut(Hit<'a>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        self.walk(start, end, |n| {
            f(Hit {
                slot: &n.slot,
                start: n.key.0,
                end: n.end,
                base: n.base,
            })
        })
    }

    /// The overlap walk, calling `f` with each overlapping node in order.
    ///
    /// In order with the pending ancestors on a stack of its own rather
    /// than recursion: every notifier call makes two of these queries, and
    /// at 32k slots the descent is some twenty levels, where a call per
    /// level (its register saves and restores) was most of the query's
    /// cost. It also stops as soon as it reaches a slot starting at or
    /// after `end` instead of unwinding through every level. The stack is
    /// an `ArrayVec` (nothing to initialise, no allocation); a treap deeper
    /// than it (its priorities are hashes: practically never) finishes the
    /// subtree below by recursion.
    fn walk<'a>(
        &'a self,
        start: u64,
        end: u64,
        mut f: impl FnMut(&'a Node) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if start >= end {
            return ControlFlow::Continue(());
        }
        let mut stack: ArrayVec<&'a Node, STACK> = ArrayVec::new();
        let mut cur = self.root.as_deref();
        loop {
            // Down the left spine of `cur`, as far as a subtree may still
            // reach past `start`.
            while let Some(n) = cur {
                if n.max_end <= start {
                    break;
                }
                if stack.try_push(n).is_err() {
                    visit_overlaps(n, start, end, &mut f)?;
                    break;
                }
                cur = n.left.as_deref();
            }
            // The next node in order: once one starts at or after `end`,
            // so does everything after it (its right subtree, the
            // ancestors still on the stack).
            let Some(n) = stack.pop() else {
                return ControlFlow::Continue(());
            };
            if n.key.0 >= end {
                return ControlFlow::Continue(());
            }
            if n.end > start {
                f(n)?;
            }
            cur = n.right.as_deref();
        }
    }

    /// All slots in (start, id) order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Memslot>> {
        fn walk<'a>(t: &'a Link, out: &mut Vec<&'a Arc<Memslot>>) {
            if let Some(n) = t {
                walk(&n.left, out);
                out.push(&n.slot);
                walk(&n.right, out);
            }
        }
        let mut out = Vec::with_capacity(self.len);
        walk(&self.root, &mut out);
        out.into_iter()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::{classify, Change, MemslotSet, UserMemoryRegion};
    use super::*;

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

    /// The treap's invariants below `t`: keys in order, each node's priority
    /// at least its children's (what keeps the depth logarithmic), `max_end`
    /// the largest end below. Returns the subtree's (min key, max key).
    fn assert_treap(t: &Link) -> Option<(Key, Key)> {
        let n = t.as_ref()?;
        let mut lo = n.key;
        let mut hi = n.key;
        if let Some(l) = &n.left {
            let (a, b) = assert_treap(&n.left).unwrap_or((l.key, l.key));
            assert!(b < n.key, "left subtree key {b:?} not below {:?}", n.key);
            assert!(l.prio <= n.prio, "heap order broken at {:?}", n.key);
            lo = a;
        }
        if let Some(r) = &n.right {
            let (a, b) = assert_treap(&n.right).unwrap_or((r.key, r.key));
            assert!(a > n.key, "right subtree key {a:?} not above {:?}", n.key);
            assert!(r.prio <= n.prio, "heap order broken at {:?}", n.key);
            hi = b;
        }
        assert_eq!(n.prio, prio(n.key));
        assert_eq!(
            n.max_end,
            n.end.max(max_end(&n.left)).max(max_end(&n.right)),
            "max_end at {:?}",
            n.key
        );
        Some((lo, hi))
    }

    /// The overlap query's answer, checked against the same walk stopped
    /// early after each prefix length.
    fn ids(t: &SlotTree, start: u64, end: u64) -> Vec<u16> {
        let mut v = Vec::new();
        t.for_each_overlap(start, end, |s| v.push(s.id));
        for k in 1..=v.len().min(4) {
            let mut got = Vec::new();
            let r = t.try_for_each_overlap(start, end, |s| {
                got.push(s.id);
                if got.len() == k {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            assert!(r.is_break());
            assert_eq!(got, v[..k], "stopped after {k}");
        }
        v
    }

    fn insert(t: &mut SlotTree, s: Arc<Memslot>) {
        let start = s.userspace_addr.0;
        t.insert(start, start + s.npages * 4096, s.base_gfn.0, s);
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
        let mut t = SlotTree::default();
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
                insert(&mut t, slot(id, hva, pages));
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
            assert_treap(&t.root);
            assert_eq!(t.len(), all.len());
            assert_eq!(t.iter().count(), all.len());
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
    fn test_holding_finds_the_disjoint_slot_of_a_point_or_none() {
        let mut t = SlotTree::default();
        // Slots [10, 20), [20, 25), [40, 41) in their own units.
        for (id, start, end) in [(1u16, 10u64, 20u64), (2, 20, 25), (3, 40, 41)] {
            t.insert(start, end, start, slot(id, start * 4096, end - start));
        }
        let at = |p| t.holding(p).map(|s| s.id);
        assert_eq!(at(9), None);
        assert_eq!(at(10), Some(1));
        assert_eq!(at(19), Some(1));
        assert_eq!(at(20), Some(2));
        assert_eq!(at(24), Some(2));
        assert_eq!(at(25), None, "past the end of the slot below");
        assert_eq!(at(40), Some(3));
        assert_eq!(at(41), None);
        let order: Vec<u16> = t.iter().map(|s| s.id).collect();
        assert_eq!(order, [1, 2, 3]);
    }

    fn depth(t: &Link) -> usize {
        t.as_ref()
            .map_or(0, |n| 1 + depth(&n.left).max(depth(&n.right)))
    }

    #[test]
    fn test_slots_created_in_order_still_make_a_shallow_tree() {
        // Memslots are usually created in ascending order: without the
        // priorities (or with them ignored when merging) that is a list.
        let mut t = SlotTree::default();
        for i in 0..4096u16 {
            let start = u64::from(i) * 4;
            t.insert(start, start + 4, start, slot(i, start * 4096, 4));
        }
        let d = depth(&t.root);
        assert!(d <= 40, "depth {d} for 4096 slots");
        // Replacing a slot under the same key keeps the count.
        t.insert(0, 4, 0, slot(0, 0, 4));
        assert_eq!(t.len(), 4096);
        assert_eq!(t.iter().count(), 4096);
    }

    #[test]
    fn test_a_tree_deeper_than_the_walks_inline_stack_is_walked_whole() {
        // Keys whose priorities grow with the start make the treap a chain
        // of left children, the walk's worst case: its whole height on the
        // stack at once.
        let mut t = SlotTree::default();
        let mut last = 0u64;
        let n = 2 * STACK as u64;
        for i in 0..n {
            let start = i * 4;
            let id = (0..32_764u16)
                .filter(|id| prio((start, *id)) > last)
                .min_by_key(|id| prio((start, *id)))
                .expect("a larger priority");
            last = prio((start, id));
            // The first slot reaches past all the others (an alias), so
            // every subtree holding it reaches far: the deep walk then
            // visits nodes that end where a query starts and must skip them.
            let end = if i == 0 { 4 * n + 4 } else { start + 4 };
            t.insert(start, end, start, slot(id, start * 4096, end - start));
        }
        assert_eq!(depth(&t.root), n as usize, "not a chain");
        assert_eq!(ids(&t, 0, u64::MAX).len(), n as usize);
        // [40, 48) below the stack's reach: the long first slot and the two
        // at 40 and 44, not the one that ends at 40.
        let mid: Vec<_> = ids(&t, 40, 48);
        assert_eq!(mid.len(), 3, "{mid:?}");
        let mut starts = Vec::new();
        t.for_each_overlap(0, u64::MAX, |s| starts.push(s.userspace_addr.0));
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "out of order");
    }

    #[test]
    fn test_one_large_slot_does_not_widen_queries_elsewhere() {
        let mut t = SlotTree::default();
        insert(&mut t, slot(0, 0, 1 << 20));
        for i in 1..1000u16 {
            insert(&mut t, slot(i, (8 << 30) + u64::from(i) * 4096, 1));
        }
        let a = (8 << 30) + 500 * 4096;
        assert_eq!(ids(&t, a, a + 4096), vec![500]);
        assert_eq!(ids(&t, 4096, 8192), vec![0]);
        assert!(ids(&t, 5 << 30, 6 << 30).is_empty());
    }
}
