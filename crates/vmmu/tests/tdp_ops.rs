//! The TDP MMU's table operations seen from outside: batched flushes of zaps,
//! the table-page cache, fresh tables, walks above 512 GiB, splits under the NX
//! mitigation, a table replaced by a huge leaf, write-protection, dirty-bit
//! harvesting and table counting.

use std::sync::{Arc, Mutex};

use vmmu::spte::ept;
use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, GfnRange, Gpa, HostOps, Level, MemFlags, Pfn, RetPf, Spte, Table, TableMemory,
    TableMemoryError, Vm, VmConfig,
};

mod common;
use common::*;

/// Pages `[first, first + n)` of the slot as a gfn range.
fn pages(first: u64, n: u64) -> GfnRange {
    GfnRange::new(gpa(first).gfn(), gpa(first + n).gfn())
}

/// Every entry of every table reachable from `root`, as the processor would
/// read them: `(level, entry)`.
fn hardware_entries(mem: &dyn TableMemory, root: Pfn, root_level: Level) -> Vec<(Level, Spte)> {
    let mut out = Vec::new();
    let mut todo = vec![(root, root_level)];
    while let Some((pfn, level)) = todo.pop() {
        for e in mem.table(pfn).iter() {
            let s = Spte(e.load(std::sync::atomic::Ordering::SeqCst));
            out.push((level, s));
            if let (true, Some(lower)) = (s.is_table(level), level.lower()) {
                todo.push((s.pfn(), lower));
            }
        }
    }
    out
}

/// The entry mapping `gfn` at `level`, found by walking from `root` (a 4-level
/// table), with the tables on the way.
fn entry_path(mem: &dyn TableMemory, root: Pfn, gfn: vmmu::Gfn, level: Level) -> (Vec<Pfn>, usize) {
    let mut path = vec![root];
    let mut cur = Level::L4;
    while cur > level {
        let table = *path.last().unwrap();
        let s = Spte(mem.table(table)[cur.index(gfn)].load(std::sync::atomic::Ordering::SeqCst));
        assert!(s.is_table(cur), "no table above {gfn:?} at {cur:?}");
        path.push(s.pfn());
        cur = cur.lower().unwrap();
    }
    (path, level.index(gfn))
}

fn executable(s: Spte) -> bool {
    s.raw() & ept::X != 0
}

/// A zap of several leaves makes the vCPUs drop their translations, with one
/// remote flush for the whole batch; a zap that removes nothing flushes nothing.
#[test]
fn test_zap_gfn_range_flushes_once_per_batch_and_only_when_it_zapped() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    for p in 0..4 {
        assert_eq!(
            vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap(),
            RetPf::Fixed
        );
    }
    vcpu.prepare_entry().unwrap();
    let before = vm.stats();
    vm.zap_gfn_range(0, pages(0, 4)).unwrap();
    let d = vm.stats().since(&before);
    assert_eq!(d.leaves_zapped, 4);
    assert_eq!(d.tlb_flush_remote, 1, "one flush for the batch of zaps");
    assert!(vcpu.has_requests(), "the vCPU was asked to flush");
    assert!(
        vcpu.prepare_entry().unwrap().flush_tlb,
        "the next entry flushes the TLB"
    );
    let before = vm.stats();
    vm.zap_gfn_range(0, pages(0, 4)).unwrap();
    assert_eq!(vm.stats().since(&before).tlb_flush_remote, 0);
    assert!(!vcpu.has_requests());
    teardown(host, vm, vec![vcpu]);
}

/// The vCPU's cache is topped up to what a fault can need (one page per level),
/// no more: a host with exactly that many spare table pages serves the fault.
#[test]
fn test_fault_needs_no_more_spare_table_pages_than_levels() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    assert_eq!(
        host.memory.allocated(),
        vm.table_pages_in_use(),
        "loading the root leaves nothing cached"
    );
    host.memory.set_limit(vm.table_pages_in_use() + 4);
    assert_eq!(
        vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(vm.count_reachable_tables(), 3);
    teardown(host, vm, vec![vcpu]);
}

/// Table memory that hands out whatever a page held before: every entry of
/// every table the MMU makes reachable must be one it wrote (not present, a
/// table, a leaf or an MMIO entry), or the processor would walk garbage.
#[test]
fn test_reused_table_pages_hold_only_entries_the_mmu_wrote() {
    let host = TestHost::new();
    {
        // A first VM leaves its tables on the host's free list (poisoned).
        let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
        vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
            .unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.prepare_entry().unwrap();
        for p in [0, 512, 1024, 1536] {
            vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
        }
        teardown(host.clone(), vm, vec![vcpu]);
    }
    let vm = Vm::new(VmConfig::default(), host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let entry = vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(7), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    let entries = hardware_entries(&host.memory, entry.root, entry.root_level);
    assert_eq!(entries.len(), 4 * 512);
    for (level, s) in entries {
        assert!(
            s == Spte::NONPRESENT || s.is_shadow_present() || s.is_mmio(),
            "{level:?} entry {s:?} was never written by the MMU"
        );
    }
    teardown(host, vm, vec![vcpu]);
}

/// Table memory that, once armed, changes a huge leaf the way lockless aging
/// does (clears Accessed) when the fault fills the table that is to replace it:
/// the fault's compare-and-exchange of the link then loses, as it would to a
/// concurrent aging pass.
struct AgingWhileSplitting {
    host: Arc<TestHost>,
    /// The leaf's table and index, and the tables already on its path.
    armed: Mutex<Option<(Pfn, usize, Vec<Pfn>)>>,
}

impl TableMemory for AgingWhileSplitting {
    fn alloc_table_page(&self) -> Result<Pfn, TableMemoryError> {
        self.host.memory.alloc_table_page()
    }
    fn free_table_page(&self, pfn: Pfn) {
        self.host.memory.free_table_page(pfn)
    }
    fn table(&self, pfn: Pfn) -> &Table {
        let hit = self
            .armed
            .lock()
            .unwrap()
            .take_if(|(_, _, path)| !path.contains(&pfn));
        if let Some((table, index, _)) = hit {
            let e = &self.host.memory.table(table)[index];
            let old = e.load(std::sync::atomic::Ordering::SeqCst);
            assert!(e
                .compare_exchange(
                    old,
                    old & !ept::A,
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst
                )
                .is_ok());
        }
        self.host.memory.table(pfn)
    }
}

/// A split whose link loses the race gives its table back to the vCPU's cache:
/// the retried fault succeeds and no table page is leaked.
#[test]
fn test_split_that_loses_its_race_returns_the_table_to_the_cache() {
    let host = TestHost::new();
    host.set_host_level(Level::M2);
    let mem = Arc::new(AgingWhileSplitting {
        host: host.clone(),
        armed: Mutex::new(None),
    });
    let ops = HostOps {
        memory: mem.clone(),
        primary: host.clone(),
        kick: host.clone(),
        private: None,
    };
    let config = VmConfig {
        nx_huge_pages: true,
        ..VmConfig::default()
    };
    let vm = Vm::new(config, ops).unwrap();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let entry = vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(512), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(leaf(&vm, 512).unwrap().0, Level::M2);
    // A second fault tops the cache up, so the split below allocates nothing.
    assert_eq!(
        vcpu.page_fault(gpa(513), ErrorCode::empty()).unwrap(),
        RetPf::Spurious
    );
    let (path, index) = entry_path(&*mem, entry.root, gpa(512).gfn(), Level::M2);
    *mem.armed.lock().unwrap() = Some((*path.last().unwrap(), index, path));
    let before = vm.stats();
    // An instruction fetch splits the non-executable huge leaf.
    assert_eq!(
        vcpu.page_fault(gpa(513), ErrorCode::FETCH | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Retry
    );
    assert!(mem.armed.lock().unwrap().is_none(), "the race was staged");
    let d = vm.stats().since(&before);
    assert_eq!((d.map_retries, d.huge_splits), (1, 0));
    let r = vcpu
        .page_fault(gpa(513), ErrorCode::FETCH | ErrorCode::PRESENT)
        .unwrap();
    assert!(matches!(r, RetPf::Fixed | RetPf::Spurious), "{r:?}");
    assert_eq!(leaf(&vm, 513).unwrap().0, Level::K4);
    assert_eq!(vm.stats().huge_splits, 1);
    drop(vcpu);
    drop(vm);
    drop(mem);
    assert_eq!(host.memory.allocated(), 0, "table pages leaked");
    assert_eq!(host.outstanding_refs(), 0);
}

/// Walks restart from the root towards where they head: a slot above 512 GiB
/// (the second top-level entry) is mapped and zapped like any other.
#[test]
fn test_slot_above_512g_is_mapped_and_zapped() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let high = 1u64 << 39;
    vm.set_user_memory_region(region(1, high, SIZE, HVA + (1 << 30), 0))
        .unwrap();
    assert_eq!(
        vcpu.page_fault(Gpa(high + 4096), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    let gfn = Gpa(high + 4096).gfn();
    assert!(vm
        .mappings(0)
        .iter()
        .any(|(g, l, _)| *g == gfn && *l == Level::K4));
    vm.zap_gfn_range(0, GfnRange::new(gfn, gfn.add(1))).unwrap();
    assert!(vm.mappings(0).is_empty());
    teardown(host, vm, vec![vcpu]);
}

/// Under the NX mitigation, splitting a 1 GiB leaf for a fetch leaves its 2 MiB
/// children non-executable (they are still huge), while the 4 KiB children of the
/// split 2 MiB entry get execute back.
#[test]
fn test_nx_split_of_1g_keeps_2m_children_non_executable_and_4k_executable() {
    let host = TestHost::new();
    host.set_host_level(Level::G1);
    let config = VmConfig {
        nx_huge_pages: true,
        ..VmConfig::default()
    };
    let vm = Vm::new(config, host.ops()).unwrap();
    vm.set_user_memory_region(region(0, GPA, 1 << 30, HVA, 0))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    assert_eq!(
        vcpu.page_fault(gpa(0), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(leaf(&vm, 0).unwrap().0, Level::G1);
    let r = vcpu
        .page_fault(gpa(1), ErrorCode::FETCH | ErrorCode::PRESENT)
        .unwrap();
    assert!(matches!(r, RetPf::Fixed | RetPf::Spurious), "{r:?}");
    assert_eq!(vm.stats().huge_splits, 2);
    let maps = vm.mappings(0);
    let count = |l: Level| maps.iter().filter(|(_, ml, _)| *ml == l).count();
    assert_eq!((count(Level::M2), count(Level::K4)), (511, 512));
    for (g, l, s) in maps {
        if l > Level::K4 {
            assert!(!executable(s), "huge {l:?} leaf at {g:?} is executable");
        } else {
            assert!(executable(s), "4K child at {g:?} lost execute");
        }
    }
    teardown(host, vm, vec![vcpu]);
}

/// With dirty logging off again, a fault maps a 2 MiB region that holds 4 KiB
/// leaves huge, replacing their table: those leaves count as removed, the
/// table is freed, and vCPUs are told to drop the old translations. (The
/// region's first page is left unmapped, so turning logging off cannot
/// recover the huge page by itself: recovery builds it from that page.)
#[test]
fn test_huge_leaf_over_a_table_of_leaves_accounts_them_removed_and_flushes() {
    let (host, vm, mut vcpu) = huge_host_vm(VmConfig::default());
    let logging = MemFlags::LOG_DIRTY_PAGES.bits();
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, logging))
        .unwrap();
    for p in [513, 514] {
        assert_eq!(
            vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap(),
            RetPf::Fixed
        );
        assert_eq!(leaf(&vm, p).unwrap().0, Level::K4);
    }
    vm.set_user_memory_region(region(0, GPA, SIZE, HVA, 0))
        .unwrap();
    assert_eq!(vm.stats().huge_recovered, 0, "nothing to build it from");
    let tables = vm.count_reachable_tables();
    let before = vm.stats();
    assert_eq!(
        vcpu.page_fault(gpa(600), ErrorCode::WRITE).unwrap(),
        RetPf::Fixed
    );
    assert_eq!(leaf(&vm, 512).unwrap().0, Level::M2);
    let s = vm.stats();
    let d = s.since(&before);
    assert_eq!(s.present(Level::K4), 0, "4K leaves of the replaced table");
    assert_eq!(s.present(Level::M2), 1);
    assert_eq!(d.tables_freed, 1);
    assert_eq!(d.tlb_flush_remote, 1);
    assert_eq!(vm.count_reachable_tables(), tables - 1);
    teardown(host, vm, vec![vcpu]);
}

/// A write to a page the host first mapped read-only, once the host allows
/// writes to the same frame, upgrades the leaf in place: nothing the old entry
/// allowed is taken away, so no remote flush.
#[test]
fn test_upgrading_a_read_only_leaf_to_writable_does_not_flush() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let pfn = host.fresh_pfn();
    host.set(hva(3), pfn, false);
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::empty()).unwrap(),
        RetPf::Fixed
    );
    assert!(!leaf(&vm, 3).unwrap().1.is_writable());
    host.set(hva(3), pfn, true);
    let before = vm.stats();
    assert_eq!(
        vcpu.page_fault(gpa(3), ErrorCode::WRITE | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Fixed
    );
    let s = leaf(&vm, 3).unwrap().1;
    assert!(s.is_writable() && s.pfn() == pfn);
    let d = vm.stats().since(&before);
    assert_eq!(d.tlb_flush_remote, 0);
    assert_eq!(d.invariant_violations, 0);
    teardown(host, vm, vec![vcpu]);
}

/// Write-protection touches writable leaves only (never read-only leaves nor
/// table links), and protecting what is already protected changes nothing and
/// flushes nothing.
#[test]
fn test_write_protect_changes_only_writable_leaves_and_flushes_only_then() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    for p in [0, 1] {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    host.set(hva(5), host.fresh_pfn(), false);
    vcpu.page_fault(gpa(5), ErrorCode::empty()).unwrap();
    let before = vm.stats();
    vm.write_protect_gfn_range(0, pages(0, 512)).unwrap();
    let d = vm.stats().since(&before);
    assert_eq!(d.entries_write_protected, 2);
    assert_eq!(d.tlb_flush_remote, 1);
    for p in [0, 1, 5] {
        assert!(!leaf(&vm, p).unwrap().1.is_writable());
    }
    let entry = vcpu.prepare_entry().unwrap();
    for (level, s) in hardware_entries(&host.memory, entry.root, entry.root_level) {
        if s.is_table(level) {
            assert!(s.is_writable(), "{level:?} table link {s:?} lost W");
        }
    }
    let before = vm.stats();
    vm.write_protect_gfn_range(0, pages(0, 512)).unwrap();
    let d = vm.stats().since(&before);
    assert_eq!(d.entries_write_protected, 0);
    assert_eq!(d.tlb_flush_remote, 0, "nothing changed, nothing to flush");
    // The write is logged by the fast path.
    assert_eq!(
        vcpu.page_fault(gpa(0), ErrorCode::WRITE | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Fixed
    );
    assert_eq!(vm.stats().fast_path_fixed, 1);
    teardown(host, vm, vec![vcpu]);
}

/// Harvesting clears exactly the Dirty bit of each dirty leaf (writable or
/// write-protected) and reports each once; clean leaves stay as they are, and
/// a page dirtied again is reported by the next harvest.
#[test]
fn test_clear_dirty_clears_only_d_and_reports_each_dirty_leaf_once() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    for p in [0, 1, 2] {
        vcpu.page_fault(gpa(p), ErrorCode::WRITE).unwrap();
    }
    // Page 2 write-protected but still dirty (the atomic path).
    vm.write_protect_gfn_range(0, pages(2, 1)).unwrap();
    host.set(hva(5), host.fresh_pfn(), false);
    vcpu.page_fault(gpa(5), ErrorCode::empty()).unwrap();
    let before: Vec<Spte> = [0, 1, 2, 5].map(|p| leaf(&vm, p).unwrap().1).into();
    assert!(!before[3].is_dirty());
    assert_eq!(vm.clear_dirty_gfn_range(0, pages(0, 512)).unwrap(), 3);
    for (p, old) in [0, 1, 2, 5].into_iter().zip(before) {
        let (level, now) = leaf(&vm, p).unwrap();
        assert_eq!(level, Level::K4);
        assert_eq!(now, Spte(old.raw() & !ept::D), "page {p}");
    }
    assert_eq!(vm.clear_dirty_gfn_range(0, pages(0, 512)).unwrap(), 0);
    assert!(vmmu::testing::hardware_set_dirty(&vm, gpa(1)));
    assert_eq!(vm.clear_dirty_gfn_range(0, pages(0, 512)).unwrap(), 1);
    assert_eq!(vm.stats().dirty_bits_harvested, 4);
    assert_eq!(vm.stats().present(Level::K4), 4);
    teardown(host, vm, vec![vcpu]);
}

/// Harvesting looks at leaves only: an MMIO entry whose memslot generation has
/// the bit that sits where D sits in a leaf is neither reported nor changed.
#[test]
fn test_clear_dirty_leaves_mmio_entries_alone() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    let mut n = 1;
    while vm.memslots(0).unwrap().generation() & (ept::D >> 3) == 0 {
        vm.set_user_memory_region(region(
            n,
            GPA + n as u64 * SIZE,
            SIZE,
            HVA + n as u64 * SIZE,
            0,
        ))
        .unwrap();
        n += 1;
    }
    let mmio = Gpa(4096);
    assert_eq!(
        vcpu.page_fault(mmio, ErrorCode::empty()).unwrap(),
        RetPf::Emulate
    );
    assert_eq!(vm.stats().mmio_sptes_created, 1);
    let range = GfnRange::new(mmio.gfn(), mmio.gfn().add(1));
    assert_eq!(vm.clear_dirty_gfn_range(0, range).unwrap(), 0);
    let before = vm.stats();
    assert_eq!(
        vcpu.page_fault(mmio, ErrorCode::RSVD | ErrorCode::PRESENT)
            .unwrap(),
        RetPf::Emulate
    );
    assert_eq!(
        vm.stats().since(&before).mmio_fast_hits,
        1,
        "the MMIO entry still carries the current generation"
    );
    teardown(host, vm, vec![vcpu]);
}

/// The reachable-table count is what is linked: one table per level below the
/// root for the first page, one more 4 KiB table per further 2 MiB region.
#[test]
fn test_count_reachable_tables_matches_tables_linked() {
    let (host, vm, mut vcpu) = setup(VmConfig::default());
    assert_eq!(vm.count_reachable_tables(), 0);
    vcpu.page_fault(gpa(0), ErrorCode::WRITE).unwrap();
    assert_eq!(vm.count_reachable_tables(), 3);
    vcpu.page_fault(gpa(512), ErrorCode::WRITE).unwrap();
    vcpu.page_fault(gpa(1024), ErrorCode::WRITE).unwrap();
    assert_eq!(vm.count_reachable_tables(), 5);
    assert_eq!(vm.count_reachable_tables(), vm.table_pages_in_use() - 1);
    teardown(host, vm, vec![vcpu]);
}
