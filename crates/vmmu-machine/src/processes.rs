//! A guest kernel running short-lived processes: each has its own page
//! tables (PML4, PDPT, PD, PT in guest memory, built with page-table writes),
//! a PCID, and user pages it writes stamps to and reads back. The kernel
//! spawns processes (a CR3 load that flushes the new PCID), switches between
//! live ones (CR3 loads with the no-flush bit), remaps and write-protects
//! their pages (entry write, then INVLPG, or for some remaps a CR3 load
//! that flushes the whole PCID), and ends them (entries cleared,
//! frames freed for the next process to reuse). Like a real kernel it has
//! tables of its own (a PML4 with only the direct map of guest memory, whose
//! table every process's PML4 shares): it runs on them before paging has a
//! process to run and while it tears one down, and it writes page tables
//! through the direct map.
//!
//! This is the guest a shadow MMU finds hardest: every spawn and exit changes
//! page tables, every switch changes roots. Here it checks the machine's
//! guest paging and TLB end to end: every read must return the last stamp
//! written through the process's mapping, and a write to a page the kernel
//! made read-only must fault.

use std::collections::VecDeque;

use vmmu::{ErrorCode, Gpa, Gva};

use crate::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram, PagingOp, Rng};
use crate::paging::{
    direct_map_entries, pte, LinearAccess, LinearOp, PagingMode, CR3_NOFLUSH, DIRECT_MAP_INDEX,
};

/// Linear address of a process's first page (PML4, PDPT index 0, PD index 2).
const USER_BASE: u64 = 0x40_0000;
const USER: u64 = pte::P | pte::W | pte::U;

#[derive(Debug)]
struct Process {
    root: u64,
    tables: [u64; 4],
    pcid: u16,
    frames: Vec<u64>,
    /// The last stamp written to each page (None: unknown, not checked).
    expected: Vec<Option<u64>>,
}

impl Process {
    fn pt_entry(&self, page: usize) -> u64 {
        self.tables[3] + page as u64 * 8
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Nothing,
    Value(u64),
    Fault(ErrorCode),
}

/// Counters of a run.
#[derive(Debug, Default, Clone)]
pub struct ProcessCounters {
    /// Processes spawned.
    pub spawned: u64,
    /// Processes ended.
    pub exited: u64,
    /// Switches between live processes (CR3 loads with the no-flush bit).
    pub switches: u64,
    /// Pages moved to another frame.
    pub remaps: u64,
    /// Remaps flushed with a CR3 load of the process's own table that
    /// flushes its PCID (the others with INVLPG).
    pub flushing_loads: u64,
    /// Writes to read-only pages (each must fault).
    pub protection_faults: u64,
    /// Reads checked against the stamp written.
    pub verified_reads: u64,
}

/// The program.
#[derive(Debug)]
pub struct ProcessChurn {
    vcpu: u32,
    rng: Rng,
    free: Vec<u64>,
    live: Vec<Process>,
    current: Option<usize>,
    next_pcid: u16,
    pages: usize,
    max_live: usize,
    ops: u64,
    seq: u64,
    queue: VecDeque<(GuestAccess, Expect)>,
    started: bool,
    /// The kernel's own PML4 (CR3 with PCID 0) and its direct map's PDPT.
    kernel_root: u64,
    direct_map: u64,
    mismatches: u64,
    first: Option<String>,
    /// What it did.
    pub counters: ProcessCounters,
}

impl ProcessChurn {
    /// A kernel for vCPU `vcpu` owning the guest frames of `[base, base +
    /// bytes)`, running up to `max_live` processes of `pages` pages each, for
    /// `ops` operations (spawn, switch, run, remap, protect, exit).
    pub fn new(
        vcpu: u32,
        base: Gpa,
        bytes: u64,
        pages: usize,
        max_live: usize,
        ops: u64,
        seed: u64,
    ) -> ProcessChurn {
        let frames = bytes / 4096;
        let mut free: Vec<u64> = (0..frames).rev().map(|i| base.0 + i * 4096).collect();
        let kernel_root = free.pop().unwrap_or_default();
        let direct_map = free.pop().unwrap_or_default();
        ProcessChurn {
            vcpu,
            rng: Rng::new(seed ^ ((vcpu as u64) << 40)),
            free,
            kernel_root,
            direct_map,
            live: Vec::new(),
            current: None,
            next_pcid: 1,
            pages: pages.clamp(1, 512),
            max_live: max_live.max(1),
            ops,
            seq: 0,
            queue: VecDeque::new(),
            started: false,
            mismatches: 0,
            first: None,
            counters: ProcessCounters::default(),
        }
    }

    /// Allow `n` more operations (the processes live on). Mismatches count
    /// from here again: the machine reports each run's.
    pub fn add_ops(&mut self, n: u64) {
        self.ops += n;
        self.mismatches = 0;
        self.first = None;
    }

    fn push(&mut self, a: GuestAccess, e: Expect) {
        self.queue.push_back((a, e));
    }

    fn pte_write(&mut self, gpa: u64, value: u64, space: u64) {
        self.push(
            GuestAccess::shared(
                Gpa(gpa),
                AccessKind::PteWrite {
                    value,
                    space: Gpa(space),
                },
            ),
            Expect::Nothing,
        );
    }

    fn user(op: LinearOp) -> LinearAccess {
        LinearAccess {
            op,
            user: true,
            ac: false,
        }
    }

    fn load(&mut self, idx: usize, noflush: bool) {
        let p = &self.live[idx];
        let mut cr3 = p.root | p.pcid as u64;
        if noflush {
            cr3 |= CR3_NOFLUSH;
        }
        self.push(GuestAccess::paging(PagingOp::LoadCr3(cr3)), Expect::Nothing);
        self.current = Some(idx);
    }

    fn spawn(&mut self) -> bool {
        if self.live.len() >= self.max_live || self.free.len() < 4 + self.pages {
            return false;
        }
        let mut tables = [0u64; 4];
        for t in &mut tables {
            *t = self.free.pop().unwrap_or_default();
        }
        let frames: Vec<u64> = (0..self.pages)
            .map(|_| self.free.pop().unwrap_or_default())
            .collect();
        // PCIDs of live processes are distinct; a reused one is flushed by the
        // spawn's CR3 load.
        let pcid = self.next_pcid;
        self.next_pcid = self.next_pcid % 4095 + 1;
        let root = tables[0];
        let pd_index = (USER_BASE >> 21) & 511;
        // The kernel half: the shared direct map.
        self.pte_write(
            root + DIRECT_MAP_INDEX * 8,
            self.direct_map | pte::P | pte::W | pte::A,
            root,
        );
        self.pte_write(tables[0], tables[1] | USER, root);
        self.pte_write(tables[1], tables[2] | USER, root);
        self.pte_write(tables[2] + pd_index * 8, tables[3] | USER, root);
        for (i, f) in frames.iter().enumerate() {
            self.pte_write(tables[3] + i as u64 * 8, f | USER, root);
        }
        self.live.push(Process {
            root,
            tables,
            pcid,
            expected: vec![None; frames.len()],
            frames,
        });
        self.counters.spawned += 1;
        self.load(self.live.len() - 1, false);
        true
    }

    fn exit(&mut self, idx: usize) {
        let p = self.live.swap_remove(idx);
        // Off its tables first (a kernel switches to its own mm before it
        // frees a process's), without keeping PCID 0's translations.
        self.push(
            GuestAccess::paging(PagingOp::LoadCr3(self.kernel_root)),
            Expect::Nothing,
        );
        // Clear what the process's tables hold, so their frames come back
        // zeroed, then free everything.
        let pd_index = (USER_BASE >> 21) & 511;
        self.pte_write(p.root + DIRECT_MAP_INDEX * 8, 0, p.root);
        for i in 0..p.frames.len() {
            self.pte_write(p.pt_entry(i), 0, p.root);
        }
        self.pte_write(p.tables[2] + pd_index * 8, 0, p.root);
        self.pte_write(p.tables[1], 0, p.root);
        self.pte_write(p.tables[0], 0, p.root);
        self.free.extend(p.tables);
        self.free.extend(p.frames);
        self.counters.exited += 1;
        self.current = None;
        if !self.live.is_empty() {
            let next = self.rng.below(self.live.len() as u64) as usize;
            self.load(next, true);
        }
    }

    fn run_current(&mut self, n: u64) {
        let Some(c) = self.current else { return };
        for _ in 0..n {
            let page = self.rng.below(self.pages as u64) as usize;
            let gva = Gva(USER_BASE + page as u64 * 4096);
            let p = &mut self.live[c];
            if self.rng.below(2) == 0 || p.expected[page].is_none() {
                self.seq += 1;
                let v = ((self.vcpu as u64 + 1) << 48) | self.seq;
                p.expected[page] = Some(v);
                self.push(
                    GuestAccess::linear(gva, Self::user(LinearOp::Write(v))),
                    Expect::Value(v),
                );
            } else {
                let v = p.expected[page].unwrap_or_default();
                self.push(
                    GuestAccess::linear(gva, Self::user(LinearOp::Read)),
                    Expect::Value(v),
                );
                self.counters.verified_reads += 1;
            }
        }
    }

    fn remap(&mut self, c: usize) {
        let Some(new) = self.free.pop() else { return };
        let page = self.rng.below(self.pages as u64) as usize;
        let p = &mut self.live[c];
        let old = std::mem::replace(&mut p.frames[page], new);
        p.expected[page] = None;
        let (entry, root) = (p.pt_entry(page), p.root);
        self.pte_write(entry, new | USER, root);
        if self.rng.below(4) == 0 {
            self.load(c, false);
            self.counters.flushing_loads += 1;
        } else {
            self.push(
                GuestAccess::paging(PagingOp::Invlpg(Gva(USER_BASE + page as u64 * 4096))),
                Expect::Nothing,
            );
        }
        self.free.push(old);
        self.counters.remaps += 1;
    }

    fn protect(&mut self, c: usize) {
        let page = self.rng.below(self.pages as u64) as usize;
        let gva = Gva(USER_BASE + page as u64 * 4096);
        let p = &self.live[c];
        let (entry, root, frame) = (p.pt_entry(page), p.root, p.frames[page]);
        self.pte_write(entry, frame | pte::P | pte::U, root);
        self.push(GuestAccess::paging(PagingOp::Invlpg(gva)), Expect::Nothing);
        self.push(
            GuestAccess::linear(gva, Self::user(LinearOp::Write(1))),
            Expect::Fault(ErrorCode::PRESENT | ErrorCode::WRITE | ErrorCode::USER),
        );
        self.pte_write(entry, frame | USER, root);
        self.push(GuestAccess::paging(PagingOp::Invlpg(gva)), Expect::Nothing);
        self.counters.protection_faults += 1;
    }

    fn plan(&mut self) -> bool {
        if !self.started {
            self.started = true;
            // Before paging: the kernel's own tables, the direct map only.
            let k = self.kernel_root;
            for (gpa, v) in direct_map_entries(Gpa(k), Gpa(self.direct_map)) {
                self.pte_write(gpa.0, v, k);
            }
            self.push(
                GuestAccess::paging(PagingOp::SetMode(PagingMode::long_mode())),
                Expect::Nothing,
            );
            self.push(GuestAccess::paging(PagingOp::LoadCr3(k)), Expect::Nothing);
        }
        if self.ops == 0 {
            return false;
        }
        self.ops -= 1;
        if self.live.is_empty() {
            self.spawn();
            return true;
        }
        let c = match self.current {
            Some(c) => c,
            None => {
                self.load(0, true);
                0
            }
        };
        match self.rng.below(100) {
            0..=9 => {
                if !self.spawn() {
                    self.exit(c);
                }
            }
            10..=17 => self.exit(c),
            18..=37 => {
                let k = self.rng.below(self.live.len() as u64) as usize;
                self.counters.switches += 1;
                self.load(k, true);
            }
            38..=45 => self.remap(c),
            46..=50 => self.protect(c),
            _ => self.run_current(8),
        }
        true
    }

    fn mismatch(&mut self, what: String) {
        self.mismatches += 1;
        self.first.get_or_insert(what);
    }
}

impl GuestProgram for ProcessChurn {
    fn next(&mut self) -> Option<GuestAccess> {
        while self.queue.is_empty() {
            if !self.plan() {
                return None;
            }
        }
        self.queue.front().map(|(a, _)| *a)
    }

    fn complete(&mut self, access: &GuestAccess, result: AccessResult) {
        let Some((_, expect)) = self.queue.pop_front() else {
            return;
        };
        let ok = match (expect, result) {
            (Expect::Nothing, AccessResult::Memory(_) | AccessResult::Done) => true,
            (Expect::Value(v), AccessResult::Memory(got)) => v == got,
            (Expect::Fault(e), AccessResult::PageFault(got)) => e == got,
            _ => false,
        };
        if !ok {
            self.mismatch(format!(
                "vCPU {}: {:?} gave {result:?}, expected {expect:?}",
                self.vcpu, access.kind
            ));
        }
    }

    fn mismatches(&self) -> u64 {
        self.mismatches
    }

    fn first_mismatch(&self) -> Option<String> {
        self.first.clone()
    }
}
