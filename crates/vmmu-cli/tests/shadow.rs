//! Guest paging and the shadow MMU as a user runs them: the access cases,
//! process churn, unsync pages and the page limit, roots, guest tables.

mod common;
use common::{json_run, refusal};

/// `access`: a sample of the guest-paging cases agrees with the reference
/// walk (faults, error codes, A/D bits) and the oracle; a stride of 0 is
/// refused in one line.
#[test]
fn test_access_cases_agree_with_the_reference() {
    let v = json_run(&["run", "access", "--stride", "499"]);
    let cases = v["cases"].as_u64().unwrap();
    assert!(cases > 4000, "{v}");
    assert_eq!(v["case_failures"], 0, "{v}");
    let faulted = v["cases_faulted"].as_u64().unwrap();
    assert!(faulted > 0 && faulted < cases, "{v}");
    assert!(
        v["oracle_checked_accesses"].as_u64().unwrap() > cases,
        "{v}"
    );
    let e = refusal(&["run", "access", "--stride", "0"]);
    assert!(e.contains("--stride 0") && e.contains("1..="), "{e}");
}

/// `--mmu shadow`: the `access` sample agrees with the reference when the
/// shadow MMU's walker decides the faults, its stores to shadowed tables are
/// emulated, and the JSON says which MMU ran; what shadow paging cannot run
/// is refused in one line.
#[test]
fn test_shadow_mmu_runs_the_access_cases_and_refuses_what_it_cannot() {
    let v = json_run(&["run", "access", "--stride", "499", "--mmu", "shadow"]);
    assert_eq!(v["config"]["mmu"]["kind"], "shadow", "{v}");
    assert_eq!(v["case_failures"], 0, "{v}");
    assert!(v["cases"].as_u64().unwrap() > 4000, "{v}");
    assert!(v["emulated_writes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["shadow_pf_exits"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["violations"], 0, "{v}");
    let e = refusal(&["run", "access", "--mmu", "nested"]);
    assert!(e.contains("tdp, shadow"), "{e}");
    let e = refusal(&["run", "dirty-log", "--mmu", "shadow", "--tracking", "pml"]);
    assert!(e.contains("write-protect"), "{e}");
    let e = refusal(&[
        "soak",
        "--mmu",
        "shadow",
        "--vm-type",
        "snp",
        "--duration",
        "1",
    ]);
    assert!(e.contains("--vm-type default"), "{e}");
}

/// `shadow-process-churn`: the same guests with the free-obsolete-roots fix
/// and without it; the fix drops only zapped roots and loads fewer; both
/// sides keep every guest check and the oracle clean; `--mmu tdp` is refused.
#[test]
fn test_shadow_process_churn_shows_what_freeing_only_obsolete_roots_saves() {
    let v = json_run(&["run", "shadow-process-churn", "-i", "5000"]);
    assert_eq!(v["config"]["mmu"]["kind"], "shadow", "{v}");
    let (fixed, legacy) = (&v["fixed"], &v["legacy"]);
    for side in [fixed, legacy] {
        assert_eq!(side["mismatches"], 0, "{v}");
        assert_eq!(side["violations"], 0, "{v}");
        assert!(side["prev_root_hits"].as_u64().unwrap() > 0, "{v}");
    }
    assert!(fixed["obsolete_roots_dropped"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(fixed["root_slots_dropped_legacy"], 0, "{v}");
    assert!(
        legacy["root_slots_dropped_legacy"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert!(
        fixed["root_loads"].as_u64().unwrap() < legacy["root_loads"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(v["legacy_leaked_pages"], 0, "{v}");
    assert_eq!(v["leaked_table_pages"], 0, "{v}");
    let e = refusal(&["run", "shadow-process-churn", "--mmu", "tdp"]);
    assert!(e.contains("shadow MMU"), "{e}");
}

/// Unsync pages take most stores to the kernel's page tables off the exit
/// path: with `--no-unsync` the same guests have more of them emulated; the
/// config says which ran; the page limit and unsync flags are refused
/// without a shadow MMU or below KVM's minimum.
#[test]
fn test_shadow_unsync_and_page_limit_flags() {
    let on = json_run(&[
        "run",
        "shadow-process-churn",
        "-i",
        "3000",
        "--nr-mmu-pages",
        "64",
    ]);
    let off = json_run(&["run", "shadow-process-churn", "-i", "3000", "--no-unsync"]);
    assert_eq!(on["config"]["mmu"]["shadow_unsync"], true, "{on}");
    assert_eq!(off["config"]["mmu"]["shadow_unsync"], false, "{off}");
    let (a, b) = (&on["fixed"], &off["fixed"]);
    assert!(a["shadow_unsynced"].as_u64().unwrap() > 0, "{on}");
    assert!(a["shadow_recycled"].as_u64().unwrap() > 0, "{on}");
    assert_eq!(b["shadow_unsynced"], 0, "{off}");
    assert!(
        a["shadow_pte_writes"].as_u64().unwrap() < b["shadow_pte_writes"].as_u64().unwrap(),
        "{on} {off}"
    );
    for v in [&on, &off] {
        assert_eq!(v["fixed"]["violations"], 0, "{v}");
        assert_eq!(v["fixed"]["mismatches"], 0, "{v}");
    }
    let e = refusal(&["run", "demand-paging", "--no-unsync"]);
    assert!(e.contains("--mmu shadow"), "{e}");
    let e = refusal(&[
        "run",
        "demand-paging",
        "--mmu",
        "shadow",
        "--nr-mmu-pages",
        "63",
    ]);
    assert!(e.contains("at least 64"), "{e}");
}

/// `roots --mmu shadow`: processes zap their own roots while the host zaps
/// every root; once every vCPU has handled its requests no zapped root is
/// held, valid cached roots survived single-root zaps, guests and oracle
/// clean.
#[test]
fn test_roots_on_the_shadow_mmu_frees_only_obsolete_roots() {
    let v = json_run(&["run", "roots", "--mmu", "shadow", "-i", "4", "-b", "4M"]);
    assert_eq!(v["config"]["mmu"]["kind"], "shadow", "{v}");
    assert!(v["zaps_all_roots"].as_u64().unwrap() > 0, "{v}");
    assert!(v["processes_exited"].as_u64().unwrap() > 0, "{v}");
    assert!(v["prev_roots_kept"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["invalid_roots_left"], 0, "{v}");
    assert_eq!(v["guest_mismatches"], 0, "{v}");
}

/// `--guest-paging` (shadow only): the vCPUs start over a direct map, so
/// the shadow MMU shadows guest tables (indirect pages) where it shadows
/// none without it; refused in one line under the TDP MMU.
#[test]
fn test_guest_paging_makes_the_shadow_mmu_shadow_guest_tables() {
    let on = json_run(&[
        "run",
        "demand-paging",
        "-v",
        "2",
        "-b",
        "4M",
        "--mmu",
        "shadow",
        "--guest-paging",
    ]);
    assert_eq!(on["shadow"]["guest_paging"], true, "{on}");
    assert!(
        on["shadow"]["indirect_pages"].as_u64().unwrap() >= 2,
        "{on}"
    );
    let off = json_run(&[
        "run",
        "demand-paging",
        "-v",
        "2",
        "-b",
        "4M",
        "--mmu",
        "shadow",
    ]);
    assert_eq!(off["shadow"]["indirect_pages"], 0, "{off}");
    let e = refusal(&["run", "demand-paging", "--guest-paging"]);
    assert!(e.contains("--mmu shadow"), "{e}");
    let e = refusal(&["bench", "demand-paging", "--guest-paging"]);
    assert!(e.contains("--mmu shadow"), "{e}");
}

/// `shadow-process-churn --vs-kvm`: the real KVM's side ran (both phases,
/// with the shadow MMU's counters and the emulation count), or the report
/// says why not; without the flag there is no KVM side.
#[test]
fn test_shadow_process_churn_vs_kvm_runs_both_phases_or_says_why_not() {
    let v = json_run(&[
        "run",
        "shadow-process-churn",
        "-i",
        "500",
        "-b",
        "2M",
        "--vs-kvm",
    ]);
    let k = &v["kvm"];
    if let Some(phases) = k["phases"].as_array() {
        let names: Vec<_> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["switches", "churn"], "{k}");
        for p in phases {
            assert!(
                p["kvm_stats"]["insn_emulation"].as_u64().unwrap() > 0,
                "{p}"
            );
            let flushes = &p["counters"]["tlb_flush_local"];
            assert!(flushes["kvm"].as_u64().unwrap() >= 4000, "{p}");
            assert!(flushes["vmmu"].as_u64().unwrap() >= 4000, "{p}");
            // Six address spaces round robin through a cache of four: vmmu
            // loads a root at nearly every switch.
            assert!(p["vmmu_root_loads"].as_u64().unwrap() >= 4000, "{p}");
        }
        let created = &phases[0]["counters"]["shadow_pages_created"];
        assert!(created["kvm"].as_u64().unwrap() > 0, "{k}");
        assert!(created["vmmu"].as_u64().unwrap() > 0, "{k}");
        assert_eq!(phases[1]["respawns"], 1000, "{k}");
        // Each respawn writes its root four times with no fault through it
        // in between: both MMUs zap that root for write flooding.
        for c in ["shadow_flooded", "shadow_pages_zapped"] {
            let n = &phases[1]["counters"][c];
            assert!(n["vmmu"].as_u64().unwrap() >= 1000, "{c}: {k}");
            assert!(n["kvm"].as_u64().unwrap() >= 1000, "{c}: {k}");
        }
        assert_eq!(k["vmmu_violations"], 0, "{k}");
    } else {
        assert_eq!(k["ran"], false, "{k}");
        assert!(k["note"].as_str().unwrap().contains("kvm"), "{k}");
    }
    let v = json_run(&["run", "shadow-process-churn", "-i", "500", "-b", "2M"]);
    assert!(v.get("kvm").is_none(), "{v}");
}
