//! `vmmu bugs`: historical KVM MMU bugs re-created as test-only switches
//! (`GuardKnobs`), each with the detector of vmmu's that catches it.
//!
//! Every entry names the upstream fix (commit subject, SHA, first release)
//! and the knob that puts the bug back. Detectors are of three kinds:
//! - **oracle**: the stress run (host events, memslot churn, every access
//!   checked) in this process, stopped at the first violation; the figure is
//!   the seconds it took;
//! - **check**: a short deterministic sequence in this process whose check
//!   fails with the bug in (the same check the test suite makes);
//! - **model** / **test**: the loom model or test of the workspace whose
//!   failing twin sets the knob and passes only if the violation is found,
//!   run through `cargo` (these need the source tree; loom models report how
//!   long they took, a failing model stops at its first violating schedule).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmmu::VmConfig;

use crate::args::BadInput;

/// How a bug is caught.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Detector {
    /// The stress run with the oracle, in this process.
    Oracle,
    /// A deterministic check in this process: passes as built, fails with
    /// the bug in.
    Check(fn(VmConfig) -> Result<(), String>),
    /// A loom model's failing twin (`cargo test --release` with `--cfg loom`).
    Model {
        /// The test target (`None`: the library's own tests).
        target: Option<&'static str>,
        /// The failing twin.
        test: &'static str,
    },
    /// A test of the workspace that sets the knob and passes only if the
    /// check catches it.
    Test {
        /// The package.
        package: &'static str,
        /// The test target (`None`: the library's own tests).
        target: Option<&'static str>,
        /// The test.
        test: &'static str,
    },
}

/// One re-created bug.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bug {
    /// Its name here.
    pub(crate) name: &'static str,
    /// The upstream fix: commit subject ("" for a rule of vmmu's with no
    /// known upstream bug behind it).
    pub(crate) fix: &'static str,
    /// The upstream fix: short SHA.
    pub(crate) sha: &'static str,
    /// The first mainline release with the fix.
    pub(crate) kernel: &'static str,
    /// What goes wrong, in one line.
    pub(crate) what: &'static str,
    /// The knob that puts the bug back.
    pub(crate) knob: &'static str,
    set: fn(&mut VmConfig),
    /// Who catches it.
    pub(crate) detector: Detector,
}

impl Bug {
    /// The VM configuration with this bug in.
    pub(crate) fn config(&self) -> VmConfig {
        let mut c = VmConfig::default();
        (self.set)(&mut c);
        c
    }

    /// Whether an upstream fix is named.
    pub(crate) fn upstream(&self) -> bool {
        !self.fix.is_empty()
    }

    fn detector_name(&self) -> String {
        match self.detector {
            Detector::Oracle => "oracle (stress run)".into(),
            Detector::Check(_) => "check".into(),
            Detector::Model { test, .. } => format!("loom model {test}"),
            Detector::Test { target, test, .. } => {
                format!("test {}::{test}", target.unwrap_or("lib"))
            }
        }
    }

    /// Whether the detector runs in this process (no `cargo` needed).
    pub(crate) fn in_process(&self) -> bool {
        matches!(self.detector, Detector::Oracle | Detector::Check(_))
    }
}

/// What running a detector found.
#[derive(Debug)]
pub(crate) struct Outcome {
    caught: bool,
    elapsed: Duration,
    detail: String,
}

/// Run `bug`'s detector with the bug in.
pub(crate) fn run_one(bug: &Bug) -> anyhow::Result<Outcome> {
    let t = Instant::now();
    let (caught, detail) = match bug.detector {
        Detector::Oracle => {
            let vm = bug.config();
            let cfg = vmmu_machine::stress::StressConfig {
                duration: Duration::from_secs(30),
                knobs: vm.knobs,
                precheck: vm.precheck,
                stop_on_violation: true,
                backing: vmmu_machine::Backing::Anonymous,
                ..vmmu_machine::stress::StressConfig::default()
            };
            // In a debug build the MMU's own assertions may fire first (a
            // present leaf remapped, say) and panic a vCPU thread: that is
            // the bug caught too, by the check the oracle's count backs.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                vmmu_machine::stress::stress(&cfg)
            }));
            let r = match run {
                Ok(r) => r?,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic");
                    return Ok(Outcome {
                        caught: true,
                        elapsed: t.elapsed(),
                        detail: format!("an MMU assertion fired in the stress run: {what}"),
                    });
                }
            };
            let kinds: Vec<String> = r
                .violations
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            (
                r.total_violations > 0,
                format!(
                    "{} accesses in {:.1} s of stress: {}",
                    r.accesses,
                    r.elapsed.as_secs_f64(),
                    if kinds.is_empty() {
                        "no violation".into()
                    } else {
                        kinds.join(", ")
                    }
                ),
            )
        }
        Detector::Check(f) => {
            // The check holds as built; with the bug in it must fail.
            if let Err(e) = f(VmConfig::default()) {
                anyhow::bail!("{}: the check fails even without the bug: {e}", bug.name);
            }
            match f(bug.config()) {
                Err(e) => (true, e),
                Ok(()) => (false, "the check passed with the bug in".into()),
            }
        }
        Detector::Model { target, test } => cargo_test("vmmu", target, test, true)?,
        Detector::Test {
            package,
            target,
            test,
        } => cargo_test(package, target, test, false)?,
    };
    Ok(Outcome {
        caught,
        elapsed: t.elapsed(),
        detail,
    })
}

/// The workspace this binary was built from, if it is still there.
fn workspace() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ws = dir.parent()?.parent()?.to_path_buf();
    ws.join("Cargo.toml").is_file().then_some(ws)
}

/// Run one test of the workspace; it passes only if it caught the bug.
fn cargo_test(
    package: &str,
    target: Option<&str>,
    test: &str,
    loom: bool,
) -> anyhow::Result<(bool, String)> {
    let ws = workspace().ok_or_else(|| {
        anyhow::anyhow!(
            "{test}: this detector runs a test of vmmu's source tree, which is not where this binary was built (run the in-process detectors with --quick)"
        )
    })?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ws).args(["test", "-q", "-p", package]);
    if loom {
        cmd.arg("--release")
            .env("RUSTFLAGS", "--cfg loom")
            .env("CARGO_TARGET_DIR", ws.join("target/loom"))
            .env("LOOM_MAX_PREEMPTIONS", "2");
    }
    match target {
        Some(t) => cmd.args(["--test", t]),
        None => cmd.arg("--lib"),
    };
    cmd.args([test, "--", "--exact"]);
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run cargo for {test}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Exactly one test must have run: a name that matches nothing passes too.
    let ran = stdout.contains("1 passed");
    let caught = out.status.success() && ran;
    let detail = if caught {
        format!("{test} passed: the violation was found")
    } else if !ran && out.status.success() {
        format!("{test}: no such test ran")
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .chain(stdout.lines())
            .rfind(|l| l.contains("panicked") || l.contains("error"))
            .unwrap_or("failed")
            .trim()
            .to_string();
        format!("{test} failed: {last}")
    };
    Ok((caught, detail))
}

/// `vmmu bugs` (list) and `vmmu bugs run [NAME] [--quick]`.
pub(crate) fn run(a: &crate::cli::BugsArgs) -> anyhow::Result<i32> {
    let all = crate::bug_zoo::BUGS;
    let chosen: Vec<&Bug> = match a.name.as_deref() {
        Some(n) => {
            let b = all.iter().find(|b| b.name == n).ok_or_else(|| {
                BadInput(format!(
                    "no bug named '{n}' (valid: {})",
                    all.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
                ))
            })?;
            vec![b]
        }
        None => all.iter().filter(|b| !a.quick || b.in_process()).collect(),
    };
    if a.action != "run" {
        return list(&chosen, a.json);
    }
    let mut rows = Vec::new();
    for b in &chosen {
        if !a.json {
            eprintln!("vmmu bugs: {} ...", b.name);
        }
        let o = run_one(b)?;
        rows.push((*b, o));
    }
    let missed = rows.iter().filter(|(_, o)| !o.caught).count();
    if a.json {
        println!(
            "{}",
            json!({
                "mode": "bugs",
                "bugs": rows.iter().map(|(b, o)| {
                    let mut v = bug_json(b);
                    v["caught"] = json!(o.caught);
                    v["elapsed_ns"] = json!(o.elapsed.as_nanos() as u64);
                    v["detail"] = json!(o.detail);
                    v
                }).collect::<Vec<_>>(),
                "missed": missed,
            })
        );
    } else {
        use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec!["bug", "caught", "detector", "time (s)", "what it saw"]);
        for (b, o) in &rows {
            t.add_row(vec![
                b.name.to_string(),
                if o.caught { "yes" } else { "NO" }.to_string(),
                b.detector_name(),
                format!("{:.1}", o.elapsed.as_secs_f64()),
                o.detail.clone(),
            ]);
        }
        println!("{t}");
        println!("{} of {} caught", rows.len() - missed, rows.len());
    }
    Ok(if missed == 0 { 0 } else { 1 })
}

fn bug_json(b: &Bug) -> Value {
    json!({
        "name": b.name,
        "upstream_fix": if b.upstream() { json!(b.fix) } else { Value::Null },
        "sha": b.sha,
        "kernel": b.kernel,
        "what": b.what,
        "knob": b.knob,
        "detector": b.detector_name(),
        "in_process": b.in_process(),
    })
}

fn list(bugs: &[&Bug], json_out: bool) -> anyhow::Result<i32> {
    if json_out {
        println!(
            "{}",
            json!({"mode": "bugs", "bugs": bugs.iter().map(|b| bug_json(b)).collect::<Vec<_>>()})
        );
        return Ok(0);
    }
    use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "bug",
        "upstream fix",
        "kernel",
        "what goes wrong",
        "detector",
    ]);
    for b in bugs {
        t.add_row(vec![
            b.name.to_string(),
            if b.upstream() {
                format!("{} ({})", b.fix, b.sha)
            } else {
                "— (a rule of vmmu's; no upstream bug known)".into()
            },
            b.kernel.to_string(),
            b.what.to_string(),
            b.detector_name(),
        ]);
    }
    println!("{t}");
    println!(
        "`vmmu bugs run [NAME]` puts each back (a test-only switch) and runs its detector; --quick runs the in-process ones only."
    );
    Ok(0)
}

impl Bug {
    /// An entry of the zoo.
    #[allow(clippy::too_many_arguments)]
    pub(crate) const fn new(
        name: &'static str,
        fix: &'static str,
        sha: &'static str,
        kernel: &'static str,
        what: &'static str,
        knob: &'static str,
        set: fn(&mut VmConfig),
        detector: Detector,
    ) -> Bug {
        Bug {
            name,
            fix,
            sha,
            kernel,
            what,
            knob,
            set,
            detector,
        }
    }
}
