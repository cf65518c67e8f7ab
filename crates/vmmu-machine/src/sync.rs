//! Atomics used by the machine model (always std: the model is not loom-checked;
//! its protocol partner, the MMU core, is).
pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
