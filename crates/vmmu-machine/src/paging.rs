//! Guest paging: the x86-64 4-level page tables a guest keeps in its own
//! memory, the control bits that change how they are read, and the processor's
//! two-dimensional walk (guest tables, each table and the final address
//! translated through the second-stage tables).
//!
//! The walker decides permissions from a table built once per mode (as the
//! processor, and KVM's `update_permission_bitmask`, do): a different way of
//! writing the rules than the oracle's reference walk in
//! [`crate::guest_oracle`], so the two check each other.
//!
//! Accessed and Dirty bits of guest entries are set with a compare-exchange on
//! the entry in guest memory, after the permission check passed (no A/D update
//! on a faulting access); a lost race restarts the walk. Setting them is a
//! write to the table page through the second stage (AMD's nested walk), so it
//! can exit when that page is not writable there.

use vmmu::{Access, ErrorCode, Gpa, Gva, Level};

use crate::cpu::{walk, Exit, Mmu, Source};
use crate::host_memory::HostMemory;
use crate::sync::{AtomicU64, Ordering};
use crate::tlb::{LinearEntry, Tlb, Translation};

/// Bits of a guest page-table entry.
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const W: u64 = 1 << 1;
    /// User-accessible.
    pub const U: u64 = 1 << 2;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty (leaves).
    pub const D: u64 = 1 << 6;
    /// Page size: a 2 MiB or 1 GiB leaf at levels 2 and 3.
    pub const PS: u64 = 1 << 7;
    /// Global (leaves, with CR4.PGE).
    pub const G: u64 = 1 << 8;
    /// No-execute (with EFER.NX; reserved without).
    pub const NX: u64 = 1 << 63;
    /// Frame address bits up to [`super::MAXPHYADDR`].
    pub const ADDR: u64 = ((1 << super::MAXPHYADDR) - 1) & !0xfff;
    /// Bits above MAXPHYADDR that must be zero (51:MAXPHYADDR).
    pub const RSVD_HIGH: u64 = ((1 << 52) - 1) & !((1 << super::MAXPHYADDR) - 1);
}

/// The guest's physical address width.
pub const MAXPHYADDR: u32 = 46;

/// Guest access rights accumulated down a walk (KVM's `ACC_*`).
pub mod acc {
    /// Executable.
    pub const EXEC: u8 = 1;
    /// Writable.
    pub const WRITE: u8 = 2;
    /// User-accessible.
    pub const USER: u8 = 4;
    /// All of them (the start of a walk).
    pub const ALL: u8 = 7;
}

/// The control bits that decide how guest tables are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PagingMode {
    /// CR0.PG (with long mode: 4-level paging). Off: linear = physical.
    pub enabled: bool,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub wp: bool,
    /// CR4.SMEP: no supervisor fetch from user pages.
    pub smep: bool,
    /// CR4.SMAP: no supervisor data access to user pages (unless EFLAGS.AC).
    pub smap: bool,
    /// EFER.NXE: the NX bit is honoured (else reserved).
    pub nx: bool,
    /// CR4.PCIDE: CR3 bits 11:0 tag translations.
    pub pcide: bool,
    /// CR4.PGE: global translations survive CR3 loads.
    pub pge: bool,
}

impl PagingMode {
    /// 4-level paging with CR0.WP, NX, PCIDs and global pages: a modern
    /// kernel's settings.
    pub fn long_mode() -> PagingMode {
        PagingMode {
            enabled: true,
            wp: true,
            nx: true,
            pcide: true,
            pge: true,
            ..PagingMode::default()
        }
    }
}

/// What a linear access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearOp {
    /// Load 8 bytes.
    Read,
    /// Store 8 bytes.
    Write(u64),
    /// Instruction fetch (loads 8 bytes).
    Fetch,
}

/// A linear access's kind and privilege.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearAccess {
    /// Load, store or fetch.
    pub op: LinearOp,
    /// Made at CPL 3.
    pub user: bool,
    /// EFLAGS.AC (lets supervisor data accesses reach user pages under SMAP).
    pub ac: bool,
}

impl LinearAccess {
    /// Whether it stores.
    pub fn is_write(&self) -> bool {
        matches!(self.op, LinearOp::Write(_))
    }
    /// Whether it fetches.
    pub fn is_fetch(&self) -> bool {
        self.op == LinearOp::Fetch
    }
    /// The second-stage access it needs.
    pub fn second_stage(&self) -> Access {
        match self.op {
            LinearOp::Read => Access::READ,
            LinearOp::Write(_) => Access::WRITE,
            LinearOp::Fetch => Access::EXEC,
        }
    }
    fn index(&self) -> usize {
        let smap_ok = !self.user && self.ac;
        (self.is_fetch() as usize)
            | (self.is_write() as usize) << 1
            | (self.user as usize) << 2
            | (smap_ok as usize) << 3
    }
}

/// For each kind of access, which accumulated guest rights fault: one bit per
/// value of the `acc` triple, sixteen access kinds (fetch, write, user, and
/// "supervisor with EFLAGS.AC").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    faults: [u8; 16],
}

impl Permissions {
    /// The table for `mode`.
    pub fn new(mode: &PagingMode) -> Permissions {
        let mut faults = [0u8; 16];
        for (index, f) in faults.iter_mut().enumerate() {
            let (fetch, write, user, ac) = (
                index & 1 != 0,
                index & 2 != 0,
                index & 4 != 0,
                index & 8 != 0,
            );
            // Bit sets over the eight rights values: those lacking W, U, X, and
            // those carrying U.
            let (no_w, no_u, no_x, has_u) = (0x33u8, 0x0fu8, 0x55u8, 0xf0u8);
            let mut bad = 0u8;
            if user {
                bad |= no_u;
            }
            if write && (user || mode.wp) {
                bad |= no_w;
            }
            if fetch {
                if mode.nx {
                    bad |= no_x;
                }
                if !user && mode.smep {
                    bad |= has_u;
                }
            } else if !user && mode.smap && !ac {
                bad |= has_u;
            }
            *f = bad;
        }
        Permissions { faults }
    }

    /// Whether an access of this kind faults on a page with rights `rights`.
    pub fn faults(&self, rights: u8, access: &LinearAccess) -> bool {
        self.faults[access.index()] & (1 << (rights & 7)) != 0
    }
}

/// A vCPU's paging state: mode, CR3 and the permission table that goes with
/// the mode.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestCpu {
    mode: PagingMode,
    perms: Permissions,
    /// CR3: the root table's address, and the PCID in bits 11:0 with CR4.PCIDE.
    pub cr3: u64,
}

impl GuestCpu {
    /// Paging mode.
    pub fn mode(&self) -> &PagingMode {
        &self.mode
    }
    /// Change the mode (rebuilds the permission table).
    pub fn set_mode(&mut self, mode: PagingMode) {
        self.mode = mode;
        self.perms = Permissions::new(&mode);
    }
    /// The current PCID (0 without CR4.PCIDE).
    pub fn pcid(&self) -> u16 {
        if self.mode.pcide {
            (self.cr3 & 0xfff) as u16
        } else {
            0
        }
    }
    /// The root table's guest physical address.
    pub fn root(&self) -> Gpa {
        Gpa(self.cr3 & pte::ADDR)
    }
}

/// PML4 entry of the guest kernels' direct map of guest physical memory.
pub const DIRECT_MAP_INDEX: u64 = 254;
/// Where the direct map starts: linear `DIRECT_MAP + gpa` reaches `gpa`.
/// Kernels reach their page tables through it. Under shadow paging the
/// processor makes no physical accesses once paging is on, so the machine
/// sends a guest's physical loads and stores (`AccessKind::Read`, `Write`,
/// `PteWrite`) through it; a guest that runs under shadow paging builds it
/// ([`direct_map_entries`]) before it turns paging on.
pub const DIRECT_MAP: u64 = DIRECT_MAP_INDEX << 39;

/// The entries of a direct map of guest physical 0..512 GiB: the PML4 entry
/// (in the table at `pml4`) pointing at the table at `pdpt`, then that
/// table's 512 1 GiB leaves (supervisor, writable, accessed and dirty).
pub fn direct_map_entries(pml4: Gpa, pdpt: Gpa) -> Vec<(Gpa, u64)> {
    let mut v = vec![(
        Gpa(pml4.0 + DIRECT_MAP_INDEX * 8),
        pdpt.0 | pte::P | pte::W | pte::A,
    )];
    v.extend((0..512u64).map(|i| {
        (
            Gpa(pdpt.0 + i * 8),
            (i << 30) | pte::P | pte::W | pte::PS | pte::A | pte::D,
        )
    }));
    v
}

/// CR3 bit 63 on a load: keep the new PCID's translations.
pub const CR3_NOFLUSH: u64 = 1 << 63;

/// What a walk of the guest's tables found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestWalk {
    /// The guest physical address the access goes to.
    pub gpa: Gpa,
    /// Size of the guest's mapping.
    pub level: Level,
    /// Rights accumulated down the walk (`acc`).
    pub rights: u8,
    /// The leaf is dirty after the walk.
    pub dirty: bool,
    /// A global leaf (with CR4.PGE).
    pub global: bool,
}

/// Why a linear access did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearFault {
    /// A page fault for the guest (#PF with this error code).
    Guest(ErrorCode),
    /// A second-stage exit to the hypervisor (on a table or on the final address).
    Exit(Exit),
}

/// The page-fault error code of a guest-level fault.
pub fn guest_error(
    mode: &PagingMode,
    access: &LinearAccess,
    present: bool,
    rsvd: bool,
) -> ErrorCode {
    let mut e = ErrorCode::empty();
    if present {
        e |= ErrorCode::PRESENT;
    }
    if rsvd {
        e |= ErrorCode::RSVD;
    }
    if access.is_write() {
        e |= ErrorCode::WRITE;
    }
    if access.user {
        e |= ErrorCode::USER;
    }
    if access.is_fetch() && (mode.nx || mode.smep) {
        e |= ErrorCode::FETCH;
    }
    e
}

/// Bits of an entry at `level` that must be zero.
pub fn reserved_bits(mode: &PagingMode, level: u8, entry: u64) -> u64 {
    let mut rsvd = pte::RSVD_HIGH;
    if !mode.nx {
        rsvd |= pte::NX;
    }
    match level {
        4 => rsvd |= pte::PS,
        3 if entry & pte::PS != 0 => rsvd |= 0x3fff_e000,
        2 if entry & pte::PS != 0 => rsvd |= 0x1f_e000,
        _ => {}
    }
    entry & rsvd
}

/// Reads (and, for A/D, writes) guest page-table entries by guest physical
/// address.
pub trait GuestPhys<'m> {
    /// The entry at `gpa`, reachable for a write when `write`.
    fn entry(&mut self, gpa: Gpa, write: bool) -> Result<&'m AtomicU64, Exit>;
}

/// The processor's view: table pages reached through the second stage.
struct SecondStage<'m, 'l> {
    mem: &'m HostMemory,
    mmu: &'m Mmu,
    /// Table pages whose second-stage Dirty bit an A/D update set (what PML
    /// logs, like any other write that sets D).
    logged: &'l mut Vec<Gpa>,
}

impl<'m> GuestPhys<'m> for SecondStage<'m, '_> {
    fn entry(&mut self, gpa: Gpa, write: bool) -> Result<&'m AtomicU64, Exit> {
        let want = if write { Access::WRITE } else { Access::READ };
        let t = walk(self.mem, self.mmu, gpa, want)?;
        if t.set_dirty {
            self.logged.push(gpa);
        }
        if !self.mem.contains(t.pfn) {
            return Err(Exit::Wild { gpa });
        }
        Ok(&self.mem.page(t.pfn)[((gpa.0 & 0xfff) / 8) as usize])
    }
}

/// Walk the guest's tables for `gva`, setting A (and D on a write) on success.
pub fn walk_guest<'m>(
    phys: &mut impl GuestPhys<'m>,
    cpu: &GuestCpu,
    gva: Gva,
    access: &LinearAccess,
) -> Result<GuestWalk, LinearFault> {
    let mode = &cpu.mode;
    'restart: loop {
        let mut table = cpu.root().0;
        let mut level = 4u8;
        let mut rights = acc::ALL;
        let mut path: [(Gpa, u64); 4] = [(Gpa(0), 0); 4];
        let mut depth = 0;
        let leaf = loop {
            let gpa = Gpa(table + ((gva.0 >> (12 + 9 * (level as u32 - 1))) & 511) * 8);
            let raw = phys
                .entry(gpa, false)
                .map_err(LinearFault::Exit)?
                .load(Ordering::Acquire);
            if raw & pte::P == 0 {
                return Err(LinearFault::Guest(guest_error(mode, access, false, false)));
            }
            if reserved_bits(mode, level, raw) != 0 {
                return Err(LinearFault::Guest(guest_error(mode, access, true, true)));
            }
            let mut r = 0;
            if raw & pte::W != 0 {
                r |= acc::WRITE;
            }
            if raw & pte::U != 0 {
                r |= acc::USER;
            }
            if raw & pte::NX == 0 || !mode.nx {
                r |= acc::EXEC;
            }
            rights &= r;
            path[depth] = (gpa, raw);
            depth += 1;
            if level == 1 || (raw & pte::PS != 0 && level <= 3) {
                break raw;
            }
            table = raw & pte::ADDR;
            level -= 1;
        };
        if cpu.perms.faults(rights, access) {
            return Err(LinearFault::Guest(guest_error(mode, access, true, false)));
        }
        for (i, &(gpa, raw)) in path[..depth].iter().enumerate() {
            let mut want = pte::A;
            if i == depth - 1 && access.is_write() {
                want |= pte::D;
            }
            if raw & want != want {
                let e = phys.entry(gpa, true).map_err(LinearFault::Exit)?;
                if e.compare_exchange(raw, raw | want, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue 'restart;
                }
            }
        }
        let lvl = Level::new(level).unwrap_or(Level::K4);
        let size = lvl.bytes();
        let frame = leaf & pte::ADDR & !(size - 1);
        return Ok(GuestWalk {
            gpa: Gpa(frame | (gva.0 & (size - 1))),
            level: lvl,
            rights,
            dirty: leaf & pte::D != 0 || access.is_write(),
            global: leaf & pte::G != 0 && mode.pge,
        });
    }
}

/// A completed linear translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    /// Guest physical address reached.
    pub gpa: Gpa,
    /// The second-stage part (host frame, its permissions, its D bit).
    pub t: Translation,
    /// From the TLB or a walk.
    pub source: Source,
    /// A global translation.
    pub global: bool,
}

/// Translate a linear access: the TLB first (a hit must allow the access and,
/// for a write, have been cached dirty at both stages), else the two-stage
/// walk, whose result is cached at the smaller of the two page sizes. With
/// paging off the linear address is the physical one. Guest table pages whose
/// second-stage Dirty bit the walk's A/D updates set are appended to `logged`
/// (even when the access then faults or exits: the update happened).
pub fn translate_linear(
    mem: &HostMemory,
    tlb: &mut Tlb,
    mmu: &Mmu,
    cpu: &GuestCpu,
    gva: Gva,
    access: &LinearAccess,
    logged: &mut Vec<Gpa>,
) -> Result<Linear, LinearFault> {
    let second = access.second_stage();
    if !cpu.mode.enabled {
        let (t, source) =
            crate::cpu::translate(mem, tlb, mmu, Gpa(gva.0), second).map_err(LinearFault::Exit)?;
        return Ok(Linear {
            gpa: Gpa(gva.0),
            t,
            source,
            global: false,
        });
    }
    let pcid = cpu.pcid();
    if let Some((e, t, gpa)) = tlb.lookup_linear(mmu.root_id, pcid, gva) {
        let dirty_ok = !access.is_write() || (e.guest_dirty && (t.dirty || !mmu.ad));
        if !cpu.perms.faults(e.rights, access) && t.perm.contains(second) && dirty_ok {
            return Ok(Linear {
                gpa,
                t,
                source: Source::Tlb,
                global: e.global,
            });
        }
    }
    let gw = walk_guest(&mut SecondStage { mem, mmu, logged }, cpu, gva, access)?;
    let t = walk(mem, mmu, gw.gpa, second).map_err(LinearFault::Exit)?;
    tlb.insert_linear(
        mmu.root_id,
        pcid,
        gva,
        gw.gpa,
        &t,
        LinearEntry {
            rights: gw.rights,
            guest_dirty: gw.dirty,
            global: gw.global,
            guest_level: gw.level,
        },
    );
    Ok(Linear {
        gpa: gw.gpa,
        t,
        source: Source::Walk,
        global: gw.global,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(op: LinearOp, user: bool) -> LinearAccess {
        LinearAccess {
            op,
            user,
            ac: false,
        }
    }

    #[test]
    fn test_permission_table_rules() {
        let m = PagingMode::long_mode();
        let p = Permissions::new(&m);
        let rw_user = acc::ALL;
        let ro_kernel = acc::EXEC;
        assert!(!p.faults(rw_user, &acc(LinearOp::Write(0), true)));
        assert!(
            p.faults(ro_kernel, &acc(LinearOp::Read, true)),
            "user to supervisor page"
        );
        assert!(
            p.faults(ro_kernel, &acc(LinearOp::Write(0), false)),
            "CR0.WP"
        );
        let nowp = Permissions::new(&PagingMode { wp: false, ..m });
        assert!(!nowp.faults(ro_kernel, &acc(LinearOp::Write(0), false)));
        assert!(nowp.faults(acc::USER | acc::EXEC, &acc(LinearOp::Write(0), true)));
        assert!(p.faults(acc::WRITE, &acc(LinearOp::Fetch, false)), "NX");
        let nonx = Permissions::new(&PagingMode { nx: false, ..m });
        assert!(!nonx.faults(acc::WRITE, &acc(LinearOp::Fetch, false)));
        let smep = Permissions::new(&PagingMode { smep: true, ..m });
        assert!(smep.faults(acc::ALL, &acc(LinearOp::Fetch, false)));
        assert!(!smep.faults(acc::ALL, &acc(LinearOp::Read, false)));
        let smap = Permissions::new(&PagingMode { smap: true, ..m });
        assert!(smap.faults(acc::ALL, &acc(LinearOp::Read, false)));
        assert!(!smap.faults(
            acc::ALL,
            &LinearAccess {
                op: LinearOp::Read,
                user: false,
                ac: true
            }
        ));
        assert!(
            !smap.faults(acc::ALL, &acc(LinearOp::Fetch, false)),
            "SMAP is data only"
        );
    }

    #[test]
    fn test_reserved_bits_by_level() {
        let m = PagingMode::long_mode();
        assert_ne!(reserved_bits(&m, 4, pte::P | pte::PS), 0);
        assert_eq!(reserved_bits(&m, 2, pte::P | pte::PS | (1 << 21)), 0);
        assert_ne!(reserved_bits(&m, 2, pte::P | pte::PS | (1 << 13)), 0);
        assert_eq!(
            reserved_bits(&m, 1, pte::P | (1 << 13)),
            0,
            "bit 13 is an address bit of a 4 KiB leaf"
        );
        assert_ne!(reserved_bits(&m, 1, pte::P | (1 << 51)), 0);
        assert_ne!(
            reserved_bits(&PagingMode { nx: false, ..m }, 1, pte::P | pte::NX),
            0
        );
        assert_eq!(reserved_bits(&m, 1, pte::P | pte::NX), 0);
    }

    /// Guest memory as a map of words, for walks without a machine.
    struct Words(std::collections::HashMap<u64, &'static AtomicU64>);

    impl<'m> GuestPhys<'m> for Words {
        fn entry(&mut self, gpa: Gpa, _write: bool) -> Result<&'m AtomicU64, Exit> {
            self.0.get(&gpa.0).copied().ok_or(Exit::Wild { gpa })
        }
    }

    fn words(entries: &[(u64, u64)]) -> Words {
        Words(
            entries
                .iter()
                .map(|&(g, v)| (g, &*Box::leak(Box::new(AtomicU64::new(v)))))
                .collect(),
        )
    }

    fn cpu(mode: PagingMode, cr3: u64) -> GuestCpu {
        let mut c = GuestCpu::default();
        c.set_mode(mode);
        c.cr3 = cr3;
        c
    }

    /// Entries written as raw numbers from the architecture's bit layout (P 0,
    /// R/W 1, U/S 2, A 5, D 6, PS 7, G 8, NX 63), so a wrong constant in
    /// `pte` is found even though the reference walk shares them.
    #[test]
    fn test_walk_of_literal_entries() {
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000: entry 0 a 2 MiB leaf
        // (global, user, read-only), entry 1 -> PT 0x4000 whose entry 0 is a
        // writable supervisor NX page.
        let mut w = words(&[
            (0x1000, 0x2007),
            (0x2000, 0x3007),
            (0x3000, 0x0060_0000 | 0x1a5), // P U A PS G
            (0x3008, 0x4007),
            (0x4000, 0x8000_0000_0070_0003), // P W NX
        ]);
        let m = PagingMode::long_mode();
        let c = cpu(m, 0x1000 | 5);
        assert_eq!(c.pcid(), 5);
        assert_eq!(c.root(), Gpa(0x1000));
        let rd = |user| LinearAccess {
            op: LinearOp::Read,
            user,
            ac: false,
        };
        let g = walk_guest(&mut w, &c, Gva(0x1_2345), &rd(true)).unwrap();
        assert_eq!(
            (g.gpa, g.level, g.global),
            (Gpa(0x61_2345), Level::M2, true)
        );
        assert_eq!(g.rights, acc::USER | acc::EXEC, "read-only, executable");
        assert!(!g.dirty);
        // A set on every level, D untouched by a read.
        let v = |w: &Words, gpa: u64| w.0[&gpa].load(Ordering::Relaxed);
        assert_eq!(
            (v(&w, 0x1000), v(&w, 0x2000), v(&w, 0x3000)),
            (0x2027, 0x3027, 0x0060_01a5)
        );
        let g = walk_guest(&mut w, &c, Gva(0x20_0008), &rd(false)).unwrap();
        assert_eq!(
            (g.gpa, g.level, g.global),
            (Gpa(0x70_0008), Level::K4, false)
        );
        assert_eq!(g.rights, acc::WRITE);
        let wr = LinearAccess {
            op: LinearOp::Write(1),
            user: false,
            ac: false,
        };
        let g = walk_guest(&mut w, &c, Gva(0x20_0000), &wr).unwrap();
        assert!(g.dirty);
        assert_eq!(v(&w, 0x4000), 0x8000_0000_0070_0063, "A and D on a write");
        let fetch = LinearAccess {
            op: LinearOp::Fetch,
            user: false,
            ac: false,
        };
        assert_eq!(
            walk_guest(&mut w, &c, Gva(0x20_0000), &fetch),
            Err(LinearFault::Guest(ErrorCode::PRESENT | ErrorCode::FETCH))
        );
        assert_eq!(
            walk_guest(
                &mut w,
                &c,
                Gva(0x1_0000),
                &LinearAccess { user: true, ..wr }
            ),
            Err(LinearFault::Guest(
                ErrorCode::PRESENT | ErrorCode::WRITE | ErrorCode::USER
            ))
        );
        // Without PGE nothing is global; without PCIDE the PCID is 0.
        let c2 = cpu(
            PagingMode {
                pge: false,
                pcide: false,
                ..m
            },
            0x1000 | 5,
        );
        assert_eq!(c2.pcid(), 0);
        assert!(!walk_guest(&mut w, &c2, Gva(0), &rd(true)).unwrap().global);
        // Paging modes a modern kernel uses.
        assert!(m.enabled && m.wp && m.nx && m.pcide && m.pge && !m.smep && !m.smap);
        assert_eq!(CR3_NOFLUSH, 0x8000_0000_0000_0000);
        assert_eq!(pte::ADDR, 0x0000_3fff_ffff_f000);
        assert_eq!(pte::RSVD_HIGH, 0x000f_c000_0000_0000);
    }
}
