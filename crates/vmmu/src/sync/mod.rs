//! The one place atomics, locks and deferred freeing come from.
//!
//! Under `--cfg loom` every type here is loom's, so the protocol code in the rest
//! of the crate is model-checked unchanged. No other module imports
//! `std::sync::atomic` or `parking_lot` directly.

pub mod lockdep;
mod mmu_lock;
mod mutex;
mod rcu;
mod snapshot;
mod srcu;

#[cfg(not(loom))]
pub use std::sync::atomic::{
    fence, AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(loom)]
pub use loom::sync::atomic::{
    fence, AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

pub use std::sync::{Arc, Weak};

pub use lockdep::LockClass;
pub use mmu_lock::LockStats;
pub(crate) use mmu_lock::{MmuGuard, MmuLock, MmuReadGuard, MmuWriteGuard};
pub(crate) use mutex::{Condvar, Mutex, MutexGuard};
pub(crate) use rcu::{Rcu, RcuGuard, RcuReader};
pub(crate) use snapshot::Snapshot;
pub(crate) use srcu::{Srcu, SrcuReader, SrcuSnapshot};

/// Back off inside a spin-wait loop. Under loom this yields to the scheduler so the
/// model can make progress; otherwise it spins briefly and then yields the CPU
/// (this machine often runs more threads than cores).
pub(crate) fn spin_wait(iteration: &mut u32) {
    #[cfg(loom)]
    {
        let _ = iteration;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if *iteration < 6 {
            for _ in 0..(1u32 << *iteration) {
                std::hint::spin_loop();
            }
        } else {
            std::thread::yield_now();
        }
        *iteration = iteration.saturating_add(1);
    }
}
