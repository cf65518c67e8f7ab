//! Small host implementations for tests, examples and model checking.
//!
//! [`TestHost`] implements every host trait with simple, strict bookkeeping: it
//! fails loudly on a double free or an unbalanced frame reference, and reports
//! leaked table pages, so tests over random operation sequences can assert that
//! the MMU neither leaks nor frees twice.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::host::{
    FaultinRequest, HostFaultError, HostOps, HostPfn, Kick, PrimaryMmu, Table, TableMemory,
    TableMemoryError,
};
use crate::spte::Spte;
use crate::sync::{Arc, AtomicU64, AtomicU8, LockClass, Mutex, Ordering};
use crate::types::{Hva, Level, Pfn, PAGE_SIZE};

#[cfg(not(loom))]
const CHUNK: usize = 256;
#[cfg(not(loom))]
const CHUNKS: usize = 256;
// Model-checked tests create every atomic afresh in each explored execution: keep
// the arena tiny there.
#[cfg(loom)]
const CHUNK: usize = 4;
#[cfg(loom)]
const CHUNKS: usize = 8;
/// Table frames are numbered from here, far from the data frames tests use.
pub const TABLE_PFN_BASE: u64 = 1 << 28;
/// Private (guest_memfd) frames are numbered from here.
pub const PRIVATE_PFN_BASE: u64 = 1 << 32;

/// Table memory that tracks every page.
pub struct TestMemory {
    chunks: Vec<OnceLock<Box<[Table]>>>,
    state: Box<[AtomicU8]>,
    free: Mutex<Vec<u32>>,
    next: AtomicU64,
    allocated: AtomicU64,
    double_frees: AtomicU64,
    limit: AtomicU64,
}

impl std::fmt::Debug for TestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestMemory {{ allocated: {} }}", self.allocated())
    }
}

impl Default for TestMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl TestMemory {
    /// Room for 65536 tables (32 under loom).
    pub fn new() -> Self {
        let chunks: Vec<OnceLock<Box<[Table]>>> = (0..CHUNKS).map(|_| OnceLock::new()).collect();
        TestMemory {
            chunks,
            state: (0..CHUNK * CHUNKS).map(|_| AtomicU8::new(0)).collect(),
            free: Mutex::new(LockClass::Leaf, Vec::new()),
            next: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            double_frees: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
        }
    }

    fn make_chunk() -> Box<[Table]> {
        (0..CHUNK)
            .map(|_| std::array::from_fn(|_| AtomicU64::new(Spte::NONPRESENT.0)))
            .collect()
    }

    /// Allocate a table filled with not-present entries (for tests building tables
    /// by hand).
    pub fn new_table(&self) -> Pfn {
        let pfn = self.alloc_table_page().unwrap_or_else(|e| panic!("{e}"));
        for e in self.table(pfn).iter() {
            e.store(Spte::NONPRESENT.0, Ordering::Relaxed);
        }
        pfn
    }

    /// Pages currently allocated.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::SeqCst)
    }

    /// Frees of pages that were not allocated.
    pub fn double_frees(&self) -> u64 {
        self.double_frees.load(Ordering::SeqCst)
    }

    /// Fail allocations once `n` pages are in use.
    pub fn set_limit(&self, n: u64) {
        self.limit.store(n, Ordering::SeqCst);
    }

    /// A freed page that no longer holds the poison its free left in it:
    /// something wrote into the table after it was freed (a use after free
    /// that nothing else may notice, if the page is never handed out again).
    pub fn freed_page_written(&self) -> Option<Pfn> {
        let free = self.free.lock().clone();
        free.into_iter()
            .map(|i| Pfn(TABLE_PFN_BASE + u64::from(i)))
            .find(|&pfn| !self.holds_poison(pfn))
    }

    fn holds_poison(&self, pfn: Pfn) -> bool {
        self.table(pfn)
            .iter()
            .all(|e| e.load(Ordering::Relaxed) == FREED_POISON)
    }
}

/// What a freed table page is filled with, so a reader that should have been
/// gone sees garbage, and a write after the free can be found.
const FREED_POISON: u64 = 0xdead_0000_0000_0007;

impl TableMemory for TestMemory {
    fn alloc_table_page(&self) -> Result<Pfn, TableMemoryError> {
        if self.allocated.load(Ordering::SeqCst) >= self.limit.load(Ordering::SeqCst) {
            return Err(TableMemoryError::OutOfMemory);
        }
        // Not under the lock: a page found written must not poison it.
        let reused = self.free.lock().pop();
        let idx = match reused {
            Some(i) => {
                let pfn = Pfn(TABLE_PFN_BASE + u64::from(i));
                assert!(
                    self.holds_poison(pfn),
                    "table page {pfn:?} was written after it was freed"
                );
                u64::from(i)
            }
            None => self.next.fetch_add(1, Ordering::SeqCst),
        };
        if idx as usize >= CHUNK * CHUNKS {
            return Err(TableMemoryError::OutOfMemory);
        }
        let prev = self.state[idx as usize].swap(1, Ordering::SeqCst);
        assert_eq!(prev, 0, "table page {idx} handed out twice");
        self.allocated.fetch_add(1, Ordering::SeqCst);
        Ok(Pfn(TABLE_PFN_BASE + idx))
    }

    fn free_table_page(&self, pfn: Pfn) {
        let idx = pfn.0.wrapping_sub(TABLE_PFN_BASE) as usize;
        if idx >= CHUNK * CHUNKS || self.state[idx].swap(0, Ordering::SeqCst) != 1 {
            self.double_frees.fetch_add(1, Ordering::SeqCst);
            panic!("free of table page {pfn:?} that is not allocated");
        }
        for e in self.table(pfn).iter() {
            e.store(FREED_POISON, Ordering::Relaxed);
        }
        self.allocated.fetch_sub(1, Ordering::SeqCst);
        self.free.lock().push(idx as u32);
    }

    fn table(&self, pfn: Pfn) -> &Table {
        let idx = pfn.0.wrapping_sub(TABLE_PFN_BASE) as usize;
        assert!(idx < CHUNK * CHUNKS, "{pfn:?} is not a table page");
        let chunk = self.chunks[idx / CHUNK].get_or_init(Self::make_chunk);
        &chunk[idx % CHUNK]
    }
}

/// A host address space: hva pages mapped to frames, with reference counting.
#[derive(Debug)]
struct Mapping {
    pfn: Pfn,
    writable: bool,
    /// Size of the host page this address is part of.
    level: Level,
}

/// A complete test host: table memory, a primary MMU with explicit mappings, and
/// a kick that does nothing (tests that run no guest code).
pub struct TestHost {
    /// Table pages.
    pub memory: TestMemory,
    map: Mutex<HashMap<u64, Mapping>>,
    refs: Mutex<HashMap<u64, u64>>,
    next_pfn: AtomicU64,
    host_level: AtomicU8,
    populate: bool,
    released_writable: AtomicU64,
    private: Mutex<std::collections::BTreeSet<u64>>,
    next_private: AtomicU64,
    /// Most guest_memfd pages allocated at once (then out of memory).
    private_limit: AtomicU64,
    /// Contents of guest memory by frame and 8-byte word (what the shadow
    /// MMU reads and writes); absent words read as 0.
    words: Mutex<HashMap<(u64, u64), u64>>,
}

impl std::fmt::Debug for TestHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHost")
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

impl TestHost {
    /// A host that maps a fresh frame on first touch of any address (like
    /// anonymous memory), writable.
    pub fn new() -> Arc<Self> {
        Arc::new(TestHost {
            memory: TestMemory::new(),
            map: Mutex::new(LockClass::Leaf, HashMap::new()),
            refs: Mutex::new(LockClass::Leaf, HashMap::new()),
            words: Mutex::new(LockClass::Leaf, HashMap::new()),
            next_pfn: AtomicU64::new(0x1000),
            host_level: AtomicU8::new(1),
            populate: true,
            released_writable: AtomicU64::new(0),
            private: Mutex::new(LockClass::Leaf, std::collections::BTreeSet::new()),
            next_private: AtomicU64::new(PRIVATE_PFN_BASE),
            private_limit: AtomicU64::new(u64::MAX),
        })
    }

    /// Allow at most `pages` guest_memfd pages at once; beyond, allocation
    /// fails with out-of-memory.
    pub fn set_private_limit(&self, pages: u64) {
        self.private_limit.store(pages, Ordering::SeqCst);
    }

    /// Host services for [`crate::Vm::new`].
    pub fn ops(self: &Arc<Self>) -> HostOps {
        HostOps {
            memory: self.clone(),
            primary: self.clone(),
            kick: self.clone(),
            private: Some(self.clone()),
        }
    }

    /// Private pages handed out and not yet given back.
    pub fn private_pages(&self) -> u64 {
        self.private.lock().len() as u64
    }

    /// Whether `pfn` is a private page handed out now.
    pub fn is_private_page(&self, pfn: Pfn) -> bool {
        self.private.lock().contains(&pfn.0)
    }

    /// The frame mapped at `hva`, if any.
    pub fn lookup(&self, hva: Hva) -> Option<(Pfn, bool)> {
        self.map
            .lock()
            .get(&(hva.0 / PAGE_SIZE))
            .map(|m| (m.pfn, m.writable))
    }

    /// Map `hva` to `pfn`. Callers bracket changes of existing mappings with
    /// invalidations, like a real host.
    /// Like the host splitting a huge page before changing part of it, every page
    /// of the surrounding 1 GiB becomes a 4 KiB mapping.
    pub fn set(&self, hva: Hva, pfn: Pfn, writable: bool) {
        let mut map = self.map.lock();
        Self::split(&mut map, hva.0 / PAGE_SIZE);
        map.insert(
            hva.0 / PAGE_SIZE,
            Mapping {
                pfn,
                writable,
                level: Level::K4,
            },
        );
    }

    /// Remove the mapping of `hva` (splitting a huge page around it first).
    pub fn unmap(&self, hva: Hva) {
        let mut map = self.map.lock();
        Self::split(&mut map, hva.0 / PAGE_SIZE);
        map.remove(&(hva.0 / PAGE_SIZE));
    }

    fn split(map: &mut HashMap<u64, Mapping>, page: u64) {
        let first = page & !(Level::G1.pages() - 1);
        if map.get(&page).is_some_and(|m| m.level > Level::K4) {
            for p in first..first + Level::G1.pages() {
                if let Some(m) = map.get_mut(&p) {
                    m.level = Level::K4;
                }
            }
        }
    }

    /// A frame number never used before.
    pub fn fresh_pfn(&self) -> Pfn {
        Pfn(self.next_pfn.fetch_add(1, Ordering::SeqCst))
    }

    /// The size of host pages populated from now on.
    pub fn set_host_level(&self, level: Level) {
        self.host_level.store(level.get(), Ordering::SeqCst);
    }

    /// Frames released with "the MMU mapped it writable" (the host would mark
    /// them dirty).
    pub fn released_writable(&self) -> u64 {
        self.released_writable.load(Ordering::SeqCst)
    }

    /// Frame references taken and not yet released.
    pub fn outstanding_refs(&self) -> u64 {
        self.refs.lock().values().sum()
    }
}

impl TableMemory for TestHost {
    fn alloc_table_page(&self) -> Result<Pfn, TableMemoryError> {
        self.memory.alloc_table_page()
    }
    fn free_table_page(&self, pfn: Pfn) {
        self.memory.free_table_page(pfn)
    }
    fn table(&self, pfn: Pfn) -> &Table {
        self.memory.table(pfn)
    }
}

impl PrimaryMmu for TestHost {
    fn faultin(&self, hva: Hva, req: FaultinRequest) -> Result<HostPfn, HostFaultError> {
        let page = hva.0 / PAGE_SIZE;
        let mut map = self.map.lock();
        let m = match map.get(&page) {
            Some(m) => m,
            None if self.populate => {
                // Populate a whole host page (huge pages are physically contiguous,
                // frames congruent with the address) if its range is still empty,
                // else a 4 KiB page.
                let mut level =
                    Level::new(self.host_level.load(Ordering::SeqCst)).unwrap_or(Level::K4);
                let first = page & !(level.pages() - 1);
                if (first..first + level.pages()).any(|p| map.contains_key(&p)) {
                    level = Level::K4;
                }
                let n = level.pages();
                let first = page & !(n - 1);
                let base = self.next_pfn.fetch_add(2 * n, Ordering::SeqCst);
                let base_pfn = (base + n) & !(n - 1);
                for i in 0..n {
                    map.insert(
                        first + i,
                        Mapping {
                            pfn: Pfn(base_pfn + i),
                            writable: true,
                            level,
                        },
                    );
                }
                map.get(&page).unwrap_or_else(|| unreachable!())
            }
            None => return Err(HostFaultError::NotMapped),
        };
        if req.write && !m.writable {
            return Err(HostFaultError::ReadOnly);
        }
        let r = HostPfn {
            pfn: m.pfn,
            writable: m.writable,
            level: m.level,
        };
        drop(map);
        *self.refs.lock().entry(r.pfn.0).or_insert(0) += 1;
        Ok(r)
    }

    fn release(&self, pfn: Pfn, mapped_writable: bool) {
        if mapped_writable {
            self.released_writable.fetch_add(1, Ordering::SeqCst);
        }
        let mut refs = self.refs.lock();
        let n = refs
            .get_mut(&pfn.0)
            .unwrap_or_else(|| panic!("release of unreferenced {pfn:?}"));
        *n -= 1;
        if *n == 0 {
            refs.remove(&pfn.0);
        }
    }

    fn mapping_level(&self, hva: Hva) -> Level {
        self.map
            .lock()
            .get(&(hva.0 / PAGE_SIZE))
            .map_or(Level::K4, |m| m.level)
    }

    fn read_u64(&self, hva: Hva) -> Result<u64, HostFaultError> {
        let key = self.word(hva, false)?;
        Ok(self.words.lock().get(&key).copied().unwrap_or(0))
    }

    fn peek_u64(&self, hva: Hva) -> Option<u64> {
        let m = self.map.lock().get(&(hva.0 / PAGE_SIZE)).map(|m| m.pfn)?;
        let key = (m.0, (hva.0 % PAGE_SIZE) / 8);
        Some(self.words.lock().get(&key).copied().unwrap_or(0))
    }

    fn cmpxchg_u64(
        &self,
        hva: Hva,
        old: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, HostFaultError> {
        let key = self.word(hva, true)?;
        let mut w = self.words.lock();
        let cur = w.get(&key).copied().unwrap_or(0);
        if cur != old {
            return Ok(Err(cur));
        }
        w.insert(key, new);
        Ok(Ok(old))
    }

    fn write_u64(&self, hva: Hva, value: u64) -> Result<(), HostFaultError> {
        let key = self.word(hva, true)?;
        self.words.lock().insert(key, value);
        Ok(())
    }
}

impl TestHost {
    /// The (frame, word) behind `hva`, faulted in like a user access.
    fn word(&self, hva: Hva, write: bool) -> Result<(u64, u64), HostFaultError> {
        let h = self.faultin(hva, FaultinRequest { write })?;
        self.release(h.pfn, write);
        Ok((h.pfn.0, (hva.0 % PAGE_SIZE) / 8))
    }
}

impl crate::host::PrivateMemory for TestHost {
    fn alloc_private(&self) -> Result<Pfn, HostFaultError> {
        let mut set = self.private.lock();
        if set.len() as u64 >= self.private_limit.load(Ordering::SeqCst) {
            return Err(HostFaultError::OutOfMemory);
        }
        let pfn = self.next_private.fetch_add(1, Ordering::SeqCst);
        set.insert(pfn);
        Ok(Pfn(pfn))
    }

    fn free_private(&self, pfn: Pfn) {
        let was = self.private.lock().remove(&pfn.0);
        assert!(was, "free of private page {pfn:?} that is not allocated");
    }
}

impl Kick for TestHost {
    fn kick(&self, _vcpu_id: u32) {}
}

/// What a processor does when it writes through an entry whose Dirty bit is
/// clear: walk to the leaf and set D with a locked update of the value it read.
/// Returns whether D was set (false if the entry is gone or changed under it, in
/// which case real hardware would walk again and fault).
pub fn hardware_set_dirty(vm: &crate::Vm, gpa: crate::Gpa) -> bool {
    let gfn = gpa.gfn();
    let inner = &vm.inner;
    let _rcu = inner.tdp.rcu.read_lock();
    for root in inner.tdp.roots_snapshot().iter() {
        if root.is_invalid() {
            continue;
        }
        let (sptep, spte, level) = inner.tdp.last_spte(root, gfn);
        if !spte.is_leaf(level) || !spte.is_writable() {
            return false;
        }
        // AcqRel: the locked read-modify-write the processor performs.
        return sptep
            .compare_exchange(
                spte.0,
                spte.0 | crate::spte::ept::D,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
    }
    false
}

/// What the processor reads for `gva` on a shadow VM: a walk of the shadow
/// tables from `root` (the root an entry returned) without `mmu_lock`, as the
/// hardware walks them. The last entry on the path (a leaf, or the first
/// entry that is not present).
pub fn hardware_walk_shadow(vm: &crate::Vm, root: Pfn, gva: crate::Gva) -> crate::spte::Spte {
    crate::shadow::fault::last_shadow_spte(&*vm.inner.host.memory, root, gva).1
}

/// Build huge leaves back in place over memslot `slot` of address space 0, as
/// turning its dirty logging off does, under the read lock (for models that
/// race it against faults). Returns the huge leaves made, or `None` if there
/// is no such slot.
pub fn recover_huge_pages(vm: &crate::Vm, slot: u16) -> Option<u64> {
    let set = vm.inner.memslots[0].load_full();
    let s = set.by_id(slot)?;
    Some(vm.recover_huge_pages(s))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A page written after its free is found, on request and when it is
    /// handed out again; pages freed and left alone are not.
    #[test]
    fn test_a_table_page_written_after_its_free_is_found() {
        let mem = TestMemory::new();
        let (a, b) = (mem.new_table(), mem.new_table());
        mem.free_table_page(a);
        mem.free_table_page(b);
        assert_eq!(mem.freed_page_written(), None, "both pages untouched");
        // A walker that should have been gone stores into `a`.
        mem.table(a)[7].store(Spte::NONPRESENT.0, Ordering::Relaxed);
        assert_eq!(mem.freed_page_written(), Some(a));
        // `b` was freed last and comes back first, clean.
        assert_eq!(mem.alloc_table_page(), Ok(b));
        let reuse =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mem.alloc_table_page()));
        let msg = reuse.expect_err("the written page was handed out again");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("written after it was freed"), "{msg}");
    }
}
