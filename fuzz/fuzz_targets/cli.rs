//! The vmmu command's argument parser under arbitrary argument vectors.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmmu_fuzz::cli::run_bytes(data) {
        panic!("{e}");
    }
});
