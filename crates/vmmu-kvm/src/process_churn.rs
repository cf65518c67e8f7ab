//! A process-churning guest kernel on the real KVM: context switches (CR3
//! loads between processes' page tables), and processes that end and are
//! spawned again (their tables cleared and rebuilt by stores), so KVM's
//! shadow MMU builds, caches, switches and zaps roots as it does for a
//! guest kernel running short-lived processes.
//!
//! The kernel runs at CPL0, because only CPL0 may load CR3. On this
//! machine's `kvm_pvm` backend CPL0 code does not run natively: KVM's
//! instruction emulator executes every instruction (the report counts them,
//! `insn_emulation`). That is still KVM's MMU at work for what this guest is
//! about: an emulated `mov cr3` goes through `kvm_set_cr3` (the fast switch
//! through the previous-roots cache), an emulated store to a shadowed table
//! through the page-track hook (write emulation, flooding, zaps of the
//! root), and every entry loads the current root. What it does not give is
//! shadow page faults (an emulated access walks the guest's tables in
//! software), so compare root and zap counts per operation, and read the
//! times as emulator-bound.
//!
//! Layout (one slot at GPA 0): the kernel's identity map of the first GiB
//! (2 MiB pages) is PML4 entry 0 of every address space; process `p` has its
//! PML4, PDPT, PD and PT at [`TABLES`] + `p` × 16 KiB and maps [`PAGES`] user
//! pages at [`USER_BASE`] (PML4 entry 1). The host generates the kernel's
//! code straight-line from a fixed schedule, so both phases are the same on
//! every run: phase 1 only switches between live processes and touches
//! their pages; phase 2 also ends and respawns one process every
//! [`RESPAWN_EVERY`] switches (on the kernel's own tables, as a kernel
//! tears down an mm).

use std::time::Instant;

use iced_x86::code_asm::{al, cr3, dx, qword_ptr, rax, CodeAssembler};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuExit;

use crate::error::{KvmError, Result};
use crate::guest::flat_segment;
use crate::host_mem::HostMemory;
use crate::stats::{delta, Snapshot, StatsFd};

/// Live processes the kernel switches between.
pub const PROCESSES: u64 = 6;
/// User pages each process maps and touches after every switch to it.
pub const PAGES: u64 = 16;
/// Phase 2 ends and respawns a process every this many switches.
pub const RESPAWN_EVERY: u64 = 4;
/// Most switches per phase (the straight-line code must fit its slot).
pub const MAX_SWITCHES: u64 = 20_000;

const SLOT_BYTES: u64 = 64 << 20;
const KERNEL_PML4: u64 = 0x1000;
const KERNEL_PDPT: u64 = 0x2000;
const KERNEL_PD: u64 = 0x3000;
const GDT: u64 = 0x6000;
const TABLES: u64 = 0x10_0000;
const FRAMES: u64 = 0x20_0000;
const CODE: u64 = 0x40_0000;
/// Linear address of a process's first user page (PML4 entry 1).
pub const USER_BASE: u64 = 1 << 39;
const DONE_PORT: u16 = 0x10;
const TABLE: u64 = 0x27; // P | W | U | A
const LEAF: u64 = 0x67; // and D
const PS: u64 = 1 << 7;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct ProcessChurnConfig {
    /// CR3 switches in each phase (at most [`MAX_SWITCHES`]).
    pub switches: u64,
}

/// One phase's figures.
#[derive(Debug, Clone)]
pub struct ChurnPhase {
    /// `switches` or `churn`.
    pub name: &'static str,
    /// Wall time of the phase.
    pub ns: u64,
    /// CR3 switches to a process.
    pub switches: u64,
    /// Processes ended and spawned again.
    pub respawns: u64,
    /// Every KVM statistic that changed (VM and vCPU, by name).
    pub kvm: Snapshot,
}

/// What the run measured.
#[derive(Debug, Clone)]
pub struct ProcessChurnReport {
    /// Switches only, then switches with process exits and spawns.
    pub phases: Vec<ChurnPhase>,
}

fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

fn put(img: &mut [u8], at: u64, v: u64) {
    img[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

fn tables(p: u64) -> [u64; 4] {
    let b = TABLES + p * 0x4000;
    [b, b + 0x1000, b + 0x2000, b + 0x3000]
}

fn frame(p: u64, i: u64) -> u64 {
    FRAMES + (p * PAGES + i) * 0x1000
}

/// The stores that build process `p`'s address space: the kernel half
/// (PML4 entry 0, the shared identity map), then the user half. An exit
/// clears them in the opposite order, so it writes the root twice and a
/// respawn twice more.
fn spawn_stores(p: u64) -> Vec<(u64, u64)> {
    let [pml4, pdpt, pd, pt] = tables(p);
    let mut v = vec![
        (pml4, KERNEL_PDPT | TABLE),
        (pml4 + 8, pdpt | TABLE),
        (pdpt, pd | TABLE),
        (pd, pt | TABLE),
    ];
    v.extend((0..PAGES).map(|i| (pt + 8 * i, frame(p, i) | LEAF)));
    v
}

/// The guest image: the kernel's identity map, every process spawned, the
/// GDT.
fn image() -> Vec<u8> {
    let mut img = vec![0u8; SLOT_BYTES as usize];
    put(&mut img, KERNEL_PML4, KERNEL_PDPT | TABLE);
    put(&mut img, KERNEL_PDPT, KERNEL_PD | TABLE);
    for i in 0..512u64 {
        put(&mut img, KERNEL_PD + 8 * i, (i << 21) | LEAF | PS);
    }
    for p in 0..PROCESSES {
        for (gpa, v) in spawn_stores(p) {
            put(&mut img, gpa, v);
        }
    }
    // Null, code64 DPL0 (selector 0x08), data DPL0 (0x10).
    put(&mut img, GDT + 8, 0x00AF_9A00_0000_FFFF);
    put(&mut img, GDT + 16, 0x00CF_9200_0000_FFFF);
    img
}

/// The kernel's code for both phases, an `out` after each.
fn code(switches: u64) -> std::result::Result<Vec<u8>, iced_x86::IcedError> {
    let mut a = CodeAssembler::new(64)?;
    for phase in 1..=2u8 {
        for s in 0..switches {
            let p = s % PROCESSES;
            if phase == 2 && s % RESPAWN_EVERY == RESPAWN_EVERY - 1 {
                // End p on the kernel's own tables: clear its entries (the
                // PT's first, as a kernel unmaps before it frees tables),
                // then spawn it again with the same frames.
                a.mov(rax, KERNEL_PML4)?;
                a.mov(cr3, rax)?;
                let stores = spawn_stores(p);
                for (gpa, _) in stores.iter().rev() {
                    a.mov(qword_ptr(*gpa), 0)?;
                }
                for (gpa, v) in stores {
                    a.mov(rax, v)?;
                    a.mov(qword_ptr(gpa), rax)?;
                }
            }
            a.mov(rax, tables(p)[0])?;
            a.mov(cr3, rax)?;
            for i in 0..PAGES {
                a.mov(qword_ptr(USER_BASE + i * 0x1000), rax)?;
            }
        }
        a.mov(al, phase as u32)?;
        a.out(dx, al)?;
    }
    a.hlt()?;
    a.assemble(CODE)
}

/// Run the two phases on the real KVM.
pub fn run_process_churn(cfg: &ProcessChurnConfig) -> Result<ProcessChurnReport> {
    if cfg.switches == 0 || cfg.switches > MAX_SWITCHES {
        return Err(KvmError::BadConfig(format!(
            "process churn: {} switches per phase (valid: 1..={MAX_SWITCHES})",
            cfg.switches
        )));
    }
    let kvm = crate::open_kvm()?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
    let code = code(cfg.switches).map_err(KvmError::Assemble)?;
    let mut img = image();
    if CODE as usize + code.len() > img.len() {
        return Err(KvmError::BadConfig(format!(
            "process churn: {} bytes of code do not fit the slot",
            code.len()
        )));
    }
    img[CODE as usize..CODE as usize + code.len()].copy_from_slice(&code);
    let mem = HostMemory::new(SLOT_BYTES, false)?;
    mem.write_bytes(&img);
    let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: SLOT_BYTES,
        userspace_addr: mem.host_addr(),
    };
    // SAFETY: the region is a live mapping owned by `mem`, which is dropped
    // after the VM fd (declared before it, dropped after it at the end).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    let vm_stats = StatsFd::open(&vm).map_err(|source| KvmError::Stats {
        what: "VM".into(),
        source,
    })?;
    let mut vcpu = vm.create_vcpu(0).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(ioctl_err("KVM_SET_CPUID2"))?;
    let vcpu_stats = StatsFd::open(&vcpu).map_err(|source| KvmError::Stats {
        what: "vCPU 0".into(),
        source,
    })?;
    let mut s = vcpu.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
    s.cs = flat_segment(0x8, 0xB, true, 0);
    let data = flat_segment(0x10, 0x3, false, 0);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.gdt.base = GDT;
    s.gdt.limit = 23;
    // PE, MP, ET, NE, WP, PG; PAE; long mode.
    s.cr0 = 1 | 2 | 0x10 | 0x20 | (1 << 16) | (1 << 31);
    s.cr3 = KERNEL_PML4;
    s.cr4 = 1 << 5;
    s.efer = (1 << 8) | (1 << 10);
    vcpu.set_sregs(&s).map_err(ioctl_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&kvm_regs {
        rip: CODE,
        rflags: 2,
        rdx: u64::from(DONE_PORT),
        rsp: KERNEL_PD,
        ..Default::default()
    })
    .map_err(ioctl_err("KVM_SET_REGS"))?;
    let snap = || -> Result<Snapshot> {
        let mut m = Snapshot::new();
        for (what, fd) in [("VM", &vm_stats), ("vCPU 0", &vcpu_stats)] {
            fd.accumulate(&mut m).map_err(|source| KvmError::Stats {
                what: what.into(),
                source,
            })?;
        }
        Ok(m)
    };
    let mut phases = Vec::new();
    for (phase, name) in [(1u8, "switches"), (2, "churn")] {
        let before = snap()?;
        let t = Instant::now();
        loop {
            let unexpected = match vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) if port == DONE_PORT => {
                    if data.first() == Some(&phase) {
                        break;
                    }
                    format!("phase {:?} signalled during phase {phase}", data.first())
                }
                Ok(VcpuExit::Intr) => continue,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Ok(exit) => format!("{exit:?}"),
                Err(e) => format!("KVM_RUN failed: {e}"),
            };
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            return Err(KvmError::UnexpectedExit {
                vcpu: 0,
                exit: unexpected,
                rip,
            });
        }
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut kvm = delta(&before, &snap()?);
        kvm.retain(|_, v| *v != 0);
        phases.push(ChurnPhase {
            name,
            ns,
            switches: cfg.switches,
            respawns: if phase == 2 {
                cfg.switches / RESPAWN_EVERY
            } else {
                0
            },
            kvm,
        });
    }
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok(ProcessChurnReport { phases })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_spawn_stores_map_every_page_of_the_process() {
        let s = spawn_stores(2);
        assert_eq!(s.len() as u64, 4 + PAGES);
        assert_eq!(s[0], (tables(2)[0], KERNEL_PDPT | TABLE));
        assert_eq!(s[4], (tables(2)[3], frame(2, 0) | LEAF));
        // No two processes share a table or a frame.
        assert!(tables(1)[3] < tables(2)[0]);
        assert!(frame(PROCESSES - 1, PAGES - 1) < CODE);
        assert!(tables(PROCESSES - 1)[3] < FRAMES);
    }

    #[test]
    fn test_the_largest_run_fits_its_slot() {
        let c = code(MAX_SWITCHES).unwrap();
        assert!(CODE + c.len() as u64 <= SLOT_BYTES, "{} bytes", c.len());
    }

    #[test]
    fn test_a_bad_switch_count_is_refused_before_kvm_is_opened() {
        for n in [0, MAX_SWITCHES + 1] {
            let e = run_process_churn(&ProcessChurnConfig { switches: n }).unwrap_err();
            assert!(e.to_string().contains("valid: 1..="), "{e}");
        }
    }
}
