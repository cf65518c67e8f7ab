//! Random operation sequences against a reference: after every step, every present
//! leaf must agree with the host's current mapping (same frame, no write access the
//! host or the slot forbids), no leaf may exist outside a memslot, the table
//! accounting must match what is reachable, and at teardown no table page or frame
//! reference may be left over (the tracking host panics on a double free).

use proptest::prelude::*;
use vmmu::testing::TestHost;
use vmmu::{
    ErrorCode, GfnRange, Gpa, Hva, HvaRange, Level, MemFlags, RootFilter, UserMemoryRegion, Vm,
    VmConfig,
};

const GPA: u64 = 1 << 30;
const HVA: u64 = 64 << 30;
const PAGES: u64 = 2048; // two slots of 1024 pages (4 MiB each)

#[derive(Debug, Clone)]
enum Op {
    Fault {
        vcpu: usize,
        page: u64,
        write: bool,
        present: bool,
    },
    Remap {
        page: u64,
    },
    Protect {
        page: u64,
        writable: bool,
    },
    Unmap {
        page: u64,
        n: u64,
    },
    Age {
        page: u64,
        n: u64,
    },
    WriteProtect {
        page: u64,
        n: u64,
    },
    ZapGfns {
        page: u64,
        n: u64,
    },
    DeleteSlot1,
    CreateSlot1 {
        readonly: bool,
    },
    MoveSlot1 {
        up: bool,
    },
    LogDirty {
        on: bool,
    },
    InvalidateRoots {
        smm_only: bool,
    },
    Smm {
        vcpu: usize,
        on: bool,
    },
    Enter {
        vcpu: usize,
    },
    HostLevel {
        huge: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let page = 0..PAGES;
    prop_oneof![
        8 => (0..2usize, page.clone(), any::<bool>(), any::<bool>())
            .prop_map(|(vcpu, page, write, present)| Op::Fault { vcpu, page, write, present }),
        2 => page.clone().prop_map(|page| Op::Remap { page }),
        2 => (page.clone(), any::<bool>()).prop_map(|(page, writable)| Op::Protect { page, writable }),
        1 => (page.clone(), 1..600u64).prop_map(|(page, n)| Op::Unmap { page, n }),
        1 => (page.clone(), 1..600u64).prop_map(|(page, n)| Op::Age { page, n }),
        1 => (page.clone(), 1..600u64).prop_map(|(page, n)| Op::WriteProtect { page, n }),
        1 => (page.clone(), 1..600u64).prop_map(|(page, n)| Op::ZapGfns { page, n }),
        1 => Just(Op::DeleteSlot1),
        1 => any::<bool>().prop_map(|readonly| Op::CreateSlot1 { readonly }),
        1 => any::<bool>().prop_map(|up| Op::MoveSlot1 { up }),
        1 => any::<bool>().prop_map(|on| Op::LogDirty { on }),
        1 => any::<bool>().prop_map(|smm_only| Op::InvalidateRoots { smm_only }),
        1 => (0..2usize, any::<bool>()).prop_map(|(vcpu, on)| Op::Smm { vcpu, on }),
        2 => (0..2usize).prop_map(|vcpu| Op::Enter { vcpu }),
        1 => any::<bool>().prop_map(|huge| Op::HostLevel { huge }),
    ]
}

fn hva(page: u64) -> Hva {
    Hva(HVA + page * 4096)
}

struct World {
    host: std::sync::Arc<TestHost>,
    vm: Vm,
    vcpus: Vec<vmmu::VcpuMmu>,
    slot1_gpa: Option<u64>,
    slot1_ro: bool,
    slot0_log: bool,
}

impl World {
    fn new(ad: bool) -> World {
        let host = TestHost::new();
        let vm = Vm::new(
            VmConfig {
                ad_enabled: ad,
                ..VmConfig::default()
            },
            host.ops(),
        )
        .unwrap();
        vm.set_user_memory_region(UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: GPA,
            memory_size: 1024 * 4096,
            userspace_addr: HVA,
        })
        .unwrap();
        let vcpus = (0..2).map(|i| vm.create_vcpu(i).unwrap()).collect();
        let mut w = World {
            host,
            vm,
            vcpus,
            slot1_gpa: None,
            slot1_ro: false,
            slot0_log: false,
        };
        w.create_slot1(GPA + (4 << 20), false);
        w
    }

    fn create_slot1(&mut self, gpa: u64, ro: bool) {
        let flags = if ro { MemFlags::READONLY.bits() } else { 0 };
        self.vm
            .set_user_memory_region(UserMemoryRegion {
                slot: 1,
                flags,
                guest_phys_addr: gpa,
                memory_size: 1024 * 4096,
                userspace_addr: HVA + (4 << 20),
            })
            .unwrap();
        self.slot1_gpa = Some(gpa);
        self.slot1_ro = ro;
    }

    fn gpa_of(&self, page: u64) -> Gpa {
        if page < 1024 {
            Gpa(GPA + page * 4096)
        } else {
            Gpa(self.slot1_gpa.unwrap_or(GPA + (4 << 20)) + (page - 1024) * 4096)
        }
    }

    fn bracket(&self, page: u64, n: u64, f: impl FnOnce()) {
        let r = HvaRange::new(hva(page), hva((page + n).min(PAGES)));
        let inv = self.vm.invalidate_range_start(r);
        f();
        inv.end();
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Fault {
                vcpu,
                page,
                write,
                present,
            } => {
                let gpa = self.gpa_of(page);
                let v = &mut self.vcpus[vcpu];
                if v.prepare_entry().is_err() {
                    return;
                }
                let mut ec = ErrorCode::empty();
                if write {
                    ec |= ErrorCode::WRITE;
                }
                if present {
                    ec |= ErrorCode::PRESENT;
                }
                let _ = v.page_fault(gpa, ec);
            }
            Op::Remap { page } => self.bracket(page, 1, || {
                if let Some((_, w)) = self.host.lookup(hva(page)) {
                    self.host.set(hva(page), self.host.fresh_pfn(), w);
                }
            }),
            Op::Protect { page, writable } => self.bracket(page, 1, || {
                if let Some((pfn, _)) = self.host.lookup(hva(page)) {
                    self.host.set(hva(page), pfn, writable);
                }
            }),
            Op::Unmap { page, n } => self.bracket(page, n, || {
                for p in page..(page + n).min(PAGES) {
                    self.host.unmap(hva(p));
                }
            }),
            Op::Age { page, n } => {
                self.vm.clear_young(HvaRange::new(hva(page), hva(page + n)));
            }
            Op::WriteProtect { page, n } => {
                let g = self.gpa_of(page).gfn();
                self.vm
                    .write_protect_gfn_range(0, GfnRange::new(g, g.add(n)))
                    .unwrap();
            }
            Op::ZapGfns { page, n } => {
                let g = self.gpa_of(page).gfn();
                self.vm
                    .zap_gfn_range(0, GfnRange::new(g, g.add(n)))
                    .unwrap();
            }
            Op::DeleteSlot1 => {
                if self.slot1_gpa.is_some() {
                    self.vm
                        .set_user_memory_region(UserMemoryRegion {
                            slot: 1,
                            ..Default::default()
                        })
                        .unwrap();
                    self.slot1_gpa = None;
                }
            }
            Op::CreateSlot1 { readonly } => {
                if self.slot1_gpa.is_none() {
                    self.create_slot1(GPA + (4 << 20), readonly);
                }
            }
            Op::MoveSlot1 { up } => {
                if self.slot1_gpa.is_some() {
                    let gpa = if up {
                        GPA + (64 << 20)
                    } else {
                        GPA + (4 << 20)
                    };
                    self.create_slot1(gpa, self.slot1_ro);
                }
            }
            Op::LogDirty { on } => {
                let flags = if on {
                    MemFlags::LOG_DIRTY_PAGES.bits()
                } else {
                    0
                };
                self.vm
                    .set_user_memory_region(UserMemoryRegion {
                        slot: 0,
                        flags,
                        guest_phys_addr: GPA,
                        memory_size: 1024 * 4096,
                        userspace_addr: HVA,
                    })
                    .unwrap();
                self.slot0_log = on;
            }
            Op::InvalidateRoots { smm_only } => {
                self.vm
                    .invalidate_roots(if smm_only {
                        RootFilter::AddressSpace(1)
                    } else {
                        RootFilter::All
                    })
                    .unwrap();
            }
            Op::Smm { vcpu, on } => self.vcpus[vcpu].set_smm(on).unwrap(),
            Op::Enter { vcpu } => {
                let _ = self.vcpus[vcpu].prepare_entry();
            }
            Op::HostLevel { huge } => {
                self.host
                    .set_host_level(if huge { Level::M2 } else { Level::K4 })
            }
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let slots = self.vm.memslots(0).unwrap();
        for (gfn, level, spte) in self.vm.mappings(0) {
            if !spte.is_shadow_present() {
                continue;
            }
            for i in 0..level.pages() {
                let g = gfn.add(i);
                let slot = slots.lookup(g);
                prop_assert!(
                    slot.is_some(),
                    "leaf {spte:?} at {g:?} outside every memslot"
                );
                let slot = slot.unwrap();
                let host = self.host.lookup(slot.gfn_to_hva(g));
                prop_assert!(
                    host.is_some(),
                    "leaf {spte:?} at {g:?} but the host unmapped it"
                );
                let (pfn, writable) = host.unwrap();
                prop_assert_eq!(
                    spte.pfn().0 + i,
                    pfn.0,
                    "stale frame at {:?} ({:?})",
                    g,
                    spte
                );
                if spte.is_writable() {
                    prop_assert!(
                        writable && !slot.is_readonly(),
                        "writable leaf {spte:?} at {g:?} the host or slot forbids"
                    );
                }
                if spte.is_writable() && slot.dirty_logging() {
                    let rel = g.0 - slot.base_gfn().0;
                    prop_assert!(
                        slot.dirty_bitmap().unwrap().test(rel),
                        "writable page {g:?} not logged"
                    );
                }
            }
        }
        let stats = self.vm.stats();
        prop_assert_eq!(stats.invariant_violations, 0);
        Ok(())
    }
}

fn run(ops: &[Op], ad: bool) -> Result<(), TestCaseError> {
    let mut w = World::new(ad);
    for op in ops {
        w.apply(op);
        w.check()?;
    }
    let World {
        host, vm, vcpus, ..
    } = w;
    drop(vcpus);
    drop(vm);
    prop_assert_eq!(host.memory.allocated(), 0, "table pages leaked");
    prop_assert_eq!(host.outstanding_refs(), 0, "frame references leaked");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn test_model_random_ops_match_host_with_ad_bits(ops in prop::collection::vec(op(), 1..80)) {
        run(&ops, true)?;
    }

    #[test]
    fn test_model_random_ops_match_host_with_access_tracking(ops in prop::collection::vec(op(), 1..80)) {
        run(&ops, false)?;
    }
}
