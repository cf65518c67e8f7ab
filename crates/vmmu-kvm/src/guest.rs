//! The guest: a 64-bit user-mode (CPL3) loop that writes one `u64` per 4 KiB page.
//!
//! Why CPL3: on this machine `/dev/kvm` is the nested `kvm_pvm` backend, which runs
//! only 64-bit CPL3 code natively; CPL0 and paging-off code go through KVM's instruction
//! emulator (about 4 emulated instructions per page), which would measure the emulator
//! instead of the MMU. So the vCPU starts directly in long mode at CPL3, with segment
//! state loaded through `KVM_SET_SREGS`; there is no boot code, no IDT (the guest never
//! faults on purpose; an unexpected fault triple-faults into `KVM_EXIT_SHUTDOWN`, which
//! the host reports as an error). The CPL3 `out` that signals completion exits as
//! `KVM_EXIT_IO`; it is made legal twice over: RFLAGS.IOPL = 3 (enough on backends that
//! keep a guest IOPL) and an all-zero I/O permission bitmap in the TSS. The bitmap is
//! what works on `kvm_pvm`: it drops IOPL to 0 on the first entry and emulates `out`
//! (one emulated instruction per pass per vCPU), and the emulator's permission check
//! falls back to the TSS bitmap when CPL > IOPL. Without the bitmap the `out` raises #GP
//! and, with no IDT, the vCPU shuts down.
//!
//! Guest physical layout:
//!
//! | GPA | contents |
//! |---|---|
//! | `0x1000` | PML4 |
//! | `0x2000` | PDPT |
//! | `0x3000` | PD for GPA 0..1 GiB (one entry, pointing at the PT below) |
//! | `0x4000` | PT mapping the small slot (1 MiB) with 4 KiB pages |
//! | `0x5000` | code |
//! | `0x6000` | GDT (for completeness: segments are loaded through SREGS) |
//! | `0x7000` | TSS with an all-zero I/O permission bitmap (ports open at CPL3) |
//! | `0x10000..` | one PD per GiB of measured memory, 2 MiB entries |
//! | `1 GiB..` | measured slot, identity mapped, data only |
//!
//! The small slot holding tables and code is a separate memslot so that the measured
//! slot holds only data and its faults are the workload's alone. All guest page-table
//! entries are created with Accessed (and leaf Dirty) already set, so KVM's shadow MMU
//! never has to write guest page tables to set A/D bits during the measurement.

use iced_x86::code_asm::{al, dx, eax, ebx, qword_ptr, r8, rax, rbx, rcx, rdi, rsi, CodeAssembler};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::error::{KvmError, Result};
use crate::host_mem::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// Guest physical address and size of the small slot (page tables and code).
pub(crate) const SMALL_SLOT_GPA: u64 = 0;
pub(crate) const SMALL_SLOT_SIZE: u64 = 1 << 20;
/// Guest physical address of the measured slot.
pub const MEASURED_GPA: u64 = 1 << 30;
/// I/O port the guest writes its pass number to when it has finished a pass.
pub(crate) const DONE_PORT: u16 = 0x10;

const GIB: u64 = 1 << 30;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD_LOW: u64 = 0x3000;
const PT_LOW: u64 = 0x4000;
pub(crate) const CODE: u64 = 0x5000;
const GDT: u64 = 0x6000;
const TSS: u64 = 0x7000;
/// Offset of the I/O permission bitmap inside the TSS (right after the 104-byte TSS).
const TSS_IOMAP: u64 = 0x68;
/// TSS limit: the TSS, an 8 KiB bitmap covering all 65536 ports, and the 0xFF byte the
/// architecture wants after it (SDM Vol. 1, 19.5.2 "I/O Permission Bit Map").
const TSS_LIMIT: u64 = TSS_IOMAP + 8192;
const PD_MEASURED: u64 = 0x10000;
/// Most measured memory the small slot has room to map (one PD page per GiB).
pub(crate) const MAX_MEASURED_BYTES: u64 = (SMALL_SLOT_SIZE - PD_MEASURED) / PAGE_SIZE * GIB;
// The small slot must be able to map the largest run the config accepts.
const _: () = assert!(MAX_MEASURED_BYTES >= crate::MAX_TOTAL_BYTES);

// Page-table entry bits (Intel SDM Vol. 3A, 4.5 "4-Level Paging").
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const TABLE: u64 = PTE_P | PTE_RW | PTE_US | PTE_A;
const LEAF: u64 = TABLE | PTE_D;

// Control-register and EFER bits (SDM Vol. 3A, 2.5 and 2.2.1).
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: reserved bit 1 plus IOPL = 3, so CPL3 may execute `out` where the backend
/// honours IOPL (`kvm_pvm` does not; see the TSS I/O bitmap).
const RFLAGS: u64 = 0x2 | (3 << 12);

// GDT selectors (RPL 3 for the user segments).
const SEL_CODE: u16 = (3 << 3) | 3;
const SEL_DATA: u16 = (4 << 3) | 3;
const SEL_TSS: u16 = 5 << 3;

fn put_u64(image: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    image[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Assembles the guest loop at run time (placed at GPA [`CODE`]).
///
/// Inputs: `rdi` = first GPA of this vCPU's chunk, `rsi` = one past its last byte,
/// `dx` = [`DONE_PORT`], `rbx` = 0, `r8` = the stride (4 KiB: every page). Each
/// pass increments `rbx` and writes `gpa + pass` to the first 8 bytes of every
/// page it visits, in order, so the host can verify afterwards that those pages
/// were written by that pass; then it `out`s the pass number and loops back for
/// the next pass when the host re-enters the vCPU.
pub(crate) fn assemble_loop() -> Result<Vec<u8>> {
    fn build() -> std::result::Result<Vec<u8>, iced_x86::IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut pass = a.create_label();
        let mut page = a.create_label();
        a.set_label(&mut pass)?;
        a.inc(rbx)?;
        a.mov(rax, rdi)?;
        a.set_label(&mut page)?;
        a.lea(rcx, qword_ptr(rax + rbx))?;
        a.mov(qword_ptr(rax), rcx)?;
        a.add(rax, r8)?;
        a.cmp(rax, rsi)?;
        a.jb(page)?;
        a.mov(eax, ebx)?;
        a.out(dx, al)?;
        a.jmp(pass)?;
        a.assemble(CODE)
    }
    build().map_err(KvmError::Assemble)
}

/// Builds the small slot's contents: page tables mapping `measured_bytes` at
/// [`MEASURED_GPA`] with 2 MiB pages, the code, a GDT and a TSS.
///
/// `measured_bytes` must be a multiple of 2 MiB and at most [`MAX_MEASURED_BYTES`]
/// (checked by the caller's config validation; violated inputs are clamped, not UB).
pub(crate) fn small_slot_image(measured_bytes: u64, code: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; SMALL_SLOT_SIZE as usize];
    let measured_bytes = measured_bytes.min(MAX_MEASURED_BYTES);

    put_u64(&mut image, PML4, PDPT | TABLE);
    put_u64(&mut image, PDPT, PD_LOW | TABLE);
    put_u64(&mut image, PD_LOW, PT_LOW | TABLE);
    for i in 0..SMALL_SLOT_SIZE / PAGE_SIZE {
        put_u64(
            &mut image,
            PT_LOW + 8 * i,
            (SMALL_SLOT_GPA + i * PAGE_SIZE) | LEAF,
        );
    }

    let gibs = measured_bytes.div_ceil(GIB);
    for g in 0..gibs {
        let pd = PD_MEASURED + g * PAGE_SIZE;
        let pdpt_index = (MEASURED_GPA + g * GIB) / GIB;
        put_u64(&mut image, PDPT + 8 * pdpt_index, pd | TABLE);
        let in_this_gib = (measured_bytes - g * GIB).min(GIB) / HUGE_PAGE_SIZE;
        for j in 0..in_this_gib {
            let gpa = MEASURED_GPA + g * GIB + j * HUGE_PAGE_SIZE;
            put_u64(&mut image, pd + 8 * j, gpa | LEAF | PTE_PS);
        }
    }

    let code_len = code.len().min(PAGE_SIZE as usize);
    image[CODE as usize..CODE as usize + code_len].copy_from_slice(&code[..code_len]);

    // GDT: null, two unused, user code64 (DPL3, L=1), user data (DPL3), 64-bit TSS.
    put_u64(&mut image, GDT + 8 * 3, 0x00AF_FA00_0000_FFFF);
    put_u64(&mut image, GDT + 8 * 4, 0x00CF_F200_0000_FFFF);
    let tss_low =
        TSS_LIMIT | ((TSS & 0xFF_FFFF) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xFF) << 56);
    put_u64(&mut image, GDT + 8 * 5, tss_low);
    put_u64(&mut image, GDT + 8 * 6, TSS >> 32);
    // TSS: an all-zero I/O bitmap, i.e. every port allowed at CPL3. The bitmap, not
    // RFLAGS.IOPL, is what makes the completion `out` legal here: kvm_pvm does not keep
    // a guest IOPL (it reads back RFLAGS with IOPL = 0 after the first entry), and it
    // emulates `out`, whose permission check falls back to this bitmap when CPL > IOPL.
    let iomap = (TSS + 0x66) as usize;
    image[iomap..iomap + 2].copy_from_slice(&(TSS_IOMAP as u16).to_le_bytes());
    image[(TSS + TSS_LIMIT) as usize] = 0xFF;
    image
}

fn user_segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    flat_segment(selector, type_, code, 3)
}

/// A flat 4 GiB code (64-bit) or data segment of privilege `dpl`.
pub(crate) fn flat_segment(selector: u16, type_: u8, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` into 64-bit long mode with paging at CPL3 (CS.DPL = 3, RPL 3).
pub(crate) fn setup_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = user_segment(SEL_CODE, 0xB, true);
    let data = user_segment(SEL_DATA, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT as u32,
        selector: SEL_TSS,
        type_: 0xB, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        base: 0,
        limit: 0xFFFF,
        selector: 0,
        type_: 0x2,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 1,
        padding: 0,
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers for a vCPU that owns GPAs `[start, end)`.
pub(crate) fn regs_for_chunk(start: u64, end: u64) -> kvm_regs {
    kvm_regs {
        rip: CODE,
        rflags: RFLAGS,
        rdi: start,
        rsi: end,
        rdx: u64::from(DONE_PORT),
        rbx: 0,
        r8: PAGE_SIZE,
        rsp: SMALL_SLOT_SIZE,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(image: &[u8], at: u64) -> u64 {
        let at = at as usize;
        u64::from_le_bytes(image[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn test_assemble_loop_ends_with_out_and_jmp() {
        let code = assemble_loop().unwrap();

        // `out dx, al` (0xEE) then a short backward jmp (0xEB rel8) back to the start.
        let n = code.len();
        assert_eq!(code[n - 3..n - 1], [0xEE, 0xEB]);
        assert_eq!(code[n - 1] as i8 as i64, -(n as i64));
    }

    #[test]
    fn test_small_slot_image_three_gib_maps_2m_leaves() {
        let total = 3 * GIB - HUGE_PAGE_SIZE;

        let image = small_slot_image(total, &[0x90]);

        assert_eq!(get(&image, PDPT + 8), PD_MEASURED | TABLE);
        assert_eq!(
            get(&image, PDPT + 24),
            (PD_MEASURED + 2 * PAGE_SIZE) | TABLE
        );
        assert_eq!(get(&image, PDPT + 32), 0);
        assert_eq!(get(&image, PD_MEASURED), MEASURED_GPA | LEAF | PTE_PS);
        let last_pd = PD_MEASURED + 2 * PAGE_SIZE;
        assert_eq!(
            get(&image, last_pd + 8 * 510),
            (MEASURED_GPA + 2 * GIB + 510 * HUGE_PAGE_SIZE) | LEAF | PTE_PS
        );
        assert_eq!(get(&image, last_pd + 8 * 511), 0);
        assert_eq!(image[CODE as usize], 0x90);
        assert_eq!(get(&image, PT_LOW + 8 * 5), CODE | LEAF);
    }
}
