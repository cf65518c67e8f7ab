//! Read-mostly state published as an immutable snapshot and swapped whole.
//!
//! Readers take a cheap guard and never block; a writer builds a new value and
//! stores it. `swap` returns the previous value so a writer can wait until readers
//! are done with it and then recycle it (the memslot code keeps two sets and
//! updates the inactive one, as KVM does).

use super::Arc;

#[cfg(not(loom))]
pub(crate) struct Snapshot<T> {
    inner: arc_swap::ArcSwap<T>,
}

#[cfg(loom)]
pub(crate) struct Snapshot<T> {
    inner: super::Mutex<Arc<T>>,
}

impl<T> std::fmt::Debug for Snapshot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

#[cfg(not(loom))]
pub(crate) type SnapshotGuard<T> = arc_swap::Guard<Arc<T>>;
#[cfg(loom)]
pub(crate) type SnapshotGuard<T> = Arc<T>;

impl<T> Snapshot<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        #[cfg(not(loom))]
        {
            Snapshot {
                inner: arc_swap::ArcSwap::new(value),
            }
        }
        #[cfg(loom)]
        {
            Snapshot {
                inner: super::Mutex::new(super::LockClass::Leaf, value),
            }
        }
    }

    /// A cheap, non-blocking read guard.
    pub(crate) fn load(&self) -> SnapshotGuard<T> {
        #[cfg(not(loom))]
        {
            self.inner.load()
        }
        #[cfg(loom)]
        {
            self.inner.lock().clone()
        }
    }

    /// A full reference, for holding across long operations.
    pub(crate) fn load_full(&self) -> Arc<T> {
        #[cfg(not(loom))]
        {
            self.inner.load_full()
        }
        #[cfg(loom)]
        {
            self.inner.lock().clone()
        }
    }

    /// Publish `value`, returning the previous one.
    pub(crate) fn swap(&self, value: Arc<T>) -> Arc<T> {
        #[cfg(not(loom))]
        {
            self.inner.swap(value)
        }
        #[cfg(loom)]
        {
            std::mem::replace(&mut *self.inner.lock(), value)
        }
    }
}
