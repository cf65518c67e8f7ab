//! The Linux errno values KVM's ioctls return, so every typed error of this crate
//! can say which one KVM would have answered (`-errno` from the ioctl).
//!
//! The values are the x86-64 Linux ones; the core does not depend on libc.

/// No such file or directory.
pub const ENOENT: i32 = 2;
/// Interrupted system call.
pub const EINTR: i32 = 4;
/// Argument list too long (KVM: a range beyond what a call accepts).
/// No such device or address (a dirty bitmap asked for on a VM with rings).
pub const ENXIO: i32 = 6;
pub const E2BIG: i32 = 7;
/// Bad file descriptor.
pub const EBADF: i32 = 9;
/// Try again.
pub const EAGAIN: i32 = 11;
/// Out of memory.
pub const ENOMEM: i32 = 12;
/// Bad address.
pub const EFAULT: i32 = 14;
/// Device or resource busy.
pub const EBUSY: i32 = 16;
/// File exists.
pub const EEXIST: i32 = 17;
/// No such device (a guest_memfd mapped without MMAP).
pub const ENODEV: i32 = 19;
/// Invalid argument.
pub const EINVAL: i32 = 22;
/// Inappropriate ioctl (an unknown or unsupported ioctl).
pub const ENOTTY: i32 = 25;
/// File too large.
pub const EFBIG: i32 = 27;
/// No space left.
pub const ENOSPC: i32 = 28;
/// Operation not supported.
pub const EOPNOTSUPP: i32 = 95;
/// Memory page has hardware error.
pub const EHWPOISON: i32 = 133;
