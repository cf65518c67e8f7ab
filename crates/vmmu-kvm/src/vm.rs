//! One VM with its memslots, vCPUs and statistics fds, and the parallel run of a pass.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, kvm_userspace_memory_region2, CpuId};

/// `KVM_MEM_GUEST_MEMFD`.
const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::error::{KvmError, Result};
use crate::guest::{self, DONE_PORT, MEASURED_GPA, SMALL_SLOT_GPA, SMALL_SLOT_SIZE};
use crate::host_mem::{HostMemory, PAGE_SIZE};
use crate::stats::{Snapshot, StatsFd};

const SMALL_SLOT: u32 = 0;
/// `KVM_CAP_DIRTY_LOG_RING`.
pub(crate) const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
pub(crate) const MEASURED_SLOT: u32 = 1;

fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Wall time of a parallel pass: from the earliest thread's release to the latest
/// thread's completion.
pub(crate) fn span_ns(times: &[(Instant, Instant)]) -> u64 {
    let start = times.iter().map(|t| t.0).min();
    let end = times.iter().map(|t| t.1).max();
    match (start, end) {
        (Some(s), Some(e)) => {
            u64::try_from(e.saturating_duration_since(s).as_nanos()).unwrap_or(u64::MAX)
        }
        _ => 0,
    }
}

/// What backs the measured slot.
pub(crate) enum Measured {
    /// Anonymous host memory.
    Anon(HostMemory),
    /// A guest_memfd of `bytes` with `flags`, created by the VM and mapped shared.
    Gmem { bytes: u64, flags: u64 },
}

/// A VM running the demand-paging guest, one vCPU per chunk of the measured slot.
///
/// Field order is drop order: vCPUs, stats fds and the VM fd are closed before the host
/// memory behind the memslots is unmapped.
#[derive(Debug)]
pub(crate) struct GuestVm {
    vcpus: Vec<VcpuFd>,
    vcpu_stats: Vec<StatsFd>,
    vm_stats: StatsFd,
    vm: VmFd,
    bytes_per_vcpu: u64,
    _small: HostMemory,
    measured: HostMemory,
    /// The guest_memfd behind the measured slot, when it is one (its shared
    /// mapping is `measured`).
    gmem: Option<std::os::fd::OwnedFd>,
}

impl GuestVm {
    /// Creates the VM, both memslots and `vcpus` vCPUs ready at the loop's entry.
    pub(crate) fn new(
        kvm: &Kvm,
        cpuid: &CpuId,
        code: &[u8],
        vcpus: usize,
        bytes_per_vcpu: u64,
        measured: HostMemory,
    ) -> Result<Self> {
        Self::build(
            kvm,
            cpuid,
            code,
            vcpus,
            bytes_per_vcpu,
            Measured::Anon(measured),
            0,
        )
    }

    /// As [`GuestVm::new`] with one vCPU, the measured slot (`bytes`) bound to a
    /// guest_memfd with `flags` that the new VM creates (guest_memfd belongs to
    /// its VM), through `KVM_SET_USER_MEMORY_REGION2` with `GUEST_MEMFD` at file
    /// offset 0; the host's view of the slot is its shared `mmap` of the file.
    pub(crate) fn new_with_own_gmem(
        kvm: &Kvm,
        cpuid: &CpuId,
        code: &[u8],
        bytes: u64,
        flags: u64,
    ) -> Result<Self> {
        Self::build(
            kvm,
            cpuid,
            code,
            1,
            bytes,
            Measured::Gmem { bytes, flags },
            0,
        )
    }

    fn build(
        kvm: &Kvm,
        cpuid: &CpuId,
        code: &[u8],
        vcpus: usize,
        bytes_per_vcpu: u64,
        measured: Measured,
        ring_bytes: u32,
    ) -> Result<Self> {
        let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        if ring_bytes > 0 {
            // Before any vCPU exists, as KVM requires.
            let cap = kvm_bindings::kvm_enable_cap {
                cap: KVM_CAP_DIRTY_LOG_RING,
                args: [u64::from(ring_bytes), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(ioctl_err("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)"))?;
        }
        let (measured, gmem) = match measured {
            Measured::Anon(m) => (m, None),
            Measured::Gmem { bytes, flags } => {
                use std::os::fd::FromRawFd;
                if vm.check_extension_raw(crate::gmem::KVM_CAP_GUEST_MEMFD) <= 0 {
                    return Err(KvmError::Unsupported {
                        what: "guest_memfd",
                        cap: "KVM_CAP_GUEST_MEMFD",
                    });
                }
                let fd = vm
                    .create_guest_memfd(kvm_bindings::kvm_create_guest_memfd {
                        size: bytes,
                        flags,
                        ..Default::default()
                    })
                    .map_err(ioctl_err("KVM_CREATE_GUEST_MEMFD"))?;
                // SAFETY: KVM just returned this descriptor; nothing else owns it.
                let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
                use std::os::fd::AsRawFd;
                (HostMemory::map_shared(fd.as_raw_fd(), bytes)?, Some(fd))
            }
        };
        let vm_stats = StatsFd::open(&vm).map_err(|source| KvmError::Stats {
            what: "VM".into(),
            source,
        })?;

        let small = HostMemory::new(SMALL_SLOT_SIZE, false)?;
        small.write_bytes(&guest::small_slot_image(measured.len(), code));
        let regions = [
            (SMALL_SLOT, SMALL_SLOT_GPA, &small),
            (MEASURED_SLOT, MEASURED_GPA, &measured),
        ];
        for (slot, gpa, mem) in regions {
            if let (MEASURED_SLOT, Some(fd)) = (slot, &gmem) {
                use std::os::fd::AsRawFd;
                let region = kvm_userspace_memory_region2 {
                    slot,
                    flags: KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: gpa,
                    memory_size: mem.len(),
                    userspace_addr: mem.host_addr(),
                    guest_memfd_offset: 0,
                    guest_memfd: fd.as_raw_fd() as u32,
                    ..Default::default()
                };
                // SAFETY: as below; the file outlives the slot too (it is a field).
                unsafe { vm.set_user_memory_region2(region) }
                    .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION2"))?;
                continue;
            }
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: mem.len(),
                userspace_addr: mem.host_addr(),
            };
            // SAFETY: the region describes a live mapping owned by this `GuestVm`, which
            // outlives the VM fd (field order), so KVM never sees a dangling range.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let mut fds = Vec::with_capacity(vcpus);
        let mut vcpu_stats = Vec::with_capacity(vcpus);
        for i in 0..vcpus {
            let vcpu = vm
                .create_vcpu(i as u64)
                .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(cpuid)
                .map_err(ioctl_err("KVM_SET_CPUID2"))?;
            let mut sregs = vcpu.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
            guest::setup_sregs(&mut sregs);
            vcpu.set_sregs(&sregs).map_err(ioctl_err("KVM_SET_SREGS"))?;
            let start = MEASURED_GPA + i as u64 * bytes_per_vcpu;
            vcpu.set_regs(&guest::regs_for_chunk(start, start + bytes_per_vcpu))
                .map_err(ioctl_err("KVM_SET_REGS"))?;
            let stats = StatsFd::open(&vcpu).map_err(|source| KvmError::Stats {
                what: format!("vCPU {i}"),
                source,
            })?;
            fds.push(vcpu);
            vcpu_stats.push(stats);
        }
        Ok(Self {
            vcpus: fds,
            vcpu_stats,
            vm_stats,
            vm,
            bytes_per_vcpu,
            _small: small,
            measured,
            gmem,
        })
    }

    /// VM statistics plus every vCPU's, summed by name.
    pub(crate) fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = Snapshot::new();
        self.vm_stats
            .accumulate(&mut snap)
            .map_err(|source| KvmError::Stats {
                what: "VM".into(),
                source,
            })?;
        for (i, s) in self.vcpu_stats.iter().enumerate() {
            s.accumulate(&mut snap).map_err(|source| KvmError::Stats {
                what: format!("vCPU {i}"),
                source,
            })?;
        }
        Ok(snap)
    }

    /// Runs pass number `pass` (1-based) on all vCPUs at once and returns its wall time.
    ///
    /// Every vCPU thread waits on one barrier, so all are released together; each
    /// records its own release and completion instants and the pass spans the earliest
    /// release to the latest completion.
    pub(crate) fn run_pass(&mut self, pass: u8) -> Result<u64> {
        let barrier = Barrier::new(self.vcpus.len());
        let results: Vec<Result<(Instant, Instant)>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .vcpus
                .iter_mut()
                .enumerate()
                .map(|(i, vcpu)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        let start = Instant::now();
                        run_until_done(vcpu, i, pass)?;
                        Ok((start, Instant::now()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join()
                        .unwrap_or(Err(KvmError::ThreadPanicked { index: i }))
                })
                .collect()
        });
        let times = results.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(span_ns(&times))
    }

    /// Checks that every page of the measured slot holds `gpa + pass`.
    pub(crate) fn verify(&self, pass: u8) -> Result<()> {
        let total = self.bytes_per_vcpu * self.vcpus.len() as u64;
        let mut offset = 0;
        while offset < total {
            let gpa = MEASURED_GPA + offset;
            let expected = gpa + u64::from(pass);
            let found = self.measured.read_u64(offset).unwrap_or(0);
            if found != expected {
                return Err(KvmError::MarkerMismatch {
                    gpa,
                    expected,
                    found,
                });
            }
            offset += PAGE_SIZE;
        }
        Ok(())
    }

    /// Punches `[offset, offset + len)` out of the measured slot's guest_memfd
    /// (`Ok(false)` when the slot is plain memory); the errno on failure.
    pub(crate) fn punch_measured(&self, offset: u64, len: u64) -> std::result::Result<bool, i32> {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.gmem else {
            return Ok(false);
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: a plain system call on a descriptor we own.
        let r = unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(true)
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    }

    /// Make vCPU `index` visit `[start, end)` (guest physical) from its next
    /// pass on.
    pub(crate) fn set_chunk(&mut self, index: usize, start: u64, end: u64) -> Result<()> {
        let vcpu = self
            .vcpus
            .get(index)
            .ok_or_else(|| KvmError::BadConfig(format!("no vCPU {index}")))?;
        let mut regs = vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        regs.rdi = start;
        regs.rsi = end;
        vcpu.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Host address of the measured memory's first byte.
    pub(crate) fn measured_host_addr(&self) -> u64 {
        self.measured.host_addr()
    }

    /// Drop `[offset, offset + len)` of the measured memory (`MADV_DONTNEED`).
    pub(crate) fn dontneed_measured(&self, offset: u64, len: u64) -> Result<()> {
        self.measured.dontneed(offset, len)
    }

    /// Set (create, move, delete with size 0) slot `slot` at `gpa` over
    /// `size` bytes of the measured memory from `offset`; returns how long
    /// the call took.
    pub(crate) fn set_measured_part(
        &self,
        slot: u32,
        gpa: u64,
        offset: u64,
        size: u64,
    ) -> Result<Duration> {
        if offset
            .checked_add(size)
            .is_none_or(|e| e > self.measured.len())
        {
            return Err(KvmError::BadConfig(format!(
                "slot {slot}: {size:#x} bytes at offset {offset:#x} of {:#x} bytes",
                self.measured.len()
            )));
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.measured.host_addr() + offset,
        };
        let start = Instant::now();
        // SAFETY: the range lies inside the measured mapping, which outlives the
        // VM fd (field order).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(start.elapsed())
    }

    /// Run vCPU 0's passes over its chunk in a thread until `host` returns,
    /// `host` running beside it with the VM fd. MMIO exits (a write into a
    /// slot moved away) are counted and re-entered; returns the passes
    /// completed, the MMIO exits, and the first MMIO exit outside `allowed`.
    pub(crate) fn passes_while<R>(
        &mut self,
        allowed: (u64, u64),
        host: impl FnOnce(&VmFd) -> R,
    ) -> Result<(R, u64, u64, Option<u64>)> {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (vcpus, vm) = (&mut self.vcpus, &self.vm);
        let vcpu = vcpus
            .get_mut(0)
            .ok_or_else(|| KvmError::BadConfig("no vCPU".into()))?;
        std::thread::scope(|s| {
            let stop = &stop;
            let guest = s.spawn(move || -> Result<(u64, u64, Option<u64>)> {
                let (mut passes, mut mmio, mut outside) = (0u64, 0u64, None);
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    match vcpu.run() {
                        Ok(VcpuExit::IoOut(port, _)) if port == DONE_PORT => passes += 1,
                        Ok(VcpuExit::MmioWrite(addr, _)) | Ok(VcpuExit::MmioRead(addr, _)) => {
                            mmio += 1;
                            if (addr < allowed.0 || addr >= allowed.1) && outside.is_none() {
                                outside = Some(addr);
                            }
                        }
                        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                        Ok(VcpuExit::Intr) => {}
                        Ok(exit) => {
                            return Err(KvmError::UnexpectedExit {
                                vcpu: 0,
                                exit: format!("{exit:?}"),
                                rip: 0,
                            })
                        }
                        Err(e) => {
                            return Err(KvmError::UnexpectedExit {
                                vcpu: 0,
                                exit: format!("KVM_RUN failed: {e}"),
                                rip: 0,
                            })
                        }
                    }
                }
                Ok((passes, mmio, outside))
            });
            let r = host(vm);
            stop.store(true, std::sync::atomic::Ordering::Release);
            let (passes, mmio, outside) = guest
                .join()
                .unwrap_or(Err(KvmError::ThreadPanicked { index: 0 }))?;
            Ok((r, passes, mmio, outside))
        })
    }

    /// Make the guest visit every `stride`-th byte (a multiple of 4 KiB) from
    /// the next pass on.
    pub(crate) fn set_stride(&mut self, stride: u64) -> Result<()> {
        for vcpu in &self.vcpus {
            let mut regs = vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
            regs.r8 = stride;
            vcpu.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Turn dirty logging of the measured slot on or off
    /// (`KVM_SET_USER_MEMORY_REGION` with `KVM_MEM_LOG_DIRTY_PAGES`); returns
    /// how long the call took.
    pub(crate) fn set_measured_logging(&mut self, on: bool) -> Result<Duration> {
        let region = kvm_userspace_memory_region {
            slot: MEASURED_SLOT,
            flags: if on { 1 } else { 0 },
            guest_phys_addr: MEASURED_GPA,
            memory_size: self.measured.len(),
            userspace_addr: self.measured.host_addr(),
        };
        let start = Instant::now();
        // SAFETY: the same live mapping the slot already describes (only the
        // flags change); it outlives the VM fd (field order).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION (log dirty pages)"))?;
        Ok(start.elapsed())
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` with
    /// `MANUAL_PROTECT_ENABLE`: gets only copy, clears protect.
    pub(crate) fn enable_manual_protect(&self) -> Result<()> {
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        self.vm
            .enable_cap(&cap)
            .map_err(ioctl_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))
    }

    /// `KVM_CLEAR_DIRTY_LOG` of the whole measured slot with `bitmap`, and how
    /// long it took.
    pub(crate) fn clear_measured_dirty_log(&self, bitmap: &[u64]) -> Result<Duration> {
        use std::os::fd::AsRawFd;
        let pages = self.measured.len() / PAGE_SIZE;
        if (bitmap.len() as u64) < pages.div_ceil(64) {
            return Err(KvmError::BadChunkSize {
                bytes: bitmap.len() as u64 * 64 * PAGE_SIZE,
                granule: PAGE_SIZE,
            });
        }
        let mut arg = kvm_bindings::kvm_clear_dirty_log {
            slot: MEASURED_SLOT,
            num_pages: pages as u32,
            first_page: 0,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
        // _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)
        const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xC018_AEC0;
        let start = Instant::now();
        // SAFETY: a KVM ioctl on our VM fd with a correctly laid out argument
        // whose bitmap pointer covers every page of the slot (checked above)
        // and lives across the call.
        let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &arg) };
        let took = start.elapsed();
        if r != 0 {
            return Err(KvmError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(took)
    }

    /// `KVM_GET_DIRTY_LOG` of the measured slot, and how long it took.
    pub(crate) fn get_measured_dirty_log(&self) -> Result<(Vec<u64>, Duration)> {
        let start = Instant::now();
        let log = self
            .vm
            .get_dirty_log(MEASURED_SLOT, self.measured.len() as usize)
            .map_err(ioctl_err("KVM_GET_DIRTY_LOG"))?;
        Ok((log, start.elapsed()))
    }

    /// The value at `offset` of the measured slot, read through the host's mapping.
    pub(crate) fn read_measured(&self, offset: u64) -> Option<u64> {
        self.measured.read_u64(offset)
    }

    /// Write `value` at `offset` of the measured slot through the host's mapping.
    pub(crate) fn write_measured(&self, offset: u64, value: u64) {
        self.measured.write_u64(offset, value);
    }

    /// As [`GuestVm::new`] with one vCPU whose dirty ring is `ring_bytes`
    /// long (enabled on the VM before the vCPU is created).
    pub(crate) fn new_with_ring(
        kvm: &Kvm,
        cpuid: &CpuId,
        code: &[u8],
        measured: HostMemory,
        ring_bytes: u32,
    ) -> Result<Self> {
        let bytes = measured.len();
        Self::build(
            kvm,
            cpuid,
            code,
            1,
            bytes,
            Measured::Anon(measured),
            ring_bytes,
        )
    }

    /// vCPU 0's fd (to map its dirty ring).
    pub(crate) fn vcpu0(&self) -> Option<&VcpuFd> {
        self.vcpus.first()
    }

    /// The VM fd.
    pub(crate) fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Makes the measured memslot read-only (deleted and created again with
    /// `KVM_MEM_READONLY`: the flag cannot be toggled in place).
    pub(crate) fn set_measured_readonly(&mut self) -> Result<()> {
        self.delete_measured_slot()?;
        let region = kvm_userspace_memory_region {
            slot: MEASURED_SLOT,
            flags: 1 << 1,
            guest_phys_addr: MEASURED_GPA,
            memory_size: self.measured.len(),
            userspace_addr: self.measured.host_addr(),
        };
        // SAFETY: the same live mapping as before; it outlives the VM fd
        // (field order).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION (read-only)"))?;
        Ok(())
    }

    /// Enters vCPU 0 once and says how it exited: an MMIO access (address,
    /// length, write), the completion `out` (with `rax`), or something else.
    pub(crate) fn run_once(&mut self) -> Result<GuestExit> {
        let vcpu = self
            .vcpus
            .first_mut()
            .ok_or(KvmError::ThreadPanicked { index: 0 })?;
        let exit = match vcpu.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => GuestExit::Mmio {
                addr,
                len: data.len(),
                write: false,
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => GuestExit::Mmio {
                addr,
                len: data.len(),
                write: true,
            },
            Ok(VcpuExit::IoOut(port, _)) if port == DONE_PORT => {
                let regs = vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
                GuestExit::Done { rax: regs.rax }
            }
            Ok(other) => GuestExit::Other(format!("{other:?}")),
            Err(e) => GuestExit::Other(format!("KVM_RUN failed: {e}")),
        };
        Ok(exit)
    }

    /// Deletes the (populated) measured memslot and returns how long the ioctl took.
    pub(crate) fn delete_measured_slot(&mut self) -> Result<Duration> {
        let region = kvm_userspace_memory_region {
            slot: MEASURED_SLOT,
            flags: 0,
            guest_phys_addr: MEASURED_GPA,
            memory_size: 0,
            userspace_addr: self.measured.host_addr(),
        };
        let start = Instant::now();
        // SAFETY: deleting a slot (size 0) makes KVM drop its references to the range;
        // the memory itself stays mapped until `self` is dropped.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        let took = start.elapsed();
        Ok(took)
    }
}

/// How a single entry of the guest ended ([`GuestVm::run_once`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GuestExit {
    /// `KVM_EXIT_MMIO`.
    Mmio { addr: u64, len: usize, write: bool },
    /// The completion `out`; `rax` as the guest left it.
    Done { rax: u64 },
    /// Anything else, described.
    Other(String),
}

/// Enters the vCPU until the guest reports the end of `pass` on [`DONE_PORT`].
fn run_until_done(vcpu: &mut VcpuFd, index: usize, pass: u8) -> Result<()> {
    loop {
        let unexpected = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == DONE_PORT => {
                let found = data.first().copied().unwrap_or(0);
                if found != pass {
                    return Err(KvmError::WrongPass {
                        vcpu: index,
                        expected: pass,
                        found,
                    });
                }
                return Ok(());
            }
            // A host signal interrupted KVM_RUN; the guest state is intact, re-enter.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Ok(VcpuExit::Intr) => continue,
            Ok(exit) => format!("{exit:?}"),
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        let regs = vcpu.get_regs().ok();
        let rip = regs.map(|r| r.rip).unwrap_or(0);
        let mut exit = unexpected;
        if let (Some(r), Ok(sr)) = (regs, vcpu.get_sregs()) {
            exit.push_str(&format!(
                " (rflags {:#x}, cs {:#x} dpl {}, cr0 {:#x}, cr4 {:#x}, efer {:#x})",
                r.rflags, sr.cs.selector, sr.cs.dpl, sr.cr0, sr.cr4, sr.efer
            ));
        }
        return Err(KvmError::UnexpectedExit {
            vcpu: index,
            exit,
            rip,
        });
    }
}
