//! One vCPU and two faulting through real tables into host memory, with the
//! oracle checking every access, then a clean teardown.

mod common;

use common::*;
use vmmu::Level;
use vmmu_machine::guest::Pattern;
use vmmu_machine::{Backing, MachineConfig};

#[test]
fn test_demand_paging_populates_verifies_and_tears_down_clean() {
    let bytes = 16 << 20;
    let mut m = machine(MachineConfig::default(), 2, bytes, Backing::Anonymous);
    let md = pass(&mut m, models(2, bytes), 1, Pattern::Sequential, 100);
    let md = pass(&mut m, md, 2, Pattern::Sequential, 0);
    let _ = pass(&mut m, md, 3, Pattern::Random, 50);
    let st = m.vm.stats();
    let pages = 2 * bytes / 4096;
    assert_eq!(st.leaves_mapped_4k, pages, "one fault per page");
    // Sequential faults start at the cached last-level table: every fault
    // but the first of each 2 MiB region (a few more may walk after races).
    assert!(
        st.walk_cache_hits >= pages - pages / 256 && st.walk_cache_hits < pages,
        "{} walk-cache hits for {pages} faults",
        st.walk_cache_hits
    );
    assert!(m.oracle.checks() >= 3 * pages);
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    let oracle = m.oracle.clone();
    let t = m.teardown();
    assert_eq!(
        t.leaked_data_pages + t.leaked_table_pages + t.double_frees,
        0,
        "{t:?}"
    );
    assert_eq!(oracle.total(), 0, "{:?}", oracle.log());
}

#[test]
fn test_thp_backing_maps_2m_leaves() {
    let bytes = 8 << 20;
    let mut m = machine(MachineConfig::default(), 1, bytes, Backing::AnonymousThp);
    let md = pass(&mut m, models(1, bytes), 1, Pattern::Sequential, 100);
    let _ = pass(&mut m, md, 2, Pattern::Random, 0);
    let st = m.vm.stats();
    assert_eq!(st.present(Level::M2), 4);
    assert_eq!(st.leaves_mapped_4k, 0);
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    let oracle = m.oracle.clone();
    m.teardown();
    assert_eq!(oracle.total(), 0, "{:?}", oracle.log());
}

#[test]
fn test_hugetlb_1g_backing_maps_1g_leaves() {
    // Regression: the arena's first frame was aligned for 2 MiB only, so a 1 GiB
    // host page never agreed with its gfn modulo 1 GiB and every fault fell
    // straight to 4 KiB.
    let bytes = 1 << 30;
    let cfg = MachineConfig {
        memory_bytes: 3 << 30,
        ..MachineConfig::default()
    };
    let mut m = machine(cfg, 1, bytes, Backing::Hugetlb1G);
    let md = pass(&mut m, models(1, bytes), 1, Pattern::Random, 0);
    drop(md);
    let st = m.vm.stats();
    assert_eq!(st.leaves_mapped_1g, 1, "{st:?}");
    assert_eq!(st.leaves_mapped_4k + st.leaves_mapped_2m, 0);
    assert_eq!(m.oracle.total(), 0, "{:?}", m.oracle.log());
    let oracle = m.oracle.clone();
    m.teardown();
    assert_eq!(oracle.total(), 0, "{:?}", oracle.log());
}
