//! A mutex that knows its lock class, plus a condition variable for it.

use std::ops::{Deref, DerefMut};
use std::panic::Location;

use super::lockdep::{Held, LockClass};

#[cfg(not(loom))]
type Inner<T> = parking_lot::Mutex<T>;
#[cfg(not(loom))]
type InnerGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
#[cfg(loom)]
type Inner<T> = loom::sync::Mutex<T>;
#[cfg(loom)]
type InnerGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

/// A mutual-exclusion lock checked by the lock-order checker.
#[derive(Debug)]
pub(crate) struct Mutex<T> {
    inner: Inner<T>,
    class: LockClass,
}

/// Guard of a [`Mutex`].
pub(crate) struct MutexGuard<'a, T> {
    inner: Option<InnerGuard<'a, T>>,
    _held: Held,
}

impl<T> Mutex<T> {
    pub(crate) fn new(class: LockClass, value: T) -> Self {
        Mutex {
            inner: Inner::new(value),
            class,
        }
    }

    #[track_caller]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        let held = Held::acquire(self.class, Location::caller());
        #[cfg(not(loom))]
        let g = self.inner.lock();
        #[cfg(loom)]
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        MutexGuard {
            inner: Some(g),
            _held: held,
        }
    }
}

impl<T> Mutex<T> {
    /// Take the lock only if it is free now. Never waits, so it cannot take
    /// part in a deadlock; the checker still records it as held.
    #[track_caller]
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        let held = Held::acquire(self.class, Location::caller());
        #[cfg(not(loom))]
        let g = self.inner.try_lock()?;
        #[cfg(loom)]
        let g = self.inner.try_lock().ok()?;
        Some(MutexGuard {
            inner: Some(g),
            _held: held,
        })
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // The option is only empty transiently inside `Condvar::wait`.
        self.inner.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.inner.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

/// Condition variable paired with [`Mutex`].
#[derive(Debug, Default)]
pub(crate) struct Condvar {
    #[cfg(not(loom))]
    inner: parking_lot::Condvar,
    #[cfg(loom)]
    inner: loom::sync::Condvar,
}

impl Condvar {
    pub(crate) fn new() -> Self {
        Condvar::default()
    }

    /// Atomically release the mutex and sleep until notified.
    pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
        #[cfg(not(loom))]
        {
            if let Some(g) = guard.inner.as_mut() {
                self.inner.wait(g);
            }
        }
        #[cfg(loom)]
        {
            if let Some(g) = guard.inner.take() {
                let g = self.inner.wait(g).unwrap_or_else(|e| e.into_inner());
                guard.inner = Some(g);
            }
        }
    }

    pub(crate) fn notify_all(&self) {
        self.inner.notify_all();
    }
}
