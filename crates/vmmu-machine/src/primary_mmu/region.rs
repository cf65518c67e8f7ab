//! The host's regions (its `mmap`s): the list, looked up lock-free by every
//! fault, and each thread's cache of the last region it used.

use super::*;

/// One mapped region.
pub(super) struct Region {
    pub(super) start: u64,
    pub(super) pages: u64,
    pub(super) backing: Backing,
    pub(super) entries: Box<[AtomicU64]>,
    pub(super) locks: Box<[Mutex<()>]>,
    /// Serialises host events on the region (each holds it from its checks to
    /// its changes) and huge-page population; taken before page-table locks.
    /// Events may still be in `invalidate_range_start` at the same time, as
    /// concurrent invalidations are in Linux.
    pub(super) reshape: Mutex<()>,
}

impl Region {
    pub(super) fn contains(&self, hva: u64) -> bool {
        hva >= self.start && hva < self.start + self.pages * PAGE
    }
    pub(super) fn idx(&self, hva: u64) -> usize {
        ((hva - self.start) / PAGE) as usize
    }
    pub(super) fn lock(&self, idx: usize) -> parking_lot::MutexGuard<'_, ()> {
        self.locks[idx / 512].lock()
    }
}

impl HostMmu {
    /// `mmap` a region.
    pub fn map_region(&self, start: Hva, len: u64, backing: Backing) -> Result<(), HostError> {
        let align = backing.alignment();
        if len == 0
            || !start.0.is_multiple_of(align)
            || !len.is_multiple_of(align)
            || start.0.checked_add(len).is_none()
        {
            return Err(HostError::Unaligned {
                start: start.0,
                len,
                align,
            });
        }
        let _u = self.regions_update.lock();
        let cur = self.regions.load();
        if cur
            .iter()
            .any(|r| start.0 < r.start + r.pages * PAGE && r.start < start.0 + len)
        {
            return Err(HostError::Overlap {
                start: start.0,
                len,
            });
        }
        let pages = len / PAGE;
        let region = Arc::new(Region {
            start: start.0,
            pages,
            backing,
            // Zeroed by the allocator, so a sparse guest's host page table
            // costs memory only where it is touched.
            entries: crate::host_memory::zeroed_atomics(pages as usize),
            locks: (0..pages.div_ceil(512)).map(|_| Mutex::new(())).collect(),
            reshape: Mutex::new(()),
        });
        let mut v: Vec<_> = (**cur).clone();
        v.push(region);
        v.sort_by_key(|r| r.start);
        self.publish(v);
        Ok(())
    }

    /// `munmap` a whole region: invalidate, free every frame, forget it.
    pub fn unmap_region(&self, start: Hva) -> bool {
        let Some(r) = self.region(start.0) else {
            return false;
        };
        self.madvise_dontneed(HvaRange::new(Hva(r.start), Hva(r.start + r.pages * PAGE)));
        let _u = self.regions_update.lock();
        let v: Vec<_> = self
            .regions
            .load()
            .iter()
            .filter(|x| !Arc::ptr_eq(x, &r))
            .cloned()
            .collect();
        self.publish(v);
        true
    }

    /// Make `v` the region list. Every change goes through here: the
    /// generation it bumps is what keeps [`HostMmu::with_region`]'s
    /// per-thread caches from answering with a region of an older list.
    fn publish(&self, v: Vec<Arc<Region>>) {
        self.regions.store(Arc::new(v));
        // Release: a thread that sees the new count also sees the new list.
        self.regions_gen.fetch_add(1, Ordering::Release);
    }

    /// Run `f` on the region holding `hva` through this thread's cache of
    /// the last region it used: a fault looks its region up twice (faultin,
    /// the mapping level), and cloning the `Arc` each time made every vCPU
    /// faulting in one region write that region's count. The cache is keyed
    /// by this host and the list's generation, so a changed list is looked
    /// up again (a nested call finds the cache taken and looks up directly).
    /// A thread keeps at most one region of a dead host or list alive, until
    /// its next lookup or its exit.
    pub(super) fn with_region<R>(&self, hva: u64, f: impl FnOnce(&Region) -> R) -> Option<R> {
        thread_local! {
            static LAST: std::cell::Cell<Option<(u64, u64, Arc<Region>)>> =
                const { std::cell::Cell::new(None) };
        }
        // Acquire: pairs with the Release after each store of the list.
        let gen = self.regions_gen.load(Ordering::Acquire);
        let cached = LAST.with(|c| c.take());
        let r = match cached {
            Some((id, g, r)) if id == self.id && g == gen && r.contains(hva) => r,
            _ => self.region(hva)?,
        };
        let out = f(&r);
        LAST.with(|c| c.set(Some((self.id, gen, r))));
        Some(out)
    }

    pub(super) fn region(&self, hva: u64) -> Option<Arc<Region>> {
        let regions = self.regions.load();
        let i = regions.partition_point(|r| r.start <= hva);
        let r = regions.get(i.checked_sub(1)?)?;
        r.contains(hva).then(|| r.clone())
    }
}
