//! Chrome trace-event JSON (opens in Perfetto and chrome://tracing): faults per
//! vCPU, host events and memslot operations as spans, MMU counters (yields,
//! remote flushes, mmu_lock waits) as counter tracks.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};
use vmmu_machine::FaultRecord;

/// Collects events; written once at the end.
#[derive(Debug)]
pub struct Trace {
    /// Time zero of the trace.
    pub epoch: Instant,
    events: Mutex<Vec<Value>>,
}

const HOST_TID: u64 = 1000;

impl Trace {
    /// A new, empty trace.
    pub fn new() -> Trace {
        let t = Trace {
            epoch: Instant::now(),
            events: Mutex::new(Vec::new()),
        };
        t.push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": HOST_TID, "args": {"name": "host"}}));
        t
    }

    fn push(&self, v: Value) {
        if let Ok(mut e) = self.events.lock() {
            e.push(v);
        }
    }

    fn us(&self, t: Instant) -> f64 {
        t.duration_since(self.epoch).as_nanos() as f64 / 1000.0
    }

    /// A span on the host track.
    pub fn host_span(&self, name: &str, start: Instant, end: Instant, args: Value) {
        self.push(
            json!({"name": name, "cat": "host", "ph": "X", "pid": 1, "tid": HOST_TID,
            "ts": self.us(start), "dur": (self.us(end) - self.us(start)).max(0.001), "args": args}),
        );
    }

    /// A counter sample.
    pub fn counter(&self, name: &str, at: Instant, value: u64) {
        self.push(
            json!({"name": name, "ph": "C", "pid": 1, "ts": self.us(at), "args": {"value": value}}),
        );
    }

    /// Faults recorded by a vCPU.
    pub fn faults(&self, vcpu: u32, records: &[FaultRecord]) {
        self.push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": vcpu, "args": {"name": format!("vCPU {vcpu}")}}));
        for r in records {
            self.push(json!({"name": format!("fault:{}", r.outcome), "cat": "fault", "ph": "X", "pid": 1, "tid": vcpu,
                "ts": r.start_ns as f64 / 1000.0, "dur": (r.dur_ns as f64 / 1000.0).max(0.001),
                "args": {"gpa": format!("{:#x}", r.gpa), "mmu_lock_reads": r.lock_reads}}));
        }
    }

    /// Write the trace file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let events = self.events.lock().map(|e| e.clone()).unwrap_or_default();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer(
            &mut f,
            &json!({"traceEvents": events, "displayTimeUnit": "ns"}),
        )?;
        f.flush()
    }
}

impl Default for Trace {
    fn default() -> Self {
        Trace::new()
    }
}
