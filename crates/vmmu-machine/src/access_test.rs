//! The `access` guest, in the spirit of kvm-unit-tests' `access` test: every
//! combination of guest entry bits (PTE and PDE: present, writable, user,
//! accessed, dirty, NX, a reserved bit; PDE page size and its reserved bit
//! 13), paging mode (EFER.NX, CR0.WP, SMEP, SMAP with or without EFLAGS.AC)
//! and access (user or supervisor; read, write or fetch; once, or after a
//! read) is set up in the guest's tables and run. Each must fault or not, with
//! the error code, and leave the entries' Accessed and Dirty bits, as the
//! oracle's reference walk of the same tables says.
//!
//! The tables are rebuilt for every case (PML4, PDPT and PD entries
//! rewritten, INVLPG), then read back after the access.

use std::collections::{HashMap, VecDeque};

use vmmu::{Gpa, Gva};

use crate::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram, PagingOp, Rng};
use crate::guest_oracle::{reference_walk, Outcome};
use crate::paging::{direct_map_entries, pte, LinearAccess, LinearOp, PagingMode};

/// Flag bits of one case.
mod f {
    pub const PTE_P: u32 = 1 << 0;
    pub const PTE_W: u32 = 1 << 1;
    pub const PTE_U: u32 = 1 << 2;
    pub const PTE_A: u32 = 1 << 3;
    pub const PTE_D: u32 = 1 << 4;
    pub const PTE_NX: u32 = 1 << 5;
    pub const PTE_51: u32 = 1 << 6;
    pub const PDE_P: u32 = 1 << 7;
    pub const PDE_W: u32 = 1 << 8;
    pub const PDE_U: u32 = 1 << 9;
    pub const PDE_A: u32 = 1 << 10;
    pub const PDE_D: u32 = 1 << 11;
    pub const PDE_PS: u32 = 1 << 12;
    pub const PDE_NX: u32 = 1 << 13;
    pub const PDE_51: u32 = 1 << 14;
    pub const PDE_13: u32 = 1 << 15;
    pub const USER: u32 = 1 << 16;
    pub const WRITE: u32 = 1 << 17;
    pub const FETCH: u32 = 1 << 18;
    pub const TWICE: u32 = 1 << 19;
    pub const EFER_NX: u32 = 1 << 20;
    pub const CR0_WP: u32 = 1 << 21;
    pub const SMEP: u32 = 1 << 22;
    pub const SMAP: u32 = 1 << 23;
    pub const AC: u32 = 1 << 24;
    pub const ALL: u32 = (1 << 25) - 1;
    pub const PTE_BITS: u32 = (1 << 7) - 1;

    pub const NAMES: [&str; 25] = [
        "pte.p",
        "pte.rw",
        "pte.user",
        "pte.a",
        "pte.d",
        "pte.nx",
        "pte.51",
        "pde.p",
        "pde.rw",
        "pde.user",
        "pde.a",
        "pde.d",
        "pde.pse",
        "pde.nx",
        "pde.51",
        "pde.13",
        "user",
        "write",
        "fetch",
        "twice",
        "efer.nx",
        "cr0.wp",
        "cr4.smep",
        "cr4.smap",
        "eflags.ac",
    ];
}

/// Whether a flag combination is a case (bits that mean nothing in it are
/// left clear, so each case is run once).
fn legal(flags: u32) -> bool {
    let has = |b| flags & b != 0;
    !(has(f::WRITE) && has(f::FETCH))
        && (has(f::PDE_PS) || !has(f::PDE_D | f::PDE_13))
        && (!has(f::PDE_PS) || flags & f::PTE_BITS == 0)
        && (has(f::SMAP) || !has(f::AC))
}

/// The entry bits a case's flags select from `map` (flag, entry bit).
fn entry_bits(flags: u32, map: &[(u32, u64)]) -> u64 {
    map.iter()
        .filter(|(flag, _)| flags & flag != 0)
        .fold(0, |e, (_, bit)| e | bit)
}

/// The name of a case: its flags.
pub fn case_name(flags: u32) -> String {
    (0..25)
        .filter(|i| flags & (1 << i) != 0)
        .map(|i| f::NAMES[i])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Number of cases (all legal combinations).
pub fn case_count() -> u64 {
    (0..=f::ALL).filter(|&x| legal(x)).count() as u64
}

/// The address every case accesses: PML4, PDPT and PD index 0x24, 0, 0; PT
/// index 3.
const GVA: u64 = (0x24 << 39) | 0x3000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Setup,
    First,
    Access,
    ReadBack(usize),
}

/// The `access` guest program.
#[derive(Debug)]
pub struct AccessTest {
    base: Gpa,
    /// Next flag combination to consider.
    next_flags: u32,
    /// Run one case in `stride` (1: all).
    stride: u64,
    seed: u64,
    seen: u64,
    mode: Option<PagingMode>,
    queue: VecDeque<(GuestAccess, Step)>,
    flags: u32,
    tables: HashMap<u64, u64>,
    result: Option<AccessResult>,
    readback: [u64; 4],
    /// Cases run.
    pub cases: u64,
    /// Cases whose access faulted (as expected or not).
    pub faulted: u64,
    /// Cases that disagreed with the reference.
    pub failures: u64,
    /// The first failures, described.
    pub failed: Vec<String>,
}

impl AccessTest {
    /// Cases over tables and data placed from `base` (needs 6 MiB of guest
    /// memory there, 2 MiB aligned); about one case in `stride` is run (a
    /// deterministic pseudo-random pick).
    pub fn new(base: Gpa, stride: u64) -> AccessTest {
        AccessTest {
            base,
            next_flags: 0,
            stride: stride.max(1),
            seed: 0,
            seen: 0,
            mode: None,
            queue: VecDeque::new(),
            flags: 0,
            tables: HashMap::new(),
            result: None,
            readback: [0; 4],
            cases: 0,
            faulted: 0,
            failures: 0,
            failed: Vec::new(),
        }
    }

    /// Pick a different sample of cases (with a stride above 1).
    pub fn with_seed(mut self, seed: u64) -> AccessTest {
        self.seed = seed;
        self
    }

    fn pml4(&self) -> u64 {
        self.base.0 + 0x10_0000
    }
    /// The four entries on the walk to [`GVA`], top down.
    fn entry_gpas(&self) -> [u64; 4] {
        let t = self.pml4();
        [t + 0x24 * 8, t + 0x1000, t + 0x2000, t + 0x3000 + 3 * 8]
    }
    /// The 2 MiB page a huge leaf maps.
    fn data(&self) -> u64 {
        self.base.0 + 0x40_0000
    }
    /// The address the access reaches, through a 4 KiB or a 2 MiB leaf.
    fn target(&self) -> u64 {
        self.data() + (GVA & 0x1f_ffff)
    }

    fn access_of(&self, flags: u32) -> LinearAccess {
        let op = if flags & f::WRITE != 0 {
            LinearOp::Write(0x5a5a)
        } else if flags & f::FETCH != 0 {
            LinearOp::Fetch
        } else {
            LinearOp::Read
        };
        LinearAccess {
            op,
            user: flags & f::USER != 0,
            ac: flags & f::AC != 0,
        }
    }

    fn mode_of(flags: u32) -> PagingMode {
        PagingMode {
            enabled: true,
            wp: flags & f::CR0_WP != 0,
            smep: flags & f::SMEP != 0,
            smap: flags & f::SMAP != 0,
            nx: flags & f::EFER_NX != 0,
            pcide: false,
            pge: false,
        }
    }

    /// Queue the next case, or return false when all are done.
    fn start_case(&mut self) -> bool {
        let flags = loop {
            if self.next_flags > f::ALL {
                return false;
            }
            let x = self.next_flags;
            self.next_flags += 1;
            if legal(x) {
                self.seen += 1;
                // A scrambled pick: a plain "every N-th" would keep the low
                // flag bits in step with N (an even N never sets pte.p).
                if self.stride == 1
                    || Rng::new(self.seen ^ self.seed.rotate_left(32))
                        .next_u64()
                        .is_multiple_of(self.stride)
                {
                    break x;
                }
            }
        };
        self.flags = flags;
        let has = |b| flags & b != 0;
        let mode = Self::mode_of(flags);
        if self.mode.is_none() {
            // Before paging is on: the kernel's direct map, through which
            // its physical accesses go under shadow paging.
            let t = self.pml4();
            for (gpa, v) in direct_map_entries(Gpa(t), Gpa(t + 0x4000)) {
                self.queue.push_back((
                    GuestAccess::shared(
                        gpa,
                        AccessKind::PteWrite {
                            value: v,
                            space: Gpa(t),
                        },
                    ),
                    Step::Setup,
                ));
            }
        }
        if self.mode != Some(mode) {
            self.mode = Some(mode);
            self.queue
                .push_back((GuestAccess::paging(PagingOp::SetMode(mode)), Step::Setup));
            self.queue.push_back((
                GuestAccess::paging(PagingOp::LoadCr3(self.pml4())),
                Step::Setup,
            ));
        }
        let e = self.entry_gpas();
        let t = self.pml4();
        let mut pde = if has(f::PDE_PS) {
            (self.data() & !0x1f_ffff) | pte::PS
        } else {
            t + 0x3000
        };
        pde |= entry_bits(
            flags,
            &[
                (f::PDE_P, pte::P),
                (f::PDE_W, pte::W),
                (f::PDE_U, pte::U),
                (f::PDE_A, pte::A),
                (f::PDE_D, pte::D),
                (f::PDE_NX, pte::NX),
                (f::PDE_51, 1 << 51),
                (f::PDE_13, 1 << 13),
            ],
        );
        let leaf = self.target()
            | entry_bits(
                flags,
                &[
                    (f::PTE_P, pte::P),
                    (f::PTE_W, pte::W),
                    (f::PTE_U, pte::U),
                    (f::PTE_A, pte::A),
                    (f::PTE_D, pte::D),
                    (f::PTE_NX, pte::NX),
                    (f::PTE_51, 1 << 51),
                ],
            );
        let upper = pte::P | pte::W | pte::U;
        let values = [(t + 0x1000) | upper, (t + 0x2000) | upper, pde, leaf];
        self.tables.clear();
        for (gpa, v) in e.iter().zip(values) {
            self.tables.insert(*gpa, v);
            self.queue.push_back((
                GuestAccess::shared(
                    Gpa(*gpa),
                    AccessKind::PteWrite {
                        value: v,
                        space: Gpa(t),
                    },
                ),
                Step::Setup,
            ));
        }
        self.queue
            .push_back((GuestAccess::paging(PagingOp::Invlpg(Gva(GVA))), Step::Setup));
        if has(f::TWICE) {
            let read = LinearAccess {
                op: LinearOp::Read,
                user: false,
                ac: false,
            };
            self.queue
                .push_back((GuestAccess::linear(Gva(GVA), read), Step::First));
        }
        self.queue.push_back((
            GuestAccess::linear(Gva(GVA), self.access_of(flags)),
            Step::Access,
        ));
        for (i, gpa) in e.iter().enumerate() {
            self.queue.push_back((
                GuestAccess::shared(Gpa(*gpa), AccessKind::Read),
                Step::ReadBack(i),
            ));
        }
        true
    }

    /// What the reference walk says `access` does to the tables as they are
    /// in `self.tables`; applies its A/D updates there.
    fn expect(&mut self, access: &LinearAccess) -> Option<Outcome> {
        let mode = Self::mode_of(self.flags);
        let tables = &self.tables;
        let out = reference_walk(
            |g| Some(tables.get(&g.0).copied().unwrap_or(0)),
            &mode,
            self.pml4(),
            Gva(GVA),
            access,
        )?;
        if let Outcome::Reached(_) = out {
            let e = self.entry_gpas();
            let depth = if self.flags & f::PDE_PS != 0 { 3 } else { 4 };
            for (i, gpa) in e[..depth].iter().enumerate() {
                if let Some(v) = self.tables.get_mut(gpa) {
                    *v |= pte::A;
                    if i == depth - 1 && access.is_write() {
                        *v |= pte::D;
                    }
                }
            }
        }
        Some(out)
    }

    fn finish_case(&mut self) {
        self.cases += 1;
        let flags = self.flags;
        let access = self.access_of(flags);
        let before = self.tables.clone();
        let want = self.expect(&access);
        let e = self.entry_gpas();
        let depth = if flags & f::PDE_PS != 0 { 3 } else { 4 };
        let got = match self.result {
            Some(AccessResult::PageFault(code)) => Some(Outcome::Fault(code)),
            Some(AccessResult::Memory(_)) => Some(Outcome::Reached(Gpa(self.target()))),
            _ => None,
        };
        if matches!(got, Some(Outcome::Fault(_))) {
            self.faulted += 1;
        }
        let mut problems = Vec::new();
        if got != want {
            problems.push(format!("access gave {got:?}, expected {want:?}"));
        }
        for (i, gpa) in e.iter().enumerate() {
            let exp = self.tables.get(gpa).copied().unwrap_or(0);
            let mut got_v = self.readback[i];
            let mut exp_v = exp;
            // After a fault the entries above the leaf may or may not have
            // been marked accessed (processors differ; the reference test
            // ignores them too).
            let faulted = matches!(want, Some(Outcome::Fault(_)));
            if faulted && i + 1 < depth {
                let orig = before.get(gpa).copied().unwrap_or(0);
                if orig & pte::A == 0 {
                    got_v &= !pte::A;
                    exp_v &= !pte::A;
                }
            }
            if i >= depth {
                continue;
            }
            if got_v != exp_v {
                problems.push(format!("entry {i} is {got_v:#x}, expected {exp_v:#x}"));
            }
        }
        if !problems.is_empty() {
            self.failures += 1;
            if self.failed.len() < 10 {
                self.failed
                    .push(format!("{}: {}", case_name(flags), problems.join("; ")));
            }
        }
    }
}

impl GuestProgram for AccessTest {
    fn next(&mut self) -> Option<GuestAccess> {
        if self.queue.is_empty() && !self.start_case() {
            return None;
        }
        self.queue.front().map(|(a, _)| *a)
    }

    fn complete(&mut self, _access: &GuestAccess, result: AccessResult) {
        let Some((_, step)) = self.queue.pop_front() else {
            return;
        };
        match step {
            Step::Setup => {}
            Step::First => {
                let read = LinearAccess {
                    op: LinearOp::Read,
                    user: false,
                    ac: false,
                };
                // Only its A/D effect matters.
                let _ = self.expect(&read);
            }
            Step::Access => self.result = Some(result),
            Step::ReadBack(i) => {
                self.readback[i] = match result {
                    AccessResult::Memory(v) => v,
                    _ => u64::MAX,
                };
                if i == 3 {
                    self.finish_case();
                }
            }
        }
    }

    fn mismatches(&self) -> u64 {
        self.failures
    }

    fn first_mismatch(&self) -> Option<String> {
        self.failed.first().cloned()
    }
}
