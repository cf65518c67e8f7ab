//! `vmmu diff`: the same memslot calls and capability queries on vmmu's VM
//! and on this machine's `/dev/kvm`, answer by answer.
//!
//! Every case is a short sequence of `KVM_SET_USER_MEMORY_REGION(2)` calls;
//! each call's answer (0 or an errno) is compared, so a case also checks
//! that what an earlier call did (or refused) left the right state behind.
//! On vmmu every refused call must also leave the memslot set exactly as it
//! was. `--record FILE` writes the real KVM's answers, so a machine without
//! `/dev/kvm` (CI) compares vmmu against them (`--answers FILE`, or the
//! recording committed with the source when `/dev/kvm` cannot be opened).

use std::path::PathBuf;

use serde_json::{json, Value};
use vmmu::{UserMemoryRegion, Vm, VmConfig};

use crate::args::BadInput;
use crate::diff_cases::{cases, Hva, Op, CAPS};
use vmmu_kvm::memslot_api::{GuestCase, GUEST_CASE_GPA, READONLY_WORD};

/// The recording committed with the source (made with `vmmu diff --record`).
const RECORDED: &str = include_str!("../data/kvm-diff-answers.json");

/// vmmu's host buffer (any page-aligned user address: the test host maps
/// nothing, it only has to be a valid address).
const VMMU_BUFFER: u64 = 0x7f00_0000_0000;

/// Dirty logging cases: the bench's pattern (every page mapped, logging on,
/// a pass writing every `stride`-th page, then `KVM_GET_DIRTY_LOG`) over
/// 16 MiB and one vCPU; vmmu also with PML. Name, stride, PML.
const DIRTY_LOG_CASES: &[(&str, u64, bool)] = &[
    ("dirty-log-bitmap-every-page", 1, false),
    ("dirty-log-bitmap-every-3rd-page", 3, false),
    ("dirty-log-bitmap-every-3rd-page-pml", 3, true),
    ("dirty-log-bitmap-every-7th-page", 7, false),
];
const DIRTY_LOG_BYTES: u64 = 16 << 20;

/// The clear-log case: strides of the two passes (see
/// `vmmu_kvm::dirty_log::kvm_clear_log_bitmap`).
const CLEAR_LOG_CASE: (&str, u64, u64) = ("dirty-log-clear-half-then-rewrite", 3, 5);

/// vmmu's side of the clear-log case, on the machine model.
fn vmmu_clear_log(first: u64, second: u64) -> anyhow::Result<(String, u64)> {
    let pages = DIRTY_LOG_BYTES / 4096;
    let (mut m, r) = log_machine(0)?;
    write_pass(&mut m, 1, 1);
    m.vm.enable_manual_dirty_log_protect(vmmu::dirty_log::MANUAL_PROTECT_ENABLE)?;
    log_on(&m, r)?;
    let log = m.vm.get_dirty_log(1)?;
    m.vm.clear_dirty_log(1, 0, pages, &log)?;
    write_pass(&mut m, first, 2);
    let mut log = m.vm.get_dirty_log(1)?;
    let half = log.len() / 2;
    for w in &mut log[half..] {
        *w = 0;
    }
    m.vm.clear_dirty_log(1, 0, pages, &log)?;
    write_pass(&mut m, second, 3);
    let last = m.vm.get_dirty_log(1)?;
    let violations = m.oracle.total();
    let _ = m.teardown();
    Ok((bitmap_answer(&last), violations))
}

/// The ring case: stride of the logged pass, ring entries.
const RING_CASE: (&str, u64, u32) = ("dirty-log-ring-every-3rd-page", 3, 4096);

/// vmmu's side of the ring case, on the machine model.
fn vmmu_ring(stride: u64, entries: u32) -> anyhow::Result<(String, u64)> {
    let (mut m, r) = log_machine(entries)?;
    write_pass(&mut m, 1, 1);
    log_on(&m, r)?;
    write_pass(&mut m, stride, 2);
    let mut fetch = vec![0u32; 1];
    let (bitmap, _, _) =
        crate::scenario::harvest_rings(&m.vm, &mut fetch, 1, DIRTY_LOG_BYTES / 4096);
    let violations = m.oracle.total();
    let _ = m.teardown();
    Ok((bitmap_answer(&bitmap), violations))
}

/// The machine the dirty-log cases run on: one vCPU, the logged region at
/// `LOG_GPA` (slot 1, not yet logging), a dirty ring of `ring` entries (0:
/// bitmaps).
fn log_machine(ring: u32) -> anyhow::Result<(vmmu_machine::Machine, UserMemoryRegion)> {
    let m = vmmu_machine::Machine::new(
        vmmu_machine::MachineConfig {
            memory_bytes: 1 << 30,
            vm: VmConfig::default(),
            oracle: true,
            poison: true,
            dirty_ring: ring,
        },
        1,
    )?;
    m.map(
        vmmu::Hva(LOG_HVA),
        DIRTY_LOG_BYTES,
        vmmu_machine::Backing::Anonymous,
    )?;
    let r = UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: LOG_GPA,
        memory_size: DIRTY_LOG_BYTES,
        userspace_addr: LOG_HVA,
    };
    m.set_memslot(r)?;
    Ok((m, r))
}

const LOG_GPA: u64 = 1 << 30;
const LOG_HVA: u64 = 0x300_0000_0000;

/// The vCPU writes `v` into every `stride`-th page of the logged region, as
/// the KVM side's loop guest does.
fn write_pass(m: &mut vmmu_machine::Machine, stride: u64, v: u64) {
    use vmmu_machine::guest::{AccessKind, GuestAccess, Script};
    let s = Script::new(
        (0..DIRTY_LOG_BYTES / 4096)
            .step_by(stride as usize)
            .map(|p| GuestAccess::shared(vmmu::Gpa(LOG_GPA + p * 4096), AccessKind::Write(v)))
            .collect(),
    );
    m.run(vec![s], &vmmu_machine::RunOptions::default(), |_| {});
}

/// Logging on for the region.
fn log_on(m: &vmmu_machine::Machine, r: UserMemoryRegion) -> anyhow::Result<()> {
    m.set_memslot(UserMemoryRegion {
        flags: vmmu::MemFlags::LOG_DIRTY_PAGES.bits(),
        ..r
    })?;
    Ok(())
}

/// A bitmap as an answer: how many pages, and a hash of the words (FNV-1a),
/// so a recording stays short and any difference shows.
fn bitmap_answer(words: &[u64]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let n: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    format!("{n} pages dirty, fnv {h:016x}")
}

fn vmmu_dirty_log(stride: u64, pml: bool) -> anyhow::Result<(String, u64)> {
    let a = crate::cli::BenchDirtyLogArgs {
        bytes: DIRTY_LOG_BYTES,
        vcpus: 1,
        stride,
        vs_kvm: false,
        tracking: crate::cli::TrackingFlags {
            tracking: if pml {
                vmmu::DirtyTracking::Pml
            } else {
                vmmu::DirtyTracking::WriteProtect
            },
            no_eager_split: false,
        },
        flags: crate::cli::BenchFlags {
            oracle: true,
            json: false,
        },
    };
    let (bitmap, violations) = crate::bench::dirty_log::pattern_bitmap(&a)?;
    Ok((bitmap_answer(&bitmap), violations))
}

/// `KVM_CAP_PRE_FAULT_MEMORY`: recorded for the KVM side only (vmmu has
/// `Vm::pre_fault_memory`; its cases are compared where the host has it).
const PRE_FAULT_CAP: &str = "KVM_CAP_PRE_FAULT_MEMORY";

/// Guest-visible cases: one access by the guest after the host deleted the
/// slot or made it read-only.
const GUEST_CASES: &[(&str, GuestCase)] = &[
    ("guest-read-after-slot-delete", GuestCase::ReadAfterDelete),
    ("guest-write-to-readonly-slot", GuestCase::WriteToReadOnly),
    ("guest-read-of-readonly-slot", GuestCase::ReadOfReadOnly),
];

/// vmmu's side of a guest case, on the machine model: the exit (the
/// machine's MMIO exit is the access's own address and size) or the value
/// read; and the oracle's violations.
fn vmmu_guest_case(k: &KvmAnswers, case: GuestCase) -> anyhow::Result<(String, u64)> {
    use vmmu_machine::guest::{AccessKind, AccessResult, GuestAccess, Script};
    const HVA: u64 = 0x300_0000_0000;
    const SIZE: u64 = 2 << 20;
    let mut m = vmmu_machine::Machine::new(
        vmmu_machine::MachineConfig {
            memory_bytes: 1 << 30,
            vm: vmmu_config(k),
            oracle: true,
            poison: true,
            dirty_ring: 0,
        },
        1,
    )?;
    m.map(vmmu::Hva(HVA), SIZE, vmmu_machine::Backing::Anonymous)?;
    let r = UserMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: GUEST_CASE_GPA,
        memory_size: SIZE,
        userspace_addr: HVA,
    };
    m.set_memslot(r)?;
    let gone = UserMemoryRegion {
        memory_size: 0,
        ..r
    };
    let readonly = UserMemoryRegion {
        flags: vmmu::MemFlags::READONLY.bits(),
        ..r
    };
    let kind = match case {
        GuestCase::ReadAfterDelete => {
            m.set_memslot(gone)?;
            AccessKind::Read
        }
        GuestCase::WriteToReadOnly => {
            m.set_memslot(gone)?;
            m.set_memslot(readonly)?;
            AccessKind::Write(GUEST_CASE_GPA)
        }
        GuestCase::ReadOfReadOnly => {
            m.host
                .write_u64(vmmu::Hva(HVA), READONLY_WORD)
                .map_err(|e| anyhow::anyhow!("host write: {e:?}"))?;
            m.set_memslot(gone)?;
            m.set_memslot(readonly)?;
            AccessKind::Read
        }
    };
    let access = GuestAccess::shared(vmmu::Gpa(GUEST_CASE_GPA), kind);
    let out = m.run(
        vec![Script::new(vec![access])],
        &vmmu_machine::RunOptions::default(),
        |_| {},
    );
    let result = out
        .first()
        .and_then(|(s, _)| s.results.first().map(|(_, r)| *r));
    let answer = match result {
        Some(AccessResult::Mmio) => format!(
            "mmio {} {GUEST_CASE_GPA:#x} len 8",
            if matches!(kind, AccessKind::Write(_)) {
                "write"
            } else {
                "read"
            }
        ),
        Some(AccessResult::Memory(v)) if matches!(kind, AccessKind::Read) => format!("read {v:#x}"),
        other => format!("{other:?}"),
    };
    let violations = m.oracle.total();
    let _ = m.teardown();
    Ok((answer, violations))
}

/// An answer: "ok" or the errno's name.
fn answer(r: Result<(), i32>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(e),
    }
}

fn errno_name(e: i32) -> String {
    match e {
        libc::EINVAL => "EINVAL".into(),
        libc::EEXIST => "EEXIST".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::EBADF => "EBADF".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENOTTY => "ENOTTY".into(),
        libc::E2BIG => "E2BIG".into(),
        n => format!("errno {n}"),
    }
}

/// The host's physical address width (`address sizes` in /proc/cpuinfo),
/// which bounds guest physical addresses on both sides.
fn host_maxphyaddr() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("address sizes"))?;
    let bits = line.split(':').nth(1)?.split_whitespace().next()?;
    bits.parse().ok()
}

fn region(op: &Op, buffer: u64) -> UserMemoryRegion {
    UserMemoryRegion {
        slot: op.slot,
        flags: op.flags,
        guest_phys_addr: op.gpa,
        memory_size: op.size,
        userspace_addr: match op.hva {
            Hva::Buf(off) => buffer + off,
            Hva::Raw(a) => a,
        },
    }
}

/// The VM vmmu answers with: the KVM side's physical width, MMU kind and
/// number of address spaces, so that like is compared with like.
fn vmmu_config(k: &KvmAnswers) -> VmConfig {
    VmConfig {
        maxphyaddr: k.maxphyaddr,
        mmu: if k.shadow {
            vmmu::MmuKind::Shadow
        } else {
            vmmu::MmuKind::Tdp
        },
        address_spaces: k.address_spaces,
        ..VmConfig::default()
    }
}

type Answers = Vec<(String, Vec<String>, Option<String>)>;

/// vmmu's answers, and the first refused call that changed the memslots.
fn run_vmmu(k: &KvmAnswers) -> anyhow::Result<(Answers, Vec<(String, u64)>)> {
    let mut out = Vec::new();
    for c in cases(k.maxphyaddr) {
        let host = vmmu::testing::TestHost::new();
        let vm = Vm::new(vmmu_config(k), host.ops())?;
        let mut answers = Vec::new();
        let mut changed = None;
        for op in &c.ops {
            let snapshot = |vm: &Vm| -> Vec<String> {
                (0..2)
                    .filter_map(|a| vm.memslots(a))
                    .flat_map(|set| {
                        set.iter()
                            .map(|s| {
                                format!(
                                    "{:?}",
                                    (
                                        s.slot_number(),
                                        s.base_gfn(),
                                        s.npages(),
                                        s.userspace_addr(),
                                        s.flags()
                                    )
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let before = snapshot(&vm);
            let r = region(op, VMMU_BUFFER);
            let res = if op.v2 {
                vm.set_user_memory_region2(r, None, 0)
            } else {
                vm.set_user_memory_region(r)
            };
            let refused = res.is_err();
            answers.push(answer(res.map_err(|e| e.errno())));
            if refused && changed.is_none() && snapshot(&vm) != before {
                changed = Some(format!(
                    "call {} was refused but changed the memslots",
                    answers.len()
                ));
            }
        }
        out.push((c.name.to_string(), answers, changed));
    }
    for (name, answer) in crate::scenario::guest_memfd::vmmu_answers()? {
        out.push((format!("guest_memfd {name}"), vec![answer], None));
    }
    for (name, case) in GUEST_CASES {
        let (answer, violations) = vmmu_guest_case(k, *case)?;
        let bad = (violations > 0).then(|| format!("{violations} oracle violations"));
        out.push((name.to_string(), vec![answer], bad));
    }
    {
        let (name, stride, entries) = RING_CASE;
        let (answer, violations) = vmmu_ring(stride, entries)?;
        let bad = (violations > 0).then(|| format!("{violations} oracle violations"));
        out.push((name.to_string(), vec![answer], bad));
    }
    {
        let (name, first, second) = CLEAR_LOG_CASE;
        let (answer, violations) = vmmu_clear_log(first, second)?;
        let bad = (violations > 0).then(|| format!("{violations} oracle violations"));
        out.push((name.to_string(), vec![answer], bad));
    }
    for (name, stride, pml) in DIRTY_LOG_CASES {
        let (answer, violations) = vmmu_dirty_log(*stride, *pml)?;
        let bad = (violations > 0).then(|| format!("{violations} oracle violations"));
        out.push((name.to_string(), vec![answer], bad));
    }
    let host = vmmu::testing::TestHost::new();
    let vm = Vm::new(vmmu_config(k), host.ops())?;
    let caps = CAPS
        .iter()
        .map(|(name, cap, _)| (name.to_string(), vm.check_extension(*cap)))
        .collect();
    Ok((out, caps))
}

/// The real KVM's answers (case name → answers; cap name → value).
#[derive(Debug, Clone)]
struct KvmAnswers {
    source: String,
    maxphyaddr: u32,
    /// KVM runs its shadow MMU (no EPT/NPT).
    shadow: bool,
    /// Memslot address spaces (`KVM_CAP_MULTI_ADDRESS_SPACE`, 0 meaning 1).
    address_spaces: u16,
    cases: Vec<(String, Vec<String>)>,
    caps: Vec<(String, i64)>,
}

fn run_kvm() -> Result<KvmAnswers, String> {
    let maxphyaddr = host_maxphyaddr().ok_or("the host's physical address width is unknown")?;
    let mut out = Vec::new();
    let api = vmmu_kvm::memslot_api::MemslotApi::new().map_err(|e| e.to_string())?;
    drop(api);
    for c in cases(maxphyaddr) {
        // A fresh VM per case, as on vmmu.
        let api = vmmu_kvm::memslot_api::MemslotApi::new().map_err(|e| e.to_string())?;
        let answers = c
            .ops
            .iter()
            .map(|op| {
                let r = region(op, api.buffer());
                answer(api.set(
                    op.v2,
                    r.slot,
                    r.flags,
                    r.guest_phys_addr,
                    r.memory_size,
                    r.userspace_addr,
                ))
            })
            .collect();
        out.push((c.name.to_string(), answers));
    }
    for (name, answer) in crate::scenario::guest_memfd::kvm_answers()? {
        out.push((format!("guest_memfd {name}"), vec![answer]));
    }
    for (name, case) in GUEST_CASES {
        let answer = vmmu_kvm::memslot_api::guest_case(*case).map_err(|e| e.to_string())?;
        out.push((name.to_string(), vec![answer]));
    }
    // The same write pattern through a real guest; PML or not is the host's
    // business, so the PML case compares with the same bitmap.
    let mut by_stride: Vec<(u64, String)> = Vec::new();
    for (name, stride, _) in DIRTY_LOG_CASES {
        let answer = match by_stride.iter().find(|(s, _)| s == stride) {
            Some((_, a)) => a.clone(),
            None => {
                let r = vmmu_kvm::dirty_log::kvm_dirty_log(DIRTY_LOG_BYTES, stride * 4096, 1)
                    .map_err(|e| e.to_string())?;
                let a = bitmap_answer(&r.pattern_bitmap);
                by_stride.push((*stride, a.clone()));
                a
            }
        };
        out.push((name.to_string(), vec![answer]));
    }
    {
        let (name, first, second) = CLEAR_LOG_CASE;
        let b = vmmu_kvm::dirty_log::kvm_clear_log_bitmap(DIRTY_LOG_BYTES, first, second)
            .map_err(|e| e.to_string())?;
        out.push((name.to_string(), vec![bitmap_answer(&b)]));
    }
    {
        // A host without the ring answers why: "not comparable here".
        let (name, stride, entries) = RING_CASE;
        let answer = match vmmu_kvm::dirty_log::kvm_ring_bitmap(DIRTY_LOG_BYTES, stride, entries) {
            Ok(b) => bitmap_answer(&b),
            Err(e) => format!("unavailable: {e}"),
        };
        out.push((name.to_string(), vec![answer]));
    }
    let api = vmmu_kvm::memslot_api::MemslotApi::new().map_err(|e| e.to_string())?;
    let mut caps: Vec<(String, i64)> = CAPS
        .iter()
        .map(|(name, _, num)| (name.to_string(), i64::from(api.check_extension(*num))))
        .collect();
    caps.push((PRE_FAULT_CAP.into(), i64::from(api.check_extension(236))));
    let info = vmmu_kvm::kvm_available()
        .map(|i| i.description)
        .unwrap_or_default();
    let spaces = api.check_extension(118).max(1) as u16;
    Ok(KvmAnswers {
        source: format!("/dev/kvm here ({info})"),
        maxphyaddr,
        shadow: info.contains("shadow MMU"),
        address_spaces: spaces,
        cases: out,
        caps,
    })
}

fn answers_json(k: &KvmAnswers) -> Value {
    json!({
        "source": k.source,
        "maxphyaddr": k.maxphyaddr,
        "shadow_mmu": k.shadow,
        "address_spaces": k.address_spaces,
        "host": crate::report::host_json(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cases": k.cases.iter().map(|(n, a)| (n.clone(), json!(a))).collect::<serde_json::Map<_, _>>(),
        "caps": k.caps.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

fn parse_answers(text: &str, origin: &str) -> anyhow::Result<KvmAnswers> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        BadInput(format!(
            "{origin}: not a recording of `vmmu diff --record` ({e})"
        ))
    })?;
    let bad = || BadInput(format!("{origin}: not a recording of `vmmu diff --record`"));
    let cases = v["cases"]
        .as_object()
        .ok_or_else(bad)?
        .iter()
        .map(|(n, a)| {
            let list = a
                .as_array()
                .map(|x| {
                    x.iter()
                        .map(|s| s.as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default();
            (n.clone(), list)
        })
        .collect();
    let caps = v["caps"]
        .as_object()
        .ok_or_else(bad)?
        .iter()
        .map(|(n, x)| (n.clone(), x.as_i64().unwrap_or(-1)))
        .collect();
    Ok(KvmAnswers {
        source: format!(
            "recorded: {} (kernel {})",
            v["source"].as_str().unwrap_or("?"),
            v["kernel"].as_str().unwrap_or("?")
        ),
        maxphyaddr: v["maxphyaddr"].as_u64().ok_or_else(bad)? as u32,
        shadow: v["shadow_mmu"].as_bool().ok_or_else(bad)?,
        address_spaces: v["address_spaces"].as_u64().ok_or_else(bad)? as u16,
        cases,
        caps,
    })
}

/// One line of the parity table.
struct Row {
    case: String,
    vmmu: String,
    kvm: String,
    verdict: String,
    mismatch: bool,
}

/// Run it.
pub(crate) fn run(a: &crate::cli::DiffArgs) -> anyhow::Result<i32> {
    let kvm = match (&a.answers, &a.record) {
        (Some(_), Some(_)) => anyhow::bail!(BadInput(
            "--answers with --record: record from /dev/kvm, or compare against a recording, not both".into()
        )),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                BadInput(format!("--answers {}: cannot read it: {e}", path.display()))
            })?;
            parse_answers(&text, &path.display().to_string())?
        }
        (None, record) => match run_kvm() {
            Ok(k) => {
                if let Some(path) = record {
                    write_recording(path, &k)?;
                }
                k
            }
            Err(e) if record.is_some() => {
                anyhow::bail!("--record needs /dev/kvm: {e}")
            }
            Err(e) => {
                let mut k = parse_answers(RECORDED, "the committed recording")?;
                k.source = format!("{} — /dev/kvm not usable here: {e}", k.source);
                k
            }
        },
    };
    let (vmmu_cases, vmmu_caps) = run_vmmu(&kvm)?;
    let mut rows = Vec::new();
    for (name, answers, changed) in &vmmu_cases {
        let theirs = kvm.cases.iter().find(|(n, _)| n == name).map(|(_, a)| a);
        let (kvm_text, verdict, mismatch) = match theirs {
            None => (
                "—".to_string(),
                "not comparable here: the KVM side has no answer for this case (record again)"
                    .to_string(),
                false,
            ),
            Some(t) if changed.is_some() => (
                t.join(", "),
                format!("vmmu FAILS: {}", changed.as_deref().unwrap_or("")),
                true,
            ),
            Some(t) if t.iter().any(|a| a.starts_with("unavailable: ")) => (
                t.join(", "),
                format!(
                    "not comparable here: {}",
                    t.join(", ").trim_start_matches("unavailable: ")
                ),
                false,
            ),
            Some(t) if t == answers => (t.join(", "), "parity".into(), false),
            Some(t) => match crate::diff_cases::deviation(name) {
                Some(why) => (
                    t.join(", "),
                    format!("deviation (documented): {why}"),
                    false,
                ),
                None => (t.join(", "), "MISMATCH".into(), true),
            },
        };
        rows.push(Row {
            case: name.clone(),
            vmmu: answers.join(", "),
            kvm: kvm_text,
            verdict,
            mismatch,
        });
    }
    for (name, value) in &vmmu_caps {
        let theirs = kvm.caps.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        let (kvm_text, verdict, mismatch) = match theirs {
            None => (
                "—".into(),
                "not comparable here: not recorded".into(),
                false,
            ),
            Some(v) if v == *value as i64 => (v.to_string(), "parity".into(), false),
            Some(v) => match crate::diff_cases::deviation(name) {
                Some(why) => (
                    v.to_string(),
                    format!("deviation (documented): {why}"),
                    false,
                ),
                None => (v.to_string(), "MISMATCH".into(), true),
            },
        };
        rows.push(Row {
            case: format!("cap {name}"),
            vmmu: value.to_string(),
            kvm: kvm_text,
            verdict,
            mismatch,
        });
    }
    if let Some((_, v)) = kvm.caps.iter().find(|(n, _)| n == PRE_FAULT_CAP) {
        rows.push(Row {
            case: "KVM_PRE_FAULT_MEMORY".into(),
            vmmu: "supported (vmmu run prefault)".into(),
            kvm: v.to_string(),
            verdict: if *v == 0 {
                "not comparable here: this host's KVM does not offer KVM_PRE_FAULT_MEMORY".into()
            } else {
                "not comparable yet: the pre-fault cases are not in the corpus".into()
            },
            mismatch: false,
        });
    }
    let mismatches = rows.iter().filter(|r| r.mismatch).count();
    let parity = rows.iter().filter(|r| r.verdict == "parity").count();
    if a.json {
        println!(
            "{}",
            json!({
                "mode": "diff",
                "kvm": kvm.source,
                "maxphyaddr": kvm.maxphyaddr,
                "cases": rows.iter().map(|r| json!({
                    "case": r.case, "vmmu": r.vmmu, "kvm": r.kvm, "verdict": r.verdict,
                })).collect::<Vec<_>>(),
                "parity": parity,
                "mismatches": mismatches,
            })
        );
    } else {
        use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
        println!(
            "KVM side: {}. Both sides: host physical width {} bits, {} MMU, {} address space(s).\n",
            kvm.source,
            kvm.maxphyaddr,
            if kvm.shadow { "shadow" } else { "TDP" },
            kvm.address_spaces
        );
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec!["case", "vmmu", "KVM", "verdict"]);
        for r in &rows {
            t.add_row(vec![
                r.case.clone(),
                r.vmmu.clone(),
                r.kvm.clone(),
                r.verdict.clone(),
            ]);
        }
        println!("{t}");
        println!(
            "{parity} of {} at parity, {mismatches} mismatches",
            rows.len()
        );
    }
    Ok(if mismatches == 0 { 0 } else { 1 })
}

fn write_recording(path: &PathBuf, k: &KvmAnswers) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&answers_json(k))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| anyhow::anyhow!("--record {}: cannot write it: {e}", path.display()))
}
