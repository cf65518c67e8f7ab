//! The NX huge page mitigation at the VM level: turning it on and off at run
//! time, the recovery worker's pass, and a check of the possible-NX-huge-page
//! list against the tables (kvm-mmu-reference §8.6, §8.7).
//!
//! The mitigation against iTLB multihit keeps every huge leaf
//! non-executable; an instruction fetch maps its page at 4 KiB and lists the
//! table it made ([`crate::tdp`]'s `nx` module). Recovery, as in KVM since
//! 6.18, runs under `mmu_lock` held for read: it takes `ceil(listed / ratio)`
//! of the oldest listed tables and zaps each with a compare-and-exchange of
//! its link, so faults go on meanwhile. Tables in slots that log dirty pages
//! are left where they are (they would come back as 4 KiB pages anyway; huge
//! pages return there when logging stops) and only lose their mark.

use std::collections::HashSet;

use crate::root::RootFilter;
use crate::stats::CounterSet;
use crate::tdp::nx::NxOutcome;
use crate::tdp::{Ctx, FlushBatch};
use crate::types::{Gfn, Level};
use crate::vm::Vm;

/// Listed pages one hold of the read lock handles before it flushes and lets
/// writers in (KVM yields when someone waits; a fixed batch keeps the hold
/// short without a contention probe).
const PAGES_PER_HOLD: u64 = 64;

/// `mmu_lock` as a recovery batch holds it.
enum Held<'a> {
    Read(#[allow(dead_code)] crate::sync::MmuReadGuard<'a>),
    Write(#[allow(dead_code)] crate::sync::MmuWriteGuard<'a>),
}

/// What one NX recovery pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NxRecovery {
    /// Pages listed when the pass began (`nx_lpage_splits`).
    pub listed: u64,
    /// Pages the pass set out to take: `ceil(listed / ratio)`, 0 with ratio 0.
    pub to_zap: u64,
    /// Tables zapped: their ranges may be mapped huge again.
    pub zapped: u64,
    /// Tables left in place (unmarked) because their slot logs dirty pages.
    pub skipped_dirty_log: u64,
    /// Listed tables somebody else had zapped or replaced meanwhile.
    pub gone: u64,
}

impl Vm {
    /// Whether the NX huge page mitigation is on.
    pub fn nx_huge_pages(&self) -> bool {
        self.inner.tdp.nx_enabled()
    }

    /// Turn the mitigation on or off (KVM's `nx_huge_pages` parameter written
    /// at run time). A change zaps every root the fast way, as KVM does, so
    /// no mapping made under the old setting survives: turned on, no
    /// executable huge leaf is left; turned off, split ranges may be mapped
    /// huge again. Returns whether the setting changed.
    pub fn set_nx_huge_pages(&self, on: bool) -> bool {
        let vm = &*self.inner;
        let _s = vm.slots_guard();
        if vm.tdp.nx_enabled() == on {
            return false;
        }
        // Stored under the write lock, before the roots are invalidated: a
        // fault that read the old value either finished before (its mapping
        // is zapped with its root) or finds its root invalid and retries.
        vm.zap_roots_fast_with(RootFilter::All, || {
            vm.tdp
                .nx_huge_pages
                .store(on, crate::sync::Ordering::Relaxed);
        });
        true
    }

    /// Possible NX huge pages listed now (what `nx_lpage_splits` counts).
    pub fn possible_nx_huge_pages(&self) -> u64 {
        self.inner.tdp.possible_nx_count() as u64
    }

    /// One pass of the NX recovery worker: zap `ceil(listed / ratio)` of the
    /// oldest listed tables under the read lock (KVM's
    /// `kvm_recover_nx_huge_pages`, `nx_huge_pages_recovery_ratio`). Ratio 0
    /// turns recovery off, as in KVM. Every batch is flushed before the lock
    /// is let go: a vCPU must not keep using a translation through a zapped
    /// table once writers (an invalidation about to free the page) can run.
    pub fn recover_nx_huge_pages(&self, ratio: u32) -> NxRecovery {
        let vm = &*self.inner;
        CounterSet::inc(&vm.stats.nx_recovery_passes);
        let listed = vm.tdp.possible_nx_count() as u64;
        let to_zap = if ratio == 0 {
            0
        } else {
            listed.div_ceil(u64::from(ratio))
        };
        let mut out = NxRecovery {
            listed,
            to_zap,
            ..NxRecovery::default()
        };
        let srcu = vm.srcu.register();
        let mut taken = 0;
        while taken < to_zap {
            let _srcu = srcu.read_lock();
            let rcu = vm.tdp.rcu.read_lock();
            let ctx = Ctx::new(&vm.stats, &rcu);
            let mut batch = FlushBatch::default();
            // Before 6.18 recovery held the write lock (kept for measuring).
            let r = if vm.config.nx_recovery_write_lock {
                Held::Write(vm.mmu_lock.write(&vm.stats.lock))
            } else {
                Held::Read(vm.mmu_lock.read(&vm.stats.lock))
            };
            let mut empty = false;
            for _ in 0..PAGES_PER_HOLD.min(to_zap - taken) {
                let Some(page) = vm.tdp.pop_possible_nx(&ctx) else {
                    empty = true;
                    break;
                };
                taken += 1;
                let as_id = if vm.config.knobs.nx_recovery_slot_as0 {
                    0
                } else {
                    page.as_id
                };
                let logged = vm.memslots[as_id as usize]
                    .load()
                    .lookup(page.gfn)
                    .is_some_and(|s| s.dirty_logging())
                    && !vm.config.knobs.nx_recovery_ignores_dirty_log;
                match vm.tdp.recover_nx_page(&ctx, &page, logged, &mut batch) {
                    NxOutcome::Zapped => out.zapped += 1,
                    NxOutcome::Unmarked => {
                        CounterSet::inc(&vm.stats.nx_recovery_skipped);
                        out.skipped_dirty_log += 1;
                    }
                    NxOutcome::Gone => out.gone += 1,
                }
            }
            if !vm.config.knobs.skip_flush_before_yield {
                batch.flush(vm, &vm.stats);
            }
            drop(r);
            batch.flush(vm, &vm.stats);
            if empty {
                break;
            }
        }
        out
    }

    /// Check the possible-NX-huge-page list against the tables: every listed
    /// table is linked by a marked entry where the list says, and every
    /// marked link is listed. Returns how many are listed. Takes `mmu_lock`
    /// for write, so the answer holds for a moment where nothing changes.
    pub fn check_possible_nx_huge_pages(&self) -> Result<u64, String> {
        let vm = &*self.inner;
        let _w = vm.mmu_lock.write(&vm.stats.lock);
        let listed = vm.tdp.possible_nx_pages();
        let mut marked = HashSet::new();
        for root in vm.tdp.roots_snapshot().iter() {
            let mut it = vm.tdp.walk(root, Level::M2, Gfn(0), vm.tdp.max_gfn());
            while it.in_range() {
                if it.level > Level::K4 && it.old_spte.is_nx_disallowed(it.level) {
                    marked.insert((root.id, it.old_spte.pfn(), it.gfn, it.level));
                }
                it.next();
            }
        }
        for p in &listed {
            if !marked.remove(&(p.root_id, p.table, p.gfn, p.level)) {
                return Err(format!(
                    "listed possible NX huge page {:?} (gfn {:#x}, {:?}, root {}) is not linked by a marked entry",
                    p.table, p.gfn.0, p.level, p.root_id
                ));
            }
        }
        if let Some((root, table, gfn, level)) = marked.into_iter().next() {
            return Err(format!(
                "marked table {table:?} (gfn {:#x}, {level:?}, root {root}) is not on the possible NX huge page list",
                gfn.0
            ));
        }
        Ok(listed.len() as u64)
    }
}
