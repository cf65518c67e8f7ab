//! `page-splitting` (x86/dirty_log_page_splitting_test): the guest's memory on
//! huge host pages, mapped huge; dirty logging on (eager splitting to 4 KiB),
//! a write pass, a harvest, logging off (huge pages recovered in place), a
//! write pass again; the leaves mapped at each level after every step. The
//! selftest's checks: after logging is on, nothing huge is mapped and every
//! page is mapped at 4 KiB; after it is off and the guest ran again, the
//! memory is mapped huge again, as before.

use serde_json::json;
use vmmu::{Level, MemFlags, UserMemoryRegion};
use vmmu_machine::guest::Pattern;
use vmmu_machine::Backing;

use super::{build, REGION_GPA, REGION_HVA};
use crate::args::{BadInput, Common};
use crate::report::Report;

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<crate::args::Shape> {
    if common.mmu == vmmu::MmuKind::Shadow {
        return Err(crate::args::BadInput(
            "page-splitting --mmu shadow: eager splitting and in-place recovery are TDP-MMU operations here (the shadow MMU zaps huge leaves when logging starts and refaults them small; use --mmu tdp)".into(),
        )
        .into());
    }
    let shape = common.shape(1, 1 << 30, 1, Backing::AnonymousThp)?;
    if !matches!(
        shape.backing,
        Backing::AnonymousThp | Backing::Hugetlb2M | Backing::Hugetlb1G
    ) {
        anyhow::bail!(BadInput(format!(
            "-s {}: page splitting needs huge host pages (valid: anonymous_thp, anonymous_hugetlb_2mb, anonymous_hugetlb_1gb)",
            shape.backing.name()
        )));
    }
    anyhow::ensure!(shape.slots == 1, "page-splitting runs on one memslot");
    Ok(shape)
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let mut env = build(common, shape)?;
    let region = UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: REGION_GPA,
        memory_size: shape.total,
        userspace_addr: REGION_HVA,
    };
    let levels = |env: &super::Env| {
        let s = env.m.vm.stats();
        [Level::K4, Level::M2, Level::G1].map(|l| s.present(l))
    };
    let mut steps: Vec<(&str, [u64; 3])> = Vec::new();
    let models = env.models();
    let (models, _, _) = env.pass("populate", models, 1, Pattern::Sequential, 100, |_| {});
    steps.push(("populated", levels(&env)));
    env.m.set_memslot(UserMemoryRegion {
        flags: MemFlags::LOG_DIRTY_PAGES.bits(),
        ..region
    })?;
    steps.push(("dirty logging on", levels(&env)));
    let (models, _, _) = env.pass("dirty", models, 2, Pattern::Sequential, 100, |_| {});
    steps.push(("written while logging", levels(&env)));
    let log = env.m.vm.get_dirty_log(1)?;
    let reported: u64 = log.iter().map(|w| w.count_ones() as u64).sum();
    steps.push(("harvested", levels(&env)));
    env.m.set_memslot(region)?;
    steps.push(("dirty logging off", levels(&env)));
    let (_, _, _) = env.pass("rewrite", models, 3, Pattern::Sequential, 100, |_| {});
    steps.push(("written again", levels(&env)));
    let pages = shape.total / 4096;
    let huge = |l: [u64; 3]| l[1] * 512 + l[2] * 512 * 512;
    let mut r = Report::new("page-splitting", &shape);
    for (name, l) in &steps {
        r.line(format!(
            "{name:<24} 4K: {:>8}  2M: {:>6}  1G: {:>3}",
            l[0], l[1], l[2]
        ));
    }
    let before = steps[0].1;
    let on = steps[1].1;
    let off = steps[4].1;
    let again = steps[5].1;
    let mut errors = Vec::new();
    if on[1] + on[2] != 0 || on[0] != pages {
        errors.push(format!(
            "with logging on every page must be mapped at 4 KiB: {on:?} for {pages} pages"
        ));
    }
    if reported != pages {
        errors.push(format!(
            "the harvest reported {reported} of {pages} written pages"
        ));
    }
    if huge(again) != huge(before) || again[0] != before[0] {
        errors.push(format!(
            "after logging off and a write pass the mapping must be as before: {again:?}, was {before:?}"
        ));
    }
    for e in &errors {
        r.line(format!("FAIL: {e}"));
    }
    let s = env.m.vm.stats();
    r.line(format!(
        "{} huge leaves split eagerly, {} recovered in place when logging went off ({} of them before the guest ran again)",
        s.eager_splits,
        s.huge_recovered,
        off[1] + off[2]
    ));
    r.put(
        "levels",
        json!(steps
            .iter()
            .map(|(n, l)| json!({"step": n, "pages_4k": l[0], "pages_2m": l[1], "pages_1g": l[2]}))
            .collect::<Vec<_>>()),
    );
    r.put("pages_reported", reported);
    r.put("page_splitting_errors", errors.len() as u64);
    let code = env.finish(r)?;
    Ok(if errors.is_empty() { code } else { 1 })
}
