//! A class-based lock-order checker, the project's small lockdep.
//!
//! Every lock belongs to a [`LockClass`] with a rank taken from KVM's documented
//! hierarchy (kvm-mmu-reference §9.2). A thread may only acquire a lock whose rank is
//! strictly greater than every lock it already holds; a violation panics naming both
//! classes and both acquisition sites. The check is per class, not per instance, so
//! one test run proves the order for every VM and vCPU.
//!
//! Active in debug builds and with the `lockdep` feature; compiled out otherwise and
//! under loom (loom threads share one OS thread, so thread-locals would be shared).

use std::panic::Location;

/// Lock classes in acquisition order (outermost first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockClass {
    /// `kvm->lock`: VM-wide state.
    KvmLock = 10,
    /// `vcpu->mutex`: one vCPU's ioctls.
    VcpuMutex = 20,
    /// `kvm->slots_lock`: memslot and attribute updates, fast zap.
    SlotsLock = 30,
    /// `kvm->srcu` read side (memslot readers).
    SrcuRead = 40,
    /// Pseudo-lock held for the duration of an mmu_notifier callback. Ranked after
    /// `slots_lock` so a notifier taking `slots_lock` is reported: the memslot
    /// installer holds `slots_lock` while it waits for notifiers to finish. Ranked
    /// after the SRCU read side because a vCPU fault (inside SRCU) can trigger one,
    /// e.g. when faulting in the page breaks copy-on-write.
    NotifierCallback = 45,
    /// `kvm->mn_invalidate_lock`: the active-invalidation count.
    MnInvalidateLock = 50,
    /// `kvm->mmu_lock`.
    MmuLock = 60,
    /// `kvm->arch.tdp_mmu_pages_lock`: the roots list.
    TdpMmuPagesLock = 70,
    /// Per-VM registry of vCPUs (a leaf).
    VcpuRegistry = 80,
    /// Statistics and other leaf bookkeeping.
    Leaf = 90,
}

impl LockClass {
    /// KVM's name for the lock.
    pub const fn name(self) -> &'static str {
        match self {
            LockClass::KvmLock => "kvm->lock",
            LockClass::VcpuMutex => "vcpu->mutex",
            LockClass::SlotsLock => "kvm->slots_lock",
            LockClass::NotifierCallback => "mmu_notifier callback",
            LockClass::SrcuRead => "kvm->srcu (read)",
            LockClass::MnInvalidateLock => "kvm->mn_invalidate_lock",
            LockClass::MmuLock => "kvm->mmu_lock",
            LockClass::TdpMmuPagesLock => "kvm->arch.tdp_mmu_pages_lock",
            LockClass::VcpuRegistry => "vcpu registry",
            LockClass::Leaf => "leaf lock",
        }
    }
}

/// Whether the checker is compiled in.
pub const ENABLED: bool = cfg!(all(not(loom), any(debug_assertions, feature = "lockdep")));

#[cfg(all(not(loom), any(debug_assertions, feature = "lockdep")))]
mod imp {
    use std::cell::RefCell;
    use std::panic::Location;

    use super::LockClass;

    thread_local! {
        static HELD: RefCell<Vec<(LockClass, &'static Location<'static>, u64)>> =
            const { RefCell::new(Vec::new()) };
        static NEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    pub fn acquire(class: LockClass, site: &'static Location<'static>) -> u64 {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some((h, hsite, _)) = held.iter().find(|(h, _, _)| *h >= class) {
                let (h, hsite) = (*h, *hsite);
                drop(held);
                panic!(
                    "lock order violation: acquiring {} at {} while holding {} acquired at {}",
                    class.name(),
                    site,
                    h.name(),
                    hsite
                );
            }
            let token = NEXT.with(|n| {
                let t = n.get();
                n.set(t + 1);
                t
            });
            held.push((class, site, token));
            token
        })
    }

    pub fn release(token: u64) {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(i) = held.iter().rposition(|(_, _, t)| *t == token) {
                held.remove(i);
            }
        });
    }

    pub fn holds(class: LockClass) -> bool {
        HELD.with(|held| held.borrow().iter().any(|(c, _, _)| *c == class))
    }
}

/// Proof that a lock of some class is held by this thread; releases on drop.
#[derive(Debug)]
pub struct Held {
    #[cfg(all(not(loom), any(debug_assertions, feature = "lockdep")))]
    token: u64,
}

impl Held {
    /// Record that this thread is about to acquire a lock of `class` at `site`.
    /// Panics if that would violate the hierarchy.
    #[inline]
    pub fn acquire(class: LockClass, site: &'static Location<'static>) -> Held {
        #[cfg(all(not(loom), any(debug_assertions, feature = "lockdep")))]
        {
            Held {
                token: imp::acquire(class, site),
            }
        }
        #[cfg(not(all(not(loom), any(debug_assertions, feature = "lockdep"))))]
        {
            let _ = (class, site);
            Held {}
        }
    }
}

impl Drop for Held {
    #[inline]
    fn drop(&mut self) {
        #[cfg(all(not(loom), any(debug_assertions, feature = "lockdep")))]
        imp::release(self.token);
    }
}

/// Whether the current thread holds a lock of `class` (always false when disabled).
pub fn holds(class: LockClass) -> bool {
    #[cfg(all(not(loom), any(debug_assertions, feature = "lockdep")))]
    {
        imp::holds(class)
    }
    #[cfg(not(all(not(loom), any(debug_assertions, feature = "lockdep"))))]
    {
        let _ = class;
        false
    }
}

/// Assert (when the checker is on) that `class` is held. Used by functions whose
/// callers must hold a lock, like KVM's `lockdep_assert_held`.
#[track_caller]
pub fn assert_held(class: LockClass) {
    if ENABLED {
        assert!(holds(class), "{} must be held here", class.name());
    }
}

#[cfg(all(test, not(loom), any(debug_assertions, feature = "lockdep")))]
mod tests {
    use super::*;

    #[test]
    fn test_lockdep_in_order_is_accepted() {
        let a = Held::acquire(LockClass::SlotsLock, Location::caller());
        let b = Held::acquire(LockClass::MmuLock, Location::caller());
        assert!(holds(LockClass::MmuLock));
        drop(b);
        drop(a);
        assert!(!holds(LockClass::SlotsLock));
    }

    #[test]
    fn test_lockdep_inversion_panics_naming_both_sites() {
        let r = std::panic::catch_unwind(|| {
            let _m = Held::acquire(LockClass::MmuLock, Location::caller());
            let _s = Held::acquire(LockClass::SlotsLock, Location::caller());
        });
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("acquiring kvm->slots_lock"), "{msg}");
        assert!(msg.contains("while holding kvm->mmu_lock"), "{msg}");
        assert!(msg.contains("lockdep.rs"), "{msg}");
    }

    #[test]
    fn test_lockdep_same_class_twice_panics() {
        let r = std::panic::catch_unwind(|| {
            let _a = Held::acquire(LockClass::MmuLock, Location::caller());
            let _b = Held::acquire(LockClass::MmuLock, Location::caller());
        });
        assert!(r.is_err());
    }

    #[test]
    fn test_lockdep_out_of_order_release_is_tracked() {
        let a = Held::acquire(LockClass::SlotsLock, Location::caller());
        let b = Held::acquire(LockClass::MmuLock, Location::caller());
        drop(a);
        assert!(holds(LockClass::MmuLock));
        assert!(!holds(LockClass::SlotsLock));
        drop(b);
    }
}
