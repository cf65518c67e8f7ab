//! KVM binary statistics (`KVM_GET_STATS_FD`).
//!
//! The format is described in the kernel's `Documentation/virt/kvm/api.rst`, section
//! "KVM_GET_STATS_FD": a header at offset 0, an id string, a block of descriptors (each
//! a fixed 16-byte part followed by a `name_size`-byte NUL-padded name), and a data
//! block of `u64` values. A descriptor's `offset` is relative to the data block and its
//! `size` counts `u64` items. The layout is fixed for the life of the fd, so it is parsed
//! once and only the data block is re-read per snapshot.
//!
//! We read VM and vCPU stats rather than debugfs because the fds need no mounted
//! debugfs, are per VM (not host-wide), and are cheap to read before and after a phase.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    KVMIO, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_MASK,
    KVM_STATS_TYPE_PEAK,
};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

// `KVM_GET_STATS_FD` is `_IO(KVMIO, 0xce)` on both the VM and the vCPU fd; kvm-ioctls
// 0.25 does not wrap it.
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// Size of `struct kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of the fixed part of `struct kvm_stats_desc` (the name follows it).
const DESC_FIXED_SIZE: usize = 16;
/// Sanity limits so a corrupt header cannot make us allocate without bound.
const MAX_NAME_SIZE: u32 = 4096;
const MAX_DESCRIPTORS: u32 = 65536;
const MAX_DATA_BYTES: u64 = 16 << 20;

/// Why a statistics fd could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// `KVM_GET_STATS_FD` failed (kernel older than 5.14, or a backend without stats).
    #[error("KVM_GET_STATS_FD failed")]
    Open(#[source] io::Error),
    /// Reading from the fd (or synthetic buffer) failed or came up short.
    #[error("Reading {len} bytes at offset {offset} failed")]
    Read {
        /// Offset in the file.
        offset: u64,
        /// Bytes wanted.
        len: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The header's sizes are outside sane bounds.
    #[error("Implausible stats header: name_size {name_size}, num_desc {num_desc}")]
    BadHeader {
        /// Header `name_size`.
        name_size: u32,
        /// Header `num_desc`.
        num_desc: u32,
    },
    /// A descriptor points outside a sane data block.
    #[error("Stat {name:?} has offset {offset} and {size} items, beyond the data limit")]
    BadDescriptor {
        /// The stat's name.
        name: String,
        /// Descriptor `offset`.
        offset: u32,
        /// Descriptor `size`.
        size: u16,
    },
}

/// Something statistics can be read from at an offset: the real fd, or a byte buffer in
/// tests.
pub(crate) trait ReadAt {
    /// Fills `buf` from `offset`, failing if fewer bytes are available.
    fn read_exact_at_(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at_(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at_(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn read_at<R: ReadAt + ?Sized>(src: &R, offset: u64, len: usize) -> Result<Vec<u8>, StatsError> {
    let mut buf = vec![0u8; len];
    src.read_exact_at_(&mut buf, offset)
        .map_err(|source| StatsError::Read {
            offset,
            len,
            source,
        })?;
    Ok(buf)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(b)
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&buf[at..at + 2]);
    u16::from_ne_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// One statistic we keep: a scalar (size 1) counter, gauge or peak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatDesc {
    /// Name as KVM spells it (`pf_fixed`, `pages_4k`, ...).
    pub(crate) name: String,
    /// Byte offset of the value inside the data block.
    pub(crate) offset: u32,
}

/// The parsed, immutable part of a stats fd: where each scalar stat lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatsLayout {
    /// File offset of the data block.
    pub(crate) data_offset: u64,
    /// Bytes of the data block covering every kept stat.
    pub(crate) data_len: usize,
    /// Scalar stats; histograms are skipped since no figure here needs them.
    pub(crate) descs: Vec<StatDesc>,
}

/// Stat name to value, summed over every fd it was read from.
pub(crate) type Snapshot = BTreeMap<String, u64>;

impl StatsLayout {
    /// Parses the header and descriptors.
    pub(crate) fn parse<R: ReadAt + ?Sized>(src: &R) -> Result<Self, StatsError> {
        let header = read_at(src, 0, HEADER_SIZE)?;
        let name_size = u32_at(&header, 4);
        let num_desc = u32_at(&header, 8);
        let desc_offset = u32_at(&header, 16);
        let data_offset = u32_at(&header, 20);
        if name_size == 0 || name_size > MAX_NAME_SIZE || num_desc > MAX_DESCRIPTORS {
            return Err(StatsError::BadHeader {
                name_size,
                num_desc,
            });
        }
        // Both factors are bounded above, so this cannot overflow.
        let desc_size = DESC_FIXED_SIZE + name_size as usize;
        let block = read_at(src, u64::from(desc_offset), desc_size * num_desc as usize)?;

        let mut descs = Vec::with_capacity(num_desc as usize);
        let mut data_len = 0u64;
        for raw in block.chunks_exact(desc_size) {
            let flags = u32_at(raw, 0);
            let size = u16_at(raw, 6);
            let offset = u32_at(raw, 8);
            let name_bytes = &raw[DESC_FIXED_SIZE..];
            let name_len = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..name_len]).into_owned();

            let end = u64::from(offset) + 8 * u64::from(size);
            if end > MAX_DATA_BYTES {
                return Err(StatsError::BadDescriptor { name, offset, size });
            }
            let kind = flags & KVM_STATS_TYPE_MASK;
            let scalar = matches!(
                kind,
                KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_TYPE_INSTANT | KVM_STATS_TYPE_PEAK
            );
            if !scalar || size != 1 {
                continue;
            }
            data_len = data_len.max(end);
            descs.push(StatDesc { name, offset });
        }
        Ok(Self {
            data_offset: u64::from(data_offset),
            // Bounded by MAX_DATA_BYTES above.
            data_len: data_len as usize,
            descs,
        })
    }

    /// Reads the current values and adds them into `into` by name.
    pub(crate) fn accumulate<R: ReadAt + ?Sized>(
        &self,
        src: &R,
        into: &mut Snapshot,
    ) -> Result<(), StatsError> {
        let data = read_at(src, self.data_offset, self.data_len)?;
        for d in &self.descs {
            let v = u64_at(&data, d.offset as usize);
            let slot = into.entry(d.name.clone()).or_insert(0);
            *slot = slot.wrapping_add(v);
        }
        Ok(())
    }
}

/// An open statistics fd of a VM or a vCPU, with its parsed layout.
#[derive(Debug)]
pub(crate) struct StatsFd {
    file: File,
    layout: StatsLayout,
}

impl StatsFd {
    /// Opens the statistics fd of a VM or vCPU fd.
    pub(crate) fn open<F: AsRawFd>(owner: &F) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new fd (or -1);
        // `owner` is a live VM or vCPU fd for the duration of the call.
        let fd = unsafe { ioctl(owner, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(StatsError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by the kernel, is open, and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let layout = StatsLayout::parse(&file)?;
        Ok(Self { file, layout })
    }

    /// Adds this fd's current values into `into`.
    pub(crate) fn accumulate(&self, into: &mut Snapshot) -> Result<(), StatsError> {
        self.layout.accumulate(&self.file, into)
    }
}

/// `after - before` per stat, saturating at 0 (gauges such as `pages_4k` can shrink).
pub(crate) fn delta(before: &Snapshot, after: &Snapshot) -> Snapshot {
    after
        .iter()
        .map(|(k, &a)| {
            (
                k.clone(),
                a.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a stats "file" the way the kernel lays it out.
    fn synthetic(name_size: u32, stats: &[(&str, u32, u16, &[u64])]) -> Vec<u8> {
        let id = b"kvm-1234\0";
        let id_offset = HEADER_SIZE as u32;
        let desc_offset = id_offset + name_size;
        let desc_size = DESC_FIXED_SIZE as u32 + name_size;
        let data_offset = desc_offset + desc_size * stats.len() as u32;
        let mut buf = Vec::new();
        for v in [
            0,
            name_size,
            stats.len() as u32,
            id_offset,
            desc_offset,
            data_offset,
        ] {
            buf.extend_from_slice(&v.to_ne_bytes());
        }
        let mut idb = vec![0u8; name_size as usize];
        idb[..id.len()].copy_from_slice(id);
        buf.extend_from_slice(&idb);
        let mut data = Vec::new();
        for (name, flags, size, values) in stats {
            buf.extend_from_slice(&flags.to_ne_bytes());
            buf.extend_from_slice(&0i16.to_ne_bytes());
            buf.extend_from_slice(&size.to_ne_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            let mut nb = vec![0u8; name_size as usize];
            nb[..name.len()].copy_from_slice(name.as_bytes());
            buf.extend_from_slice(&nb);
            for v in *values {
                data.extend_from_slice(&v.to_ne_bytes());
            }
        }
        buf.extend_from_slice(&data);
        buf
    }

    #[test]
    fn test_parse_scalars_and_histogram_keeps_scalars_only() {
        // Arrange
        let buf = synthetic(
            48,
            &[
                ("pf_fixed", KVM_STATS_TYPE_CUMULATIVE, 1, &[42]),
                (
                    "halt_poll_hist",
                    kvm_bindings::KVM_STATS_TYPE_LOG_HIST,
                    3,
                    &[1, 2, 3],
                ),
                ("pages_4k", KVM_STATS_TYPE_INSTANT, 1, &[7]),
                ("max_mmu_rmap_size", KVM_STATS_TYPE_PEAK, 1, &[9]),
            ],
        );

        // Act
        let layout = StatsLayout::parse(buf.as_slice()).unwrap();
        let mut snap = Snapshot::new();
        layout.accumulate(buf.as_slice(), &mut snap).unwrap();

        // Assert
        let names: Vec<_> = layout.descs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["pf_fixed", "pages_4k", "max_mmu_rmap_size"]);
        assert_eq!(snap["pf_fixed"], 42);
        assert_eq!(snap["pages_4k"], 7);
        assert_eq!(snap["max_mmu_rmap_size"], 9);
        assert!(!snap.contains_key("halt_poll_hist"));
    }

    #[test]
    fn test_accumulate_two_sources_sums_by_name() {
        let a = synthetic(32, &[("exits", KVM_STATS_TYPE_CUMULATIVE, 1, &[10])]);
        let b = synthetic(64, &[("exits", KVM_STATS_TYPE_CUMULATIVE, 1, &[5])]);
        let mut snap = Snapshot::new();

        for buf in [&a, &b] {
            let layout = StatsLayout::parse(buf.as_slice()).unwrap();
            layout.accumulate(buf.as_slice(), &mut snap).unwrap();
        }

        assert_eq!(snap["exits"], 15);
    }

    #[test]
    fn test_parse_truncated_buffer_is_read_error() {
        let buf = synthetic(32, &[("exits", KVM_STATS_TYPE_CUMULATIVE, 1, &[10])]);

        let err = StatsLayout::parse(&buf[..buf.len() - 40]).unwrap_err();

        assert!(matches!(err, StatsError::Read { .. }), "{err:?}");
    }

    #[test]
    fn test_parse_truncated_data_is_read_error() {
        let buf = synthetic(32, &[("exits", KVM_STATS_TYPE_CUMULATIVE, 1, &[10])]);
        let layout = StatsLayout::parse(buf.as_slice()).unwrap();

        let err = layout
            .accumulate(&buf[..buf.len() - 4], &mut Snapshot::new())
            .unwrap_err();

        assert!(matches!(err, StatsError::Read { .. }), "{err:?}");
    }

    #[test]
    fn test_parse_zero_name_size_is_bad_header() {
        let mut buf = synthetic(32, &[("exits", KVM_STATS_TYPE_CUMULATIVE, 1, &[10])]);
        buf[4..8].copy_from_slice(&0u32.to_ne_bytes());

        let err = StatsLayout::parse(buf.as_slice()).unwrap_err();

        assert!(
            matches!(err, StatsError::BadHeader { name_size: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn test_parse_huge_offset_is_bad_descriptor() {
        let mut buf = synthetic(32, &[("exits", KVM_STATS_TYPE_CUMULATIVE, 1, &[10])]);
        let desc_offset = u32_at(&buf, 16) as usize;
        buf[desc_offset + 8..desc_offset + 12].copy_from_slice(&u32::MAX.to_ne_bytes());

        let err = StatsLayout::parse(buf.as_slice()).unwrap_err();

        assert!(matches!(err, StatsError::BadDescriptor { .. }), "{err:?}");
    }

    #[test]
    fn test_delta_shrinking_gauge_saturates_at_zero() {
        let before = Snapshot::from([("pages_4k".into(), 10), ("exits".into(), 3)]);
        let after = Snapshot::from([("pages_4k".into(), 4), ("exits".into(), 8)]);

        let d = delta(&before, &after);

        assert_eq!(d["pages_4k"], 0);
        assert_eq!(d["exits"], 5);
    }
}
