//! memslot_perf_test's loops on the real KVM, for `vmmu run memslot-perf
//! --vs-kvm`: the loop guest over 512 MiB at GPA 1 GiB (the guest maps it
//! with 2 MiB pages, so the area is a multiple of 2 MiB: the selftest's extra
//! 64 KiB sync area is left out), split over the slots as vmmu splits its
//! own, and the same loops:
//! - `map`: the host drops one 16 MiB half, the guest writes every page of
//!   the other, then they swap;
//! - `unmap`, `unmap-chunked`: over 128 MiB faulted in once, the guest writes
//!   one page of a half, the host drops the other half 4 KiB or 2 MiB at a
//!   time;
//! - `move-active`, `move-inactive`: the last slot moves to 4 GiB and back
//!   while the guest keeps writing 64 KiB straddling its start (its MMIO
//!   exits counted, any outside the moved slot refused) or 64 KiB of the
//!   first slot;
//! - `rw`: over the memory faulted in once, the guest writes every page and
//!   the host checks every page (this loop guest only writes, so there is no
//!   guest read-back as on vmmu's side).

use std::time::{Duration, Instant};

use crate::error::{KvmError, Result};
use crate::guest::MEASURED_GPA;
use crate::host_mem::{HostMemory, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::vm::GuestVm;

/// Guest memory the loops use here.
pub const TEST_BYTES: u64 = 512 << 20;
/// Where the moved slot goes.
const MOVE_DEST_GPA: u64 = 4 << 30;
const MAP_HALF: u64 = 16 << 20;
const UNMAP_HALF: u64 = 64 << 20;
const MOVE_WINDOW: u64 = 64 << 10;

/// `bytes` from `base` over `slots - 1` memslots (slot 0 is the selftest's
/// code slot): the gpa and size of each, equal parts of whole pages and the
/// remainder in the last, as memslot_perf_test lays them out. Empty if
/// `slots < 2` or there are fewer pages than slots.
pub fn layout(base: u64, bytes: u64, slots: u32) -> Vec<(u64, u64)> {
    let pages = bytes / PAGE_SIZE;
    let count = u64::from(slots.saturating_sub(1));
    if count == 0 || pages < count {
        return Vec::new();
    }
    let per = pages / count;
    (0..count)
        .map(|i| {
            let size = if i + 1 == count {
                pages - per * (count - 1)
            } else {
                per
            };
            (base + i * per * PAGE_SIZE, size * PAGE_SIZE)
        })
        .collect()
}

/// One loop's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmLoop {
    /// Sub-test name (vmmu's names).
    pub name: &'static str,
    /// Time in the timed steps over all iterations.
    pub ns: u64,
    /// Iterations done.
    pub iterations: u64,
    /// MMIO exits of the guest during the loop.
    pub mmio: u64,
}

/// What one slot count measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmMemslotPerf {
    /// Memslots, slot 0 included.
    pub slots: u32,
    /// Creating the test slots.
    pub setup_ns: u64,
    /// The loops run, in order.
    pub loops: Vec<KvmLoop>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether a loop that started at `t0` and has done `i` iterations goes on:
/// until `budget` has passed, at least once (both sides' loops use it).
pub fn more(t0: Instant, i: u64, budget: Duration) -> bool {
    i == 0 || t0.elapsed() < budget
}

struct Runner {
    vm: GuestVm,
    /// Passes the guest has completed.
    pass: u64,
}

impl Runner {
    fn pass_over(&mut self, offset: u64, len: u64) -> Result<()> {
        self.vm
            .set_chunk(0, MEASURED_GPA + offset, MEASURED_GPA + offset + len)?;
        self.pass += 1;
        self.vm.run_pass((self.pass & 0xff) as u8)?;
        Ok(())
    }

    fn dontneed(&self, offset: u64, len: u64, chunk: u64) -> Result<()> {
        let mut at = 0;
        while at < len {
            let n = chunk.min(len - at);
            self.vm.dontneed_measured(offset + at, n)?;
            at += n;
        }
        Ok(())
    }

    fn map(&mut self, budget: Duration) -> Result<KvmLoop> {
        let mut l = KvmLoop {
            name: "map",
            ns: 0,
            iterations: 0,
            mmio: 0,
        };
        let t0 = Instant::now();
        while more(t0, l.iterations, budget) {
            let (write, drop) = if l.iterations.is_multiple_of(2) {
                (0, MAP_HALF)
            } else {
                (MAP_HALF, 0)
            };
            self.dontneed(drop, MAP_HALF, MAP_HALF)?;
            self.pass_over(write, MAP_HALF)?;
            l.iterations += 1;
        }
        l.ns = ns(t0.elapsed());
        Ok(l)
    }

    fn unmap(&mut self, budget: Duration, chunk: u64) -> Result<KvmLoop> {
        self.pass_over(0, 2 * UNMAP_HALF)?;
        let mut l = KvmLoop {
            name: if chunk == PAGE_SIZE {
                "unmap"
            } else {
                "unmap-chunked"
            },
            ns: 0,
            iterations: 0,
            mmio: 0,
        };
        let t0 = Instant::now();
        while more(t0, l.iterations, budget) {
            let (touch, drop) = if l.iterations.is_multiple_of(2) {
                (0, UNMAP_HALF)
            } else {
                (UNMAP_HALF, 0)
            };
            self.pass_over(touch, PAGE_SIZE)?;
            self.dontneed(drop, UNMAP_HALF, chunk)?;
            l.iterations += 1;
        }
        l.ns = ns(t0.elapsed());
        Ok(l)
    }

    fn moves(&mut self, budget: Duration, slots: &[(u64, u64)], active: bool) -> Result<KvmLoop> {
        let (gpa, size) = *slots
            .last()
            .ok_or_else(|| KvmError::BadConfig("no test slot".into()))?;
        let id = slots.len() as u32;
        let offset = gpa - MEASURED_GPA;
        if slots.len() < 2 || size < MOVE_WINDOW / 2 || offset < MOVE_WINDOW / 2 {
            return Err(KvmError::BadConfig(format!(
                "the move loops need two test slots (three memslots) and a last slot of at least {} KiB",
                MOVE_WINDOW / 2 / 1024
            )));
        }
        let window = if active { offset - MOVE_WINDOW / 2 } else { 0 };
        self.vm.set_chunk(
            0,
            MEASURED_GPA + window,
            MEASURED_GPA + window + MOVE_WINDOW,
        )?;
        let hva = self.vm.measured_host_addr() + offset;
        let (r, passes, mmio, outside) = self.vm.passes_while((gpa, gpa + size), |vm| {
            let set = |at: u64| {
                let region = kvm_bindings::kvm_userspace_memory_region {
                    slot: id,
                    flags: 0,
                    guest_phys_addr: at,
                    memory_size: size,
                    userspace_addr: hva,
                };
                // SAFETY: the region is part of the measured mapping, which
                // outlives the VM fd (GuestVm's field order).
                unsafe { vm.set_user_memory_region(region) }.map_err(|source| KvmError::Ioctl {
                    op: "KVM_SET_USER_MEMORY_REGION (move)",
                    source,
                })
            };
            let (mut total, mut i) = (Duration::ZERO, 0u64);
            let t0 = Instant::now();
            while more(t0, i, budget) {
                let t = Instant::now();
                set(MOVE_DEST_GPA)?;
                set(gpa)?;
                total += t.elapsed();
                i += 1;
            }
            Ok::<_, KvmError>((total, i))
        })?;
        let (total, iterations) = r?;
        self.pass += passes;
        if let Some(addr) = outside {
            return Err(KvmError::BadConfig(format!(
                "move: an MMIO exit at {addr:#x}, outside the moved slot [{gpa:#x}, {:#x})",
                gpa + size
            )));
        }
        Ok(KvmLoop {
            name: if active {
                "move-active"
            } else {
                "move-inactive"
            },
            ns: ns(total),
            iterations,
            mmio,
        })
    }

    fn rw(&mut self, budget: Duration) -> Result<KvmLoop> {
        self.pass_over(0, TEST_BYTES)?;
        let mut l = KvmLoop {
            name: "rw",
            ns: 0,
            iterations: 0,
            mmio: 0,
        };
        let t0 = Instant::now();
        while more(t0, l.iterations, budget) {
            self.pass_over(0, TEST_BYTES)?;
            // The host checks what the guest wrote: gpa + pass in every page.
            for offset in (0..TEST_BYTES).step_by(PAGE_SIZE as usize) {
                let gpa = MEASURED_GPA + offset;
                let found = self.vm.read_measured(offset).unwrap_or(0);
                if found != gpa + self.pass {
                    return Err(KvmError::MarkerMismatch {
                        gpa,
                        expected: gpa + self.pass,
                        found,
                    });
                }
            }
            l.iterations += 1;
        }
        l.ns = ns(t0.elapsed());
        Ok(l)
    }
}

/// Run `tests` (vmmu's names) with `slots` memslots on a fresh VM, each loop
/// for `budget`.
pub fn kvm_memslot_perf(slots: u32, tests: &[&str], budget: Duration) -> Result<KvmMemslotPerf> {
    let parts = layout(MEASURED_GPA, TEST_BYTES, slots);
    if parts.is_empty() {
        return Err(KvmError::BadConfig(format!(
            "{slots} memslots: at least 2, and at most one per page"
        )));
    }
    debug_assert!(TEST_BYTES.is_multiple_of(HUGE_PAGE_SIZE));
    let (kvm, cpuid) = crate::open_kvm_with_cpuid()?;
    let code = crate::guest::assemble_loop()?;
    let mem = HostMemory::new(TEST_BYTES, false)?;
    let vm = GuestVm::new(&kvm, &cpuid, &code, 1, TEST_BYTES, mem)?;
    // The measured slot (id 1) gives way to the test slots (ids 1..slots).
    vm.set_measured_part(crate::vm::MEASURED_SLOT, MEASURED_GPA, 0, 0)?;
    let t0 = Instant::now();
    for (i, (gpa, size)) in parts.iter().enumerate() {
        vm.set_measured_part(i as u32 + 1, *gpa, gpa - MEASURED_GPA, *size)?;
    }
    let setup_ns = ns(t0.elapsed());
    let mut r = Runner { vm, pass: 0 };
    let mut loops = Vec::new();
    for t in tests {
        loops.push(match *t {
            "map" => r.map(budget)?,
            "unmap" => r.unmap(budget, PAGE_SIZE)?,
            "unmap-chunked" => r.unmap(budget, HUGE_PAGE_SIZE)?,
            "move-active" => r.moves(budget, &parts, true)?,
            "move-inactive" => r.moves(budget, &parts, false)?,
            "rw" => r.rw(budget)?,
            other => return Err(KvmError::BadConfig(format!("no memslot-perf loop {other}"))),
        });
    }
    Ok(KvmMemslotPerf {
        slots,
        setup_ns,
        loops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_layout_splits_whole_pages_with_the_remainder_last() {
        let l = layout(1 << 30, 512 << 20, 32764);
        assert_eq!(l.len(), 32763);
        assert_eq!(l[0], (1 << 30, 4 * 4096));
        let (gpa, size) = *l.last().unwrap();
        assert_eq!(gpa + size, (1 << 30) + (512 << 20));
        assert!(size >= 4 * 4096);
        assert!(layout(0, 4096, 1).is_empty());
        assert!(layout(0, 4096, 3).is_empty(), "fewer pages than slots");
    }
}
