//! `private-conversions`: private_mem_conversions_test on the machine model.
//!
//! A software-protected VM, one guest_memfd split over `-m` memslots, each of
//! `-n` vCPUs owning 2 MiB + 4 KiB at 4 GiB + i × (the size aligned to the
//! backing's page). Every vCPU runs the selftest's guest script on its own
//! chunk, in parallel: explicit conversions through `KVM_HC_MAP_GPA_RANGE`
//! (handled as the selftest's host does: an optional `fallocate`, then the
//! attributes) over whole chunks and odd/even 4 KiB frames inside 2 MiB, host
//! writes through the shared path that the guest must see, and punch-holes
//! that the guest must read back as zeros. Memory is checked one word per page
//! (the MMU maps pages; a word per page catches every wrong translation).
//!
//! Besides pass/fail it measures what the design discussion asked: how many
//! leaves each conversion zaps, and how many it zaps outside its range (an
//! audit of every attribute change against the leaves of the converting
//! vCPU's chunk: must be 0).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vmmu::{Gpa, Hva, Level, UserMemoryRegion, VmType};
use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram, MapGpaHow};
use vmmu_machine::primary_mmu::HostMmu;
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

use crate::args::{BadInput, Common, Shape};
use crate::report::Report;

/// Guest-physical base of the data (the selftest's `BASE_DATA_GPA`).
pub const BASE_GPA: u64 = 1 << 32;
/// Host address of the shared side.
const BASE_HVA: u64 = 0x100_0000_0000;
/// First data memslot (`BASE_DATA_SLOT`).
const BASE_SLOT: u32 = 10;
/// Bytes each vCPU uses.
const PER_CPU: u64 = (2 << 20) + 4096;
const PAGE: u64 = 4096;

/// The selftest's test ranges: (offset, size) inside a vCPU's chunk.
const RANGES: [(u64, u64); 5] = [
    (0, PAGE),
    (0, 2 << 20),
    (PAGE, PAGE),
    (PAGE, 2 << 20),
    (2 << 20, PAGE),
];

/// Check the flags: the selftest's `-n`, `-m`, `-s`.
pub fn validate(common: &Common) -> anyhow::Result<Shape> {
    let backing = common.backing.unwrap_or(Backing::Anonymous);
    let per_cpu = per_cpu_size(backing);
    let shape = common.shape(1, per_cpu, 1, backing).map_err(|e| {
        // The shared checks speak of -v and -x; this scenario's flags are -n, -m.
        BadInput(e.0.replace("-v ", "-n ").replace("-x ", "-m "))
    })?;
    Ok(shape)
}

/// Each vCPU's chunk: 2 MiB + 4 KiB aligned up to the backing's page, at
/// least 2 MiB (the selftest's `per_cpu_size`).
fn per_cpu_size(backing: Backing) -> u64 {
    let align = backing.alignment().max(2 << 20);
    PER_CPU.div_ceil(align) * align
}

fn pat(p: u8) -> u64 {
    p as u64 * 0x0101_0101_0101_0101
}

/// What the host side checks (and writes) at a ucall.
#[derive(Debug, Clone, Copy)]
enum HostOp {
    /// `SYNC_PRIVATE`: the host still sees `pattern` through the shared path.
    Check { gpa: u64, size: u64, pattern: u8 },
    /// `SYNC_SHARED`: the host sees `current` and writes `new`.
    CheckWrite {
        gpa: u64,
        size: u64,
        current: u8,
        new: u8,
    },
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// A guest access; reads carry the word they must see.
    Guest(GuestAccess, Option<u64>),
    /// A ucall to the host side.
    Host(HostOp),
}

/// One vCPU's guest script and its host side.
struct ConversionsGuest {
    vcpu: u32,
    steps: Vec<Step>,
    next: usize,
    /// Index of the first step of the second run (the ranges), where the run
    /// is split to sample the huge leaves mapped after the shared warm-up.
    pause_at: usize,
    host: Arc<HostMmu>,
    mismatches: u64,
    first: Option<String>,
}

impl ConversionsGuest {
    fn new(vcpu: u32, base: u64, host: Arc<HostMmu>) -> ConversionsGuest {
        let mut g = ConversionsGuest {
            vcpu,
            steps: Vec::new(),
            next: 0,
            pause_at: 0,
            host,
            mismatches: 0,
            first: None,
        };
        g.explicit_conversion(base, false);
        g.explicit_conversion(base, true);
        g.punch_hole_test(base, false);
        g.punch_hole_test(base, true);
        g
    }

    fn access(&mut self, gpa: u64, kind: AccessKind, expect: Option<u64>) {
        self.steps.push(Step::Guest(
            GuestAccess {
                gpa: Gpa(gpa),
                kind,
                private: false,
            },
            expect,
        ));
    }
    fn memset(&mut self, gpa: u64, p: u8, size: u64) {
        for i in 0..size.div_ceil(PAGE) {
            self.access(gpa + i * PAGE, AccessKind::Write(pat(p)), None);
        }
    }
    fn memcmp(&mut self, gpa: u64, p: u8, size: u64) {
        for i in 0..size.div_ceil(PAGE) {
            self.access(gpa + i * PAGE, AccessKind::Read, Some(pat(p)));
        }
    }
    fn map(&mut self, gpa: u64, size: u64, private: bool, fallocate: bool) {
        self.access(
            gpa,
            AccessKind::MapGpaRange {
                size,
                private,
                how: MapGpaHow::Selftest {
                    fallocate,
                    set_attributes: true,
                },
            },
            None,
        );
    }
    fn punch(&mut self, gpa: u64, size: u64) {
        self.access(
            gpa,
            AccessKind::MapGpaRange {
                size,
                private: false,
                how: MapGpaHow::Selftest {
                    fallocate: true,
                    set_attributes: false,
                },
            },
            None,
        );
    }
    fn sync_shared(&mut self, gpa: u64, size: u64, current: u8, new: u8) {
        self.steps.push(Step::Host(HostOp::CheckWrite {
            gpa,
            size,
            current,
            new,
        }));
    }
    fn sync_private(&mut self, gpa: u64, size: u64, pattern: u8) {
        self.steps
            .push(Step::Host(HostOp::Check { gpa, size, pattern }));
    }

    /// `guest_test_explicit_conversion`.
    fn explicit_conversion(&mut self, base: u64, fallocate: bool) {
        let (def_p, init_p) = (0xaa, 0xcc);
        self.memset(base, def_p, PER_CPU);
        self.memcmp(base, def_p, PER_CPU);
        self.sync_shared(base, PER_CPU, def_p, init_p);
        self.memcmp(base, init_p, PER_CPU);
        if self.pause_at == 0 {
            self.pause_at = self.steps.len();
        }
        for (off, size) in RANGES {
            let gpa = base + off;
            let (p1, p2, p3, p4) = (0x11, 0x22, 0x33, 0x44);
            self.memset(gpa, p1, size);
            self.map(gpa, size, true, fallocate);
            if size > PAGE {
                self.memset(gpa, p2, PAGE);
            } else {
                self.memset(gpa, p2, size);
                self.sync_private(gpa, size, p1);
                self.memcmp(gpa, p2, size);
                if gpa > base {
                    self.memcmp(base, init_p, gpa - base);
                }
                if gpa + size < base + PER_CPU {
                    self.memcmp(gpa + size, init_p, base + PER_CPU - (gpa + size));
                }
                for j in (0..size).step_by(PAGE as usize) {
                    if (j / PAGE) & 1 == 1 {
                        self.map(gpa + j, PAGE, false, fallocate);
                        self.sync_shared(gpa + j, PAGE, p1, p3);
                        self.memcmp(gpa + j, p3, PAGE);
                    } else {
                        self.sync_private(gpa + j, PAGE, p1);
                    }
                }
            }
            self.map(gpa, size, false, fallocate);
            self.memset(gpa, p3, size);
            self.sync_shared(gpa, size, p3, p4);
            self.memcmp(gpa, p4, size);
            self.memset(gpa, init_p, size);
            self.map(base, PER_CPU, false, true);
        }
    }

    /// `guest_test_punch_hole`.
    fn punch_hole_test(&mut self, base: u64, precise: bool) {
        let init_p = 0xcc;
        self.map(base, PER_CPU, true, false);
        for (off, size) in RANGES {
            let gpa = base + off;
            self.punch(base, PER_CPU);
            if precise {
                self.memset(gpa, init_p, size);
                self.memcmp(gpa, init_p, size);
            } else {
                self.memset(base, init_p, PER_CPU);
                self.memcmp(base, init_p, PER_CPU);
            }
            self.punch(gpa, size);
            self.memcmp(gpa, 0, size);
        }
    }

    fn mismatch(&mut self, what: String) {
        self.mismatches += 1;
        if self.first.is_none() {
            self.first = Some(format!("vCPU {}: {what}", self.vcpu));
        }
    }

    fn host_op(&mut self, op: HostOp) {
        let (gpa, size, want, new) = match op {
            HostOp::Check { gpa, size, pattern } => (gpa, size, pattern, None),
            HostOp::CheckWrite {
                gpa,
                size,
                current,
                new,
            } => (gpa, size, current, Some(new)),
        };
        for i in 0..size.div_ceil(PAGE) {
            let g = gpa + i * PAGE;
            let hva = Hva(BASE_HVA + (g - BASE_GPA));
            match self.host.read_u64(hva) {
                Ok(v) if v == pat(want) => {}
                Ok(v) => self.mismatch(format!(
                    "host expected {:#x} at gpa {g:#x}, got {v:#x}",
                    pat(want)
                )),
                Err(e) => self.mismatch(format!("host read of gpa {g:#x} failed: {e}")),
            }
            if let Some(n) = new {
                if let Err(e) = self.host.write_u64(hva, pat(n)) {
                    self.mismatch(format!("host write of gpa {g:#x} failed: {e}"));
                }
            }
        }
    }
}

impl GuestProgram for ConversionsGuest {
    fn next(&mut self) -> Option<GuestAccess> {
        if self.next == self.pause_at && self.pause_at > 0 {
            // End of the warm-up: the run stops here once (see `run`).
            self.pause_at = usize::MAX;
            return None;
        }
        let step = *self.steps.get(self.next)?;
        Some(match step {
            Step::Guest(a, _) => a,
            Step::Host(_) => GuestAccess {
                gpa: Gpa(0),
                kind: AccessKind::Ucall(self.next as u64),
                private: false,
            },
        })
    }

    fn complete(&mut self, access: &GuestAccess, result: AccessResult) {
        let step = self.steps[self.next];
        self.next += 1;
        match (step, result) {
            (Step::Host(op), AccessResult::Hypercall(_)) => self.host_op(op),
            (Step::Guest(_, None), AccessResult::Memory(_)) => {}
            (Step::Guest(_, Some(want)), AccessResult::Memory(v)) if v == want => {}
            (Step::Guest(_, Some(want)), AccessResult::Memory(v)) => self.mismatch(format!(
                "guest expected {want:#x} at {}, got {v:#x}",
                access.gpa
            )),
            (Step::Guest(_, _), AccessResult::Hypercall(0)) => {}
            (_, other) => self.mismatch(format!(
                "{:?} at {} ended {other:?}",
                access.kind, access.gpa
            )),
        }
    }

    fn mismatches(&self) -> u64 {
        self.mismatches
    }

    fn first_mismatch(&self) -> Option<String> {
        self.first.clone()
    }
}

/// Run it.
pub fn run(common: &Common) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let per_cpu = shape.bytes_per_vcpu;
    let memfd_size = shape.total;
    let slot_size = memfd_size / shape.slots as u64;
    let cfg = MachineConfig {
        memory_bytes: 2 * memfd_size + (1 << 30),
        vm: vmmu::VmConfig {
            vm_type: VmType::SwProtected,
            ..super::vm_config(common)
        },
        oracle: !common.no_oracle,
        poison: true,
        dirty_ring: 0,
    };
    let mut m = Machine::new(cfg, shape.vcpus)?;
    m.map(Hva(BASE_HVA), memfd_size, shape.backing)?;
    let file = Arc::new(m.vm.create_guest_memfd(memfd_size, 0)?);
    for i in 0..shape.slots as u64 {
        m.vmm.bind_gmem_slot(
            UserMemoryRegion {
                slot: BASE_SLOT + i as u32,
                flags: 0,
                guest_phys_addr: BASE_GPA + i * slot_size,
                memory_size: slot_size,
                userspace_addr: BASE_HVA + i * slot_size,
            },
            file.clone(),
            i * slot_size,
        )?;
    }
    drop(file);
    // Each vCPU converts only its own chunk: any leaf a conversion removes
    // elsewhere in that chunk is a bug.
    m.vmm.set_audit(Some(Arc::new(move |gpa: u64| {
        let lo = BASE_GPA + (gpa - BASE_GPA) / per_cpu * per_cpu;
        (lo, lo + per_cpu)
    })));
    let progs: Vec<ConversionsGuest> = (0..shape.vcpus)
        .map(|i| ConversionsGuest::new(i, BASE_GPA + i as u64 * per_cpu, m.host.clone()))
        .collect();
    let steps: usize = progs.iter().map(|p| p.steps.len()).sum();
    let opts = RunOptions::default();
    let t0 = Instant::now();
    // The shared warm-up, then the conversions.
    let out = m.run(progs, &opts, |_| {});
    let huge_before = m.vm.stats().present(Level::M2);
    let warm = m.vm.stats();
    let t1 = Instant::now();
    let progs: Vec<ConversionsGuest> = out.into_iter().map(|(p, _)| p).collect();
    let out = m.run(progs, &opts, |_| {});
    let elapsed = t1.elapsed();
    let total_elapsed = t0.elapsed();
    let st = m.vm.stats();
    let huge_after = st.present(Level::M2);
    let memory_faults: u64 = out.iter().map(|(_, r)| r.counters.memory_faults).sum();
    let unfinished = out.iter().filter(|(p, _)| p.next < p.steps.len()).count();
    let vc = &m.vmm.counters;
    let conversions = vc.to_private.load(Ordering::Relaxed) + vc.to_shared.load(Ordering::Relaxed);
    let punched = vc.private_pages_punched.load(Ordering::Relaxed);
    let a = &m.vmm.audit_counters;
    let audited = a.audited.load(Ordering::Relaxed);
    let zapped_in = a.zapped_in_range.load(Ordering::Relaxed);
    let zapped_out = a.zapped_outside.load(Ordering::Relaxed);
    let zapped = st.leaves_zapped - warm.leaves_zapped;
    let attr_ns = vc.attributes_ns.load(Ordering::Relaxed);
    // Conversions per second of the MMU's work (the attribute calls), not of
    // the guest script around them.
    let per_sec = conversions as f64 * 1e9 / attr_ns.max(1) as f64;

    let mut r = Report::new("private-conversions", &shape);
    r.phase("warmup", (t1 - t0).as_nanos() as u64);
    r.phase("conversions", elapsed.as_nanos() as u64);
    r.phase("run", total_elapsed.as_nanos() as u64);
    r.put("guest_steps", steps as u64);
    r.put("memslots", shape.slots as u64);
    r.put("conversions", conversions);
    r.put("conversions_per_sec", per_sec.round() as u64);
    r.put(
        "attribute_changes",
        st.attribute_changes - warm.attribute_changes,
    );
    r.put("attributes_ns", attr_ns);
    r.put("leaves_zapped", zapped);
    r.put(
        "leaves_zapped_per_conversion_milli",
        (zapped_in * 1000).checked_div(audited).unwrap_or(0),
    );
    r.put("audited_conversions", audited);
    r.put("leaves_zapped_by_conversions_in_range", zapped_in);
    r.put("leaves_zapped_outside_range", zapped_out);
    r.put("private_pages_punched", punched);
    r.put("gmem_invalidations", st.gmem_invalidations);
    r.put("private_faults", st.private_faults);
    r.put("memory_fault_exits", memory_faults);
    r.put("huge_leaves_before", huge_before);
    r.put("huge_leaves_after", huge_after);
    r.line(format!(
        "private-conversions: {} vCPU(s), {} memslot(s), {}: {steps} guest steps",
        shape.vcpus,
        shape.slots,
        shape.backing.name()
    ));
    r.line(format!(
        "conversions: {conversions} ({} changed attributes), {:.1} us each in the MMU ({:.0}/s); {zapped_in} leaves zapped by them ({:.2} per conversion), {zapped_out} outside their range ({audited} audited); {zapped} leaves zapped in all (punch-holes included)",
        st.attribute_changes - warm.attribute_changes,
        attr_ns as f64 / 1e3 / conversions.max(1) as f64,
        per_sec,
        zapped_in as f64 / audited.max(1) as f64
    ));
    r.line(format!(
        "private faults {}, pages punched {punched} ({} guest_memfd invalidations), memory-fault exits {memory_faults}; 2M leaves {huge_before} after the shared warm-up, {huge_after} at the end",
        st.private_faults, st.gmem_invalidations
    ));
    let env = super::Env::new(m, shape, common, None);
    let code = env.finish(r)?;
    if zapped_out > 0 || unfinished > 0 || memory_faults > 0 {
        eprintln!(
            "vmmu: private-conversions: {zapped_out} leaves zapped outside their conversion's range, {unfinished} vCPU(s) did not finish, {memory_faults} memory-fault exits"
        );
        return Ok(1);
    }
    Ok(code)
}
