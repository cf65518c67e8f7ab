//! A fixed process-churn schedule, the same one the real-KVM side runs
//! (`vmmu_kvm::process_churn`), so that the shadow MMU's counters for it can
//! be put beside KVM's: a kernel with `processes` address spaces switches
//! between them round robin and touches `pages` user pages after each
//! switch; with `respawn_every` set, every that many switches it also ends
//! the process it is about to switch to (on its own tables: entries cleared,
//! the PT's first) and spawns it again with the same frames.
//!
//! Layout from `base`: the kernel's PML4 and its direct map's PDPT, then
//! four tables per process (PML4, PDPT, PD, PT), then the frames. Every
//! process shares the kernel's direct map (PML4 entry 254) and maps its
//! user pages at 512 GiB (PML4 entry 1), as the KVM side does.

use std::collections::VecDeque;

use vmmu::Gpa;

use crate::guest::{AccessKind, AccessResult, GuestAccess, GuestProgram, PagingOp};
use crate::paging::{direct_map_entries, pte, LinearAccess, LinearOp, PagingMode};

/// Linear address of a process's first user page (PML4 entry 1).
pub const USER_BASE: u64 = 1 << 39;
const USER: u64 = pte::P | pte::W | pte::U;

/// The schedule's shape.
#[derive(Debug, Clone, Copy)]
pub struct ChurnShape {
    /// Address spaces besides the kernel's.
    pub processes: u64,
    /// User pages per process.
    pub pages: u64,
    /// End and respawn a process every this many switches (0: never).
    pub respawn_every: u64,
    /// CR3 switches to a process.
    pub switches: u64,
}

impl ChurnShape {
    /// Guest memory the layout needs from `base`.
    pub fn bytes(&self) -> u64 {
        (2 + 4 * self.processes + self.processes * self.pages) * 4096
    }
}

/// The program: the accesses of one run of the schedule.
#[derive(Debug)]
pub struct ChurnSchedule {
    queue: VecDeque<(GuestAccess, Option<u64>)>,
    mismatches: u64,
    first: Option<String>,
}

impl ChurnSchedule {
    /// The schedule at `base`; with `build`, the kernel first writes every
    /// table (physical stores), turns paging on and loads its own CR3 (the
    /// first run; later runs continue on the same tables).
    pub fn new(base: Gpa, shape: ChurnShape, build: bool) -> Self {
        let b = base.0;
        let kernel = b;
        let tables = |p: u64| {
            let t = b + 0x2000 + p * 0x4000;
            [t, t + 0x1000, t + 0x2000, t + 0x3000]
        };
        let frames = b + (2 + 4 * shape.processes) * 0x1000;
        let frame = |p: u64, i: u64| frames + (p * shape.pages + i) * 0x1000;
        // The kernel half (the shared direct map) first, then the user half,
        // as on the KVM side: an exit writes the root twice, a respawn twice.
        let dm_entry = (kernel + 0x1000) | pte::P | pte::W | pte::A;
        let spawn = |p: u64| {
            let [pml4, pdpt, pd, pt] = tables(p);
            let mut v = vec![
                (pml4 + crate::paging::DIRECT_MAP_INDEX * 8, dm_entry),
                (pml4 + 8, pdpt | USER),
                (pdpt, pd | USER),
                (pd, pt | USER),
            ];
            v.extend((0..shape.pages).map(|i| (pt + 8 * i, frame(p, i) | USER)));
            v
        };
        let mut q = VecDeque::new();
        let pte_write = |q: &mut VecDeque<_>, gpa: u64, value: u64, space: u64| {
            q.push_back((
                GuestAccess::shared(
                    Gpa(gpa),
                    AccessKind::PteWrite {
                        value,
                        space: Gpa(space),
                    },
                ),
                None,
            ));
        };
        let paging =
            |q: &mut VecDeque<_>, op: PagingOp| q.push_back((GuestAccess::paging(op), None));
        if build {
            for (gpa, v) in direct_map_entries(Gpa(kernel), Gpa(kernel + 0x1000)) {
                pte_write(&mut q, gpa.0, v, kernel);
            }
            for p in 0..shape.processes {
                let root = tables(p)[0];
                for (gpa, v) in spawn(p) {
                    pte_write(&mut q, gpa, v, root);
                }
            }
            paging(
                &mut q,
                PagingOp::SetMode(PagingMode {
                    enabled: true,
                    wp: true,
                    nx: true,
                    ..PagingMode::default()
                }),
            );
            paging(&mut q, PagingOp::LoadCr3(kernel));
        }
        for s in 0..shape.switches {
            let p = s % shape.processes;
            let root = tables(p)[0];
            if shape.respawn_every > 0 && s % shape.respawn_every == shape.respawn_every - 1 {
                paging(&mut q, PagingOp::LoadCr3(kernel));
                let stores = spawn(p);
                for (gpa, _) in stores.iter().rev() {
                    pte_write(&mut q, *gpa, 0, root);
                }
                for (gpa, v) in stores {
                    pte_write(&mut q, gpa, v, root);
                }
            }
            paging(&mut q, PagingOp::LoadCr3(root));
            for i in 0..shape.pages {
                let stamp = (s << 8) | i;
                let gva = vmmu::Gva(USER_BASE + i * 0x1000);
                let user = |op| LinearAccess {
                    op,
                    user: true,
                    ac: false,
                };
                q.push_back((GuestAccess::linear(gva, user(LinearOp::Write(stamp))), None));
                if i == 0 {
                    q.push_back((GuestAccess::linear(gva, user(LinearOp::Read)), Some(stamp)));
                }
            }
        }
        ChurnSchedule {
            queue: q,
            mismatches: 0,
            first: None,
        }
    }
}

impl GuestProgram for ChurnSchedule {
    fn next(&mut self) -> Option<GuestAccess> {
        self.queue.front().map(|(a, _)| *a)
    }

    fn complete(&mut self, access: &GuestAccess, result: AccessResult) {
        let Some((_, want)) = self.queue.pop_front() else {
            return;
        };
        let ok = match (want, result) {
            (None, AccessResult::Memory(_) | AccessResult::Done) => true,
            (Some(v), AccessResult::Memory(got)) => v == got,
            _ => false,
        };
        if !ok {
            self.mismatches += 1;
            self.first.get_or_insert_with(|| {
                format!("{:?} gave {result:?}, expected {want:?}", access.kind)
            });
        }
    }

    fn mismatches(&self) -> u64 {
        self.mismatches
    }

    fn first_mismatch(&self) -> Option<String> {
        self.first.clone()
    }
}
