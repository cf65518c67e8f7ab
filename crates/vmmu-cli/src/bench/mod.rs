//! `vmmu bench`: the vmmu figure, the same workload on the real /dev/kvm, and the
//! plain user-space baseline, measured in one run, with ratios.

use std::time::Instant;

pub mod aging;
pub mod conversions;
pub mod dirty_log;
pub mod nx_recovery;
pub mod scaling;
mod window;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde_json::json;
use vmmu::UserMemoryRegion;
use vmmu_machine::guest::Pattern;
use vmmu_machine::Backing;

use crate::args::{human, BadInput, Common};
use crate::cli::{BenchDemandPagingArgs, BenchStormArgs};
use crate::scenario::build;

const EXPLAIN: &str = "\
What is compared: vmmu runs its MMU inside a software machine model (guest accesses are simulated, \
a fault is a function call on the vCPU thread, host memory is a user-space arena whose fresh pages \
cost a real first-touch fault in this process). The plain baseline is threads writing 8 bytes per \
4 KiB page of fresh anonymous memory: the host's own first-touch cost. The untouched first pass and \
the baseline are measured in three adjacent pairs, and the median pair is shown. All figures come \
from this one run; compare ratios, not absolute times across runs.";

/// What the real KVM side is, found at run time: its backend and MMU, and what
/// a fault costs there.
fn kvm_explain(info: &vmmu_kvm::KvmInfo) -> String {
    let shadow = info.description.contains("shadow MMU");
    format!(
        "Real KVM: {}. {}",
        info.description,
        if shadow {
            "KVM runs its shadow MMU here, so every guest fault is a real VM exit handled by \
             shadow paging (nested when the backend is kvm_pvm): compare with that, not with \
             KVM's TDP MMU on bare metal."
        } else {
            "KVM runs a TDP MMU here: every guest fault is a real EPT/NPT violation exit."
        }
    )
}

/// Why `/dev/kvm` could not be used, with the operating system's reason.
fn kvm_unavailable(e: &vmmu_kvm::KvmError) -> String {
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

const STORM_EXPLAIN: &str = "\
What is compared: the same machine runs two phases twice, once with the fault pre-check (KVM >= 6.9) \
and once without: faults with no invalidation, then faults while a storm of page migrations \
invalidates the hot half of each vCPU's memory. \"outside\" faults are on pages no invalidation \
covers; \"inside\" faults hit an invalidation in progress. The pre-check retries an inside fault \
before it asks the host for the page or takes mmu_lock; without it the fault takes mmu_lock and the \
locked check retries it. \"zap yields\" counts zaps giving up mmu_lock to waiters.";

const CONVERSION_STORM_EXPLAIN: &str = "\
With --conversions the storm is not migrations but conversions: a software-protected VM whose memory \
is guest_memfd-backed, the host converting 1 MiB ranges of the hot halves between private and shared \
(attributes set, then the old side discarded), so \"inside\" faults race conversions of their own gfns.";

struct Phase {
    name: &'static str,
    /// Its stable JSON name.
    key: &'static str,
    vmmu_ns: u64,
    /// With `--mmu shadow`: the same phase on vmmu's TDP MMU, same run.
    tdp_ns: Option<u64>,
    kvm_ns: Option<u64>,
    pages: u64,
}

fn per_page(ns: u64, pages: u64) -> f64 {
    ns as f64 / pages.max(1) as f64
}

/// vmmu's populate over `vcpus` x `bytes` with host memory untouched or
/// pre-touched, then (pre-touched only) a warm pass and deleting the slot.
fn vmmu_run(
    common: &Common,
    vcpus: u32,
    bytes: u64,
    pretouch: bool,
) -> anyhow::Result<(u64, u64, u64, u64)> {
    let mut c = common.clone();
    c.vcpus = Some(vcpus);
    c.bytes = Some(bytes);
    c.slots = Some(1);
    c.quiet = true;
    let shape = c.shape(vcpus, bytes, 1, Backing::Anonymous)?;
    let mut env = build(&c, shape)?;
    let _ = &shape;
    if pretouch {
        env.prefault_host()?;
    }
    let models = env.models();
    let (models, _, first) = env.pass("first pass", models, 1, Pattern::Sequential, 100, |_| {});
    let (_, _, warm) = env.pass("warm pass", models, 2, Pattern::Sequential, 100, |_| {});
    let t = Instant::now();
    env.m.set_memslot(UserMemoryRegion {
        slot: 1,
        memory_size: 0,
        ..UserMemoryRegion::default()
    })?;
    let delete = t.elapsed().as_nanos() as u64;
    let violations = {
        let code = env.finish(crate::report::Report::default())?;
        code as u64
    };
    Ok((
        first.as_nanos() as u64,
        warm.as_nanos() as u64,
        delete,
        violations,
    ))
}

/// The resolved flags of `vmmu bench demand-paging`.
fn demand_paging_common(a: &BenchDemandPagingArgs) -> anyhow::Result<Common> {
    if !matches!(a.backing, Backing::Anonymous | Backing::AnonymousThp) {
        anyhow::bail!(BadInput(format!(
            "-s {}: the real-KVM and plain sides of this benchmark take anonymous or anonymous_thp",
            a.backing.name()
        )));
    }
    Ok(Common {
        vcpus: Some(a.vcpus),
        bytes: Some(a.bytes),
        backing: Some(a.backing),
        json: a.flags.json,
        // Per-access oracle checks would be measured too; they are off unless asked.
        no_oracle: !a.flags.oracle,
        mmu: a.mmu,
        guest_paging: a.guest_paging,
        ..Common::default()
    })
}

/// Check the flags of `vmmu bench demand-paging` (before anything is allocated).
pub fn validate_demand_paging(a: &BenchDemandPagingArgs) -> anyhow::Result<()> {
    let c = demand_paging_common(a)?;
    c.shape(2, 512 << 20, 1, Backing::Anonymous)?;
    Ok(())
}

/// Adjacent (vmmu untouched first pass, plain first touch) pairs behind the
/// populate figure.
const POPULATE_PAIRS: usize = 3;

/// The pair whose ratio (vmmu / plain) is the median of `pairs` (not empty).
fn median_pair(pairs: &[(u64, u64)]) -> (u64, u64) {
    let mut by_ratio = pairs.to_vec();
    by_ratio.sort_by(|a, b| {
        let r = |&(u, p): &(u64, u64)| u as f64 / p.max(1) as f64;
        r(a).total_cmp(&r(b))
    });
    by_ratio[by_ratio.len() / 2]
}

/// `vmmu bench demand-paging`.
pub fn demand_paging(a: &BenchDemandPagingArgs) -> anyhow::Result<i32> {
    let c = demand_paging_common(a)?;
    let common = &c;
    let vs_kvm = a.vs_kvm;
    let thp = a.backing == Backing::AnonymousThp;
    let shape = c.shape(2, 512 << 20, 1, Backing::Anonymous)?;
    let (v, b) = (shape.vcpus, shape.bytes_per_vcpu);
    let pages = shape.total / 4096;
    if !common.json {
        println!("{EXPLAIN}");
        if !vs_kvm {
            println!();
        }
        println!(
            "Workload: {v} {} x {} each, one write of 8 bytes per 4 KiB page, {} on every side.",
            if v == 1 { "vCPU" } else { "vCPUs" },
            human(b),
            if thp {
                "transparent huge pages (anonymous_thp)"
            } else {
                "4 KiB host pages (anonymous)"
            }
        );
    }
    // The populate figure: the untouched first pass against the plain
    // first touch, in adjacent pairs whose order alternates (the host
    // kernel's cost of fresh pages drifts by a third between runs seconds
    // apart, more than the MMU's share), and the median of the pairs.
    let mut pairs = Vec::with_capacity(POPULATE_PAIRS);
    let mut viol1 = 0;
    let plain = || vmmu_kvm::plain_first_touch(v as usize, b, thp);
    for i in 0..POPULATE_PAIRS {
        let ((u, _, _, x), p) = if i % 2 == 1 {
            let p = plain()?;
            (vmmu_run(&c, v, b, false)?, p)
        } else {
            (vmmu_run(&c, v, b, false)?, plain()?)
        };
        viol1 += x;
        pairs.push((u, p));
    }
    let (untouched, baseline) = median_pair(&pairs);
    let (pretouched, warm, delete, viol2) = vmmu_run(&c, v, b, true)?;
    let (one_pretouched, _, _, viol3) = vmmu_run(&c, 1, b, true)?;
    // The shadow MMU's figures beside the TDP MMU's, measured in this run.
    let shadow = common.mmu == vmmu::MmuKind::Shadow;
    let tdp = if shadow {
        let t = Common {
            mmu: vmmu::MmuKind::Tdp,
            guest_paging: false,
            ..c.clone()
        };
        let (u, _, _, x) = vmmu_run(&t, v, b, false)?;
        let (p, w, d, y) = vmmu_run(&t, v, b, true)?;
        Some((u, p, w, d, x + y))
    } else {
        None
    };
    let mut kvm_note = String::new();
    let kvm = if vs_kvm {
        match vmmu_kvm::kvm_available() {
            Ok(info) => {
                kvm_note = kvm_explain(&info);
                let cfg = vmmu_kvm::DemandPagingConfig {
                    vcpus: v as usize,
                    bytes_per_vcpu: b,
                    host_thp: thp,
                };
                match vmmu_kvm::run_demand_paging(&cfg) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        kvm_note = format!("real KVM run failed: {e}");
                        None
                    }
                }
            }
            Err(e) => {
                kvm_note = format!("{}; the KVM column is left out", kvm_unavailable(&e));
                None
            }
        }
    } else {
        None
    };
    let phases = [
        Phase {
            name: "first pass, host memory untouched",
            key: "first_pass_untouched_host",
            vmmu_ns: untouched,
            tdp_ns: tdp.map(|t| t.0),
            kvm_ns: kvm.as_ref().map(|k| k.first_touch_untouched_host.wall_ns),
            pages,
        },
        Phase {
            name: "first pass, host memory pre-touched",
            key: "first_pass_pretouched_host",
            vmmu_ns: pretouched,
            tdp_ns: tdp.map(|t| t.1),
            kvm_ns: kvm.as_ref().map(|k| k.first_touch_pretouched_host.wall_ns),
            pages,
        },
        Phase {
            name: "warm pass (all mapped)",
            key: "warm_pass",
            vmmu_ns: warm,
            tdp_ns: tdp.map(|t| t.2),
            kvm_ns: kvm.as_ref().map(|k| k.warm.wall_ns),
            pages,
        },
    ];
    let scaling = (one_pretouched as f64 / 1.0) / (pretouched as f64 / v as f64);
    let violations = viol1 + viol2 + viol3 + tdp.map_or(0, |t| t.4);
    if common.json {
        let out = json!({
            "mode": "bench",
            "scenario": "demand-paging",
            "config": crate::report::config_json(
                "bench demand-paging",
                serde_json::to_value(a).unwrap_or_default(),
                &crate::scenario::vm_config(common),
                !common.no_oracle,
            ),
            "vcpus": v,
            "bytes_per_vcpu": b,
            "pages": pages,
            "backing": a.backing.name(),
            "phases": phases.iter().map(|p| json!({
                "name": p.key,
                "pages": p.pages,
                "vmmu_ns": p.vmmu_ns,
                "vmmu_tdp_ns": p.tdp_ns,
                "kvm_ns": p.kvm_ns,
            })).collect::<Vec<_>>(),
            "baseline_first_touch_ns": baseline,
            "populate_vs_plain_first_touch": {
                "pairs": pairs.iter().map(|&(u, p)| json!({
                    "vmmu_ns": u,
                    "plain_ns": p,
                    "ratio": u as f64 / p.max(1) as f64,
                })).collect::<Vec<_>>(),
                "median_ratio": untouched as f64 / baseline.max(1) as f64,
            },
            "delete_populated_slot_ns": {
                "vmmu": delete,
                "vmmu_tdp": tdp.map(|t| t.3),
                "kvm": kvm.as_ref().map(|k| k.delete_populated_slot_ns),
            },
            "mmu_fault_throughput_scaling": if v > 1 { Some(scaling) } else { None },
            "kvm": {
                "requested": vs_kvm,
                "ran": kvm.is_some(),
                "note": kvm_note,
                "emulated_guest": kvm.as_ref().map(|k| k.emulated_guest),
            },
            "violations": violations,
        });
        println!("{out}");
        return Ok(if violations > 0 { 1 } else { 0 });
    }
    // Without --vs-kvm the table has no KVM columns at all.
    let with_kvm = |mut cols: Vec<String>, kvm_cols: [String; 2], tdp_cols: [String; 2]| {
        if vs_kvm {
            cols.splice(2..2, kvm_cols);
        }
        if shadow {
            cols.splice(2..2, tdp_cols);
        }
        cols
    };
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(with_kvm(
        vec![
            "phase".into(),
            if shadow {
                "vmmu shadow ns/page".into()
            } else {
                "vmmu ns/page".into()
            },
            "plain first-touch ns/page".into(),
            "vmmu / plain".into(),
        ],
        ["KVM ns/page".into(), "vmmu / KVM".into()],
        ["vmmu TDP ns/page".into(), "shadow / TDP".into()],
    ));
    for p in &phases {
        let vm = per_page(p.vmmu_ns, p.pages);
        let kv = p.kvm_ns.map(|k| per_page(k, p.pages));
        let base = per_page(baseline, pages);
        let plain = p.name.starts_with("first pass, host memory untouched");
        t.add_row(with_kvm(
            vec![
                p.name.to_string(),
                format!("{vm:.0}"),
                if plain {
                    format!("{base:.0}")
                } else {
                    "-".into()
                },
                if plain {
                    format!("{:.2}", vm / base)
                } else {
                    "-".into()
                },
            ],
            [
                kv.map_or("-".into(), |k| format!("{k:.0}")),
                kv.map_or("-".into(), |k| format!("{:.2}", vm / k)),
            ],
            {
                let td = p.tdp_ns.map(|t| per_page(t, p.pages));
                [
                    td.map_or("-".into(), |t| format!("{t:.0}")),
                    td.map_or("-".into(), |t| format!("{:.2}", vm / t)),
                ]
            },
        ));
    }
    let kd = kvm.as_ref().map(|k| k.delete_populated_slot_ns);
    t.add_row(with_kvm(
        vec![
            "delete the populated memslot (ms)".to_string(),
            format!("{:.2}", delete as f64 / 1e6),
            "-".into(),
            "-".into(),
        ],
        [
            kd.map_or("-".into(), |k| format!("{:.2}", k as f64 / 1e6)),
            kd.map_or("-".into(), |k| format!("{:.2}", delete as f64 / k as f64)),
        ],
        {
            let td = tdp.map(|t| t.3);
            [
                td.map_or("-".into(), |t| format!("{:.2}", t as f64 / 1e6)),
                td.map_or("-".into(), |t| format!("{:.2}", delete as f64 / t as f64)),
            ]
        },
    ));
    println!("{t}");
    if v > 1 {
        println!(
            "MMU-only fault throughput (host memory pre-touched): 1 vCPU {:.0} pages/s, {v} vCPUs {:.0} pages/s: {scaling:.2}x",
            (b / 4096) as f64 / (one_pretouched as f64 / 1e9),
            pages as f64 / (pretouched as f64 / 1e9)
        );
    }
    if vs_kvm {
        println!("{kvm_note}");
        if let Some(k) = &kvm {
            if k.emulated_guest {
                println!("KVM: the guest was emulated instruction by instruction; its figures are not comparable");
            }
        }
    }
    println!("oracle violations: {violations}");
    println!("{}", crate::report::host_line());
    Ok(if violations > 0 { 1 } else { 0 })
}

/// The resolved flags of `vmmu bench invalidation-storm`.
fn storm_common(a: &BenchStormArgs) -> Common {
    Common {
        vcpus: Some(a.vcpus),
        bytes: Some(a.bytes),
        iterations: Some(a.iterations),
        backing: Some(Backing::Anonymous),
        seed: a.seed,
        json: a.flags.json,
        no_oracle: !a.flags.oracle,
        quiet: true,
        conversions: a.conversions,
        ..Common::default()
    }
}

/// Check the flags of `vmmu bench invalidation-storm`.
pub fn validate_storm(a: &BenchStormArgs) -> anyhow::Result<()> {
    crate::scenario::invalidation_storm::validate(&storm_common(a)).map(|_| ())
}

/// `vmmu bench invalidation-storm`: the storm with and without the pre-check.
pub fn invalidation_storm(a: &BenchStormArgs) -> anyhow::Result<i32> {
    let mut c = storm_common(a);
    let common = &storm_common(a);
    c.no_precheck = false;
    let (with, code1) = crate::scenario::invalidation_storm::measure(&c, None)?;
    c.no_precheck = true;
    let (without, code2) = crate::scenario::invalidation_storm::measure(&c, None)?;
    if common.json {
        println!(
            "{}",
            json!({
                "mode": "bench",
                "scenario": "invalidation-storm",
                "config": crate::report::config_json(
                    "bench invalidation-storm",
                    serde_json::to_value(a).unwrap_or_default(),
                    &crate::scenario::vm_config(common),
                    !common.no_oracle,
                ),
                "with_precheck": with.json,
                "without_precheck": without.json,
                "violations": with.violations + without.violations,
            })
        );
        return Ok(code1.max(code2));
    }
    println!("{STORM_EXPLAIN}\n");
    if a.conversions {
        println!("{CONVERSION_STORM_EXPLAIN}\n");
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["", "pre-check on", "pre-check off"]);
    let row = |name: &str, a: String, b: String| vec![name.to_string(), a, b];
    t.add_row(row(
        "outside p99, no storm (ns)",
        with.baseline_outside_p99.to_string(),
        without.baseline_outside_p99.to_string(),
    ));
    t.add_row(row(
        "outside p99, storm (ns)",
        with.storm_outside_p99.to_string(),
        without.storm_outside_p99.to_string(),
    ));
    t.add_row(row(
        "outside p99 ratio storm / no storm",
        format!(
            "{:.2}",
            with.storm_outside_p99 as f64 / with.baseline_outside_p99.max(1) as f64
        ),
        format!(
            "{:.2}",
            without.storm_outside_p99 as f64 / without.baseline_outside_p99.max(1) as f64
        ),
    ));
    t.add_row(row(
        "retries by the pre-check",
        with.storm_precheck_retries.to_string(),
        without.storm_precheck_retries.to_string(),
    ));
    t.add_row(row(
        "retries decided under mmu_lock",
        with.storm_locked_retries.to_string(),
        without.storm_locked_retries.to_string(),
    ));
    t.add_row(row(
        "mmu_lock reads by retried inside faults",
        with.inside_retry_lock_reads.to_string(),
        without.inside_retry_lock_reads.to_string(),
    ));
    t.add_row(row(
        "zap yields",
        with.yields.to_string(),
        without.yields.to_string(),
    ));
    t.add_row(row(
        "remote TLB flushes per invalidation",
        format!("{:.2}", with.flushes_per_invalidation),
        format!("{:.2}", without.flushes_per_invalidation),
    ));
    if a.conversions {
        t.add_row(row(
            "conversions of 1 MiB (per second)",
            format!("{} ({:.0})", with.conversions, with.conversions_per_sec),
            format!(
                "{} ({:.0})",
                without.conversions, without.conversions_per_sec
            ),
        ));
    }
    t.add_row(row(
        "inside p99, no storm / storm (ns)",
        format!("{} / {}", with.baseline_inside_p99, with.storm_inside_p99),
        format!(
            "{} / {}",
            without.baseline_inside_p99, without.storm_inside_p99
        ),
    ));
    println!("{t}");
    println!("{}", crate::report::host_line());
    println!(
        "oracle violations: {} (pre-check on {}, off {}){}",
        with.violations + without.violations,
        with.violations,
        without.violations,
        if a.flags.oracle {
            ""
        } else {
            "; per-access checks were off (--oracle turns them on), data and leak checks ran"
        }
    );
    Ok(code1.max(code2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_populate_figure_is_the_pair_with_the_median_ratio() {
        // Ratios 2.0, 1.1, 1.5: the median pair is the third, whatever the
        // absolute times.
        let pairs = [(2000, 1000), (1100, 1000), (3000, 2000)];
        assert_eq!(median_pair(&pairs), (3000, 2000));
        assert_eq!(median_pair(&[(5, 4)]), (5, 4));
    }
}
