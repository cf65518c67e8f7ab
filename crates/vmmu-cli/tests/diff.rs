//! `vmmu diff` against the recorded answers of the real KVM (committed with
//! the source, so this runs without /dev/kvm): every comparable case at
//! parity; a doctored recording is reported as a mismatch; bad flags get
//! one line.

const RECORDING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/kvm-diff-answers.json");

mod common;
use common::vmmu;

#[test]
fn test_diff_against_the_recording_is_at_parity() {
    let (code, out, err) = vmmu(&["diff", "--answers", RECORDING, "--json"]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["mismatches"], 0, "{v}");
    assert!(v["parity"].as_u64().unwrap() >= 100, "{v}");
    let cases = v["cases"].as_array().expect("cases");
    for c in cases {
        let verdict = c["verdict"].as_str().unwrap_or_default();
        assert!(
            verdict == "parity"
                || verdict.starts_with("deviation (documented)")
                || verdict.starts_with("not comparable here:"),
            "{c}"
        );
    }
    // The refusals are compared too, errno by errno.
    let overlap = cases
        .iter()
        .find(|c| c["case"] == "overlap")
        .expect("overlap");
    assert_eq!(overlap["vmmu"], "ok, EEXIST");
}

#[test]
fn test_diff_reports_a_doctored_answer_as_a_mismatch() {
    let text = std::fs::read_to_string(RECORDING).expect("recording");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    v["cases"]["resize"] = serde_json::json!(["ok", "ok"]);
    let path = std::env::temp_dir().join(format!("vmmu-diff-doctored-{}.json", std::process::id()));
    std::fs::write(&path, v.to_string()).expect("write");
    let p = path.to_string_lossy().into_owned();
    let (code, out, _) = vmmu(&["diff", "--answers", &p, "--json"]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 1, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(r["mismatches"], 1);
    let resize = r["cases"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["case"] == "resize").cloned())
        .expect("resize");
    assert_eq!(resize["verdict"], "MISMATCH");
    assert_eq!(resize["vmmu"], "ok, EINVAL");
}

#[test]
fn test_diff_refuses_bad_flags_in_one_line() {
    for (args, needle) in [
        (
            &["diff", "--answers", "/no/such/file"][..],
            "cannot read it",
        ),
        (
            &["diff", "--answers", RECORDING, "--record", "/tmp/x.json"],
            "not both",
        ),
    ] {
        let (code, out, err) = vmmu(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty());
        assert!(err.contains(needle) && err.lines().count() == 1, "{err}");
    }
}
