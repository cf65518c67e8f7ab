//! `guest-memfd`: the guest_memfd contract (guest_memfd_test), case by case,
//! on vmmu and — with `--vs-kvm` — on the real `/dev/kvm`, which offers
//! guest_memfd on its default VM type.
//!
//! Every case is one call with the answer the selftest (or KVM's API
//! documentation) requires: `ok` or an errno. vmmu must give it; the real
//! KVM's answer is shown beside it, and the two are compared case by case.
//! A case a side does not model says so instead of passing (none today: the
//! host's mapping of the file and a guest on gmem-only shared memory are
//! modelled). Then the count the design discussion asked for: a punch-hole
//! across two slots bound to one file invalidates once, and only the hole.

use std::collections::BTreeMap;

use vmmu::errno::{EBADF, EEXIST, EFAULT, EINVAL, ENODEV, EOPNOTSUPP};
use vmmu_kvm::gmem::GmemGuestReport;

use vmmu::gmem::{
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
};
use vmmu::{ErrorCode, Gpa, GuestMemfd, Hva, UserMemoryRegion, VmType, MEMORY_ATTRIBUTE_PRIVATE};
use vmmu_machine::{Backing, Machine, MachineConfig};

use crate::args::{Common, Shape};
use crate::report::Report;

const PAGE: u64 = 4096;
const HVA: u64 = 0x100_0000_0000;
const GMEM: u32 = 1 << 2;
const READONLY: u32 = 1 << 1;
const LOG_DIRTY: u32 = 1 << 0;
const PUNCH: u32 = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;

/// Check the flags.
pub fn validate(common: &Common) -> anyhow::Result<Shape> {
    Ok(common.shape(1, 16 << 20, 1, Backing::Anonymous)?)
}

/// What a call answered: `Ok`, an errno, or "not modelled".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Success.
    Ok,
    /// Failure with this errno.
    Err(i32),
    /// The side does not model this call.
    NotModelled,
}

impl Answer {
    fn of<T>(r: Result<T, i32>) -> Answer {
        match r {
            Ok(_) => Answer::Ok,
            Err(e) => Answer::Err(e),
        }
    }
    fn show(self) -> String {
        match self {
            Answer::Ok => "ok".into(),
            Answer::Err(e) => errno_name(e),
            Answer::NotModelled => "not modelled".into(),
        }
    }
}

fn errno_name(e: i32) -> String {
    match e {
        vmmu::errno::ENOENT => "ENOENT".into(),
        EBADF => "EBADF".into(),
        vmmu::errno::ENOMEM => "ENOMEM".into(),
        vmmu::errno::EFAULT => "EFAULT".into(),
        EEXIST => "EEXIST".into(),
        ENODEV => "ENODEV".into(),
        EINVAL => "EINVAL".into(),
        vmmu::errno::ENOSPC => "ENOSPC".into(),
        EOPNOTSUPP => "EOPNOTSUPP".into(),
        vmmu::errno::EFBIG => "EFBIG".into(),
        e => format!("errno {e}"),
    }
}

/// The calls of the contract, on one side.
pub trait GmemSide {
    /// The side's file type.
    type File;
    /// `KVM_CREATE_GUEST_MEMFD`.
    fn create(&mut self, size: u64, flags: u64) -> Result<Self::File, i32>;
    /// `fallocate`.
    fn fallocate(&mut self, f: &Self::File, mode: u32, offset: u64, len: u64) -> Result<(), i32>;
    /// `KVM_SET_USER_MEMORY_REGION2` (`file` `None`: an invalid descriptor).
    fn bind(
        &mut self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        file: Option<&Self::File>,
        offset: u64,
    ) -> Result<(), i32>;
    /// `KVM_SET_USER_MEMORY_REGION`.
    fn set_region(&mut self, slot: u32, flags: u32, gpa: u64, size: u64) -> Result<(), i32>;
    /// `mmap` of two pages of the file (`shared`: `MAP_SHARED`, else
    /// `MAP_PRIVATE`) and, with `touch`, a host access at that offset (a
    /// SIGBUS is EFAULT) (`None`: not modelled).
    fn mmap_touch(
        &mut self,
        f: &Self::File,
        shared: bool,
        touch: Option<u64>,
    ) -> Option<Result<(), i32>>;
    /// Write the first word through a shared mapping, punch the page, read it
    /// again: (before, after) (`None`: not modelled).
    fn mmap_punch(&mut self, f: &Self::File) -> Option<Result<(u64, u64), i32>>;
    /// A guest on a slot of `MMAP | INIT_SHARED` memory (the selftest's
    /// `test_guest_memfd_guest`, with the loop guest): see
    /// [`vmmu_kvm::gmem::guest_on_gmem`].
    fn guest(&mut self) -> Option<Result<GmemGuestReport, String>>;
}

/// The guest case passes when every check of its report holds.
fn guest_answer(r: Option<Result<GmemGuestReport, String>>) -> (Answer, Option<String>) {
    match r {
        None => (Answer::NotModelled, None),
        Some(Err(e)) => (Answer::Err(-1), Some(e)),
        Some(Ok(g)) => {
            let ok = g.pass1_verified == g.pages
                && g.zero_after_punch == g.punched_pages
                && g.kept_after_punch == g.pages - g.punched_pages
                && g.pass2_verified == g.pages;
            let what = format!(
                "{} pages ({} written by the host first): pass 1 {} verified; punched {}, {} read zero, {} kept; pass 2 {} verified",
                g.pages, g.host_written_pages, g.pass1_verified, g.punched_pages,
                g.zero_after_punch, g.kept_after_punch, g.pass2_verified
            );
            (if ok { Answer::Ok } else { Answer::Err(-1) }, Some(what))
        }
    }
}

/// One case: its name, what it must answer, what the side answered.
pub type CaseResult = (&'static str, Answer, Answer);

/// Run every case on `g`; with them, what the guest case saw.
pub fn cases<G: GmemSide>(g: &mut G) -> (Vec<CaseResult>, Option<String>) {
    let mut out: Vec<CaseResult> = Vec::new();
    let mut case = |name, want, got| out.push((name, want, got));
    let ok = Answer::Ok;
    let e = Answer::Err;

    // Creation: sizes and flags.
    case("create: size 0", e(EINVAL), Answer::of(g.create(0, 0)));
    case(
        "create: size 4095",
        e(EINVAL),
        Answer::of(g.create(4095, 0)),
    );
    case("create: size 4096", ok, Answer::of(g.create(PAGE, 0)));
    case(
        "create: unknown flag bit 5",
        e(EINVAL),
        Answer::of(g.create(PAGE, 1 << 5)),
    );
    case(
        "create: MMAP",
        ok,
        Answer::of(g.create(PAGE, GUEST_MEMFD_FLAG_MMAP)),
    );
    case(
        "create: MMAP | INIT_SHARED",
        ok,
        Answer::of(g.create(PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)),
    );
    case(
        "create: INIT_SHARED without MMAP",
        ok,
        Answer::of(g.create(PAGE, GUEST_MEMFD_FLAG_INIT_SHARED)),
    );

    // fallocate: modes and bounds (the selftest's test_fallocate and
    // test_invalid_punch_hole) on a 4-page file.
    let total = 4 * PAGE;
    if let Ok(f) = g.create(total, 0) {
        let mut fa = |name, want, mode: u32, off: u64, len: u64| {
            let got = Answer::of(g.fallocate(&f, mode, off, len));
            case(name, want, got);
        };
        fa(
            "fallocate: allocate page 0",
            ok,
            FALLOC_FL_KEEP_SIZE,
            0,
            PAGE,
        );
        fa(
            "fallocate: allocate at an unaligned offset",
            e(EINVAL),
            FALLOC_FL_KEEP_SIZE,
            PAGE - 1,
            PAGE,
        );
        fa(
            "fallocate: allocate at EOF",
            e(EINVAL),
            FALLOC_FL_KEEP_SIZE,
            total,
            PAGE,
        );
        fa(
            "fallocate: allocate past EOF",
            e(EINVAL),
            FALLOC_FL_KEEP_SIZE,
            total + PAGE,
            PAGE,
        );
        fa("fallocate: punch at EOF", ok, PUNCH, total, PAGE);
        fa("fallocate: punch past EOF", ok, PUNCH, total + PAGE, PAGE);
        fa(
            "fallocate: punch an unaligned length",
            e(EINVAL),
            PUNCH,
            PAGE,
            PAGE - 1,
        );
        fa("fallocate: punch page 1", ok, PUNCH, PAGE, PAGE);
        fa(
            "fallocate: allocate page 1 again",
            ok,
            FALLOC_FL_KEEP_SIZE,
            PAGE,
            PAGE,
        );
        fa(
            "fallocate: mode 0 (no KEEP_SIZE)",
            e(EOPNOTSUPP),
            0,
            0,
            PAGE,
        );
        fa(
            "fallocate: PUNCH_HOLE without KEEP_SIZE",
            e(EOPNOTSUPP),
            FALLOC_FL_PUNCH_HOLE,
            0,
            PAGE,
        );
        for (name, off, len) in [
            ("punch: offset 0, length 1", 0, 1),
            ("punch: offset 0, length 4095", 0, PAGE - 1),
            ("punch: offset 0, length 4097", 0, PAGE + 1),
            ("punch: offset 1, length 1", 1, 1),
            ("punch: offset 1, length 4095", 1, PAGE - 1),
            ("punch: offset 1, length 4096", 1, PAGE),
            ("punch: offset 1, length 4097", 1, PAGE + 1),
            ("punch: offset 4096, length 1", PAGE, 1),
            ("punch: offset 4096, length 4095", PAGE, PAGE - 1),
            ("punch: offset 4096, length 4097", PAGE, PAGE + 1),
        ] {
            fa(name, e(EINVAL), PUNCH, off, len);
        }
    }

    // Binding through KVM_SET_USER_MEMORY_REGION2.
    let two_m = 2 << 20;
    if let Ok(f) = g.create(2 * two_m, 0) {
        let (g1, g2) = (1u64 << 30, 2u64 << 30);
        case(
            "bind: unaligned offset",
            e(EINVAL),
            Answer::of(g.bind(1, GMEM, g1, two_m, Some(&f), 1)),
        );
        case(
            "bind: offset + size beyond the file",
            e(EINVAL),
            Answer::of(g.bind(1, GMEM, g1, two_m, Some(&f), 3 * two_m)),
        );
        case(
            "bind: GUEST_MEMFD with an invalid descriptor",
            e(EBADF),
            Answer::of(g.bind(1, GMEM, g1, two_m, None, 0)),
        );
        case(
            "bind: GUEST_MEMFD through the old call",
            e(EINVAL),
            Answer::of(g.set_region(1, GMEM, g1, two_m)),
        );
        case(
            "bind: READONLY | GUEST_MEMFD",
            e(EINVAL),
            Answer::of(g.bind(1, GMEM | READONLY, g1, two_m, Some(&f), 0)),
        );
        case(
            "bind: file pages 0..512 to slot 1",
            ok,
            Answer::of(g.bind(1, GMEM, g1, two_m, Some(&f), 0)),
        );
        case(
            "bind: the same file pages to slot 2",
            e(EINVAL),
            Answer::of(g.bind(2, GMEM, g2, two_m, Some(&f), 0)),
        );
        case(
            "bind: file pages 512..1024 to slot 2",
            ok,
            Answer::of(g.bind(2, GMEM, g2, two_m, Some(&f), two_m)),
        );
        case(
            "bind: move slot 1",
            e(EINVAL),
            Answer::of(g.bind(1, GMEM, 3u64 << 30, two_m, Some(&f), 0)),
        );
        case(
            "bind: turn on dirty logging on slot 1",
            e(EINVAL),
            Answer::of(g.bind(1, GMEM | LOG_DIRTY, g1, two_m, Some(&f), 0)),
        );
        case(
            "bind: delete slot 1",
            ok,
            Answer::of(g.set_region(1, 0, g1, 0)),
        );
        case(
            "bind: bind pages 0..512 again",
            ok,
            Answer::of(g.bind(1, GMEM, g1, two_m, Some(&f), 0)),
        );
        let _ = g.set_region(1, 0, g1, 0);
        let _ = g.set_region(2, 0, g2, 0);
    }

    // A host mapping of the file (6.18): the selftest's test_mmap_supported,
    // test_mmap_cow, test_fault_overflow, test_fault_private and
    // test_mmap_not_supported; a SIGBUS shows as EFAULT.
    let shared = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let mt = |g: &mut G, flags, map_shared, touch| match g.create(PAGE, flags) {
        Ok(f) => g
            .mmap_touch(&f, map_shared, touch)
            .map_or(Answer::NotModelled, Answer::of),
        Err(e) => Answer::Err(e),
    };
    let got = mt(g, 0, true, None);
    case("mmap: a file without MMAP", e(ENODEV), got);
    let got = mt(g, shared, false, None);
    case("mmap: MAP_PRIVATE of an MMAP file", e(EINVAL), got);
    let got = mt(g, shared, true, Some(0));
    case("mmap: touch page 0 of MMAP | INIT_SHARED", ok, got);
    let got = mt(g, shared, true, Some(PAGE));
    case("mmap: touch past the end (SIGBUS)", e(EFAULT), got);
    let got = mt(g, GUEST_MEMFD_FLAG_MMAP, true, Some(0));
    case(
        "mmap: touch MMAP without INIT_SHARED (SIGBUS)",
        e(EFAULT),
        got,
    );
    if let Ok(f) = g.create(PAGE, shared) {
        let got = g
            .mmap_touch(&f, true, None)
            .map_or(Answer::NotModelled, Answer::of);
        case("mmap: an MMAP | INIT_SHARED file", ok, got);
        let got = match g.mmap_punch(&f) {
            None => Answer::NotModelled,
            Some(Ok((before, after))) if before == 0xaa55 && after == 0 => Answer::Ok,
            Some(Ok(_)) => Answer::Err(-1),
            Some(Err(e)) => Answer::Err(e),
        };
        case("mmap: a punch-hole zeroes the mapped page", ok, got);
    }
    let (got, seen) = guest_answer(g.guest());
    case("guest: runs on gmem-only shared memory", ok, got);
    (out, seen)
}

/// vmmu's side: the core's calls on the machine's VM (default type, as the
/// real KVM here offers guest_memfd).
struct VmmuSide {
    m: Machine,
}

impl GmemSide for VmmuSide {
    type File = GuestMemfd;
    fn create(&mut self, size: u64, flags: u64) -> Result<GuestMemfd, i32> {
        self.m
            .vm
            .create_guest_memfd(size, flags)
            .map_err(|e| e.errno())
    }
    fn fallocate(&mut self, f: &GuestMemfd, mode: u32, offset: u64, len: u64) -> Result<(), i32> {
        f.fallocate(mode, offset, len).map_err(|e| e.errno())
    }
    fn bind(
        &mut self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        file: Option<&GuestMemfd>,
        offset: u64,
    ) -> Result<(), i32> {
        self.m
            .vm
            .set_user_memory_region2(region(slot, flags, gpa, size), file, offset)
            .map_err(|e| e.errno())
    }
    fn set_region(&mut self, slot: u32, flags: u32, gpa: u64, size: u64) -> Result<(), i32> {
        self.m
            .vm
            .set_user_memory_region(region(slot, flags, gpa, size))
            .map_err(|e| e.errno())
    }
    fn mmap_touch(
        &mut self,
        f: &GuestMemfd,
        shared: bool,
        touch: Option<u64>,
    ) -> Option<Result<(), i32>> {
        let r = f.mmap(shared).and_then(|()| match touch {
            Some(off) => f.mmap_fault(off).map(|_| ()),
            None => Ok(()),
        });
        Some(r.map_err(|e| e.errno()))
    }
    fn mmap_punch(&mut self, f: &GuestMemfd) -> Option<Result<(u64, u64), i32>> {
        let vmm = &self.m.vmm;
        let r = (|| {
            f.mmap(true)?;
            vmm.mmap_write_u64(f, 0, 0xaa55)?;
            let before = vmm.mmap_read_u64(f, 0)?;
            f.fallocate(PUNCH, 0, PAGE)?;
            Ok((before, vmm.mmap_read_u64(f, 0)?))
        })();
        Some(r.map_err(|e: vmmu::GmemError| e.errno()))
    }
    fn guest(&mut self) -> Option<Result<GmemGuestReport, String>> {
        Some(vmmu_guest_on_gmem(GUEST_BYTES).map_err(|e| format!("{e:#}")))
    }
}

/// The guest case's slot: 4 MiB.
const GUEST_BYTES: u64 = 4 << 20;

/// vmmu's run of the guest case, step for step as
/// [`vmmu_kvm::gmem::guest_on_gmem`] does it on the real KVM: a default VM,
/// one vCPU, a slot bound to an `MMAP | INIT_SHARED` file (nothing is mapped
/// at its host address); the host writes the first half through its mapping,
/// the guest writes `gpa + 1` to every page, the host reads them back; a
/// punch of the first quarter reads zero there and keeps the rest; the guest
/// writes `gpa + 2` to every page (faulting the punched ones anew).
fn vmmu_guest_on_gmem(bytes: u64) -> anyhow::Result<GmemGuestReport> {
    use vmmu_machine::guest::{AccessKind, GuestAccess, Script};
    let gpa0 = vmmu_kvm::guest::MEASURED_GPA;
    let mut m = Machine::new(
        MachineConfig {
            memory_bytes: 1 << 30,
            ..MachineConfig::default()
        },
        1,
    )?;
    let file = m.vmm.create_gmem_slot_with(
        region(1, 0, gpa0, bytes),
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )?;
    let pages = bytes / PAGE;
    let host_written_pages = pages / 2;
    for i in 0..host_written_pages {
        m.vmm.mmap_write_u64(&file, i * PAGE, 0x5a5a_0000 + i)?;
    }
    let pass = |m: &mut Machine, n: u64| {
        let script = (0..pages)
            .map(|i| GuestAccess {
                gpa: Gpa(gpa0 + i * PAGE),
                kind: AccessKind::Write(gpa0 + i * PAGE + n),
                private: false,
            })
            .collect();
        m.run(vec![Script::new(script)], &Default::default(), |_| {});
    };
    let check = |m: &Machine, n: u64, range: std::ops::Range<u64>| {
        range
            .filter(|i| m.vmm.mmap_read_u64(&file, i * PAGE) == Ok(gpa0 + i * PAGE + n))
            .count() as u64
    };
    pass(&mut m, 1);
    let pass1_verified = check(&m, 1, 0..pages);
    let punched_pages = pages / 4;
    m.vmm.punch_hole(gpa0, punched_pages * PAGE)?;
    let zero_after_punch = (0..punched_pages)
        .filter(|i| m.vmm.mmap_read_u64(&file, i * PAGE) == Ok(0))
        .count() as u64;
    let kept_after_punch = check(&m, 1, punched_pages..pages);
    pass(&mut m, 2);
    let pass2_verified = check(&m, 2, 0..pages);
    let violations = m.oracle.total();
    drop(file);
    let t = m.teardown();
    anyhow::ensure!(
        violations == 0,
        "the oracle found {violations} violation(s)"
    );
    anyhow::ensure!(
        t.leaked_data_pages + t.double_frees == 0,
        "teardown: {} leaked pages, {} double frees",
        t.leaked_data_pages,
        t.double_frees
    );
    Ok(GmemGuestReport {
        pages,
        host_written_pages,
        pass1_verified,
        punched_pages,
        zero_after_punch,
        kept_after_punch,
        pass2_verified,
    })
}

fn region(slot: u32, flags: u32, gpa: u64, size: u64) -> UserMemoryRegion {
    UserMemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: HVA,
    }
}

/// The real KVM's side.
struct KvmSide(vmmu_kvm::gmem::GmemVm);

impl GmemSide for KvmSide {
    type File = vmmu_kvm::gmem::KvmGmem;
    fn create(&mut self, size: u64, flags: u64) -> Result<Self::File, i32> {
        self.0.create(size, flags)
    }
    fn fallocate(&mut self, f: &Self::File, mode: u32, offset: u64, len: u64) -> Result<(), i32> {
        self.0.fallocate(f, mode as i32, offset, len)
    }
    fn bind(
        &mut self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        file: Option<&Self::File>,
        offset: u64,
    ) -> Result<(), i32> {
        self.0.bind(slot, flags, gpa, size, file, offset)
    }
    fn set_region(&mut self, slot: u32, flags: u32, gpa: u64, size: u64) -> Result<(), i32> {
        self.0.set_region(slot, flags, gpa, size)
    }
    fn mmap_touch(
        &mut self,
        f: &Self::File,
        shared: bool,
        touch: Option<u64>,
    ) -> Option<Result<(), i32>> {
        Some(self.0.mmap_touch(f, shared, touch))
    }
    fn mmap_punch(&mut self, f: &Self::File) -> Option<Result<(u64, u64), i32>> {
        Some(self.0.mmap_punch_roundtrip(f, 0xaa55))
    }
    fn guest(&mut self) -> Option<Result<GmemGuestReport, String>> {
        Some(vmmu_kvm::gmem::guest_on_gmem(GUEST_BYTES).map_err(|e| e.to_string()))
    }
}

/// The invalidation count: a software-protected VM, one 4 MiB guest_memfd
/// bound to two slots (file halves at two gpas), every page faulted private;
/// a punch-hole over 1 MiB of each half must invalidate once and zap exactly
/// the hole's leaves; a punch in no bound range invalidates nothing.
fn punch_counts(common: &Common) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let m = Machine::new(
        MachineConfig {
            memory_bytes: 1 << 30,
            vm: vmmu::VmConfig {
                vm_type: VmType::SwProtected,
                ..super::vm_config(common)
            },
            oracle: !common.no_oracle,
            poison: true,
            dirty_ring: 0,
        },
        1,
    )?;
    let mut m = m;
    m.map(Hva(HVA), 4 << 20, Backing::Anonymous)?;
    let half = 2u64 << 20;
    let file = std::sync::Arc::new(m.vm.create_guest_memfd(2 * half, 0)?);
    let (g1, g2) = (1u64 << 30, 2u64 << 30);
    m.vmm
        .bind_gmem_slot(region(1, 0, g1, half), file.clone(), 0)?;
    m.vmm.bind_gmem_slot(
        UserMemoryRegion {
            userspace_addr: HVA + half,
            ..region(2, 0, g2, half)
        },
        file.clone(),
        half,
    )?;
    for g in [g1, g2] {
        m.vm.set_memory_attributes(g, half, MEMORY_ATTRIBUTE_PRIVATE, 0)?;
    }
    let vcpu = &mut m.vcpus()[0].mmu;
    vcpu.prepare_entry()?;
    for g in [g1, g2] {
        for p in 0..half / PAGE {
            vcpu.page_fault(Gpa(g + p * PAGE), ErrorCode::WRITE)?;
        }
    }
    let before = m.vm.stats();
    // 1 MiB at the end of the first half and 1 MiB at the start of the second.
    file.fallocate(PUNCH, half - (1 << 20), 2 << 20)?;
    let mid = m.vm.stats();
    // The same hole again: still bound (one invalidation), nothing mapped.
    file.fallocate(PUNCH, half - (1 << 20), 2 << 20)?;
    let after = m.vm.stats();
    let mut out = BTreeMap::new();
    out.insert("pages_mapped_before", before.present(vmmu::Level::K4));
    out.insert(
        "punch_invalidations",
        mid.gmem_invalidations - before.gmem_invalidations,
    );
    out.insert(
        "punch_leaves_zapped",
        mid.leaves_zapped - before.leaves_zapped,
    );
    out.insert("hole_pages", (2 << 20) / PAGE);
    out.insert("pages_mapped_after", mid.present(vmmu::Level::K4));
    out.insert(
        "repunch_invalidations",
        after.gmem_invalidations - mid.gmem_invalidations,
    );
    out.insert(
        "repunch_leaves_zapped",
        after.leaves_zapped - mid.leaves_zapped,
    );
    drop(file);
    let oracle = m.oracle.clone();
    m.vmm.clear();
    let t = m.teardown();
    out.insert(
        "leaked_pages",
        t.leaked_data_pages + t.leaked_table_pages + t.double_frees,
    );
    out.insert("violations", oracle.total());
    Ok(out)
}

/// Run it.
/// vmmu's answer to every case, as shown (for `vmmu diff`).
pub(crate) fn vmmu_answers() -> anyhow::Result<Vec<(&'static str, String)>> {
    let cfg = MachineConfig {
        memory_bytes: 1 << 30,
        vm: vmmu::VmConfig::default(),
        oracle: true,
        poison: true,
        dirty_ring: 0,
    };
    let m = Machine::new(cfg, 1)?;
    m.map(Hva(HVA), 16 << 20, Backing::Anonymous)?;
    let mut side = VmmuSide { m };
    let (ours, _) = cases(&mut side);
    Ok(ours.iter().map(|(n, _, got)| (*n, got.show())).collect())
}

/// The real KVM's answer to every case, as shown (for `vmmu diff`).
pub(crate) fn kvm_answers() -> Result<Vec<(&'static str, String)>, String> {
    let kvm = vmmu_kvm::gmem::GmemVm::new().map_err(|e| e.to_string())?;
    let have = kvm.caps().guest_memfd;
    if have <= 0 {
        return Err(format!(
            "this KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is {have})"
        ));
    }
    let mut k = KvmSide(kvm);
    let (theirs, _) = cases(&mut k);
    Ok(theirs.iter().map(|(n, _, got)| (*n, got.show())).collect())
}

pub fn run(common: &Common, vs_kvm: bool) -> anyhow::Result<i32> {
    let shape = validate(common)?;
    let cfg = MachineConfig {
        memory_bytes: 1 << 30,
        vm: super::vm_config(common),
        oracle: !common.no_oracle,
        poison: true,
        dirty_ring: 0,
    };
    let m = Machine::new(cfg, 1)?;
    m.map(Hva(HVA), 16 << 20, Backing::Anonymous)?;
    let mut side = VmmuSide { m };
    let (ours, our_guest) = cases(&mut side);
    let theirs = if vs_kvm {
        let kvm = vmmu_kvm::gmem::GmemVm::new().map_err(|e| anyhow::anyhow!("--vs-kvm: {e}"))?;
        let caps = kvm.caps();
        if caps.guest_memfd <= 0 {
            // Every case would fail at its first create: nothing to compare.
            anyhow::bail!(
                "--vs-kvm: this KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is {}); run without --vs-kvm",
                caps.guest_memfd
            );
        }
        let mut k = KvmSide(kvm);
        let (t, guest) = cases(&mut k);
        Some((caps, t, guest))
    } else {
        None
    };
    let mut r = Report::new("guest-memfd", &shape);
    let (mut failed, mut parity, mut compared, mut not_modelled) = (0u64, 0u64, 0u64, 0u64);
    let mut table = Vec::new();
    for (name, want, got) in ours.iter() {
        // By name: a side whose setup step failed skips the cases built on it.
        let kvm = theirs
            .as_ref()
            .and_then(|(_, t, _)| t.iter().find(|c| c.0 == *name).map(|c| c.2));
        let pass = got == want;
        if *got == Answer::NotModelled {
            not_modelled += 1;
        } else if !pass {
            failed += 1;
        }
        if let Some(k) = kvm {
            if *got != Answer::NotModelled {
                compared += 1;
                parity += u64::from(k == *got);
            }
        }
        table.push(serde_json::json!({
            "case": name, "expected": want.show(), "vmmu": got.show(),
            "kvm": kvm.map(|k| k.show()),
        }));
        r.line(format!(
            "{:<48} expected {:<11} vmmu {:<13}{}{}",
            name,
            want.show(),
            got.show(),
            kvm.map(|k| format!(" kvm {:<13}", k.show()))
                .unwrap_or_default(),
            if *got == Answer::NotModelled {
                " (not modelled)"
            } else if !pass {
                " FAIL"
            } else if kvm.is_some_and(|k| k != *got) {
                " (KVM differs)"
            } else {
                ""
            }
        ));
    }
    r.put("cases", ours.len() as u64);
    r.put("cases_failed", failed);
    r.put("cases_not_modelled", not_modelled);
    r.put("case_table", serde_json::Value::Array(table));
    if let Some(g) = &our_guest {
        r.line(format!("guest on gmem-only shared memory, vmmu: {g}"));
    }
    if let Some(g) = theirs.as_ref().and_then(|t| t.2.as_ref()) {
        r.line(format!("guest on gmem-only shared memory, kvm:  {g}"));
    }
    if let Some((caps, _, _)) = &theirs {
        r.put("kvm_cases_compared", compared);
        r.put("kvm_cases_same", parity);
        r.put(
            "kvm_caps",
            serde_json::json!({
                "guest_memfd": caps.guest_memfd, "user_memory2": caps.user_memory2,
                "guest_memfd_flags": caps.guest_memfd_flags,
                "memory_attributes": caps.memory_attributes, "pre_fault_memory": caps.pre_fault_memory,
            }),
        );
        r.line(format!(
            "side by side with /dev/kvm: {parity} of {compared} comparable cases answer the same; KVM reports guest_memfd {}, user_memory2 {}, guest_memfd flags {:#x}, memory attributes {:#x}, pre-fault {}",
            caps.guest_memfd, caps.user_memory2, caps.guest_memfd_flags, caps.memory_attributes, caps.pre_fault_memory
        ));
    }
    let counts = punch_counts(common)?;
    for (k, v) in &counts {
        r.put(k, *v);
    }
    let punch_ok = counts["punch_invalidations"] == 1
        && counts["punch_leaves_zapped"] == counts["hole_pages"]
        && counts["repunch_invalidations"] == 1
        && counts["repunch_leaves_zapped"] == 0
        && counts["leaked_pages"] == 0
        && counts["violations"] == 0;
    r.line(format!(
        "punch-hole over two slots of one file: {} invalidation(s), {} leaves zapped for a {}-page hole ({} of {} pages still mapped); again over the same hole: {} invalidation(s), {} leaves{}",
        counts["punch_invalidations"],
        counts["punch_leaves_zapped"],
        counts["hole_pages"],
        counts["pages_mapped_after"],
        counts["pages_mapped_before"],
        counts["repunch_invalidations"],
        counts["repunch_leaves_zapped"],
        if punch_ok { "" } else { " FAIL" }
    ));
    let env = super::Env::new(side.m, shape, common, None);
    let code = env.finish(r)?;
    Ok(if failed > 0 || !punch_ok { 1 } else { code })
}
