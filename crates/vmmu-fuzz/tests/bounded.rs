//! A bounded run of each fuzz harness on pseudo-random inputs (the long runs
//! use cargo-fuzz; see the README). Fails on the first input that breaks a
//! property or panics, printing the seed to replay it with.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vmmu_fuzz::{api, cli};

fn bounded(name: &str, runs: u64, max_len: usize, f: impl Fn(&[u8]) -> Result<(), String>) {
    let base: u64 = std::env::var("VMMU_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for i in 0..runs {
        let seed = base.wrapping_add(i);
        let mut g = SmallRng::seed_from_u64(seed);
        let len = (g.next_u64() as usize) % max_len;
        let mut data = vec![0u8; len];
        g.fill_bytes(&mut data);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data)));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{name}: seed {seed} ({len} bytes): {e}"),
            Err(_) => panic!("{name}: seed {seed} ({len} bytes) panicked"),
        }
    }
}

#[test]
fn test_api_fuzz_bounded_run_keeps_every_property() {
    let runs = if cfg!(debug_assertions) { 3000 } else { 30000 };
    let cov = std::sync::Mutex::new(api::Coverage::default());
    bounded("api", runs, 2048, |d| {
        api::run_bytes_counted(d, &mut cov.lock().unwrap_or_else(|e| e.into_inner()))
    });
    let cov = cov.into_inner().unwrap_or_else(|e| e.into_inner());
    eprintln!("api fuzz coverage over {runs} inputs: {cov:?}");
    // Not vacuous: the inputs made VMs, mapped pages (some huge), were refused
    // and checked leaves against the host.
    assert!(cov.vms > runs / 4, "{cov:?}");
    assert!(cov.faults_fixed > runs / 10, "{cov:?}");
    assert!(cov.huge_leaves > 0, "{cov:?}");
    assert!(cov.pre_faulted_bytes > 0, "{cov:?}");
    assert!(cov.refused > runs / 4, "{cov:?}");
    assert!(cov.leaves_checked > runs / 2, "{cov:?}");
    assert!(cov.gmem_leaves_checked > 0, "no guest_memfd leaf: {cov:?}");
    assert!(cov.pml_entries > 0, "no PML log drained: {cov:?}");
    assert!(
        cov.shadow_vms > 0 && cov.shadow_faults > 0,
        "no shadow-MMU fault: {cov:?}"
    );
}

#[test]
fn test_cli_fuzz_bounded_run_never_panics_and_refuses_in_one_line() {
    let runs = if cfg!(debug_assertions) { 3000 } else { 30000 };
    bounded("cli", runs, 256, cli::run_bytes);
}
