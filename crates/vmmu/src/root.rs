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
        match self {
            RootFilter::All => true,
            RootFilter::AddressSpace(a) => role.as_id() == *a,
        }
    }
}

impl Tdp {
    /// Take a reference unless the root is already on its way out.
    pub(crate) fn get_root(&self, root: &Root) -> bool {
        if self.knobs.unconditional_root_get {
            root.refcount.fetch_add(1, Ordering::Acquire);
            return true;
        }
        // Acquire on success: the root's state written before its creation or
        // invalidation is visible to the new holder.
        root.refcount
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |c| if c == 0 { None } else { Some(c + 1) })
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
        debug_assert!(root.is_invalid(), "only invalid roots may lose their last reference");
        self.roots.lock().retain(|r| !Arc::ptr_eq(r, root));
        root.freed.store(true, Ordering::Release);
        CounterSet::inc(&ctx.stats.roots_freed);
        let mem = self.mem.clone();
        let pfn = root.pfn;
        ctx.rcu.defer(move || mem.free_table_page(pfn));
    }

    /// A snapshot of the roots list.
    pub(crate) fn roots_snapshot(&self) -> Vec<Arc<Root>> {
        self.roots.lock().clone()
    }

    /// Find a valid root for `role` and take a reference, or create one from the
    /// vCPU's cache (KVM's `kvm_tdp_mmu_alloc_root`). `mmu_lock` is held for read.
    pub(crate) fn find_or_create_root(&self, stats: &CounterSet, role: Role, cache: &mut TableCache) -> Option<Arc<Root>> {
        let matching = |r: &Arc<Root>| r.role == role && !r.is_invalid();
        for r in self.roots_snapshot().iter().filter(|r| matching(r)) {
            if self.get_root(r) {
                return Some(r.clone());
            }
        }
        let mut roots = self.roots.lock();
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
        roots.push(root.clone());
        CounterSet::inc(&stats.roots_created);
        Some(root)
    }

    /// Mark matching roots invalid and schedule them for zapping. Requires
    /// `mmu_lock` held for write (or a dying VM). Returns how many were invalidated.
    pub(crate) fn invalidate_roots(&self, stats: &CounterSet, filter: RootFilter) -> u64 {
        let mut n = 0;
        for r in self.roots.lock().iter() {
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
        for root in self.roots_snapshot() {
            if !root.scheduled_to_zap.load(Ordering::Relaxed) || !self.get_root(&root) {
                continue;
            }
            if root.scheduled_to_zap.swap(false, Ordering::AcqRel) {
                self.zap_root(ctx, &root, guard, lock_stats, shared);
                // The MMU's own reference, "gifted" to the zapper.
                self.put_root(ctx, &root);
            }
            self.put_root(ctx, &root);
        }
    }
}
