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
