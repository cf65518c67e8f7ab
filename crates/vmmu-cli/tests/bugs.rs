//! `vmmu bugs`: the zoo lists at least twelve upstream bugs with their
//! fixes; every in-process detector catches its bug (CI runs these; the loom
//! and test detectors' failing twins run in the test suite and the loom
//! step); every detector names a test that exists.

mod common;
use common::vmmu;

fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = vmmu(args);
    assert_eq!(code, 0, "{args:?}: {err}\n{out}");
    serde_json::from_str(&out).expect("JSON")
}

#[test]
fn test_the_zoo_names_at_least_twelve_upstream_fixes() {
    let v = json(&["bugs", "--json"]);
    let bugs = v["bugs"].as_array().expect("bugs");
    let upstream: Vec<_> = bugs
        .iter()
        .filter(|b| !b["upstream_fix"].is_null())
        .collect();
    assert!(upstream.len() >= 12, "{} upstream bugs", upstream.len());
    for b in &upstream {
        let sha = b["sha"].as_str().unwrap_or_default();
        assert!(
            sha.len() == 12 && sha.chars().all(|c| c.is_ascii_hexdigit()),
            "{b}"
        );
        assert!(
            b["kernel"].as_str().unwrap_or_default().starts_with('v'),
            "{b}"
        );
        assert!(
            b["upstream_fix"]
                .as_str()
                .unwrap_or_default()
                .starts_with("KVM: "),
            "{b}"
        );
    }
}

#[test]
fn test_every_in_process_detector_catches_its_bug() {
    let v = json(&["bugs", "run", "--quick", "--json"]);
    assert_eq!(v["missed"], 0, "{v}");
    let bugs = v["bugs"].as_array().expect("bugs");
    assert!(bugs.len() >= 8);
    for b in bugs {
        assert_eq!(b["caught"], true, "{b}");
        assert_eq!(b["in_process"], true);
    }
}

/// The detectors that run through cargo name tests that exist, so the zoo
/// cannot point at a renamed or deleted test (that run would report "no such
/// test ran", but CI does not run them through the binary).
#[test]
fn test_every_workspace_detector_names_an_existing_test() {
    let v = json(&["bugs", "--json"]);
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut sources = String::new();
    for dir in [
        "crates/vmmu/src",
        "crates/vmmu/tests",
        "crates/vmmu-machine/tests",
    ] {
        for entry in walk(&ws.join(dir)) {
            sources.push_str(&std::fs::read_to_string(entry).unwrap_or_default());
        }
    }
    for b in v["bugs"].as_array().expect("bugs") {
        let d = b["detector"].as_str().unwrap_or_default();
        let Some(name) = d
            .strip_prefix("loom model ")
            .or_else(|| d.strip_prefix("test "))
        else {
            continue;
        };
        let f = name.rsplit("::").next().unwrap_or(name);
        assert!(
            sources.contains(&format!("fn {f}")) || sources.contains(&format!("    {f},")),
            "{} names {f}, which is not in the sources",
            b["name"]
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn test_an_unknown_bug_is_refused_in_one_line() {
    let (code, out, err) = vmmu(&["bugs", "run", "no-such-bug"]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(
        err.contains("no bug named 'no-such-bug'") && err.contains("valid:"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
}
