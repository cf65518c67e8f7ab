//! Page-modification logging: the D-bit way of catching a guest's writes
//! (Intel's PML, KVM's `enable_pml`).
//!
//! With [`DirtyTracking::Pml`](crate::DirtyTracking::Pml) a dirty-log harvest
//! leaves a logged 4 KiB page writable and only clears its Dirty bit. When the
//! guest next writes it, the processor sets Dirty again (no exit) and appends
//! the page's address to the vCPU's log, a 512-entry buffer. KVM drains the
//! log into the dirty bitmap (or the vCPU's dirty ring) at every VM exit, and
//! the processor exits on its own when the log is full. A write is therefore
//! reported late, never lost: until the vCPU's next exit it sits in the log
//! while its page's Dirty bit is set, so a harvest that does not see it in
//! the bitmap leaves the page alone and the next harvest reports it. A
//! harvest kicks running vCPUs so their logs drain soon (KVM's
//! `kvm_arch_sync_dirty_log`), without waiting for them, as KVM does.
//!
//! The log belongs to the vCPU's thread (the processor writes it while the
//! vCPU runs; KVM reads it after the exit), so it needs no synchronisation.

use std::cell::RefCell;

use crate::types::{Gfn, Gpa};
use crate::vcpu::VcpuMmu;

/// Entries in a vCPU's log (one 4 KiB page of addresses).
pub const PML_ENTRIES: usize = 512;

/// A vCPU's page-modification log.
#[derive(Debug, Default)]
pub(crate) struct PmlLog {
    gfns: RefCell<Vec<Gfn>>,
}

impl PmlLog {
    /// Append `gfn`; true once the log holds [`PML_ENTRIES`] entries.
    fn push(&self, gfn: Gfn) -> bool {
        let mut g = self.gfns.borrow_mut();
        if g.capacity() == 0 {
            g.reserve_exact(PML_ENTRIES);
        }
        g.push(gfn);
        g.len() >= PML_ENTRIES
    }

    /// Hand every entry to `f`, oldest first, and empty the log.
    fn drain(&self, mut f: impl FnMut(Gfn)) -> usize {
        let mut g = self.gfns.borrow_mut();
        let n = g.len();
        g.drain(..).for_each(&mut f);
        n
    }

    fn is_empty(&self) -> bool {
        self.gfns.borrow().is_empty()
    }
}

impl VcpuMmu {
    /// The processor set the Dirty bit of the leaf that maps `gpa` while
    /// writing it: with PML on, the page's address goes into this vCPU's log.
    /// Returns true when the log is now full: the vCPU must leave guest mode
    /// (a PML-full exit) before its next write, which drains the log. Without
    /// PML this does nothing and returns false.
    pub fn pml_log(&self, gpa: Gpa) -> bool {
        if !self.vm.config.pml() {
            return false;
        }
        let full = self.pml.push(gpa.gfn());
        if full {
            crate::stats::CounterSet::inc(&self.shared.stats.pml_full_exits);
        }
        full
    }

    /// Entries waiting in this vCPU's log.
    pub fn pml_pending(&self) -> usize {
        self.pml.gfns.borrow().len()
    }

    /// Drain the log into the dirty bitmaps or this vCPU's ring (KVM's
    /// `vmx_flush_pml_buffer`, run at every VM exit). Addresses in slots that
    /// do not log, or in no slot, are dropped, as `mark_page_dirty` drops them.
    pub(crate) fn flush_pml(&self) {
        if self.pml.is_empty() {
            return;
        }
        let vm = &*self.vm;
        let _srcu = self.srcu.read_lock();
        let slots = vm.memslots[self.role.as_id() as usize].load();
        let ring = self.shared.ring.as_ref();
        let n = self.pml.drain(|gfn| {
            if let Some(slot) = slots.lookup(gfn) {
                crate::dirty_log::mark_page_dirty(slot, gfn, ring);
            }
        });
        crate::stats::CounterSet::add(&self.shared.stats.pml_entries_flushed, n as u64);
    }
}
