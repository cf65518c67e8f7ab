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

/// Lock classes, listed in acquisition order (outermost first).
///
/// The order is upstream's `Documentation/virt/kvm/locking.rst` (kvm-mmu-reference
/// §9.2, corrected where the reference quotes a superseded draft; see
/// docs/DESIGN.md): `kvm->lock` → `vcpu->mutex` → `slots_lock` → `irq_lock`;
/// `synchronize_srcu(&kvm->srcu)` runs under `kvm->lock`, `vcpu->mutex` and
/// `slots_lock`, so none of them may be taken inside an SRCU read section;
/// `slots_arch_lock` is dropped before that synchronize and may be taken inside
/// one; mmu_notifier callbacks run inside SRCU read sections (a vCPU fault can
/// break copy-on-write) and must not take `slots_lock` or `slots_arch_lock` (the
/// memslot installer waits for them while holding both); `mmu_lock` comes after
/// all of those, and `tdp_mmu_pages_lock` only ever inside `mmu_lock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockClass {
    /// `kvm->lock`: VM-wide state (the vCPU list).
    KvmLock,
    /// `vcpu->mutex`: one vCPU's ioctls (held across a vCPU's run and faults).
    VcpuMutex,
    /// `kvm->slots_lock`: memslot and attribute updates, fast zap.
    SlotsLock,
    /// `kvm->irq_lock`: interrupt routing (taken after `slots_lock`).
    IrqLock,
    /// `kvm->srcu` read side (memslot readers).
    SrcuRead,
    /// `synchronize_srcu(&kvm->srcu)`: waiting for every read section. Checked
    /// like taking the read side exclusively: never inside a read section, nor
    /// under anything that may be taken inside one.
    SrcuSync,
    /// `kvm->slots_arch_lock`: arch memslot metadata; held by the installer
    /// while it waits for notifiers and publishes, dropped before synchronize.
    SlotsArchLock,
    /// A guest_memfd's mapping invalidate lock: taken by faults inside SRCU,
    /// and before `mmu_lock` by hole punching and release.
    GmemLock,
    /// Pseudo-lock held for the duration of an mmu_notifier callback. Ranked after
    /// `slots_lock` and `slots_arch_lock` so a notifier taking either is reported:
    /// the memslot installer holds them while it waits for notifiers to finish.
    /// Ranked after the SRCU read side because a vCPU fault (inside SRCU) can
    /// trigger one, e.g. when faulting in the page breaks copy-on-write.
    NotifierCallback,
    /// `kvm->mn_invalidate_lock`: the active-invalidation count.
    MnInvalidateLock,
    /// `kvm->mmu_lock`.
    MmuLock,
    /// `kvm->arch.tdp_mmu_pages_lock`: the roots list. Only under `mmu_lock`.
    TdpMmuPagesLock,
    /// The shadow MMU's pages, hash, rmaps and write tracking: only ever
    /// taken with `mmu_lock` held for write (the lock that really guards
    /// them, as in KVM; this one gives the state to Rust).
    ShadowPages,
    /// Statistics and other leaf bookkeeping.
    Leaf,
}

impl LockClass {
    /// KVM's name for the lock.
    pub const fn name(self) -> &'static str {
        match self {
            LockClass::KvmLock => "kvm->lock",
            LockClass::VcpuMutex => "vcpu->mutex",
            LockClass::SlotsLock => "kvm->slots_lock",
            LockClass::IrqLock => "kvm->irq_lock",
            LockClass::SrcuRead => "kvm->srcu (read)",
            LockClass::SrcuSync => "synchronize_srcu(kvm->srcu)",
            LockClass::SlotsArchLock => "kvm->slots_arch_lock",
            LockClass::GmemLock => "guest_memfd invalidate lock",
            LockClass::NotifierCallback => "mmu_notifier callback",
            LockClass::MnInvalidateLock => "kvm->mn_invalidate_lock",
            LockClass::MmuLock => "kvm->mmu_lock",
            LockClass::TdpMmuPagesLock => "kvm->arch.tdp_mmu_pages_lock",
            LockClass::ShadowPages => "shadow pages (under kvm->mmu_lock)",
            LockClass::Leaf => "leaf lock",
        }
    }

    /// Position in the order: a lock may be taken only while every lock held
    /// ranks strictly lower. Waiting for SRCU readers ranks with the read side.
    pub const fn rank(self) -> u8 {
        match self {
            LockClass::KvmLock => 10,
            LockClass::VcpuMutex => 20,
            LockClass::SlotsLock => 30,
            LockClass::IrqLock => 35,
            LockClass::SrcuRead | LockClass::SrcuSync => 40,
            LockClass::SlotsArchLock => 42,
            LockClass::GmemLock => 43,
            LockClass::NotifierCallback => 45,
            LockClass::MnInvalidateLock => 50,
            LockClass::MmuLock => 60,
            LockClass::TdpMmuPagesLock => 70,
            LockClass::ShadowPages => 72,
            LockClass::Leaf => 90,
        }
    }

    /// A lock that must already be held when this one is taken.
    pub const fn requires(self) -> Option<LockClass> {
        match self {
            LockClass::TdpMmuPagesLock | LockClass::ShadowPages => Some(LockClass::MmuLock),
            _ => None,
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
            if let Some(req) = class.requires() {
                if !held.iter().any(|(h, _, _)| *h == req) {
                    drop(held);
                    panic!(
                        "lock order violation: acquiring {} at {} without holding {}",
                        class.name(),
                        site,
                        req.name()
                    );
                }
            }
            if let Some((h, hsite, _)) = held.iter().find(|(h, _, _)| h.rank() >= class.rank()) {
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

    /// Run `f` on its own thread and return the checker's report, or say that
    /// it hung or ran clean. Several of these rules deadlock when broken, so the
    /// report must come before the hang.
    fn report_of(f: impl FnOnce() + Send + 'static) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let msg = match r {
                Ok(()) => "no report".to_string(),
                Err(e) => e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            };
            let _ = tx.send(msg);
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| "hung: no report within 10 s".to_string())
    }

    fn assert_reported(msg: &str, acquiring: &str, holding: &str) {
        assert!(
            msg.contains(&format!("acquiring {acquiring}")) && msg.contains(holding),
            "expected a report of {acquiring} under {holding}, got: {msg}"
        );
    }

    use crate::sync::{MmuLock, Mutex, Srcu};

    #[test]
    fn test_lockdep_synchronize_srcu_inside_its_read_section_is_reported_not_hung() {
        let msg = report_of(|| {
            let srcu = Srcu::new();
            let reader = srcu.register();
            let _g = reader.read_lock();
            srcu.synchronize();
        });
        assert_reported(&msg, "synchronize_srcu", "while holding kvm->srcu (read)");
    }

    #[test]
    fn test_lockdep_synchronize_srcu_under_mmu_lock_is_reported() {
        let msg = report_of(|| {
            let srcu = Srcu::new();
            let lock = MmuLock::new();
            let stats = crate::sync::LockStats::default();
            let _w = lock.write(&stats);
            srcu.synchronize();
        });
        assert_reported(&msg, "synchronize_srcu", "while holding kvm->mmu_lock");
    }

    #[test]
    fn test_lockdep_synchronize_srcu_inside_a_notifier_is_reported() {
        let msg = report_of(|| {
            let srcu = Srcu::new();
            let _n = crate::notifier::notifier_section();
            srcu.synchronize();
        });
        assert_reported(
            &msg,
            "synchronize_srcu",
            "while holding mmu_notifier callback",
        );
    }

    #[test]
    fn test_lockdep_synchronize_srcu_under_slots_arch_lock_is_reported() {
        let msg = report_of(|| {
            let srcu = Srcu::new();
            let arch = Mutex::new(LockClass::SlotsArchLock, ());
            let _a = arch.lock();
            srcu.synchronize();
        });
        assert_reported(
            &msg,
            "synchronize_srcu",
            "while holding kvm->slots_arch_lock",
        );
    }

    #[test]
    fn test_lockdep_synchronize_srcu_under_kvm_lock_vcpu_mutex_and_slots_lock_is_allowed() {
        // Upstream calls synchronize_srcu under all three.
        let msg = report_of(|| {
            let srcu = Srcu::new();
            let kvm = Mutex::new(LockClass::KvmLock, ());
            let vcpu = Mutex::new(LockClass::VcpuMutex, ());
            let slots = Mutex::new(LockClass::SlotsLock, ());
            let _k = kvm.lock();
            let _v = vcpu.lock();
            let _s = slots.lock();
            srcu.synchronize();
        });
        assert_eq!(msg, "no report");
    }

    #[test]
    fn test_lockdep_kvm_lock_and_slots_lock_inside_srcu_read_are_reported() {
        for (class, name) in [
            (LockClass::KvmLock, "kvm->lock"),
            (LockClass::VcpuMutex, "vcpu->mutex"),
            (LockClass::SlotsLock, "kvm->slots_lock"),
        ] {
            let msg = report_of(move || {
                let srcu = Srcu::new();
                let reader = srcu.register();
                let m = Mutex::new(class, ());
                let _g = reader.read_lock();
                let _l = m.lock();
            });
            assert_reported(&msg, name, "while holding kvm->srcu (read)");
        }
    }

    #[test]
    fn test_lockdep_slots_arch_lock_inside_srcu_read_is_allowed() {
        let msg = report_of(|| {
            let srcu = Srcu::new();
            let reader = srcu.register();
            let arch = Mutex::new(LockClass::SlotsArchLock, ());
            let _g = reader.read_lock();
            let _a = arch.lock();
        });
        assert_eq!(msg, "no report");
    }

    #[test]
    fn test_lockdep_notifier_taking_slots_lock_or_slots_arch_lock_is_reported() {
        for (class, name) in [
            (LockClass::SlotsLock, "kvm->slots_lock"),
            (LockClass::SlotsArchLock, "kvm->slots_arch_lock"),
        ] {
            let msg = report_of(move || {
                let m = Mutex::new(class, ());
                let _n = crate::notifier::notifier_section();
                let _l = m.lock();
            });
            assert_reported(&msg, name, "while holding mmu_notifier callback");
        }
    }

    #[test]
    fn test_lockdep_tdp_mmu_pages_lock_without_mmu_lock_is_reported() {
        let msg = report_of(|| {
            let pages = Mutex::new(LockClass::TdpMmuPagesLock, ());
            let _p = pages.lock();
        });
        assert!(
            msg.contains("acquiring kvm->arch.tdp_mmu_pages_lock")
                && msg.contains("without holding kvm->mmu_lock"),
            "{msg}"
        );
        let msg = report_of(|| {
            let lock = MmuLock::new();
            let stats = crate::sync::LockStats::default();
            let pages = Mutex::new(LockClass::TdpMmuPagesLock, ());
            let _r = lock.read(&stats);
            let _p = pages.lock();
        });
        assert_eq!(msg, "no report");
    }

    #[test]
    fn test_lockdep_irq_lock_comes_after_slots_lock_and_kvm_lock() {
        let msg = report_of(|| {
            let irq = Mutex::new(LockClass::IrqLock, ());
            let slots = Mutex::new(LockClass::SlotsLock, ());
            let _i = irq.lock();
            let _s = slots.lock();
        });
        assert_reported(&msg, "kvm->slots_lock", "while holding kvm->irq_lock");
        let msg = report_of(|| {
            let kvm = Mutex::new(LockClass::KvmLock, ());
            let slots = Mutex::new(LockClass::SlotsLock, ());
            let irq = Mutex::new(LockClass::IrqLock, ());
            let _k = kvm.lock();
            let _s = slots.lock();
            let _i = irq.lock();
        });
        assert_eq!(msg, "no report");
    }

    #[test]
    fn test_lockdep_kvm_lock_inside_vcpu_mutex_is_reported() {
        let msg = report_of(|| {
            let kvm = Mutex::new(LockClass::KvmLock, ());
            let vcpu = Mutex::new(LockClass::VcpuMutex, ());
            let _v = vcpu.lock();
            let _k = kvm.lock();
        });
        assert_reported(&msg, "kvm->lock", "while holding vcpu->mutex");
    }
}
