//! Instruction counts of one 4 KiB write fault, shared against private, for
//! callgrind (a count is stable where a time is not, on a loaded machine):
//!
//! ```text
//! cargo bench -p vmmu --bench fault_cost --no-run
//! valgrind --tool=callgrind --callgrind-out-file=cg.out \
//!     target/release/deps/fault_cost-<hash> --batches 8
//! callgrind_annotate --inclusive=yes cg.out | grep -E 'shared_batch|private_batch'
//! ```
//!
//! Each `*_batch` call faults 4096 pages into existing tables (the same timed
//! step as the `mmu` bench's `fault_4k_resident` and `fault_4k_private`); the
//! zap between batches is outside them. Divide a batch function's inclusive
//! count by `4096 × batches`. Run without valgrind it prints a self-check.

use std::sync::atomic::{AtomicU64, Ordering};

use vmmu::{ErrorCode, Level, PAGE_SIZE};

mod common;
use common::Guest;

const BATCH: u64 = 4096;

// Each counts its calls in its own static, so the two bodies differ and the
// compiler cannot fold them into one function.
static SHARED_CALLS: AtomicU64 = AtomicU64::new(0);
static PRIVATE_CALLS: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
fn shared_batch(g: &mut Guest) -> u64 {
    SHARED_CALLS.fetch_add(1, Ordering::Relaxed);
    g.fault_pages(PAGE_SIZE, BATCH, ErrorCode::WRITE)
}

#[inline(never)]
fn private_batch(g: &mut Guest) -> u64 {
    PRIVATE_CALLS.fetch_add(1, Ordering::Relaxed);
    g.fault_pages(PAGE_SIZE, BATCH, ErrorCode::WRITE)
}

fn run(g: &mut Guest, batches: u64, f: fn(&mut Guest) -> u64) {
    // Build the tables once, so the counted faults only install leaves.
    assert_eq!(f(g), BATCH);
    g.zap_slot();
    for _ in 0..batches {
        assert_eq!(f(g), BATCH, "every fault installs a leaf");
        assert_eq!(g.vm.stats().present(Level::K4), BATCH);
        g.zap_slot();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut batches = 8;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batches" => {
                batches = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("fault_cost: --batches takes a positive number");
                        std::process::exit(2)
                    })
            }
            // `cargo bench` passes `--bench`; nothing else is accepted.
            "--bench" => {}
            other => {
                eprintln!("fault_cost: unknown argument {other} (valid: --batches N)");
                std::process::exit(2)
            }
        }
    }
    let mut shared = Guest::new(Level::K4, BATCH * PAGE_SIZE, 1024);
    run(&mut shared, batches, shared_batch);
    assert_eq!(shared.vm.stats().private_faults, 0);
    let (mut private, file) = Guest::new_private(BATCH * PAGE_SIZE, 1024);
    run(&mut private, batches, private_batch);
    let st = private.vm.stats();
    assert_eq!(
        st.private_faults, st.faults_fixed,
        "every fault was private"
    );
    drop(private);
    drop(file);
    assert_eq!(SHARED_CALLS.load(Ordering::Relaxed), batches + 1);
    assert_eq!(PRIVATE_CALLS.load(Ordering::Relaxed), batches + 1);
    println!(
        "fault_cost: {batches} batches of {BATCH} shared and {BATCH} private 4 KiB faults done"
    );
}
