//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` (run for hours)
//! and by this crate's tests (a bounded run in CI, no cargo-fuzz needed).
//!
//! - [`api`]: the public API of `Vm` and `VcpuMmu`; refused calls must change
//!   nothing, mappings must agree with the host, nothing may leak.
//! - [`cli`]: the `vmmu` command's argument parser and validation: any argument
//!   vector gets either a start or one line naming what is wrong, never a panic.

pub mod api;
pub mod cli;
