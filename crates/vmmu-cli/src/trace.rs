//! Chrome trace-event JSON (opens in Perfetto and chrome://tracing): faults per
//! vCPU, host events and memslot operations as spans, MMU counters (yields,
//! remote flushes, mmu_lock waits) as counter tracks.
//!
//! Timestamps are kept in integer nanoseconds and written as microseconds with
//! at most three decimals (what the format expects), so they print exactly. A
//! vCPU records at most `RunOptions::trace_limit` faults; when it drops some, the
//! trace says so with an instant event at the cut, and the run's report counts
//! them (`trace_faults_dropped`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};
use vmmu_machine::VcpuReport;

/// Faults a vCPU records at most (about 40 bytes each in memory).
pub const FAULTS_PER_VCPU: usize = 2_000_000;

/// Collects events; written once at the end.
#[derive(Debug)]
pub struct Trace {
    /// Time zero of the trace.
    pub epoch: Instant,
    events: Mutex<Vec<Value>>,
    named: Mutex<BTreeSet<u64>>,
    dropped: Mutex<u64>,
}

const HOST_TID: u64 = 1000;

/// Nanoseconds as the format's microseconds, exactly.
fn us(ns: u64) -> Value {
    // The decimal string is exact; parsing it gives the nearest double, which
    // serde_json prints back as the same short decimal.
    let text = format!("{}.{:03}", ns / 1000, ns % 1000);
    text.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

impl Trace {
    /// A new, empty trace.
    pub fn new() -> Trace {
        let t = Trace {
            epoch: Instant::now(),
            events: Mutex::new(Vec::new()),
            named: Mutex::new(BTreeSet::new()),
            dropped: Mutex::new(0),
        };
        t.name_thread(HOST_TID, "host");
        t
    }

    fn push(&self, v: Value) {
        if let Ok(mut e) = self.events.lock() {
            e.push(v);
        }
    }

    /// Name a track once, however many times events land on it.
    fn name_thread(&self, tid: u64, name: &str) {
        let first = self
            .named
            .lock()
            .map(|mut n| n.insert(tid))
            .unwrap_or(false);
        if first {
            self.push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}));
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// A span on the host track.
    pub fn host_span(&self, name: &str, start: Instant, end: Instant, args: Value) {
        let (s, e) = (self.ns(start), self.ns(end));
        self.push(
            json!({"name": name, "cat": "host", "ph": "X", "pid": 1, "tid": HOST_TID,
            "ts": us(s), "dur": us(e.saturating_sub(s).max(1)), "args": args}),
        );
    }

    /// A counter sample.
    pub fn counter(&self, name: &str, at: Instant, value: u64) {
        self.push(json!({"name": name, "ph": "C", "pid": 1, "ts": us(self.ns(at)), "args": {"value": value}}));
    }

    /// The faults a vCPU recorded in one run, and where its recording was cut.
    pub fn faults(&self, report: &VcpuReport) {
        let vcpu = report.id as u64;
        self.name_thread(vcpu, &format!("vCPU {vcpu}"));
        for r in &report.trace {
            self.push(json!({"name": format!("fault:{}", r.outcome), "cat": "fault", "ph": "X", "pid": 1, "tid": vcpu,
                "ts": us(r.start_ns), "dur": us(r.dur_ns.max(1)),
                "args": {"gpa": format!("{:#x}", r.gpa), "mmu_lock_reads": r.lock_reads}}));
        }
        if report.trace_dropped > 0 {
            if let Ok(mut d) = self.dropped.lock() {
                *d += report.trace_dropped;
            }
            self.push(json!({"name": "trace_truncated", "cat": "trace", "ph": "i", "s": "t", "pid": 1, "tid": vcpu,
                "ts": us(report.trace_cut_ns.unwrap_or(0)),
                "args": {"recorded": report.trace.len(), "dropped": report.trace_dropped,
                    "why": "--trace-limit faults are recorded per vCPU and run"}}));
        }
    }

    /// Faults left out of the trace so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.lock().map(|d| *d).unwrap_or(0)
    }

    /// Write the trace file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let events = self.events.lock().map(|e| e.clone()).unwrap_or_default();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer(
            &mut f,
            &json!({"traceEvents": events, "displayTimeUnit": "ns",
                "otherData": {"faults_dropped": self.dropped()}}),
        )?;
        f.flush()
    }
}

impl Default for Trace {
    fn default() -> Self {
        Trace::new()
    }
}
