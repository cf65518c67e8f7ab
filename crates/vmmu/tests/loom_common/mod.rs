//! What every loom model file shares: the model runners (bounded,
//! counting the schedules they explore) and the `protocol!` pair of tests.
#![allow(dead_code)]

use std::sync::Arc;

pub const GPA: u64 = 1 << 30;
pub const HVA: u64 = 64 << 30;

/// Explore every interleaving with at most `LOOM_MAX_PREEMPTIONS` (default
/// `bound`) preemptions.
pub fn model_bounded(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(
        std::env::var("LOOM_MAX_PREEMPTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(bound),
    );
    b.max_branches = 100_000;
    // Count the schedules explored: a model whose threads never interleave
    // (one schedule) checks nothing, so that is a failure of the model.
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    b.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f()
    });
    let n = runs.load(std::sync::atomic::Ordering::Relaxed);
    if std::env::var_os("VMMU_LOOM_SCHEDULES").is_some() {
        eprintln!("schedules explored: {n}");
    }
    assert!(
        n > 1,
        "the model explored {n} schedule: its threads never interleave"
    );
}

pub fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(2, f);
}

/// Run `f` under the model and return the message of the first violation found
/// (an assertion of the model, not a failure of the checker itself).
pub fn model_finds_violation(f: impl Fn() + Sync + Send + 'static) -> String {
    model_finds_violation_bounded(2, f)
}

pub fn model_finds_violation_bounded(bound: usize, f: impl Fn() + Sync + Send + 'static) -> String {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model_bounded(bound, f)));
    std::panic::set_hook(prev);
    let err = r.expect_err("the model found no violation with the guard removed");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// One protocol, checked twice: as built, every explored interleaving must keep
/// the invariant; with its guarding step removed, the model must find a violation
/// (one of the messages given), or the check proves nothing.
#[macro_export]
macro_rules! protocol {
    ($holds:ident, $fails:ident, $scenario:ident, $knob:ident, $($msg:literal),+) => {
        #[test]
        fn $holds() {
            $crate::loom_common::model(|| $scenario(GuardKnobs::default()));
        }

        #[test]
        fn $fails() {
            let knobs = GuardKnobs { $knob: true, ..GuardKnobs::default() };
            let msg = $crate::loom_common::model_finds_violation(move || $scenario(knobs));
            assert!([$($msg),+].iter().any(|m| msg.contains(m)), "{msg}");
        }
    };
}

/// A VM with `config` over a test host mapping `host_level` pages, one
/// 2 MiB slot (id 0) at `GPA`, and a vCPU ready to fault.
pub fn vm_with_vcpu(
    config: vmmu::VmConfig,
    host_level: vmmu::Level,
) -> (Arc<vmmu::testing::TestHost>, vmmu::Vm, vmmu::VcpuMmu) {
    let host = vmmu::testing::TestHost::new();
    host.set_host_level(host_level);
    let vm = vmmu::Vm::new(config, host.ops()).unwrap();
    vm.set_user_memory_region(vmmu::UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: GPA,
        memory_size: 2 << 20,
        userspace_addr: HVA,
    })
    .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.prepare_entry().unwrap();
    (host, vm, vcpu)
}
