//! `vmmu bench dirty-log`: the dirty-log calls timed on vmmu and (with
//! `--vs-kvm`) on this machine's `/dev/kvm`, in one run, with the same guest
//! write pattern on both and the harvested bitmaps compared page for page.
//!
//! Both sides: one vCPU over `-b` bytes of anonymous memory; a pass maps every
//! page; logging is turned on (timed: on vmmu it write-protects every page);
//! a pass writes every `--stride`-th page and the bitmap is taken (compared);
//! a pass writes every page with logging on (timed) and two gets follow (all
//! dirty, then none dirty; timed); then, with manual protection, a pass
//! dirties everything, a get copies the log and a clear of every page is
//! timed.

use std::time::Instant;

use serde_json::json;
use vmmu::{Gpa, MemFlags, UserMemoryRegion};
use vmmu_machine::guest::{AccessKind, GuestAccess, Script};
use vmmu_machine::{Backing, Machine, MachineConfig, RunOptions};

use crate::args::{human, BadInput};
use crate::cli::BenchDirtyLogArgs;

const GPA: u64 = 1 << 32;
const HVA: u64 = 0x300_0000_0000;
const PAGE: u64 = 4096;

/// One side's figures.
#[derive(Debug, Clone, Default)]
struct Side {
    enable_ns: u64,
    write_pass_ns: u64,
    get_all_ns: u64,
    get_none_ns: u64,
    clear_all_ns: u64,
    bitmap: Vec<u64>,
}

/// Check the flags.
pub fn validate(a: &BenchDirtyLogArgs) -> anyhow::Result<()> {
    if a.bytes < 2 << 20 || !a.bytes.is_multiple_of(2 << 20) || a.bytes > 4 << 30 {
        anyhow::bail!(BadInput(format!(
            "-b {}: the logged memory must be a multiple of 2M from 2M to 4G",
            human(a.bytes)
        )));
    }
    if a.vcpus == 0 || a.vcpus > 64 {
        anyhow::bail!(BadInput(format!("-v {}: vCPUs must be 1..=64", a.vcpus)));
    }
    if !(a.bytes / u64::from(a.vcpus)).is_multiple_of(2 << 20)
        || a.bytes / u64::from(a.vcpus) * u64::from(a.vcpus) != a.bytes
    {
        anyhow::bail!(BadInput(format!(
            "-b {} -v {}: every vCPU's chunk must be a multiple of 2M",
            human(a.bytes),
            a.vcpus
        )));
    }
    if a.stride == 0 || a.stride > 512 {
        anyhow::bail!(BadInput(format!(
            "--stride {}: pages between written pages must be 1..=512",
            a.stride
        )));
    }
    Ok(())
}

/// Every vCPU writes `value` into every `stride`-th page of its own chunk of
/// the `pages`, as the real KVM's loop guest does; returns the pass's time.
fn pass(m: &mut Machine, vcpus: u32, pages: u64, stride: u64, value: u64) -> u64 {
    let vcpus = u64::from(vcpus);
    let per = pages / vcpus;
    let scripts = (0..vcpus)
        .map(|v| {
            Script::new(
                (v * per..(v + 1) * per)
                    .step_by(stride as usize)
                    .map(|p| GuestAccess {
                        gpa: Gpa(GPA + p * PAGE),
                        kind: AccessKind::Write(value),
                        private: false,
                    })
                    .collect(),
            )
        })
        .collect();
    let t = Instant::now();
    m.run(scripts, &RunOptions::default(), |_| {});
    t.elapsed().as_nanos() as u64
}

fn vm_config(a: &BenchDirtyLogArgs) -> vmmu::VmConfig {
    vmmu::VmConfig {
        dirty_tracking: a.tracking.tracking,
        eager_page_split: !a.tracking.no_eager_split,
        ..vmmu::VmConfig::default()
    }
}

/// The bitmap vmmu reports for the bench's write pattern (for `vmmu diff`),
/// and the oracle's violations.
pub(crate) fn pattern_bitmap(a: &BenchDirtyLogArgs) -> anyhow::Result<(Vec<u64>, u64)> {
    let (side, violations) = vmmu_side(a)?;
    Ok((side.bitmap, violations))
}

fn vmmu_side(a: &BenchDirtyLogArgs) -> anyhow::Result<(Side, u64)> {
    let pages = a.bytes / PAGE;
    let mut m = Machine::new(
        MachineConfig {
            memory_bytes: a.bytes + a.bytes / 64 + (1 << 30),
            oracle: a.flags.oracle,
            vm: vm_config(a),
            ..MachineConfig::default()
        },
        a.vcpus,
    )?;
    m.map(vmmu::Hva(HVA), a.bytes, Backing::Anonymous)?;
    let region = UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: GPA,
        memory_size: a.bytes,
        userspace_addr: HVA,
    };
    m.set_memslot(region)?;
    pass(&mut m, a.vcpus, pages, 1, 1);
    let t = Instant::now();
    m.set_memslot(UserMemoryRegion {
        flags: MemFlags::LOG_DIRTY_PAGES.bits(),
        ..region
    })?;
    let enable_ns = t.elapsed().as_nanos() as u64;
    let _ = m.vm.get_dirty_log(1)?;
    pass(&mut m, a.vcpus, pages, a.stride, 2);
    let bitmap = m.vm.get_dirty_log(1)?;
    let write_pass_ns = pass(&mut m, a.vcpus, pages, 1, 3);
    let t = Instant::now();
    let _ = m.vm.get_dirty_log(1)?;
    let get_all_ns = t.elapsed().as_nanos() as u64;
    let t = Instant::now();
    let _ = m.vm.get_dirty_log(1)?;
    let get_none_ns = t.elapsed().as_nanos() as u64;
    // Manual protection: a pass dirties everything, get copies, clear protects.
    m.vm.enable_manual_dirty_log_protect(vmmu::dirty_log::MANUAL_PROTECT_ENABLE)?;
    pass(&mut m, a.vcpus, pages, 1, 4);
    let log = m.vm.get_dirty_log(1)?;
    let t = Instant::now();
    m.vm.clear_dirty_log(1, 0, pages, &log)?;
    let clear_all_ns = t.elapsed().as_nanos() as u64;
    let violations = m.oracle.total();
    let r = m.teardown();
    anyhow::ensure!(
        r.leaked_data_pages + r.leaked_table_pages + r.double_frees == 0,
        "teardown: {r:?}"
    );
    Ok((
        Side {
            enable_ns,
            write_pass_ns,
            get_all_ns,
            get_none_ns,
            clear_all_ns,
            bitmap,
        },
        violations,
    ))
}

/// Run it.
pub fn run(a: &BenchDirtyLogArgs) -> anyhow::Result<i32> {
    validate(a)?;
    let (ours, violations) = vmmu_side(a)?;
    let kvm = if a.vs_kvm {
        let r = vmmu_kvm::dirty_log::kvm_dirty_log(a.bytes, a.stride * PAGE, a.vcpus as usize)
            .map_err(|e| anyhow::anyhow!("--vs-kvm: {e}"))?;
        Some(Side {
            enable_ns: r.enable_ns,
            write_pass_ns: r.write_pass_ns,
            get_all_ns: r.get_all_ns,
            get_none_ns: r.get_none_ns,
            clear_all_ns: r.clear_all_ns,
            bitmap: r.pattern_bitmap,
        })
    } else {
        None
    };
    let pages = a.bytes / PAGE;
    let set = |b: &[u64]| -> u64 { b.iter().map(|w| w.count_ones() as u64).sum() };
    let expected = u64::from(a.vcpus) * (pages / u64::from(a.vcpus)).div_ceil(a.stride);
    let differ = kvm.as_ref().map(|k| {
        (0..pages)
            .filter(|p| {
                let bit = |b: &[u64]| {
                    b.get((p / 64) as usize)
                        .is_some_and(|w| w & (1 << (p % 64)) != 0)
                };
                bit(&ours.bitmap) != bit(&k.bitmap)
            })
            .count() as u64
    });
    let gib = a.bytes as f64 / (1u64 << 30) as f64;
    let per_gib = |ns: u64| (ns as f64 / gib).round() as u64;
    let side_json = |s: &Side| {
        json!({
            "enable_ns": s.enable_ns, "write_pass_ns": s.write_pass_ns,
            "get_all_dirty_ns": s.get_all_ns, "get_none_dirty_ns": s.get_none_ns,
            "clear_all_dirty_ns": s.clear_all_ns,
            "get_plus_clear_all_dirty_ns": s.get_all_ns + s.clear_all_ns,
            "enable_ns_per_gib": per_gib(s.enable_ns), "get_all_dirty_ns_per_gib": per_gib(s.get_all_ns),
            "pages_reported_for_the_pattern": set(&s.bitmap),
        })
    };
    let pattern_ok = set(&ours.bitmap) == expected;
    if a.flags.json {
        println!(
            "{}",
            json!({
                "mode": "bench",
                "scenario": "dirty-log",
                "config": crate::report::config_json(
                    "bench dirty-log",
                    serde_json::to_value(a).unwrap_or_default(),
                    &vm_config(a),
                    a.flags.oracle,
                ),
                "pages": pages,
                "pattern_pages": expected,
                "vmmu": side_json(&ours),
                "kvm": kvm.as_ref().map(side_json),
                "bitmap_pages_differing": differ,
                "violations": violations,
            })
        );
    } else {
        use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
        println!(
            "{} over {} ({pages} pages): a pass maps every page, logging is turned on, a pass writes one page in every {} ({expected} pages) and the bitmap is taken, then a pass writes every page and two gets follow. vmmu catches writes by {}. All figures from this one run.\n",
            if a.vcpus == 1 { "One vCPU".to_string() } else { format!("{} vCPUs, each on its own chunk,", a.vcpus) },
            human(a.bytes),
            a.stride,
            match a.tracking.tracking {
                vmmu::DirtyTracking::Pml => "PML (Dirty bits cleared, writes logged by the processor)",
                vmmu::DirtyTracking::WriteProtect => "write protection",
            }
        );
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        let mut header = vec!["", "vmmu"];
        if kvm.is_some() {
            header.push("/dev/kvm");
            header.push("vmmu / kvm");
        }
        t.set_header(header);
        let row = |name: &str, f: fn(&Side) -> u64| {
            let mut r = vec![name.to_string(), f(&ours).to_string()];
            if let Some(k) = &kvm {
                r.push(f(k).to_string());
                r.push(format!("{:.2}", f(&ours) as f64 / f(k).max(1) as f64));
            }
            r
        };
        t.add_row(row("enable logging (ns)", |s| s.enable_ns));
        t.add_row(row("write pass, logging on (ns)", |s| s.write_pass_ns));
        t.add_row(row("get, all dirty (ns)", |s| s.get_all_ns));
        t.add_row(row("get, none dirty (ns)", |s| s.get_none_ns));
        t.add_row(row("clear, all dirty, manual protection (ns)", |s| {
            s.clear_all_ns
        }));
        t.add_row(row("get + clear, all dirty (ns)", |s| {
            s.get_all_ns + s.clear_all_ns
        }));
        t.add_row(row("pages reported for the pattern", |s| {
            s.bitmap.iter().map(|w| w.count_ones() as u64).sum()
        }));
        println!("{t}");
        println!("{}", crate::report::host_line());
        if let Some(d) = differ {
            println!(
                "bitmaps of the same write pattern: {d} pages differ between vmmu and /dev/kvm"
            );
        }
        println!(
            "vmmu reported {} pages for the pattern, {expected} written",
            set(&ours.bitmap)
        );
    }
    Ok(
        if violations > 0 || !pattern_ok || differ.is_some_and(|d| d > 0) {
            1
        } else {
            0
        },
    )
}
