//! What a run reports: the selftest's lines, a human table, or one JSON object.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use vmmu::Stats;

/// A run's results.
#[derive(Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// 4 KiB pages touched.
    pub pages: u64,
    /// Phase timings, in order.
    pub phases: Vec<(String, u64)>,
    /// MMU counters over the run.
    pub stats: Stats,
    /// Oracle violations.
    pub violations: u64,
    /// Violations by kind.
    pub violation_kinds: Vec<(&'static str, u64)>,
    /// First violations, described.
    pub violation_log: Vec<String>,
    /// Scenario-specific values (shown in the table and the JSON).
    pub extra: Vec<(String, Value)>,
    /// The selftest-style lines.
    pub lines: Vec<String>,
    /// The run's configuration (`config_json`).
    pub config: Value,
}

/// Percentile summary of a latency histogram (ns).
pub fn latency_json(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_ns": h.value_at_quantile(0.50),
        "p90_ns": h.value_at_quantile(0.90),
        "p99_ns": h.value_at_quantile(0.99),
        "max_ns": h.max(),
        "mean_ns": h.mean().round() as u64,
    })
}

/// [`latency_json`] plus the histogram itself, in power-of-two buckets:
/// `buckets` is a list of `[upper_bound_ns, count]` for every non-empty
/// bucket (a fault of `d` ns counts in the first bucket with `d <= upper`).
pub fn histogram_json(h: &Histogram<u64>) -> Value {
    let mut v = latency_json(h);
    let buckets: Vec<Value> = h
        .iter_log(1, 2.0)
        .filter(|b| b.count_since_last_iteration() > 0)
        .map(|b| json!([b.value_iterated_to(), b.count_since_last_iteration()]))
        .collect();
    if let Value::Object(m) = &mut v {
        m.insert("buckets".into(), Value::Array(buckets));
    }
    v
}

/// Format ns as seconds with 9 decimals, as the selftests print timespecs.
pub fn secs(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

impl Report {
    /// An empty report for `scenario` run with `shape`.
    pub fn new(scenario: &str, shape: &crate::args::Shape) -> Report {
        Report {
            scenario: scenario.into(),
            vcpus: shape.vcpus,
            bytes_per_vcpu: shape.bytes_per_vcpu,
            pages: shape.total / 4096,
            ..Report::default()
        }
    }

    /// Record a phase.
    pub fn phase(&mut self, name: &str, ns: u64) {
        self.phases.push((name.to_string(), ns));
    }

    /// Record a value.
    pub fn put(&mut self, key: &str, v: impl Into<Value>) {
        self.extra.push((key.to_string(), v.into()));
    }

    /// Print a selftest line (stored; shown in human mode).
    pub fn line(&mut self, s: impl Into<String>) {
        self.lines.push(s.into());
    }

    /// The JSON object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("mode".into(), json!("run"));
        m.insert("scenario".into(), json!(self.scenario));
        m.insert("config".into(), self.config.clone());
        m.insert("vcpus".into(), json!(self.vcpus));
        m.insert("bytes_per_vcpu".into(), json!(self.bytes_per_vcpu));
        m.insert("pages".into(), json!(self.pages));
        for (name, ns) in &self.phases {
            m.insert(format!("{name}_ns"), json!(ns));
        }
        let s = &self.stats;
        m.insert("faults".into(), json!(s.faults));
        m.insert("fast_path_fixes".into(), json!(s.fast_path_fixed));
        m.insert("retries".into(), json!(s.faults_retry));
        m.insert("precheck_retries".into(), json!(s.precheck_retries));
        m.insert("locked_retries".into(), json!(s.locked_retries));
        let causes: Map<String, Value> = s
            .retries_by_cause()
            .iter()
            .map(|(k, n)| (k.to_string(), json!(n)))
            .collect();
        m.insert("retries_by_cause".into(), Value::Object(causes));
        m.insert("mmu_lock_read".into(), json!(s.mmu_lock_read));
        m.insert("mmu_lock_write".into(), json!(s.mmu_lock_write));
        m.insert(
            "mmu_lock_waits".into(),
            json!(s.mmu_lock_read_contended + s.mmu_lock_write_contended),
        );
        m.insert("tlb_flushes_local".into(), json!(s.tlb_flush_local));
        m.insert("tlb_flushes_remote".into(), json!(s.tlb_flush_remote));
        m.insert("tables_allocated".into(), json!(s.tables_allocated));
        m.insert("tables_freed".into(), json!(s.tables_freed));
        m.insert("roots_created".into(), json!(s.roots_created));
        m.insert("roots_invalidated".into(), json!(s.roots_invalidated));
        m.insert("roots_freed".into(), json!(s.roots_freed));
        let mut counters = Map::new();
        for (k, v) in s.fields() {
            counters.insert(k.into(), json!(v));
        }
        m.insert("counters".into(), Value::Object(counters));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m.insert("violations".into(), json!(self.violations));
        let kinds: Map<String, Value> = self
            .violation_kinds
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        m.insert("violations_by_kind".into(), Value::Object(kinds));
        if !self.violation_log.is_empty() {
            m.insert("violation_log".into(), json!(self.violation_log));
        }
        Value::Object(m)
    }

    /// Print: the JSON object alone, or the selftest lines and a table.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.to_json());
            return;
        }
        for l in &self.lines {
            println!("{l}");
        }
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec!["metric", "value"]);
        t.add_row(vec!["scenario".to_string(), self.scenario.clone()]);
        t.add_row(vec![
            "vCPUs x memory".to_string(),
            format!(
                "{} x {}",
                self.vcpus,
                crate::args::human(self.bytes_per_vcpu)
            ),
        ]);
        t.add_row(vec!["pages (4 KiB)".to_string(), self.pages.to_string()]);
        for (name, ns) in &self.phases {
            t.add_row(vec![format!("{name} time"), secs(*ns)]);
        }
        let s = &self.stats;
        for (k, v) in [
            ("faults", s.faults),
            ("  fixed", s.faults_fixed),
            ("  spurious", s.faults_spurious),
            ("  retry", s.faults_retry),
            ("  emulate (MMIO)", s.faults_emulate),
            ("  error (EFAULT/memory fault)", s.faults_error),
            ("fast-path fixes", s.fast_path_fixed),
            ("retries by cause", 0),
            ("mmu_lock read / write", 0),
            ("mmu_lock waits (read / write)", 0),
            ("TLB flushes: local / remote", 0),
            ("tables allocated / freed", 0),
            ("roots created / invalidated / freed", 0),
        ] {
            let val = match k {
                "retries by cause" => s
                    .retries_by_cause()
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                "mmu_lock read / write" => format!("{} / {}", s.mmu_lock_read, s.mmu_lock_write),
                "mmu_lock waits (read / write)" => format!(
                    "{} / {}",
                    s.mmu_lock_read_contended, s.mmu_lock_write_contended
                ),
                "TLB flushes: local / remote" => {
                    format!("{} / {}", s.tlb_flush_local, s.tlb_flush_remote)
                }
                "tables allocated / freed" => {
                    format!("{} / {}", s.tables_allocated, s.tables_freed)
                }
                "roots created / invalidated / freed" => {
                    format!(
                        "{} / {} / {}",
                        s.roots_created, s.roots_invalidated, s.roots_freed
                    )
                }
                _ => v.to_string(),
            };
            t.add_row(vec![k.to_string(), val]);
        }
        for (k, v) in &self.extra {
            let shown = match v {
                Value::String(s) => s.clone(),
                // Nested details are for --json; the selftest lines summarise them.
                Value::Object(_) | Value::Array(_) => continue,
                other => other.to_string(),
            };
            t.add_row(vec![k.clone(), shown]);
        }
        t.add_row(vec![
            "oracle violations".to_string(),
            self.violations.to_string(),
        ]);
        println!("{t}");
        for l in &self.violation_log {
            println!("violation: {l}");
        }
    }
}

/// The load average when the command started (see [`note_start`]).
static LOAD_AT_START: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();

/// The load averages (1, 5, 15 minutes), empty where /proc has none.
pub fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| {
            l.split_whitespace()
                .take(3)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Load average per CPU above which a measurement is called busy.
pub const BUSY_PER_CPU: f64 = 0.5;

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Record the load average before anything runs (the start of a command).
/// Returns a warning when the machine is busy: the 1-minute load above
/// [`BUSY_PER_CPU`] per CPU.
pub fn note_start() -> Option<String> {
    let load = LOAD_AT_START.get_or_init(load_average);
    let n = cpus().max(1);
    let one = *load.first()?;
    (one > BUSY_PER_CPU * n as f64).then(|| {
        format!(
            "vmmu: warning: the machine is busy (load average {one:.2} on {n} CPUs, above {BUSY_PER_CPU} per CPU): figures will be noisy; the JSON records it"
        )
    })
}

/// One line for a benchmark's text output: where it was measured.
pub fn host_line() -> String {
    let h = host_json();
    let fmt = |v: &Value| {
        v.as_array().map_or("unknown".into(), |a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" / ")
        })
    };
    format!(
        "Measured on: {}, {} CPUs, commit {}; load average {} before, {} after{}",
        h["cpu_model"].as_str().unwrap_or("unknown"),
        h["cpus"],
        env!("VMMU_COMMIT"),
        fmt(&h["load_average_before"]),
        fmt(&h["load_average"]),
        if h["busy"] == true {
            " (busy: figures are noisy)"
        } else {
            ""
        }
    )
}

/// What the machine is, for the record: the CPU model and how loaded it was
/// before the command ran and when its report was made.
pub fn host_json() -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let load = load_average();
    let before = LOAD_AT_START.get().cloned();
    let n = cpus();
    let busy = before
        .as_ref()
        .and_then(|b| b.first())
        .is_some_and(|one| *one > BUSY_PER_CPU * n.max(1) as f64);
    json!({
        "cpu_model": cpu_model,
        "cpus": n,
        "load_average": load,
        "load_average_before": before,
        "busy": busy,
    })
}

/// The configuration block every `--json` object carries: the command, every
/// flag with its value, the MMU's mode, the build, and the host.
pub fn config_json(command: &str, flags: Value, vm: &vmmu::VmConfig, oracle: bool) -> Value {
    json!({
        "command": command,
        "flags": flags,
        "mmu": {
            "kind": vm.mmu.name(),
            "vm_type": vm.vm_type.name(),
            "root_level": vm.root_level.get(),
            "max_level": vm.max_level.to_string(),
            "ept_ad_bits": vm.ad_enabled,
            "precheck": vm.precheck,
            "mmio_caching": vm.mmio_caching,
            "nx_huge_pages": vm.nx_huge_pages,
            "dirty_tracking": vm.dirty_tracking.name(),
            "eager_page_split": vm.eager_page_split,
            "address_spaces": vm.address_spaces,
            "maxphyaddr": vm.maxphyaddr,
            "shadow_unsync": vm.mmu == vmmu::MmuKind::Shadow && vm.shadow_unsync,
            "legacy_root_reload": vm.legacy_root_reload,
        },
        "oracle": oracle,
        "version": env!("CARGO_PKG_VERSION"),
        "commit": env!("VMMU_COMMIT"),
        "host": host_json(),
    })
}
