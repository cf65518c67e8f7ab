//! Guest programs: the access streams vCPUs run.
//!
//! Every store writes a stamp that names the vCPU, the pass and the page, into the
//! first word of the page; a per-vCPU reference model remembers what each page
//! must hold, and reads that are checked compare against it. Streams are
//! deterministic for a seed.

use vmmu::{Gpa, Gva, PAGE_SIZE};

use crate::paging::{LinearAccess, PagingMode};

/// What the guest does with one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    /// Load 8 bytes.
    Read,
    /// Store 8 bytes.
    Write(u64),
    /// Ask the VMM to convert `[gpa, gpa + size)` to private or shared (the
    /// `KVM_HC_MAP_GPA_RANGE` hypercall a confidential guest makes before it
    /// changes how it accesses the range).
    MapGpaRange {
        /// Bytes.
        size: u64,
        /// Convert to private (else to shared).
        private: bool,
        /// What the VMM does about it.
        how: MapGpaHow,
    },
    /// A call to the host (a selftest's ucall): the vCPU exits, the program's
    /// host side runs in [`GuestProgram::complete`] (outside guest mode), and the
    /// guest goes on.
    Ucall(u64),
    /// An access by linear address, through the guest's page tables when its
    /// paging is on (`GuestAccess::gpa` is unused). Completes with the value
    /// loaded (or stored), or with [`AccessResult::PageFault`].
    Linear {
        /// The address.
        gva: Gva,
        /// What and with which privilege.
        access: LinearAccess,
    },
    /// Store an entry of the guest's own page tables at `GuestAccess::gpa` (a
    /// physical store, as through the kernel's direct map). The oracle learns
    /// that translations of address space `space` may now be stale.
    PteWrite {
        /// The new entry.
        value: u64,
        /// The root table's address of the address space the entry belongs to.
        space: Gpa,
    },
    /// A paging instruction (completes with [`AccessResult::Done`]).
    Paging(PagingOp),
}

/// Paging instructions and control-register writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingOp {
    /// Write CR0/CR4/EFER: a new paging mode. Changing PCIDE, PGE, or turning
    /// paging on or off flushes every linear translation.
    SetMode(PagingMode),
    /// MOV to CR3 (bit 63: keep the new PCID's translations, with PCIDE).
    LoadCr3(u64),
    /// INVLPG: the current PCID's and the global translations of a page.
    Invlpg(Gva),
    /// INVPCID.
    Invpcid(Invpcid),
}

/// The four INVPCID types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invpcid {
    /// Type 0: one page of one PCID, global translations kept.
    Address {
        /// The PCID.
        pcid: u16,
        /// The page.
        gva: Gva,
    },
    /// Type 1: one PCID's translations, global ones kept.
    Context(u16),
    /// Type 2: everything, global translations too.
    AllIncludingGlobal,
    /// Type 3: every PCID, global translations kept.
    AllNonGlobal,
}

/// How the VMM handles a `MapGpaRange` hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapGpaHow {
    /// Set the attributes, then discard the side the range left (QEMU).
    Convert,
    /// The selftest's handler: optionally `fallocate` the guest_memfd range
    /// first (punch-hole when going shared, allocate when going private), then
    /// optionally set the attributes.
    Selftest {
        /// `fallocate` the range.
        fallocate: bool,
        /// Set the attributes.
        set_attributes: bool,
    },
}

/// One access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestAccess {
    /// Where.
    pub gpa: Gpa,
    /// What.
    pub kind: AccessKind,
    /// The guest marks the access private (an SNP guest's C-bit, a TDX guest's
    /// cleared shared bit). Only a VM type whose accesses carry the marking
    /// acts on it; elsewhere it says which side the guest means to use.
    pub private: bool,
}

impl GuestAccess {
    /// A shared access.
    pub fn shared(gpa: Gpa, kind: AccessKind) -> GuestAccess {
        GuestAccess {
            gpa,
            kind,
            private: false,
        }
    }
}

/// How an access completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessResult {
    /// Done against memory; for reads, the value loaded.
    Memory(u64),
    /// Emulated as MMIO (no memslot, or a write to a read-only slot); reads
    /// return [`MMIO_READ_VALUE`].
    Mmio,
    /// The run failed with EFAULT (the host refused the page); the access did
    /// not happen.
    Fault,
    /// A hypercall completed with this return value (0, or a negative errno).
    Hypercall(i64),
    /// The run failed with a memory-fault exit (`KVM_EXIT_MEMORY_FAULT`) the
    /// VMM did not resolve; the access did not happen.
    MemoryFault {
        /// The exit's gpa.
        gpa: Gpa,
        /// Its size.
        size: u64,
        /// Its PRIVATE flag.
        private: bool,
    },
    /// The guest's paging raised a page fault (#PF with this error code); the
    /// access did not happen.
    PageFault(vmmu::ErrorCode),
    /// A paging instruction completed.
    Done,
}

impl GuestAccess {
    /// A linear access.
    pub fn linear(gva: Gva, access: LinearAccess) -> GuestAccess {
        GuestAccess::shared(Gpa(0), AccessKind::Linear { gva, access })
    }
    /// A paging instruction.
    pub fn paging(op: PagingOp) -> GuestAccess {
        GuestAccess::shared(Gpa(0), AccessKind::Paging(op))
    }
}

/// What an emulated MMIO read returns (the selftests answer 0xBEEF).
pub const MMIO_READ_VALUE: u64 = 0xbeef;

/// A deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The stamp a store writes: vCPU, pass and page, never zero.
pub fn stamp(vcpu: u32, pass: u32, page: u64) -> u64 {
    ((vcpu as u64 + 1) << 52) | ((pass as u64 & 0xfffff) << 32) | (page & 0xffff_ffff)
}

/// What each page of a vCPU's chunk must contain.
#[derive(Clone, Debug)]
pub struct RefModel {
    /// First guest address of the chunk.
    pub base: Gpa,
    /// Expected first word per page (0 = never written).
    pub expected: Vec<u64>,
    /// Bytes from one modelled page to the next: 4 KiB for a dense chunk,
    /// more for a sparse one (one page touched per stride), so a guest far
    /// larger than the host's memory is modelled by the pages it touches.
    pub stride: u64,
}

impl RefModel {
    /// A chunk of `pages` pages at `base`, all zero.
    pub fn new(base: Gpa, pages: u64) -> RefModel {
        RefModel::strided(base, pages, PAGE_SIZE)
    }
    /// `pages` pages at `base`, one every `stride` bytes (a multiple of
    /// 4 KiB, at least one page).
    pub fn strided(base: Gpa, pages: u64, stride: u64) -> RefModel {
        RefModel {
            base,
            expected: vec![0; pages as usize],
            stride: stride.max(PAGE_SIZE) / PAGE_SIZE * PAGE_SIZE,
        }
    }
    /// The modelled page holding `gpa`, if any.
    pub fn page_of(&self, gpa: Gpa) -> Option<u64> {
        let off = gpa.0.checked_sub(self.base.0)?;
        let p = off / self.stride;
        (off % self.stride < PAGE_SIZE && p < self.pages()).then_some(p)
    }
    /// Pages in the chunk.
    pub fn pages(&self) -> u64 {
        self.expected.len() as u64
    }
    /// Address of page `i`.
    pub fn gpa(&self, i: u64) -> Gpa {
        Gpa(self.base.0 + i * self.stride)
    }
}

/// Pages whose contents the host may have discarded (MADV_DONTNEED): a read of
/// one is not checked until the guest writes it again. The host marks pages before
/// and after discarding them; the guest clears a mark right after its store, in
/// the same guest-mode section, so a store the host discarded is always marked.
#[derive(Debug)]
pub struct Discarded {
    base: Gpa,
    bits: Box<[crate::sync::AtomicU64]>,
}

impl Discarded {
    /// Marks for `pages` pages from `base`.
    pub fn new(base: Gpa, pages: u64) -> Discarded {
        Discarded {
            base,
            bits: (0..pages.div_ceil(64))
                .map(|_| crate::sync::AtomicU64::new(0))
                .collect(),
        }
    }
    fn idx(&self, gpa: Gpa) -> Option<(usize, u64)> {
        let p = gpa.0.checked_sub(self.base.0)? / PAGE_SIZE;
        ((p / 64) < self.bits.len() as u64).then_some(((p / 64) as usize, 1 << (p % 64)))
    }
    /// Mark `[gpa, gpa + pages)`.
    pub fn mark(&self, gpa: Gpa, pages: u64) {
        for i in 0..pages {
            if let Some((w, b)) = self.idx(Gpa(gpa.0 + i * PAGE_SIZE)) {
                self.bits[w].fetch_or(b, crate::sync::Ordering::SeqCst);
            }
        }
    }
    fn clear(&self, gpa: Gpa) {
        if let Some((w, b)) = self.idx(gpa) {
            self.bits[w].fetch_and(!b, crate::sync::Ordering::SeqCst);
        }
    }
    fn test(&self, gpa: Gpa) -> bool {
        self.idx(gpa)
            .is_some_and(|(w, b)| self.bits[w].load(crate::sync::Ordering::SeqCst) & b != 0)
    }
}

/// Order in which a pass visits pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// 0, 1, 2, ...
    Sequential,
    /// Uniformly random pages, as many accesses as pages.
    Random,
    /// 90 % of accesses go to the first 10 % of pages.
    HotSet,
}

/// A guest program.
pub trait GuestProgram: Send {
    /// The next access, or `None` when the program is done.
    fn next(&mut self) -> Option<GuestAccess>;
    /// The outcome of the last access returned by `next`.
    fn complete(&mut self, access: &GuestAccess, result: AccessResult);
    /// Reads whose value differed from the reference model.
    fn mismatches(&self) -> u64;
    /// A description of the first mismatch.
    fn first_mismatch(&self) -> Option<String> {
        None
    }
    /// The VMM converted `[gpa, gpa + size)` while handling one of this
    /// program's memory-fault exits (the guest did not ask): whatever the range
    /// held is gone, it reads as zeros on its new side.
    fn converted(&mut self, _gpa: Gpa, _size: u64, _private: bool) {}
}

/// One pass over a vCPU's chunk: each visited page is written with a stamp (with
/// probability `write_percent`) or read and, if `verify`, checked against the
/// reference model.
#[derive(Debug)]
pub struct Pass {
    vcpu: u32,
    pass: u32,
    pattern: Pattern,
    write_percent: u32,
    verify: bool,
    model: RefModel,
    rng: Rng,
    discarded: Option<std::sync::Arc<Discarded>>,
    private_percent: u32,
    fetch_percent: u32,
    mmio_allowed: Option<(Gpa, Gpa)>,
    repeat: bool,
    i: u64,
    mismatches: u64,
    first: Option<String>,
    /// Stores that failed with EFAULT.
    pub faults: u64,
    /// Accesses that completed as MMIO.
    pub mmio: u64,
}

impl Pass {
    /// A pass of vCPU `vcpu`, numbered `pass`.
    pub fn new(
        vcpu: u32,
        pass: u32,
        pattern: Pattern,
        write_percent: u32,
        verify: bool,
        model: RefModel,
        seed: u64,
    ) -> Pass {
        Pass {
            vcpu,
            pass,
            pattern,
            write_percent,
            verify,
            model,
            rng: Rng::new(seed ^ ((vcpu as u64) << 32) ^ pass as u64),
            discarded: None,
            private_percent: 0,
            fetch_percent: 0,
            mmio_allowed: None,
            repeat: false,
            i: 0,
            mismatches: 0,
            first: None,
            faults: 0,
            mmio: 0,
        }
    }

    /// Start over with the next pass number when done, until stopped.
    pub fn repeating(mut self) -> Pass {
        self.repeat = true;
        self
    }

    /// Passes completed (for repeating programs).
    pub fn pass_number(&self) -> u32 {
        self.pass
    }

    /// Skip checking pages the host may have discarded.
    pub fn with_discarded(mut self, d: std::sync::Arc<Discarded>) -> Pass {
        self.discarded = Some(d);
        self
    }

    /// Mark about `percent` % of the pages private, a side per page that
    /// changes from pass to pass (accesses carry it; the VM type decides
    /// whether the hardware acts on it).
    pub fn with_private_percent(mut self, percent: u32) -> Pass {
        self.private_percent = percent;
        self
    }

    /// Make about `percent` % of the reads instruction fetches of the page's
    /// first word (paging off: the linear address is the physical one), so
    /// the NX huge page mitigation splits what they touch. Checked as reads.
    pub fn with_fetch_percent(mut self, percent: u32) -> Pass {
        self.fetch_percent = percent;
        self
    }

    /// Allow MMIO exits only for accesses inside `[start, end)` (a slot
    /// being moved away); any other one counts as a mismatch.
    pub fn with_mmio_allowed(mut self, start: Gpa, end: Gpa) -> Pass {
        self.mmio_allowed = Some((start, end));
        self
    }

    fn side_of(&self, page: u64) -> bool {
        if self.private_percent == 0 {
            return false;
        }
        let h = Rng::new(page ^ ((self.pass as u64) << 40) ^ ((self.vcpu as u64) << 56)).next_u64();
        h % 100 < self.private_percent as u64
    }

    /// The reference model after the pass.
    pub fn into_model(self) -> RefModel {
        self.model
    }

    fn page_of(&self, gpa: Gpa) -> u64 {
        // Accesses are only made to the model's own pages (`next`).
        self.model.page_of(gpa).unwrap_or_default()
    }
}

impl GuestProgram for Pass {
    fn next(&mut self) -> Option<GuestAccess> {
        let n = self.model.pages();
        if self.i >= n && self.repeat && n > 0 {
            self.i = 0;
            self.pass += 1;
        }
        if self.i >= n || n == 0 {
            return None;
        }
        let page = match self.pattern {
            Pattern::Sequential => self.i,
            Pattern::Random => self.rng.below(n),
            Pattern::HotSet => {
                let hot = (n / 10).max(1);
                if self.rng.below(100) < 90 {
                    self.rng.below(hot)
                } else {
                    self.rng.below(n)
                }
            }
        };
        self.i += 1;
        let write = self.write_percent >= 100
            || (self.write_percent > 0 && self.rng.below(100) < self.write_percent as u64);
        let gpa = self.model.gpa(page);
        let kind = if write {
            AccessKind::Write(stamp(self.vcpu, self.pass, page))
        } else if self.fetch_percent > 0 && self.rng.below(100) < self.fetch_percent as u64 {
            AccessKind::Linear {
                gva: Gva(gpa.0),
                access: LinearAccess {
                    op: crate::paging::LinearOp::Fetch,
                    user: false,
                    ac: false,
                },
            }
        } else {
            AccessKind::Read
        };
        Some(GuestAccess {
            gpa,
            kind,
            private: self.side_of(page),
        })
    }

    fn complete(&mut self, access: &GuestAccess, result: AccessResult) {
        let page = self.page_of(access.gpa);
        // A fetch (`with_fetch_percent`) loads the page's first word: a read.
        let kind = match access.kind {
            AccessKind::Linear { access: la, .. } if la.is_fetch() => AccessKind::Read,
            k => k,
        };
        match (kind, result) {
            (AccessKind::Write(v), AccessResult::Memory(_)) => {
                self.model.expected[page as usize] = v;
                if let Some(d) = &self.discarded {
                    d.clear(access.gpa);
                }
            }
            (AccessKind::Read, AccessResult::Memory(v)) => {
                let want = self.model.expected[page as usize];
                if self.discarded.as_ref().is_some_and(|d| d.test(access.gpa)) {
                    // The host may have dropped the page: zero, or what we wrote.
                    if v == 0 {
                        self.model.expected[page as usize] = 0;
                    }
                    if v != want && v != 0 && self.verify {
                        self.mismatches += 1;
                        if self.first.is_none() {
                            self.first = Some(format!(
                                "vCPU {} pass {} read {:#x} from discarded {} (page {}), expected 0 or {:#x}",
                                self.vcpu, self.pass, v, access.gpa, page, want
                            ));
                        }
                    }
                    return;
                }
                if self.verify && v != want {
                    self.mismatches += 1;
                    if self.first.is_none() {
                        self.first = Some(format!(
                            "vCPU {} pass {} read {:#x} from {} (page {}), expected {:#x}",
                            self.vcpu, self.pass, v, access.gpa, page, want
                        ));
                    }
                }
            }
            (_, AccessResult::Mmio) => {
                self.mmio += 1;
                if let Some((start, end)) = self.mmio_allowed {
                    if access.gpa < start || access.gpa >= end {
                        self.mismatches += 1;
                        if self.first.is_none() {
                            self.first = Some(format!(
                                "vCPU {} pass {}: MMIO exit at {} (page {}), outside [{start}, {end})",
                                self.vcpu, self.pass, access.gpa, page
                            ));
                        }
                    }
                }
            }
            (
                _,
                AccessResult::Fault | AccessResult::MemoryFault { .. } | AccessResult::PageFault(_),
            ) => self.faults += 1,
            (_, AccessResult::Hypercall(_) | AccessResult::Done)
            | (
                AccessKind::MapGpaRange { .. }
                | AccessKind::Ucall(_)
                | AccessKind::Linear { .. }
                | AccessKind::PteWrite { .. }
                | AccessKind::Paging(_),
                _,
            ) => {}
        }
    }

    fn mismatches(&self) -> u64 {
        self.mismatches
    }

    fn first_mismatch(&self) -> Option<String> {
        self.first.clone()
    }

    fn converted(&mut self, gpa: Gpa, size: u64, _private: bool) {
        // Both sides of a converted range start empty.
        for i in 0..size / PAGE_SIZE {
            if let Some(p) = self.model.page_of(Gpa(gpa.0 + i * PAGE_SIZE)) {
                self.model.expected[p as usize] = 0;
            }
        }
    }
}

/// A fixed list of accesses, run in order; records how each completed and the
/// conversions the VMM made on its exits. For scenarios that script a guest
/// step by step (the selftests' guest code).
#[derive(Debug, Default, Clone)]
pub struct Script {
    accesses: Vec<GuestAccess>,
    next: usize,
    /// How each access completed, in order.
    pub results: Vec<(GuestAccess, AccessResult)>,
    /// Conversions the VMM made while handling this program's memory-fault
    /// exits: gpa, size, to private.
    pub conversions: Vec<(Gpa, u64, bool)>,
}

impl Script {
    /// A script of `accesses`.
    pub fn new(accesses: Vec<GuestAccess>) -> Script {
        Script {
            accesses,
            ..Script::default()
        }
    }
}

impl GuestProgram for Script {
    fn next(&mut self) -> Option<GuestAccess> {
        let a = self.accesses.get(self.next).copied();
        self.next += 1;
        a
    }
    fn complete(&mut self, access: &GuestAccess, result: AccessResult) {
        self.results.push((*access, result));
    }
    fn mismatches(&self) -> u64 {
        0
    }
    fn converted(&mut self, gpa: Gpa, size: u64, private: bool) {
        self.conversions.push((gpa, size, private));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_strided_model_knows_its_pages_and_nothing_between() {
        let m = RefModel::strided(Gpa(1 << 30), 4, 2 << 20);
        assert_eq!(m.gpa(3), Gpa((1 << 30) + 3 * (2 << 20)));
        assert_eq!(m.page_of(m.gpa(2)), Some(2));
        assert_eq!(m.page_of(Gpa(m.gpa(2).0 + 4095)), Some(2));
        assert_eq!(m.page_of(Gpa(m.gpa(2).0 + 4096)), None, "between pages");
        assert_eq!(m.page_of(m.gpa(4)), None, "past the last page");
        assert_eq!(m.page_of(Gpa((1 << 30) - 4096)), None, "below the base");
        let dense = RefModel::new(Gpa(0), 8);
        assert_eq!(dense.page_of(Gpa(7 * 4096 + 8)), Some(7));
    }

    #[test]
    fn test_a_conversion_clears_only_the_strided_pages_it_covers() {
        let mut p = Pass::new(
            0,
            1,
            Pattern::Sequential,
            100,
            true,
            RefModel::strided(Gpa(0), 4, 8192),
            1,
        );
        while let Some(a) = p.next() {
            p.complete(&a, AccessResult::Memory(0));
        }
        // Pages 1 and 2 sit at 8 KiB and 16 KiB.
        p.converted(Gpa(8192), 3 * 4096, true);
        let m = p.into_model();
        assert_ne!(m.expected[0], 0);
        assert_eq!(m.expected[1], 0);
        assert_eq!(m.expected[2], 0);
        assert_ne!(m.expected[3], 0);
    }

    #[test]
    fn test_mmio_outside_the_allowed_window_is_a_mismatch() {
        let mut p = Pass::new(
            0,
            1,
            Pattern::Sequential,
            100,
            true,
            RefModel::new(Gpa(0), 4),
            1,
        )
        .with_mmio_allowed(Gpa(2 * 4096), Gpa(4 * 4096));
        let mut seen = 0;
        while let Some(a) = p.next() {
            p.complete(&a, AccessResult::Mmio);
            seen += 1;
        }
        assert_eq!(seen, 4);
        // Pages 0 and 1 are outside [2, 4).
        assert_eq!(p.mismatches(), 2);
        assert!(p.first_mismatch().unwrap().contains("outside"));
    }
}
