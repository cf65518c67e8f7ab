//! The public API of [`Vm`] and [`VcpuMmu`] driven by arbitrary operations.
//!
//! Every call a hypervisor can make is here, with arguments drawn both from
//! plausible values (so runs reach deep states: mapped pages, huge pages,
//! invalidations in progress, roots in the cache) and from raw 64-bit ones (so
//! every validation path is hit). After each operation the harness checks:
//! - nothing panicked (the fuzzer itself catches panics);
//! - a call that returned an error changed nothing: the memslots, their
//!   generations, every mapping, the roots and the invalidation count are
//!   exactly what they were before it;
//! - with no invalidation in progress, every present leaf agrees with the host:
//!   it lies in a memslot, maps the frame the host maps at the slot's address
//!   (or, for a private gfn or a gmem-only slot, the page its guest_memfd
//!   holds), and is writable only where the host and the slot allow writes;
//! - after a dirty-log harvest (get without manual protection, or clear), no
//!   page it took is writable in any mapping;
//! - the MMU counted no internal invariant violation;
//! - at the end, dropping everything frees every table page and releases every
//!   frame reference (the tracking host panics on a double free).
//!
//! The host behaves like a correct host: it changes a mapping only between an
//! invalidation's start and end. Everything runs on one thread, so two things a
//! real VMM does on other threads are arranged around: vCPUs never stay in
//! guest mode across operations (a requester that waits for a vCPU to leave
//! guest mode would wait for itself), and a memslot update first ends the open
//! invalidations (it waits for them to end, as KVM's does, and the host thread
//! that would end them is this one).

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, Gfn, GfnRange, Gpa, Hva, HvaRange, Invalidation, Level, RootFilter, RootInfo,
    UserMemoryRegion, VcpuMmu, Vm, VmConfig,
};

/// Guest physical base of the "plausible" addresses.
const BASE_GPA: u64 = 1 << 30;
/// Host virtual base of the "plausible" addresses.
const BASE_HVA: u64 = 64 << 30;
/// At most this many operations per input.
const MAX_OPS: usize = 96;
/// At most this many vCPUs at once.
const MAX_VCPUS: usize = 4;
/// At most this many guest_memfd files at once.
const MAX_FILES: usize = 3;

/// An address: near the bases (plausible) or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// 4 KiB page `n % 1024` above the base (the first half is the initial
    /// memslot).
    Page(u16),
    /// 2 MiB page `n` above the base.
    Huge(u8),
    /// Any value.
    Raw(u64),
}

impl Addr {
    fn at(self, base: u64) -> u64 {
        match self {
            Addr::Page(n) => base + (n as u64 % 1024) * 4096,
            Addr::Huge(n) => base + n as u64 * (2 << 20),
            Addr::Raw(v) => v,
        }
    }
    fn gpa(self) -> u64 {
        self.at(BASE_GPA)
    }
    fn hva(self) -> u64 {
        self.at(BASE_HVA)
    }
    fn gfn(self) -> Gfn {
        Gpa(self.gpa()).gfn()
    }
}

/// A size: pages, huge pages, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Size {
    /// `n` 4 KiB pages.
    Pages(u8),
    /// `n` 2 MiB pages.
    Huge(u8),
    /// Any value.
    Raw(u64),
}

impl Size {
    fn bytes(self) -> u64 {
        match self {
            Size::Pages(n) => n as u64 * 4096,
            Size::Huge(n) => n as u64 * (2 << 20),
            Size::Raw(v) => v,
        }
    }
}

/// A slot number: a small id in a small address space, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum SlotNo {
    /// Address space `as_id % 3`, slot `id % 8`.
    Small {
        /// Address space (2 is beyond every VM).
        as_id: u8,
        /// Slot id.
        id: u8,
    },
    /// Any value.
    Raw(u32),
}

impl SlotNo {
    fn raw(self) -> u32 {
        match self {
            SlotNo::Small { as_id, id } => ((as_id as u32 % 3) << 16) | (id as u32 % 8),
            SlotNo::Raw(v) => v,
        }
    }
}

/// One call.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// `KVM_SET_USER_MEMORY_REGION`.
    Region {
        /// Slot number.
        slot: SlotNo,
        /// Flags: the low bits (log dirty, read-only, guest_memfd) or raw.
        flags: Result<u8, u32>,
        /// Guest address.
        gpa: Addr,
        /// Size.
        size: Size,
        /// Host address.
        hva: Addr,
    },
    /// A fault on vCPU `vcpu` (after its entry).
    Fault {
        /// vCPU index.
        vcpu: u8,
        /// Address.
        gpa: Addr,
        /// Error code: the x86 bits (present, write, user, rsvd, fetch) plus
        /// private, or any raw value.
        ec: Result<u8, u64>,
    },
    /// Shadow paging: the guest's paging state (CR0.PG/WP, CR4.SMEP/SMAP/
    /// PCIDE, EFER.NX from the bits) and CR3 (refused above the physical
    /// width); on a TDP VM only recorded.
    GuestPaging {
        /// vCPU index.
        vcpu: u8,
        /// Bit 0 paging, 1 WP, 2 SMEP, 3 SMAP, 4 NX, 5 PCIDE.
        bits: u8,
        /// CR3 (guest tables at a page, or anything).
        cr3: Addr,
    },
    /// Shadow paging: a #PF at a linear address (after entry); refused on a
    /// TDP VM.
    GvaFault {
        /// vCPU index.
        vcpu: u8,
        /// Linear address.
        gva: u64,
        /// Error code bits (present, write, user, rsvd, fetch).
        ec: u8,
        /// EFLAGS.AC.
        ac: bool,
    },
    /// Shadow paging: an emulated guest store (any address, aligned or not).
    EmulateWrite {
        /// vCPU index.
        vcpu: u8,
        /// Where.
        gpa: Addr,
        /// What.
        value: u64,
    },
    /// Shadow paging: INVLPG.
    Invlpg {
        /// vCPU index.
        vcpu: u8,
        /// Linear address.
        gva: u64,
    },
    /// Shadow paging: INVPCID (0: one address, 1: a context, else all).
    Invpcid {
        /// vCPU index.
        vcpu: u8,
        /// The type.
        kind: u8,
        /// The PCID (12 bits are used).
        pcid: u16,
        /// Linear address.
        gva: u64,
    },
    /// `KVM_SET_NR_MMU_PAGES` (any value: below 64 must be refused).
    SetNrMmuPages {
        /// The limit.
        pages: u16,
    },
    /// Enter and leave guest mode.
    EnterExit {
        /// vCPU index.
        vcpu: u8,
    },
    /// The processor writes through vCPU `vcpu`'s mapping of `gpa` in guest
    /// mode: Dirty set if the leaf is writable (else a write fault first),
    /// the write logged with PML (a full log exits), then the vCPU leaves
    /// guest mode (which drains the log).
    ProcessorWrite {
        /// vCPU index.
        vcpu: u8,
        /// Address.
        gpa: Addr,
        /// Writes to that page and the ones after it.
        pages: u8,
    },
    /// Enter or leave SMM.
    Smm {
        /// vCPU index.
        vcpu: u8,
        /// SMM on.
        on: bool,
    },
    /// Create a vCPU.
    CreateVcpu {
        /// Its id (any value).
        id: u32,
    },
    /// Destroy a vCPU.
    DropVcpu {
        /// vCPU index.
        vcpu: u8,
    },
    /// `invalidate_range_start`, left open.
    InvalidateStart {
        /// Start.
        start: Addr,
        /// Length (may wrap or invert the range).
        len: Size,
    },
    /// End the most recent open invalidation.
    InvalidateEnd,
    /// The host moves a page to a new frame (inside an invalidation).
    HostRemap {
        /// Host address.
        hva: Addr,
    },
    /// The host changes a page's protection (inside an invalidation).
    HostProtect {
        /// Host address.
        hva: Addr,
        /// Writable afterwards.
        writable: bool,
    },
    /// The host unmaps a page (inside an invalidation).
    HostUnmap {
        /// Host address.
        hva: Addr,
    },
    /// Size of host pages populated from now on.
    HostHuge {
        /// 2 MiB pages (else 4 KiB).
        huge: bool,
    },
    /// Invalidate and zap roots.
    InvalidateRoots {
        /// One address space (any value), or all.
        as_id: Option<u16>,
    },
    /// Zap a gfn range.
    Zap {
        /// Address space (any value).
        as_id: u16,
        /// Start.
        start: Addr,
        /// End.
        end: Addr,
    },
    /// Write-protect a gfn range.
    WriteProtect {
        /// Address space (any value).
        as_id: u16,
        /// Start.
        start: Addr,
        /// End.
        end: Addr,
    },
    /// Harvest Dirty bits of a gfn range.
    ClearDirty {
        /// Address space (any value).
        as_id: u16,
        /// Start.
        start: Addr,
        /// End.
        end: Addr,
    },
    /// `KVM_SET_MEMORY_ATTRIBUTES`.
    Attributes {
        /// Start.
        address: Addr,
        /// Size.
        size: Size,
        /// Private (else shared), or any raw attribute bits.
        attributes: Result<bool, u64>,
        /// Flags (anything but 0 is refused).
        flags: u8,
    },
    /// `KVM_PRE_FAULT_MEMORY` on vCPU `vcpu` (only while no invalidation is
    /// open: a step covered by one retries until a signal, as on KVM).
    PreFault {
        /// vCPU index.
        vcpu: u8,
        /// Start.
        gpa: Addr,
        /// Size.
        size: Size,
        /// Flags (anything but 0 is refused).
        flags: u8,
    },
    /// `KVM_CREATE_GUEST_MEMFD` (kept, at most [`MAX_FILES`]).
    CreateGmem {
        /// Size.
        size: Size,
        /// The two 6.18 flags (MMAP, INIT_SHARED), or any raw value.
        flags: Result<u8, u64>,
    },
    /// `KVM_SET_USER_MEMORY_REGION2`, with the `GUEST_MEMFD` flag unless
    /// `flags` is raw.
    BindGmem {
        /// Slot number.
        slot: SlotNo,
        /// Flags besides GUEST_MEMFD (low bits), or raw.
        flags: Result<u8, u32>,
        /// Guest address.
        gpa: Addr,
        /// Size.
        size: Size,
        /// Host address.
        hva: Addr,
        /// Which file (`None`: an invalid descriptor).
        file: Option<u8>,
        /// Offset in the file.
        offset: Size,
    },
    /// A plausible binding: the first 2 MiB (or all) of a file as slot
    /// `1 + at % 4`, right after the initial slot's 2 MiB (so faults reach it).
    GmemSlot {
        /// Which file.
        file: u8,
        /// Where.
        at: u8,
    },
    /// `fallocate` on a file.
    Fallocate {
        /// Which file.
        file: u8,
        /// Allocate or punch (with KEEP_SIZE), or any raw mode.
        mode: Result<bool, u32>,
        /// Offset.
        offset: Size,
        /// Length.
        len: Size,
    },
    /// A memory failure in a file.
    MemoryFailure {
        /// Which file.
        file: u8,
        /// Offset.
        offset: Size,
    },
    /// `mmap` of a file and a host touch through it.
    MmapTouch {
        /// Which file.
        file: u8,
        /// `MAP_SHARED` (else `MAP_PRIVATE`).
        shared: bool,
        /// Offset touched.
        offset: Size,
    },
    /// Close a file (the VMM's last reference).
    CloseGmem {
        /// Which file.
        file: u8,
    },
    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`.
    ManualDirtyLog {
        /// The two flags, or raw.
        flags: Result<u8, u64>,
    },
    /// `KVM_GET_DIRTY_LOG`.
    GetDirtyLog {
        /// Slot number.
        slot: SlotNo,
    },
    /// `KVM_CLEAR_DIRTY_LOG`.
    ClearDirtyLog {
        /// Slot number.
        slot: SlotNo,
        /// First page (plausible: a multiple of 64 below 1024), or raw.
        first: Result<u8, u64>,
        /// Pages, or raw.
        num: Result<u8, u64>,
        /// Bitmap words given (each all ones or a pattern).
        words: u8,
        /// The pattern.
        pattern: u64,
    },
    /// The VMM collects vCPU `vcpu`'s dirty ring.
    CollectDirtyRing {
        /// vCPU index.
        vcpu: u8,
    },
    /// `KVM_RESET_DIRTY_RINGS`.
    ResetDirtyRings,
    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)` (refused once vCPUs exist).
    EnableDirtyRing {
        /// Entries, any value.
        entries: u32,
    },
    /// `clear_young` / `clear_flush_young` / `test_young`.
    Age {
        /// Start.
        start: Addr,
        /// Length.
        len: Size,
        /// 0: clear_young, 1: clear_flush_young, else test_young of `start`.
        how: u8,
    },
}

/// The VM's configuration: mostly valid ones (so the calls reach a VM), some
/// drawn from anything (so creation's validation is hit).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Config {
    /// A valid configuration.
    Plausible {
        /// 5-level tables (57-bit guest physical space).
        five_level: bool,
        /// EPT A/D bits.
        ad_enabled: bool,
        /// Largest mapping: 4K, 2M or 1G.
        max_level: u8,
        /// The unlocked invalidation checks.
        precheck: bool,
        /// MMIO entries.
        mmio_caching: bool,
        /// Two address spaces (SMM).
        smm: bool,
        /// The NX huge page mitigation.
        nx_huge_pages: bool,
        /// VM type: default, software-protected, SNP-like.
        vm_type: u8,
        /// Odd: dirty rings on, of `256 << (n / 2 % 4)` entries.
        dirty_ring: u8,
        /// Eager page splitting when logging turns on.
        eager_split: bool,
        /// PML dirty tracking (only with A/D bits).
        pml: bool,
        /// The shadow MMU (refused with a private-memory type, PML or 5
        /// levels: creation's checks get hit too).
        shadow: bool,
    },
    /// Anything.
    Raw {
        /// Root level.
        root_level: u8,
        /// Guest physical width.
        maxphyaddr: u8,
        /// Largest mapping level.
        max_level: u8,
        /// Address spaces.
        address_spaces: u8,
    },
}

impl Config {
    fn vm_config(self) -> Option<VmConfig> {
        let level = |v: u8| Level::new(v % 6);
        Some(match self {
            Config::Plausible {
                five_level,
                ad_enabled,
                max_level,
                precheck,
                mmio_caching,
                smm,
                nx_huge_pages,
                vm_type,
                eager_split,
                pml,
                shadow,
                ..
            } => VmConfig {
                mmu: if shadow {
                    vmmu::MmuKind::Shadow
                } else {
                    vmmu::MmuKind::Tdp
                },
                vm_type: match vm_type % 3 {
                    0 => vmmu::VmType::Default,
                    1 => vmmu::VmType::SwProtected,
                    _ => vmmu::VmType::Snp,
                },
                root_level: if five_level { Level::L5 } else { Level::L4 },
                maxphyaddr: if five_level { 52 } else { 46 },
                ad_enabled,
                max_level: level(max_level % 3 + 1)?,
                precheck,
                mmio_caching,
                address_spaces: if smm { 2 } else { 1 },
                nx_huge_pages,
                eager_page_split: eager_split,
                dirty_tracking: if pml && ad_enabled {
                    vmmu::DirtyTracking::Pml
                } else {
                    vmmu::DirtyTracking::WriteProtect
                },
                ..VmConfig::default()
            },
            Config::Raw {
                root_level,
                maxphyaddr,
                max_level,
                address_spaces,
            } => VmConfig {
                root_level: level(root_level)?,
                maxphyaddr: maxphyaddr as u32 % 64,
                max_level: level(max_level)?,
                address_spaces: (address_spaces % 4) as u16,
                // Odd widths also ask for PML without A/D bits (refused).
                ad_enabled: maxphyaddr & 0x40 == 0,
                dirty_tracking: if maxphyaddr & 0x80 != 0 {
                    vmmu::DirtyTracking::Pml
                } else {
                    vmmu::DirtyTracking::WriteProtect
                },
                ..VmConfig::default()
            },
        })
    }
}

/// What a run reached, so a bounded run can show it was not vacuous.
#[derive(Debug, Default, Clone, Copy)]
pub struct Coverage {
    /// Inputs that created a VM.
    pub vms: u64,
    /// Calls made.
    pub calls: u64,
    /// Calls refused (each checked to have changed nothing).
    pub refused: u64,
    /// Faults that installed a mapping.
    pub faults_fixed: u64,
    /// Bytes mapped by pre-faults.
    pub pre_faulted_bytes: u64,
    /// Huge leaves mapped.
    pub huge_leaves: u64,
    /// Leaves checked against the host.
    pub leaves_checked: u64,
    /// Of those, leaves checked against their guest_memfd.
    pub gmem_leaves_checked: u64,
    /// Page-modification log entries drained into dirty logs (PML VMs).
    pub pml_entries: u64,
    /// Inputs that created a shadow-MMU VM.
    pub shadow_vms: u64,
    /// Faults handled by shadow-MMU VMs (guest-virtual ones).
    pub shadow_faults: u64,
}

/// A whole input: a configuration and the calls.
#[derive(Debug)]
pub struct Input {
    /// The VM.
    pub config: Config,
    /// The calls, in order.
    pub ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    /// The configuration, then calls for as long as the bytes last (at most
    /// [`MAX_OPS`]): denser than a length-prefixed vector, so short inputs
    /// still make many calls.
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let config = Config::arbitrary(u)?;
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < MAX_OPS {
            // A third of the calls are faults, the call that builds the state
            // every other call works on.
            let op = if u.ratio(1, 3)? {
                Op::Fault {
                    vcpu: u.arbitrary()?,
                    gpa: u.arbitrary()?,
                    ec: u.arbitrary()?,
                }
            } else if u.ratio(1, 16)? {
                // A plausible guest_memfd slot (a file of a few pages bound
                // next to the initial slot), so private and gmem-only faults
                // happen often enough to be checked.
                ops.push(Op::CreateGmem {
                    size: Size::Pages(u.int_in_range(1..=255)?),
                    flags: Ok(u.arbitrary()?),
                });
                Op::GmemSlot {
                    file: 255,
                    at: u.arbitrary()?,
                }
            } else {
                Op::arbitrary(u)?
            };
            ops.push(op);
        }
        Ok(Input { config, ops })
    }
}

/// One memslot as seen from outside: number, base gfn, pages, host address,
/// flags, being deleted.
type SlotView = (u32, u64, u64, u64, u32, bool);

/// Everything a refused call must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Observable {
    /// Attributes of the plausible window's gfns.
    attributes: Vec<u64>,
    /// Per address space: the generation and the slots.
    slots: Vec<Option<(u64, Vec<SlotView>)>>,
    mappings: Vec<Vec<(Gfn, Level, u64)>>,
    roots: Vec<RootInfo>,
    in_progress: i64,
    /// Pages allocated in each open guest_memfd.
    gmem_pages: Vec<u64>,
    /// Every logging slot's bitmap.
    dirty: Vec<(u32, Vec<u64>)>,
    manual: u64,
}

struct World {
    host: Arc<TestHost>,
    vm: Vm,
    spaces: u16,
    vcpus: Vec<VcpuMmu>,
    open: Vec<Invalidation>,
    files: Vec<vmmu::GuestMemfd>,
    /// The VMM's fetch index into each vCPU's ring.
    ring_fetch: std::collections::HashMap<u32, u32>,
    /// Ring entries collected and not yet reset.
    ring_collected: Vec<(u32, u64)>,
}

impl World {
    fn observe(&self) -> Observable {
        let slots = (0..4)
            .map(|a| {
                self.vm.memslots(a).map(|s| {
                    (
                        s.generation(),
                        s.iter()
                            .map(|m| {
                                (
                                    m.slot_number(),
                                    m.base_gfn().0,
                                    m.npages(),
                                    m.userspace_addr().0,
                                    m.flags().bits(),
                                    m.is_invalid(),
                                )
                            })
                            .collect(),
                    )
                })
            })
            .collect();
        let mappings = (0..self.spaces)
            .map(|a| {
                let mut m: Vec<_> = self
                    .vm
                    .mappings(a)
                    .into_iter()
                    .map(|(g, l, s)| (g, l, s.raw()))
                    .collect();
                m.sort_unstable();
                m
            })
            .collect();
        Observable {
            attributes: (0..1024u64)
                .map(|p| self.vm.memory_attributes(Gfn((BASE_GPA >> 12) + p)))
                .collect(),
            slots,
            mappings,
            roots: self.vm.roots(),
            in_progress: self.vm.invalidations_in_progress(),
            gmem_pages: self.files.iter().map(|f| f.allocated_pages()).collect(),
            dirty: (0..self.spaces)
                .filter_map(|a| self.vm.memslots(a))
                .flat_map(|set| {
                    set.iter()
                        .filter_map(|m| m.dirty_bitmap().map(|b| (m.slot_number(), b.snapshot())))
                        .collect::<Vec<_>>()
                })
                .collect(),
            manual: self.vm.manual_dirty_log_protect(),
        }
    }

    /// With no invalidation open, every present leaf agrees with the host.
    fn check_leaves(&self, cov: &mut Coverage) -> Result<(), String> {
        if !self.open.is_empty() {
            return Ok(());
        }
        for a in 0..self.spaces {
            let Some(slots) = self.vm.memslots(a) else {
                continue;
            };
            for (gfn, level, spte) in self.vm.mappings(a) {
                if !spte.is_shadow_present() {
                    continue;
                }
                cov.leaves_checked += 1;
                for i in 0..level.pages() {
                    let g = gfn.add(i);
                    let Some(slot) = slots.lookup(g) else {
                        return Err(format!("leaf {spte:?} at {g:?} outside every memslot"));
                    };
                    // A frame of the slot's guest_memfd (a private gfn, or any
                    // gfn of a gmem-only slot) must be the page the file holds.
                    let private =
                        self.vm.memory_attributes(g) & vmmu::MEMORY_ATTRIBUTE_PRIVATE != 0;
                    if private || slot.is_gmem_only() {
                        cov.gmem_leaves_checked += 1;
                        match slot.peek_private_page(g) {
                            vmmu::PrivatePage::Page {
                                pfn,
                                poisoned: false,
                            } if pfn.0 == spte.pfn().0 + i => {}
                            other => {
                                return Err(format!(
                                    "leaf {spte:?} at {g:?} (private {private}): its guest_memfd holds {other:?}"
                                ))
                            }
                        }
                        continue;
                    }
                    let Some((pfn, writable)) = self.host.lookup(slot.gfn_to_hva(g)) else {
                        return Err(format!("leaf {spte:?} at {g:?}: the host maps nothing"));
                    };
                    if spte.pfn().0 + i != pfn.0 {
                        return Err(format!("leaf {spte:?} at {g:?}: the host maps {pfn:?}"));
                    }
                    let may_write = writable && !slot.is_readonly();
                    if spte.is_writable() && !may_write {
                        return Err(format!(
                            "writable leaf {spte:?} at {g:?} where writes are refused"
                        ));
                    }
                }
            }
        }
        let inv = self.vm.stats().invariant_violations;
        if inv != 0 {
            return Err(format!("the MMU counted {inv} invariant violations"));
        }
        Ok(())
    }

    fn bitmap_of(&self, slot: u32) -> Option<Vec<u64>> {
        let set = self.vm.memslots((slot >> 16) as u16)?;
        let s = set.by_id((slot & 0xffff) as u16)?;
        s.dirty_bitmap().map(|b| b.snapshot())
    }

    /// Every page set in `log` (page 0 is the slot's first) is write-protected
    /// in every mapping of it, as a harvest must leave it.
    fn check_protected(&self, slot: u32, _first: u64, log: &[u64]) -> Result<(), String> {
        let as_id = (slot >> 16) as u16;
        let Some(set) = self.vm.memslots(as_id) else {
            return Ok(());
        };
        let Some(s) = set.by_id((slot & 0xffff) as u16) else {
            return Ok(());
        };
        let base = s.base_gfn().0;
        for (gfn, level, spte) in self.vm.mappings(as_id) {
            if !spte.is_shadow_present() || !spte.is_writable() {
                continue;
            }
            for i in 0..level.pages() {
                let g = gfn.0 + i;
                if g < base || g >= base + s.npages() {
                    continue;
                }
                let p = g - base;
                if log
                    .get((p / 64) as usize)
                    .is_some_and(|w| w & (1 << (p % 64)) != 0)
                {
                    return Err(format!(
                        "page {p} of slot {slot:#x} was harvested but {spte:?} at {gfn:?} is writable"
                    ));
                }
            }
        }
        Ok(())
    }

    fn file(&self, i: u8) -> Option<&vmmu::GuestMemfd> {
        let n = self.files.len();
        (n > 0).then(|| &self.files[i as usize % n])
    }

    fn vcpu(&mut self, i: u8) -> Option<&mut VcpuMmu> {
        let n = self.vcpus.len();
        if n == 0 {
            return None;
        }
        self.vcpus.get_mut(i as usize % n)
    }

    /// Run a host change of `hva` inside its own invalidation.
    fn host_change(&self, hva: u64, f: impl FnOnce(&TestHost, Hva)) {
        let hva = Hva(hva & !0xfff);
        let end = Hva(hva.0.saturating_add(4096));
        let inv = self.vm.invalidate_range_start(HvaRange::new(hva, end));
        f(&self.host, hva);
        inv.end();
    }

    /// Apply one call. `Ok(true)` if it was refused (so nothing may change).
    fn apply(&mut self, op: &Op) -> Result<bool, String> {
        let range = |s: &Addr, e: &Addr| GfnRange::new(s.gfn(), e.gfn());
        Ok(match op {
            Op::Region {
                slot,
                flags,
                gpa,
                size,
                hva,
            } => {
                let flags = match *flags {
                    Ok(b) => (b & 7) as u32,
                    Err(raw) => raw,
                };
                let r = self.vm.set_user_memory_region(UserMemoryRegion {
                    slot: slot.raw(),
                    flags,
                    guest_phys_addr: gpa.gpa(),
                    memory_size: size.bytes(),
                    userspace_addr: hva.hva(),
                });
                match r {
                    Ok(()) => false,
                    Err(e) => {
                        if e.to_string().is_empty() || e.errno() <= 0 {
                            return Err(format!("error without message or errno: {e:?}"));
                        }
                        true
                    }
                }
            }
            Op::Fault { vcpu, gpa, ec } => {
                let ec = match *ec {
                    Ok(b) => {
                        let mut e = ErrorCode::from_bits_truncate((b & 0x1f) as u64);
                        if b & 0x20 != 0 {
                            e |= ErrorCode::PRIVATE;
                        }
                        e
                    }
                    Err(raw) => ErrorCode::from_bits_retain(raw),
                };
                let gpa = Gpa(gpa.gpa());
                if let Some(v) = self.vcpu(*vcpu) {
                    if v.prepare_entry().is_ok() {
                        let _ = v.page_fault(gpa, ec);
                    }
                }
                false
            }
            Op::GuestPaging { vcpu, bits, cr3 } => {
                let cr3 = cr3.gpa();
                if let Some(v) = self.vcpu(*vcpu) {
                    let before = v.guest_paging();
                    let p = vmmu::GuestPaging {
                        paging: bits & 1 != 0,
                        wp: bits & 2 != 0,
                        smep: bits & 4 != 0,
                        smap: bits & 8 != 0,
                        nx: bits & 16 != 0,
                        pcide: bits & 32 != 0,
                        cr3,
                    };
                    match v.set_guest_paging(p) {
                        Ok(()) if v.guest_paging() != p => {
                            return Err(format!("paging state {p:?} taken but not kept"));
                        }
                        Ok(()) => {}
                        Err(e) => {
                            if v.guest_paging() != before {
                                return Err(format!("refused paging state {e} changed it"));
                            }
                            if e.errno() <= 0 {
                                return Err(format!("refusal without errno: {e:?}"));
                            }
                        }
                    }
                }
                false
            }
            Op::GvaFault { vcpu, gva, ec, ac } => {
                let ec = ErrorCode::from_bits_truncate((*ec & 0x1f) as u64);
                let shadow = self.vm.config().mmu == vmmu::MmuKind::Shadow;
                if let Some(v) = self.vcpu(*vcpu) {
                    if v.prepare_entry().is_ok() {
                        match v.page_fault_gva(vmmu::Gva(*gva), ec, *ac) {
                            Err(vmmu::FaultError::WrongMmu(_)) if shadow => {
                                return Err("a shadow VM refused a guest-virtual fault".into())
                            }
                            Ok(_) if !shadow => {
                                return Err("a TDP VM took a guest-virtual fault".into())
                            }
                            _ => {}
                        }
                    }
                }
                false
            }
            Op::EmulateWrite { vcpu, gpa, value } => {
                let gpa = Gpa(gpa.gpa());
                if let Some(v) = self.vcpu(*vcpu) {
                    if let Err(e) = v.emulate_write(gpa, *value) {
                        if e.errno() <= 0 {
                            return Err(format!("error without errno: {e:?}"));
                        }
                    }
                }
                false
            }
            Op::Invlpg { vcpu, gva } => {
                if let Some(v) = self.vcpu(*vcpu) {
                    v.invlpg(vmmu::Gva(*gva));
                }
                false
            }
            Op::Invpcid {
                vcpu,
                kind,
                pcid,
                gva,
            } => {
                if let Some(v) = self.vcpu(*vcpu) {
                    let pcid = pcid & 0xfff;
                    match kind {
                        0 => v.invpcid_address(pcid, vmmu::Gva(*gva)),
                        1 => v.invpcid_context(pcid),
                        _ => v.flush_guest_tlb(),
                    }
                }
                false
            }
            Op::SetNrMmuPages { pages } => {
                let before = self.vm.nr_mmu_pages();
                match self.vm.set_nr_mmu_pages(*pages as u64) {
                    Ok(()) if (*pages as u64) < vmmu::SHADOW_MIN_ALLOC_PAGES => {
                        return Err(format!("limit {pages} accepted"));
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if e.errno() != vmmu::errno::EINVAL {
                            return Err(format!("limit refused with {e:?}"));
                        }
                        if self.vm.nr_mmu_pages() != before {
                            return Err("a refused limit changed the limit".into());
                        }
                    }
                }
                false
            }
            Op::EnterExit { vcpu } => {
                if let Some(v) = self.vcpu(*vcpu) {
                    if v.prepare_entry().is_ok() && v.enter_guest_mode() {
                        v.exit_guest_mode();
                    }
                }
                false
            }
            Op::ProcessorWrite { vcpu, gpa, pages } => {
                let base = gpa.gpa() & !0xfff;
                let vm = self.vm.clone();
                if let Some(v) = self.vcpu(*vcpu) {
                    if v.prepare_entry().is_ok() && v.enter_guest_mode() {
                        for i in 0..u64::from(*pages % 64) + 1 {
                            let g = Gpa(base.wrapping_add(i << 12));
                            let mut set = vmmu::testing::hardware_set_dirty(&vm, g);
                            if !set {
                                // Not writable: the EPT violation, the fault,
                                // and the write again.
                                v.exit_guest_mode();
                                let _ = v.page_fault(g, ErrorCode::WRITE);
                                if !(v.prepare_entry().is_ok() && v.enter_guest_mode()) {
                                    return Ok(false);
                                }
                                set = vmmu::testing::hardware_set_dirty(&vm, g);
                            }
                            if set && v.pml_log(g) {
                                v.exit_guest_mode();
                                if !(v.prepare_entry().is_ok() && v.enter_guest_mode()) {
                                    return Ok(false);
                                }
                            }
                        }
                        v.exit_guest_mode();
                    }
                }
                false
            }
            Op::Smm { vcpu, on } => match self.vcpu(*vcpu) {
                Some(v) => {
                    let before = (v.role(), v.root_id(), v.prev_root_ids(), v.has_requests());
                    let refused = v.set_smm(*on).is_err();
                    if refused {
                        let after = (v.role(), v.root_id(), v.prev_root_ids(), v.has_requests());
                        if before != after {
                            return Err(format!(
                                "refused set_smm changed the vCPU: {before:?} -> {after:?}"
                            ));
                        }
                    }
                    refused
                }
                None => false,
            },
            Op::CreateVcpu { id } => {
                if self.vcpus.len() >= MAX_VCPUS {
                    return Ok(false);
                }
                match self.vm.create_vcpu(*id) {
                    Ok(v) => {
                        self.vcpus.push(v);
                        false
                    }
                    Err(_) => true,
                }
            }
            Op::DropVcpu { vcpu } => {
                if !self.vcpus.is_empty() {
                    let i = *vcpu as usize % self.vcpus.len();
                    drop(self.vcpus.swap_remove(i));
                }
                false
            }
            Op::InvalidateStart { start, len } => {
                let s = start.hva();
                let r = HvaRange::new(Hva(s), Hva(s.wrapping_add(len.bytes())));
                self.open.push(self.vm.invalidate_range_start(r));
                false
            }
            Op::InvalidateEnd => {
                if let Some(inv) = self.open.pop() {
                    inv.end();
                }
                false
            }
            Op::HostRemap { hva } => {
                self.host_change(hva.hva(), |h, a| {
                    if let Some((_, w)) = h.lookup(a) {
                        h.set(a, h.fresh_pfn(), w);
                    }
                });
                false
            }
            Op::HostProtect { hva, writable } => {
                self.host_change(hva.hva(), |h, a| {
                    if let Some((pfn, _)) = h.lookup(a) {
                        h.set(a, pfn, *writable);
                    }
                });
                false
            }
            Op::HostUnmap { hva } => {
                self.host_change(hva.hva(), |h, a| h.unmap(a));
                false
            }
            Op::HostHuge { huge } => {
                self.host
                    .set_host_level(if *huge { Level::M2 } else { Level::K4 });
                false
            }
            Op::InvalidateRoots { as_id } => {
                let f = as_id.map_or(RootFilter::All, RootFilter::AddressSpace);
                self.vm.invalidate_roots(f).is_err()
            }
            Op::Zap { as_id, start, end } => {
                self.vm.zap_gfn_range(*as_id, range(start, end)).is_err()
            }
            Op::WriteProtect { as_id, start, end } => self
                .vm
                .write_protect_gfn_range(*as_id, range(start, end))
                .is_err(),
            Op::ClearDirty { as_id, start, end } => self
                .vm
                .clear_dirty_gfn_range(*as_id, range(start, end))
                .is_err(),
            Op::Attributes {
                address,
                size,
                attributes,
                flags,
            } => {
                let attrs = match *attributes {
                    Ok(true) => vmmu::MEMORY_ATTRIBUTE_PRIVATE,
                    Ok(false) => 0,
                    Err(raw) => raw,
                };
                self.vm
                    .set_memory_attributes(address.gpa(), size.bytes(), attrs, (*flags % 4) as u64)
                    .is_err()
            }
            Op::PreFault {
                vcpu,
                gpa,
                size,
                flags,
            } => {
                if !self.open.is_empty() {
                    return Ok(false);
                }
                let Some(v) = self.vcpu(*vcpu) else {
                    return Ok(false);
                };
                let given = vmmu::PreFaultRange {
                    gpa: gpa.gpa(),
                    size: size.bytes(),
                    flags: (*flags % 4) as u64,
                };
                let mut r = given;
                match v.pre_fault_memory(&mut r) {
                    Ok(()) => {
                        if !(r.size < given.size && r.gpa - given.gpa == given.size - r.size) {
                            return Err(format!(
                                "pre-fault succeeded without consistent progress: {given:?} -> {r:?}"
                            ));
                        }
                        false
                    }
                    Err(e) => {
                        if r != given {
                            return Err(format!(
                                "pre-fault failed after progress: {given:?} -> {r:?}: {e:?}"
                            ));
                        }
                        // Only an argument refusal promises nothing changed: a
                        // failed step may have left an MMIO entry or a zap.
                        e.errno() == vmmu::errno::EINVAL
                    }
                }
            }
            Op::CreateGmem { size, flags } => {
                let flags = match *flags {
                    Ok(b) => (b & 3) as u64,
                    Err(raw) => raw,
                };
                match self.vm.create_guest_memfd(size.bytes(), flags) {
                    Ok(f) => {
                        if self.files.len() < MAX_FILES {
                            self.files.push(f);
                        }
                        false
                    }
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::BindGmem {
                slot,
                flags,
                gpa,
                size,
                hva,
                file,
                offset,
            } => {
                let flags = match *flags {
                    Ok(b) => (b & 3) as u32 | (1 << 2),
                    Err(raw) => raw,
                };
                let f = file.and_then(|i| {
                    let n = self.files.len();
                    (n > 0).then(|| &self.files[i as usize % n])
                });
                let r = self.vm.set_user_memory_region2(
                    UserMemoryRegion {
                        slot: slot.raw(),
                        flags,
                        guest_phys_addr: gpa.gpa(),
                        memory_size: size.bytes(),
                        userspace_addr: hva.hva(),
                    },
                    f,
                    offset.bytes(),
                );
                match r {
                    Ok(()) => false,
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::GmemSlot { file, at } => {
                let Some(f) = self.file(*file) else {
                    return Ok(false);
                };
                let k = (*at % 4) as u64;
                let r = self.vm.set_user_memory_region2(
                    UserMemoryRegion {
                        slot: 1 + k as u32,
                        flags: 1 << 2,
                        guest_phys_addr: BASE_GPA + (1 + k) * (2 << 20),
                        memory_size: f.size().min(2 << 20),
                        userspace_addr: BASE_HVA + (1 + k) * (2 << 20),
                    },
                    Some(f),
                    0,
                );
                match r {
                    Ok(()) => false,
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::Fallocate {
                file,
                mode,
                offset,
                len,
            } => {
                let Some(f) = self.file(*file) else {
                    return Ok(false);
                };
                let mode = match *mode {
                    Ok(false) => vmmu::gmem::FALLOC_FL_KEEP_SIZE,
                    Ok(true) => vmmu::gmem::FALLOC_FL_KEEP_SIZE | vmmu::gmem::FALLOC_FL_PUNCH_HOLE,
                    Err(raw) => raw,
                };
                match f.fallocate(mode, offset.bytes(), len.bytes()) {
                    Ok(()) => false,
                    // Like KVM's, an allocation that runs out of memory keeps
                    // the pages it got: not a refusal.
                    Err(vmmu::GmemError::NoMemory) => false,
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::MemoryFailure { file, offset } => {
                let Some(f) = self.file(*file) else {
                    return Ok(false);
                };
                match f.memory_failure(offset.bytes()) {
                    Ok(()) => false,
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::MmapTouch {
                file,
                shared,
                offset,
            } => {
                let Some(f) = self.file(*file) else {
                    return Ok(false);
                };
                let r = f.mmap(*shared).and_then(|()| f.mmap_fault(offset.bytes()));
                match r {
                    Ok(_) => false,
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::CloseGmem { file } => {
                let n = self.files.len();
                if n > 0 {
                    self.files.remove(*file as usize % n);
                }
                false
            }
            Op::ManualDirtyLog { flags } => {
                let flags = match *flags {
                    Ok(b) => (b & 3) as u64,
                    Err(raw) => raw,
                };
                match self.vm.enable_manual_dirty_log_protect(flags) {
                    Ok(()) => false,
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::GetDirtyLog { slot } => {
                let manual = self.vm.manual_dirty_log_protect() & 1 != 0;
                match self.vm.get_dirty_log(slot.raw()) {
                    Ok(log) => {
                        if !manual {
                            self.check_protected(slot.raw(), 0, &log)?;
                        }
                        false
                    }
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::ClearDirtyLog {
                slot,
                first,
                num,
                words,
                pattern,
            } => {
                let first = match *first {
                    Ok(b) => (b as u64 % 16) * 64,
                    Err(raw) => raw,
                };
                let num = match *num {
                    Ok(b) => b as u64 * 8,
                    Err(raw) => raw,
                };
                let bitmap = vec![*pattern; *words as usize % 20];
                let before = self.bitmap_of(slot.raw());
                match self.vm.clear_dirty_log(slot.raw(), first, num, &bitmap) {
                    Ok(_) => {
                        // What was cleared (set before, asked for) is protected.
                        if let Some(before) = before {
                            let cleared: Vec<u64> = (0..before.len())
                                .map(|w| {
                                    let p = w as u64 * 64;
                                    if p < first || p >= first + num {
                                        return 0;
                                    }
                                    let k = ((p - first) / 64) as usize;
                                    before[w] & bitmap.get(k).copied().unwrap_or(0)
                                })
                                .collect();
                            self.check_protected(slot.raw(), 0, &cleared)?;
                        }
                        false
                    }
                    Err(e) => errno_of(e.errno(), &e)?,
                }
            }
            Op::CollectDirtyRing { vcpu } => {
                let n = self.vcpus.len();
                if n == 0 {
                    return Ok(false);
                }
                let id = self.vcpus[*vcpu as usize % n].id();
                let fetch = self.ring_fetch.entry(id).or_insert(0);
                let collected = &mut self.ring_collected;
                self.vm.collect_dirty_ring(id, fetch, |slot, off| {
                    collected.push((slot, off));
                });
                false
            }
            Op::ResetDirtyRings => {
                self.vm.reset_dirty_rings();
                // Every collected page is write-protected now.
                for (slot, off) in std::mem::take(&mut self.ring_collected) {
                    let mut log = vec![0u64; (off / 64 + 1) as usize];
                    log[(off / 64) as usize] = 1 << (off % 64);
                    self.check_protected(slot, 0, &log)?;
                }
                // (A ring can overflow without an entry in between, e.g. under
                // a large pre-fault; KVM does not stop that either.)
                false
            }
            Op::EnableDirtyRing { entries } => match self.vm.enable_dirty_ring(*entries) {
                Ok(()) => return Err("dirty rings enabled after a vCPU was created".into()),
                Err(e) => errno_of(e.errno(), &e)?,
            },
            Op::Age { start, len, how } => {
                let s = start.hva();
                let r = HvaRange::new(Hva(s), Hva(s.wrapping_add(len.bytes())));
                match how % 3 {
                    0 => {
                        self.vm.clear_young(r);
                    }
                    1 => {
                        self.vm.clear_flush_young(r);
                    }
                    _ => {
                        self.vm.test_young(Hva(s));
                    }
                }
                false
            }
        })
    }
}

/// A refused call: `Ok(true)` if it has a message and a positive errno.
fn errno_of(errno: i32, e: &dyn std::fmt::Display) -> Result<bool, String> {
    if errno <= 0 || e.to_string().is_empty() {
        return Err(format!("error without message or errno: {e}"));
    }
    Ok(true)
}

/// Run one input. `Err` names the property that failed.
pub fn run(input: &Input) -> Result<(), String> {
    run_counted(input, &mut Coverage::default())
}

/// [`run`], adding what the input reached to `cov`.
pub fn run_counted(input: &Input, cov: &mut Coverage) -> Result<(), String> {
    let host = TestHost::new();
    // Files are sparse and may be huge; what backs them is not.
    host.set_private_limit(4096);
    let Some(config) = input.config.vm_config() else {
        return Ok(());
    };
    let spaces = config.address_spaces;
    let vm = match Vm::new(config, host.ops()) {
        Ok(vm) => vm,
        Err(e) => {
            return if e.errno() > 0 {
                Ok(())
            } else {
                Err(format!("{e:?} has no errno"))
            };
        }
    };
    cov.vms += 1;
    // Every run starts from a VM a hypervisor would have: one vCPU and 2 MiB of
    // memory at the plausible addresses. The calls may change or remove both.
    let slot0 = UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: BASE_GPA,
        memory_size: 2 << 20,
        userspace_addr: BASE_HVA,
    };
    if let Config::Plausible { dirty_ring, .. } = input.config {
        if dirty_ring & 1 != 0 {
            vm.enable_dirty_ring(256 << ((dirty_ring >> 1) % 4))
                .map_err(|e| format!("dirty rings refused on a fresh VM: {e}"))?;
        }
    }
    vm.set_user_memory_region(slot0)
        .map_err(|e| format!("the initial memslot was refused: {e}"))?;
    let vcpu0 = vm
        .create_vcpu(0)
        .map_err(|e| format!("vCPU 0 was refused: {e}"))?;
    let mut w = World {
        host,
        vm,
        spaces,
        vcpus: vec![vcpu0],
        open: Vec::new(),
        files: Vec::new(),
        ring_fetch: Default::default(),
        ring_collected: Vec::new(),
    };
    for (i, op) in input.ops.iter().take(MAX_OPS).enumerate() {
        if matches!(
            op,
            Op::Region { .. } | Op::BindGmem { .. } | Op::GmemSlot { .. }
        ) {
            for inv in w.open.drain(..).rev() {
                inv.end();
            }
        }
        let before = w.observe();
        let refused = w.apply(op).map_err(|e| format!("op {i} {op:?}: {e}"))?;
        cov.calls += 1;
        if refused {
            cov.refused += 1;
            let after = w.observe();
            if before != after {
                return Err(format!(
                    "op {i} {op:?} was refused but changed the VM:\n before {before:?}\n after  {after:?}"
                ));
            }
        }
        w.check_leaves(cov)
            .map_err(|e| format!("after op {i} {op:?}: {e}"))?;
    }
    let st = w.vm.stats();
    cov.faults_fixed += st.faults_fixed;
    cov.huge_leaves += st.leaves_mapped_2m + st.leaves_mapped_1g;
    cov.pre_faulted_bytes += st.pre_faulted_bytes;
    cov.pml_entries += st.pml_entries_flushed;
    if w.vm.config().mmu == vmmu::MmuKind::Shadow {
        cov.shadow_vms += 1;
        cov.shadow_faults += st.faults;
    }
    let World {
        host,
        vm,
        vcpus,
        open,
        files,
        ..
    } = w;
    drop(open);
    drop(files);
    drop(vcpus);
    drop(vm);
    if host.memory.allocated() != 0 {
        return Err(format!("{} table pages leaked", host.memory.allocated()));
    }
    if host.private_pages() != 0 {
        return Err(format!("{} guest_memfd pages leaked", host.private_pages()));
    }
    if host.outstanding_refs() != 0 {
        return Err(format!(
            "{} frame references leaked",
            host.outstanding_refs()
        ));
    }
    Ok(())
}

/// Decode `data` as an [`Input`] and run it; inputs that do not decode are
/// skipped (`Ok`).
pub fn run_bytes(data: &[u8]) -> Result<(), String> {
    run_bytes_counted(data, &mut Coverage::default())
}

/// [`run_bytes`], adding what the input reached to `cov`.
pub fn run_bytes_counted(data: &[u8], cov: &mut Coverage) -> Result<(), String> {
    let mut u = Unstructured::new(data);
    match Input::arbitrary(&mut u) {
        Ok(input) => run_counted(&input, cov),
        Err(_) => Ok(()),
    }
}
