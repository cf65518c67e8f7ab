//! Every mode's `--json` object validates against the published schema
//! (`schema/report.schema.json`), so scripts can rely on its keys.

use std::process::Command;

fn json_of(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run vmmu");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vmmu {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("vmmu {args:?}: {e}: {stdout}"))
}

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/report.schema.json"
    ))
    .expect("schema file");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn assert_valid(v: &jsonschema::Validator, args: &[&str]) {
    let out = json_of(args);
    let errors: Vec<String> = v
        .iter_errors(&out)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "vmmu {args:?}: {errors:#?}\n{out}");
}

#[test]
fn test_every_mode_json_matches_the_schema() {
    let v = schema();
    for args in [
        &["run", "demand-paging", "-b", "4M", "-v", "2"][..],
        &["run", "demand-paging", "-b", "64M", "--stride", "2M"],
        &["run", "memslot-perf", "-s", "3,10", "-l", "0.01"],
        &["run", "mmu-stress", "-b", "4M", "--aliases", "2"],
        &["run", "memslot-churn", "-b", "4M", "-i", "2"],
        &["run", "invalidation-storm", "-b", "4M", "-i", "1"],
        &["run", "roots", "-b", "4M", "-i", "2"],
        &["bench", "demand-paging", "-v", "1", "-b", "4M"],
        &["bench", "invalidation-storm", "-b", "4M", "-i", "1"],
        &[
            "bench",
            "invalidation-storm",
            "-b",
            "4M",
            "-i",
            "1",
            "--conversions",
        ],
        &["bench", "conversions", "-b", "2M", "-i", "2"],
        &["bench", "dirty-log", "-b", "4M"],
        &["bench", "nx-recovery", "-b", "8M", "--fault-bytes", "4M"],
        &["bench", "aging", "-b", "8M", "--fault-bytes", "2M"],
        &[
            "bench",
            "scaling",
            "-b",
            "4M",
            "--loop-bytes",
            "1M",
            "--rounds",
            "1",
        ],
        &[
            "run",
            "invalidation-storm",
            "-b",
            "4M",
            "-i",
            "1",
            "--conversions",
        ],
        &["soak", "--duration", "3", "-b", "4M"],
        &["run", "private-conversions"],
        &["run", "private-exits"],
        &["run", "prefault"],
        &["run", "guest-memfd"],
        &["run", "dirty-log", "-i", "3"],
        &["run", "page-splitting", "-b", "8M"],
        &["run", "nx-huge-pages", "-p", "20"],
        &["run", "reclaim", "-b", "4M", "-i", "2"],
        &["run", "access", "--stride", "4999"],
        &["run", "dirty-log-perf", "-b", "8M", "-x", "2"],
        &["run", "live-migration", "-b", "4M", "--max-rounds", "3"],
    ] {
        assert_valid(&v, args);
    }
}

#[test]
fn test_schema_rejects_an_object_without_its_configuration() {
    // The schema can fail: a run object missing its config, with a table label
    // for a key, is refused.
    let v = schema();
    let mut out = json_of(&["run", "demand-paging", "-b", "4M"]);
    out.as_object_mut().map(|o| o.remove("config"));
    assert!(!v.is_valid(&out));
    let mut out = json_of(&["run", "demand-paging", "-b", "4M"]);
    out["TLB flushes: local / remote"] = serde_json::json!("1 / 2");
    assert!(!v.is_valid(&out));
}

#[test]
fn test_json_config_carries_every_flag_and_the_machine() {
    let out = json_of(&["run", "memslot-churn", "-b", "4M", "-i", "2", "-d", "5"]);
    let c = &out["config"];
    assert_eq!(c["command"], "run memslot-churn");
    let flags = &c["flags"];
    for (k, want) in [
        ("vcpus", serde_json::json!(1)),
        ("bytes", serde_json::json!(4 << 20)),
        ("iterations", serde_json::json!(2)),
        ("delay_us", serde_json::json!(5)),
        ("slots", serde_json::json!(1)),
        ("write_percent", serde_json::json!(50)),
        ("seed", serde_json::json!(1)),
        ("overlap", serde_json::json!(false)),
    ] {
        assert_eq!(flags[k], want, "flag {k} in {flags}");
    }
    assert_eq!(c["mmu"]["precheck"], true);
    assert!(c["host"]["cpu_model"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(c["version"], env!("CARGO_PKG_VERSION"));
}
