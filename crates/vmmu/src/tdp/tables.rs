//! How the TDP MMU reaches the memory of its tables: the host's
//! [`TableMemory`], and its linear range when it has one.
//!
//! A walk looks a table up once per level, so on the fault path the lookup
//! is paid four times per fault. Through the trait it is a dynamic call with
//! the host's own bounds check; through [`LinearTables`] it is a subtraction,
//! a compare and an add, inlined (the kernel's `__va`, which KVM's walks use).

use crate::host::{LinearTables, Table, TableMemory, TableMemoryError};
use crate::sync::Arc;
use crate::types::Pfn;

/// The host's table memory with its linear range, kept together so the range
/// never outlives the memory it points into.
#[derive(Clone)]
pub(crate) struct Tables {
    mem: Arc<dyn TableMemory>,
    linear: Option<LinearTables>,
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables")
            .field("linear", &self.linear)
            .finish_non_exhaustive()
    }
}

impl Tables {
    pub(crate) fn new(mem: Arc<dyn TableMemory>) -> Self {
        let linear = mem.linear();
        Tables { mem, linear }
    }

    /// The entries of table frame `pfn`.
    #[inline]
    pub(crate) fn table(&self, pfn: Pfn) -> &Table {
        match self.linear.as_ref().and_then(|l| l.get(pfn)) {
            Some(t) => t,
            None => self.mem.table(pfn),
        }
    }

    pub(crate) fn alloc_table_page(&self) -> Result<Pfn, TableMemoryError> {
        self.mem.alloc_table_page()
    }

    pub(crate) fn free_table_page(&self, pfn: Pfn) {
        self.mem.free_table_page(pfn)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;
    use crate::testing::TestMemory;

    /// A host whose tables 0x100..0x104 are also a linear range; the trait's
    /// `table` is the slow path and counts its calls.
    struct Linear {
        frames: Box<[Table]>,
        slow: TestMemory,
        slow_calls: AtomicU64,
    }

    impl TableMemory for Linear {
        fn alloc_table_page(&self) -> Result<Pfn, TableMemoryError> {
            self.slow.alloc_table_page()
        }
        fn free_table_page(&self, pfn: Pfn) {
            self.slow.free_table_page(pfn)
        }
        fn table(&self, pfn: Pfn) -> &Table {
            self.slow_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match pfn.0.checked_sub(0x100) {
                Some(i) if i < 4 => &self.frames[i as usize],
                _ => self.slow.table(pfn),
            }
        }
        fn linear(&self) -> Option<LinearTables> {
            let base = std::ptr::NonNull::from(&self.frames[0]);
            // SAFETY: four tables from `frames[0]`, owned by `self` and only
            // accessed atomically.
            Some(unsafe { LinearTables::new(base, Pfn(0x100), 4) })
        }
    }

    #[test]
    fn test_tables_in_the_linear_range_skip_the_call_and_the_rest_take_it() {
        let frames: Box<[Table]> = (0..4)
            .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
            .collect();
        let host = Arc::new(Linear {
            frames,
            slow: TestMemory::new(),
            slow_calls: AtomicU64::new(0),
        });
        let t = Tables::new(host.clone());
        for i in 0..4 {
            assert!(
                std::ptr::eq(t.table(Pfn(0x100 + i)), &host.frames[i as usize]),
                "frame {i} of the range"
            );
        }
        assert_eq!(
            host.slow_calls.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        // Just below and just past the range: through the host.
        let outside = host.slow.alloc_table_page().unwrap();
        assert!(std::ptr::eq(t.table(outside), host.slow.table(outside)));
        assert!(std::ptr::eq(t.table(Pfn(0x103)), &host.frames[3]));
        let before = host.slow_calls.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(before, 1, "one call for the frame outside the range");
        host.slow.free_table_page(outside);
        let l = host.linear().unwrap();
        assert!(l.get(Pfn(0xff)).is_none() && l.get(Pfn(0x104)).is_none());
        assert!(std::ptr::eq(l.get(Pfn(0x103)).unwrap(), &host.frames[3]));
    }
}
