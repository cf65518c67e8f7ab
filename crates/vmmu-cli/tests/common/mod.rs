//! What the binary's tests share: running `vmmu` as a user does.
// Each test file uses its own subset.
#![allow(dead_code)]

use std::process::Command;

/// Run `vmmu args`: exit code, stdout, stderr.
pub fn vmmu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .output()
        .expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `vmmu args --json`: it must succeed, print exactly one JSON line and
/// report no oracle violation; the object.
pub fn json_run(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, err) = vmmu(&a);
    assert_eq!(code, 0, "vmmu {args:?} failed: {err}\n{out}");
    assert_eq!(
        out.lines().count(),
        1,
        "--json prints exactly one line on stdout: {out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["violations"], 0, "{v}");
    v
}

/// The one line the command prints for `args` (checked to be one line, exit 2).
pub fn refusal(args: &[&str]) -> String {
    let (code, out, err) = vmmu(args);
    assert_eq!(code, 2, "{args:?} was not refused: {err}{out}");
    assert!(out.is_empty(), "{args:?} printed on stdout: {out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    err.trim_end().to_string()
}
