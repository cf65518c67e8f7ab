//! `nx-huge-pages` (x86/nx_huge_pages_test): a guest reads and executes from
//! four 2 MiB host pages, with the iTLB-multihit mitigation on and then off
//! (turned off at run time, which zaps everything, as writing KVM's
//! `nx_huge_pages` parameter does). After every step the 2 MiB leaves mapped
//! and `nx_lpage_splits` are compared with what KVM's rules give:
//! - a read maps its 2 MiB page huge (non-executable with the mitigation);
//! - a fetch splits it (or maps 4 KiB at once) and lists it, so reads there
//!   stay at 4 KiB until recovery;
//! - each recovery period zaps `ceil(listed / ratio)` of the oldest listed
//!   pages, after which a read maps them huge again;
//! - without the mitigation fetches map huge and nothing is listed.
//!
//! The recovery worker runs on its own clock (`--recovery-period`); the steps
//! hold it off while they look at the counts, then wait for its next pass.
//! The oracle checks every access as in every scenario.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::json;
use vmmu::{Gpa, Gva, Level};
use vmmu_machine::guest::{AccessKind, GuestAccess, Script};
use vmmu_machine::nx_recovery::{recovery_period, NxRecoveryWorker};
use vmmu_machine::paging::{LinearAccess, LinearOp};
use vmmu_machine::Backing;

use super::{build, REGION_GPA};
use crate::args::{BadInput, Common};
use crate::report::Report;

/// The guest's huge pages (the selftest uses up to four).
const HUGE_PAGES: u64 = 4;
const HUGE: u64 = 2 << 20;

/// What `vmmu run nx-huge-pages` was asked for.
#[derive(Clone, Copy, Debug)]
pub struct NxArgs {
    /// Milliseconds between recovery passes (0: an hour / ratio, as KVM).
    pub period_ms: u64,
    /// `nx_huge_pages_recovery_ratio`.
    pub ratio: u32,
    /// Run with the mitigation on.
    pub on: bool,
    /// Run with the mitigation off.
    pub off: bool,
}

/// Check the flags.
pub fn validate(common: &Common, a: &NxArgs) -> anyhow::Result<crate::args::Shape> {
    if common.mmu == vmmu::MmuKind::Shadow {
        anyhow::bail!(BadInput(
            "nx-huge-pages --mmu shadow: the possible-NX-huge-page list and its recovery are built for the TDP MMU here (use --mmu tdp)".into()
        ));
    }
    if common.guest_paging {
        anyhow::bail!(BadInput(
            "nx-huge-pages --guest-paging: the guest runs with paging off here (drop --guest-paging)".into()
        ));
    }
    if a.ratio == 0 {
        anyhow::bail!(BadInput(
            "--recovery-ratio 0: recovery would never run and the steps after it could not pass (valid: 1 and up)".into()
        ));
    }
    if a.period_ms > 60_000 || (a.period_ms == 0 && a.ratio < 60) {
        anyhow::bail!(BadInput(format!(
            "--recovery-period {}: the run waits for several passes; use 1..=60000 ms (0 derives an hour / ratio, so it needs --recovery-ratio 60 or more)",
            a.period_ms
        )));
    }
    let shape = common.shape(1, HUGE_PAGES * HUGE, 1, Backing::Hugetlb2M)?;
    if shape.vcpus != 1 || shape.slots != 1 || shape.total != HUGE_PAGES * HUGE {
        anyhow::bail!(BadInput(
            "nx-huge-pages runs one vCPU over four 2 MiB pages in one slot (as the selftest)"
                .into()
        ));
    }
    if !matches!(
        shape.backing,
        Backing::AnonymousThp | Backing::Hugetlb2M | Backing::Hugetlb1G
    ) {
        anyhow::bail!(BadInput(format!(
            "-s {}: the test needs huge host pages (valid: anonymous_thp, anonymous_hugetlb_2mb, anonymous_hugetlb_1gb)",
            shape.backing.name()
        )));
    }
    Ok(shape)
}

/// Where each huge page stands, by KVM's rules (the expected side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    Unmapped,
    Huge,
    /// Split by a fetch and listed (no slot logs dirty pages here, so
    /// recovery always zaps what it takes off the list).
    Split,
}

struct Model {
    nx: bool,
    pages: [Page; HUGE_PAGES as usize],
    /// Listed pages, oldest first.
    listed: VecDeque<usize>,
}

impl Model {
    fn read(&mut self, hp: usize) {
        if self.pages[hp] == Page::Unmapped {
            self.pages[hp] = Page::Huge;
        }
    }
    fn exec(&mut self, hp: usize) {
        match (self.nx, self.pages[hp]) {
            (false, Page::Unmapped) => self.pages[hp] = Page::Huge,
            (false, _) => {}
            (true, Page::Unmapped | Page::Huge) => {
                self.pages[hp] = Page::Split;
                self.listed.push_back(hp);
            }
            (true, _) => {}
        }
    }
    fn recover(&mut self, ratio: u32) {
        let n = (self.listed.len() as u64).div_ceil(u64::from(ratio));
        for _ in 0..n {
            if let Some(hp) = self.listed.pop_front() {
                self.pages[hp] = Page::Unmapped;
            }
        }
    }
    fn toggle(&mut self, nx: bool) {
        self.nx = nx;
        self.pages = [Page::Unmapped; HUGE_PAGES as usize];
        self.listed.clear();
    }
    fn counts(&self) -> (u64, u64) {
        let huge = self.pages.iter().filter(|p| **p == Page::Huge).count() as u64;
        (huge, self.listed.len() as u64)
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Read(usize),
    Exec(usize),
    Recover,
    Toggle(bool),
}

fn gpa(hp: usize, page: u64) -> u64 {
    REGION_GPA + hp as u64 * HUGE + page * 4096
}

fn access(step: Step) -> Option<GuestAccess> {
    match step {
        // A data read of the page's first word, a fetch of its second page
        // (the selftest returns from code placed in the huge page).
        Step::Read(hp) => Some(GuestAccess::shared(Gpa(gpa(hp, 0)), AccessKind::Read)),
        Step::Exec(hp) => Some(GuestAccess::linear(
            Gva(gpa(hp, 1)),
            LinearAccess {
                op: LinearOp::Fetch,
                user: false,
                ac: false,
            },
        )),
        Step::Recover | Step::Toggle(_) => None,
    }
}

fn describe(step: Step) -> String {
    match step {
        Step::Read(hp) => format!("read hpage {hp}"),
        Step::Exec(hp) => format!("execute from hpage {hp}"),
        Step::Recover => "recovery period".into(),
        Step::Toggle(on) => format!("nx_huge_pages={}", if on { "on" } else { "off" }),
    }
}

/// The selftest's sequence for one setting of the mitigation, then reads
/// after recovery and a fetch again.
fn steps() -> Vec<Step> {
    use Step::*;
    vec![
        Read(0),
        Read(1),
        Exec(0),
        Exec(2),
        Read(0),
        Read(2),
        Recover,
        Recover,
        Read(0),
        Read(2),
        Exec(0),
        Recover,
        Exec(3),
        Read(3),
    ]
}

/// Run it.
pub fn run(common: &Common, a: &NxArgs) -> anyhow::Result<i32> {
    let shape = validate(common, a)?;
    let mut c = common.clone();
    c.nx_huge_pages = a.on;
    let mut env = build(&c, shape)?;
    let period = recovery_period(a.period_ms, a.ratio)
        .ok_or_else(|| anyhow::anyhow!("recovery is off with ratio 0"))?;
    let worker = NxRecoveryWorker::start(env.m.vm.clone(), period, a.ratio);
    let mut model = Model {
        nx: a.on,
        pages: [Page::Unmapped; HUGE_PAGES as usize],
        listed: VecDeque::new(),
    };
    let mut plan: Vec<Step> = Vec::new();
    if a.on {
        plan.extend(steps());
    }
    if a.off {
        if a.on {
            plan.push(Step::Toggle(false));
        }
        plan.extend(steps());
        // And back on: the toggle zaps again, and a fetch splits again.
        plan.extend([
            Step::Toggle(true),
            Step::Read(1),
            Step::Exec(1),
            Step::Read(1),
        ]);
    }
    let opts = env.options(&std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let t0 = Instant::now();
    let mut hold = Some(worker.hold());
    for step in plan {
        match step {
            Step::Read(hp) => model.read(hp),
            Step::Exec(hp) => model.exec(hp),
            Step::Recover => model.recover(a.ratio),
            Step::Toggle(on) => model.toggle(on),
        }
        if let Some(acc) = access(step) {
            let out = env.m.run(vec![Script::new(vec![acc])], &opts, |_| {});
            for (script, _) in &out {
                for (_, result) in &script.results {
                    if !matches!(result, vmmu_machine::guest::AccessResult::Memory(_)) {
                        errors.push(format!(
                            "{}: the access ended as {result:?}",
                            describe(step)
                        ));
                    }
                }
            }
        }
        match step {
            Step::Recover if model.nx => {
                let before = worker.passes();
                drop(hold.take());
                // Several periods at most: the worker's own clock.
                let waited = worker.wait_for_pass(before, period * 4 + Duration::from_secs(5));
                hold = Some(worker.hold());
                if waited.is_none() {
                    errors.push("the recovery worker did not run within four periods".into());
                }
            }
            Step::Toggle(on) => {
                env.m.vm.set_nx_huge_pages(on);
            }
            _ => {}
        }
        let s = env.m.vm.stats();
        let got = (s.present(Level::M2), s.nx_lpage_splits());
        let want = model.counts();
        let listed = env.m.vm.possible_nx_huge_pages();
        if got != want {
            errors.push(format!(
                "{} (mitigation {}): 2 MiB pages {}, splits {}; KVM's rules give {}, {}",
                describe(step),
                if model.nx { "on" } else { "off" },
                got.0,
                got.1,
                want.0,
                want.1
            ));
        }
        if listed != got.1 {
            errors.push(format!(
                "{}: {listed} pages listed but nx_lpage_splits is {}",
                describe(step),
                got.1
            ));
        }
        if let Err(e) = env.m.vm.check_possible_nx_huge_pages() {
            errors.push(format!("{}: {e}", describe(step)));
        }
        rows.push((step, model.nx, got, want));
    }
    drop(hold);
    let elapsed = t0.elapsed();
    let wr = worker.report();
    drop(worker);
    let mut r = Report::new("nx-huge-pages", &shape);
    r.phase("steps", elapsed.as_nanos() as u64);
    r.line(format!(
        "{:<26} {:>4}  {:>9} {:>9}  {:>9} {:>9}",
        "step", "nx", "2M pages", "expected", "splits", "expected"
    ));
    for (step, nx, got, want) in &rows {
        r.line(format!(
            "{:<26} {:>4}  {:>9} {:>9}  {:>9} {:>9}",
            describe(*step),
            if *nx { "on" } else { "off" },
            got.0,
            want.0,
            got.1,
            want.1
        ));
    }
    let s = env.m.vm.stats();
    let mean_pass_us = if wr.pass_ns.is_empty() {
        0.0
    } else {
        wr.pass_ns.iter().sum::<u64>() as f64 / wr.pass_ns.len() as f64 / 1e3
    };
    r.line(format!(
        "recovery: every {} ms, ratio {}: {} passes, {} pages zapped, {} already gone (mean pass {mean_pass_us:.1} µs); {} data faults went below a listed page",
        period.as_millis(),
        a.ratio,
        wr.passes,
        wr.totals.zapped,
        wr.totals.gone,
        s.nx_disallowed_adjusts
    ));
    for e in &errors {
        r.line(format!("FAIL: {e}"));
    }
    r.put(
        "steps",
        json!(rows
            .iter()
            .map(|(step, nx, got, want)| json!({
                "step": describe(*step),
                "nx_huge_pages": nx,
                "pages_2m": got.0,
                "pages_2m_expected": want.0,
                "nx_lpage_splits": got.1,
                "nx_lpage_splits_expected": want.1,
            }))
            .collect::<Vec<_>>()),
    );
    r.put(
        "recovery",
        json!({
            "period_ms": period.as_millis() as u64,
            "ratio": a.ratio,
            "passes": wr.passes,
            "zapped": wr.totals.zapped,
            "gone": wr.totals.gone,
            "skipped_dirty_log": wr.totals.skipped_dirty_log,
            "mean_pass_ns": (mean_pass_us * 1e3) as u64,
        }),
    );
    r.put("nx_huge_pages_errors", errors.len() as u64);
    let code = env.finish(r)?;
    Ok(if errors.is_empty() { code } else { 1 })
}
