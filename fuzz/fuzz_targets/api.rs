//! The vmmu API under arbitrary calls (see `vmmu_fuzz::api` for the properties).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmmu_fuzz::api::run_bytes(data) {
        panic!("{e}");
    }
});
