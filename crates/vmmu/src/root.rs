//! Roots: the top-level tables vCPUs run on, one per role, shared by vCPUs.
//!
//! Lifetime rules (KVM ≥ 6.6):
//! - A root is created with two references: one for the vCPU that asked, one owned
//!   by the MMU itself. The MMU's reference keeps the root alive while no vCPU uses
//!   it, so a vCPU that unloads and reloads (SMM exit, role switch) reuses it.
//! - Invalidation marks roots invalid under the write lock and schedules them for
//!   zapping; the thread that invalidated then zaps them under the read lock and only
//!   afterwards drops the MMU's reference, so notifiers can still reach the root's
//!   entries while it is being zapped.
//! - References are taken with increment-if-not-zero: a root whose count reached zero
//!   is being freed and cannot be revived. Only invalid roots reach zero.

use crate::stats::CounterSet;
use crate::sync::{fence, Arc, AtomicBool, AtomicU32, Ordering};
use crate::tdp::{Ctx, TableCache, Tdp};
use crate::types::{Level, Pfn};

/// The role a root is built for (KVM's `kvm_mmu_page_role`, the fields a TDP root
/// can differ in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Role {
    /// Root level (4 or 5).
    pub level: Level,
    /// System-management mode: selects address space 1.
    pub smm: bool,
    /// Running a nested guest (L2).
    pub guest_mode: bool,
}

impl Role {
    /// The memslot address space this role maps.
    pub fn as_id(&self) -> u16 {
        self.smm as u16
    }
}

/// One root.
#[derive(Debug)]
pub(crate) struct Root {
    pub(crate) pfn: Pfn,
    pub(crate) role: Role,
    pub(crate) id: u64,
    refcount: AtomicU32,
    invalid: AtomicBool,
    scheduled_to_zap: AtomicBool,
    freed: AtomicBool,
}

impl Root {
    /// Invalid roots are never entered again; faults on them retry.
    pub(crate) fn is_invalid(&self) -> bool {
        // Acquire: pairs with the Release store in `invalidate`, which happens under
        // the write lock; lock-free readers (fast path) may be late, which is fine
        // because vCPUs are kicked out before the root's entries are zapped.
        self.invalid.load(Ordering::Acquire)
    }

    /// Whether the root's memory was freed (checked by tests and models).
    pub(crate) fn is_freed(&self) -> bool {
        self.freed.load(Ordering::Acquire)
    }

    pub(crate) fn refcount(&self) -> u32 {
        self.refcount.load(Ordering::Acquire)
    }
}

/// Which roots an invalidation targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootFilter {
    /// Every root.
    All,
    /// Roots of one address space (0 normal, 1 SMM).
    AddressSpace(u16),
}

impl RootFilter {
    fn matches(&self, role: &Role) -> bool {
        self.covers(role.as_id())
    }

    /// Whether the filter takes address space `as_id`.
    pub(crate) fn covers(&self, as_id: u16) -> bool {
        match self {
            RootFilter::All => true,
            RootFilter::AddressSpace(a) => as_id == *a,
        }
    }
}

impl Tdp {
    /// Take a reference unless the root is already on its way out.
    pub(crate) fn get_root(&self, root: &Root) -> bool {
        // Acquire on success: the root's state written before its creation or
        // invalidation is visible to the new holder.
        root.refcount
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |c| {
                if c == 0 {
                    None
                } else {
                    Some(c + 1)
                }
            })
            .is_ok()
    }

    /// Drop a reference; the last one removes the root from the list and frees its
    /// page after an RCU grace period. Callers hold `mmu_lock` (read suffices), so a
    /// write-locked walker never sees a root disappear under it.
    pub(crate) fn put_root(&self, ctx: &Ctx<'_>, root: &Arc<Root>) {
        // Release: our uses of the root happen before whoever frees it.
        if root.refcount.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Acquire: pairs with every other holder's Release decrement.
        fence(Ordering::Acquire);
        debug_assert!(
            root.is_invalid(),
            "only invalid roots may lose their last reference"
        );
        {
            let _l = self.roots.lock();
            let mut next: Vec<Arc<Root>> = (*self.roots_list.load_full()).clone();
            next.retain(|r| !Arc::ptr_eq(r, root));
            self.roots_list.swap(Arc::new(next));
        }
        root.freed.store(true, Ordering::Release);
        CounterSet::inc(&ctx.stats.roots_freed);
        self.free_after_grace_period(ctx, root.pfn);
    }

    /// Run `f` on every root of address space `as_id` (valid ones, and invalid ones
    /// too unless `only_valid`), holding a reference across the call: walks yield
    /// `mmu_lock`, and without the reference a root could be freed meanwhile.
    /// Roots whose count already reached zero are skipped. The caller holds
    /// `mmu_lock` (the final put may free a root).
    pub(crate) fn for_each_root(
        &self,
        ctx: &Ctx<'_>,
        as_id: u16,
        only_valid: bool,
        mut f: impl FnMut(&Arc<Root>),
    ) {
        for root in self.roots_snapshot().iter() {
            if root.role.as_id() != as_id || (only_valid && root.is_invalid()) {
                continue;
            }
            if self.knobs.roots_without_refs {
                f(root);
                continue;
            }
            if self.get_root(root) {
                f(root);
                self.put_root(ctx, root);
            }
        }
    }

    /// A snapshot of the roots list; needs no lock.
    pub(crate) fn roots_snapshot(&self) -> Arc<Vec<Arc<Root>>> {
        self.roots_list.load_full()
    }

    /// Find a valid root for `role` and take a reference, or create one from the
    /// vCPU's cache (KVM's `kvm_tdp_mmu_alloc_root`). `mmu_lock` is held for read.
    pub(crate) fn find_or_create_root(
        &self,
        stats: &CounterSet,
        role: Role,
        cache: &mut TableCache,
    ) -> Option<Arc<Root>> {
        let matching = |r: &Arc<Root>| r.role == role && !r.is_invalid();
        for r in self.roots_snapshot().iter().filter(|r| matching(r)) {
            if self.get_root(r) {
                return Some(r.clone());
            }
        }
        let _l = self.roots.lock();
        let roots = self.roots_list.load_full();
        // Another vCPU may have added one since the scan.
        if let Some(r) = roots.iter().find(|r| matching(r)) {
            if self.get_root(r) {
                return Some(r.clone());
            }
        }
        let pfn = cache.pop()?;
        let root = Arc::new(Root {
            pfn,
            role,
            id: self.next_root_id.fetch_add(1, Ordering::Relaxed),
            // One reference for the vCPU, one owned by the MMU.
            refcount: AtomicU32::new(2),
            invalid: AtomicBool::new(false),
            scheduled_to_zap: AtomicBool::new(false),
            freed: AtomicBool::new(false),
        });
        let mut next: Vec<Arc<Root>> = (*roots).clone();
        next.push(root.clone());
        self.roots_list.swap(Arc::new(next));
        CounterSet::inc(&stats.roots_created);
        Some(root)
    }

    /// Mark matching roots invalid and schedule them for zapping. Requires
    /// `mmu_lock` held for write (or a dying VM). Returns how many were invalidated.
    pub(crate) fn invalidate_roots(&self, stats: &CounterSet, filter: RootFilter) -> u64 {
        let mut n = 0;
        let _l = self.roots.lock();
        for r in self.roots_list.load().iter() {
            if filter.matches(&r.role) && !r.is_invalid() {
                r.scheduled_to_zap.store(true, Ordering::Relaxed);
                // Release: pairs with `is_invalid`.
                r.invalid.store(true, Ordering::Release);
                n += 1;
            }
        }
        CounterSet::add(&stats.roots_invalidated, n);
        n
    }

    /// Zap every root scheduled by [`Tdp::invalidate_roots`] and drop the MMU's
    /// reference to it. Runs with `mmu_lock` held for read (`shared`) or write.
    pub(crate) fn zap_invalidated_roots<G: crate::sync::MmuGuard>(
        &self,
        ctx: &Ctx<'_>,
        guard: &mut G,
        lock_stats: &crate::sync::LockStats,
    ) {
        let shared = !guard.is_exclusive();
        for root in self.roots_snapshot().iter() {
            if !root.scheduled_to_zap.load(Ordering::Relaxed) || !self.get_root(root) {
                continue;
            }
            if root.scheduled_to_zap.swap(false, Ordering::AcqRel) {
                self.zap_root(ctx, root, guard, lock_stats, shared);
                // The MMU's own reference, "gifted" to the zapper.
                self.put_root(ctx, root);
            }
            self.put_root(ctx, root);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! (c) A root is never freed while a walker holds it across a yield of
    //! `mmu_lock`, and is freed exactly once when invalid and unreferenced.
    use super::*;
    use crate::config::GuardKnobs;
    use crate::sync::MmuLock;
    use crate::testing::TestMemory;

    fn scenario(knobs: GuardKnobs) {
        let mem = Arc::new(TestMemory::new());
        // 512 gfns: every whole-root walk visits a single top-level entry.
        let tdp = Arc::new(Tdp::new(mem.clone(), Level::L4, 512, true, false, knobs));
        let lock = Arc::new(MmuLock::new());
        let stats = Arc::new(CounterSet::default());
        {
            let mut cache = TableCache::default();
            cache.topup(&tdp, 1).unwrap();
            let _r = lock.read(&stats.lock);
            let role = Role {
                level: Level::L4,
                smm: false,
                guest_mode: false,
            };
            let root = tdp.find_or_create_root(&stats, role, &mut cache).unwrap();
            // The creating vCPU goes away: only the MMU's reference remains.
            let rcu = tdp.rcu.read_lock();
            tdp.put_root(&Ctx::new(&stats, &rcu), &root);
        }
        let (t2, l2, s2) = (tdp.clone(), lock.clone(), stats.clone());
        let walker = loom::thread::spawn(move || {
            // A notifier zap: walks every root and yields the lock midway.
            let rcu = t2.rcu.read_lock();
            let ctx = Ctx::new(&s2, &rcu);
            let mut w = l2.write(&s2.lock);
            let mut walked_freed = false;
            t2.for_each_root(&ctx, 0, false, |root| {
                crate::sync::MmuGuard::yield_lock(&mut w, &s2.lock);
                walked_freed |= root.is_freed();
            });
            walked_freed
        });
        // A fast zap.
        {
            let _w = lock.write(&stats.lock);
            tdp.invalidate_roots(&stats, RootFilter::All);
        }
        {
            let rcu = tdp.rcu.read_lock();
            let ctx = Ctx::new(&stats, &rcu);
            let mut r = lock.read(&stats.lock);
            tdp.zap_invalidated_roots(&ctx, &mut r, &stats.lock);
        }
        let walked_freed = walker.join().unwrap();
        assert!(!walked_freed, "a walk resumed on a freed root");
        assert!(
            tdp.roots_snapshot().is_empty(),
            "an invalid, unreferenced root was not freed"
        );
        drop(tdp);
        assert_eq!(mem.allocated(), 0, "root page leaked");
        assert_eq!(mem.double_frees(), 0);
    }

    fn check(bound: usize, f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(bound);
        // Initialising a table is 512 stores, each a branch point.
        b.max_branches = 100_000;
        b.check(f);
    }

    #[test]
    fn loom_root_never_freed_while_referenced() {
        check(3, || scenario(GuardKnobs::default()));
    }

    #[test]
    fn loom_root_freed_under_a_walk_without_references() {
        let knobs = GuardKnobs {
            roots_without_refs: true,
            ..GuardKnobs::default()
        };
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(|| check(3, move || scenario(knobs)));
        std::panic::set_hook(prev);
        let err = r.expect_err("the model found no violation with the guard removed");
        let msg = err
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()));
        assert!(msg.unwrap_or_default().contains("freed root"));
    }
}
