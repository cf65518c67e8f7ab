//! The benchmarks' host and guest, shared by `mmu` (criterion, timed) and
//! `fault_cost` (instruction counts under callgrind).
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vmmu::{
    ErrorCode, FaultinRequest, GfnRange, Gpa, HostFaultError, HostOps, HostPfn, Hva, Kick, Level,
    Pfn, PrimaryMmu, RetPf, Table, TableMemory, TableMemoryError, UserMemoryRegion, VcpuMmu, Vm,
    VmConfig, PAGE_SIZE,
};

/// Guest memory starts at 4 GiB (1 GiB aligned).
pub const GPA_BASE: u64 = 4 << 30;
/// Host addresses start at 64 GiB (1 GiB aligned), so `hva >> 12` is a frame
/// number congruent with the gfn at every level.
pub const HVA_BASE: u64 = 64 << 30;
/// Table frames are numbered from here, far above the data frames `hva >> 12`.
pub const TABLE_PFN_BASE: u64 = 1 << 28;
pub const MIB2: u64 = 2 << 20;
pub const GIB: u64 = 1 << 30;

/// A host whose primary MMU always has the frame resident and writable, and whose
/// table memory is a preallocated arena.
///
/// `faultin` is arithmetic (`pfn = hva >> 12`), `release` does nothing, and
/// `table` is an index into a boxed slice: no locks, no maps on any path a
/// steady-state fault takes. Allocation (only when a vCPU refills its table cache,
/// or a root is created) and freeing take a mutex-protected free list.
pub struct BenchHost {
    tables: Box<[Table]>,
    next: AtomicUsize,
    free: Mutex<Vec<usize>>,
    pub allocated: AtomicU64,
    /// What `mapping_level` reports for every address.
    level: Level,
    /// Private (guest_memfd) frames handed out so far.
    private_next: AtomicU64,
}

impl std::fmt::Debug for BenchHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchHost")
            .field("capacity", &self.tables.len())
            .field("allocated", &self.allocated.load(Ordering::Relaxed))
            .field("level", &self.level)
            .finish()
    }
}

impl BenchHost {
    /// A host with room for `capacity` table pages whose mappings are all `level`.
    pub fn new(capacity: usize, level: Level) -> Arc<Self> {
        let tables: Box<[Table]> = (0..capacity)
            .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
            .collect();
        Arc::new(BenchHost {
            tables,
            next: AtomicUsize::new(0),
            free: Mutex::new(Vec::new()),
            allocated: AtomicU64::new(0),
            level,
            private_next: AtomicU64::new(0),
        })
    }

    pub fn ops(self: &Arc<Self>) -> HostOps {
        HostOps {
            memory: self.clone(),
            primary: self.clone(),
            kick: self.clone(),
            private: Some(self.clone()),
        }
    }

    fn index(&self, pfn: Pfn) -> usize {
        let idx = pfn.0.wrapping_sub(TABLE_PFN_BASE) as usize;
        assert!(idx < self.tables.len(), "{pfn:?} is not a table page");
        idx
    }
}

impl TableMemory for BenchHost {
    fn alloc_table_page(&self) -> Result<Pfn, TableMemoryError> {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let idx = match reused {
            Some(i) => i,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                if i >= self.tables.len() {
                    return Err(TableMemoryError::OutOfMemory);
                }
                i
            }
        };
        self.allocated.fetch_add(1, Ordering::Relaxed);
        Ok(Pfn(TABLE_PFN_BASE + idx as u64))
    }

    fn free_table_page(&self, pfn: Pfn) {
        let idx = self.index(pfn);
        self.allocated.fetch_sub(1, Ordering::Relaxed);
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(idx);
    }

    fn table(&self, pfn: Pfn) -> &Table {
        &self.tables[self.index(pfn)]
    }
}

impl PrimaryMmu for BenchHost {
    fn faultin(&self, hva: Hva, _req: FaultinRequest) -> Result<HostPfn, HostFaultError> {
        Ok(HostPfn {
            pfn: Pfn(hva.0 / PAGE_SIZE),
            writable: true,
            level: self.level,
        })
    }

    fn release(&self, _pfn: Pfn, _mapped_writable: bool) {}

    fn mapping_level(&self, _hva: Hva) -> Level {
        self.level
    }
}

/// Private frames are numbered above the table frames; nothing reads them.
impl vmmu::PrivateMemory for BenchHost {
    fn alloc_private(&self) -> Result<Pfn, HostFaultError> {
        Ok(Pfn(
            2 * TABLE_PFN_BASE + self.private_next.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn free_private(&self, _pfn: Pfn) {}
}

impl Kick for BenchHost {
    fn kick(&self, _vcpu_id: u32) {}
}

/// A VM with one memslot at [`GPA_BASE`] / [`HVA_BASE`] and one vCPU with a root
/// loaded.
pub struct Guest {
    pub vm: Vm,
    pub vcpu: VcpuMmu,
    pub host: Arc<BenchHost>,
    /// The gfns of the memslot.
    pub slot: GfnRange,
}

impl Guest {
    pub fn new(host_level: Level, size: u64, table_capacity: usize) -> Guest {
        let host = BenchHost::new(table_capacity, host_level);
        let vm = Vm::new(VmConfig::default(), host.ops()).expect("create VM");
        vm.set_user_memory_region(UserMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: GPA_BASE,
            memory_size: size,
            userspace_addr: HVA_BASE,
        })
        .expect("create memslot");
        let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
        vcpu.prepare_entry().expect("load root");
        let first = Gpa(GPA_BASE).gfn();
        Guest {
            vm,
            vcpu,
            host,
            slot: GfnRange::new(first, first.add(size / PAGE_SIZE)),
        }
    }

    /// [`Guest::new`] on a software-protected VM whose slot is all private,
    /// backed by a guest_memfd with every page already allocated.
    pub fn new_private(size: u64, table_capacity: usize) -> (Guest, vmmu::GuestMemfd) {
        let host = BenchHost::new(table_capacity, Level::K4);
        let vm = Vm::new(
            VmConfig {
                vm_type: vmmu::VmType::SwProtected,
                ..VmConfig::default()
            },
            host.ops(),
        )
        .expect("create VM");
        let file = vm.create_guest_memfd(size, 0).expect("create guest_memfd");
        file.fallocate(vmmu::gmem::FALLOC_FL_KEEP_SIZE, 0, size)
            .expect("allocate the file");
        vm.set_user_memory_region2(
            UserMemoryRegion {
                slot: 0,
                flags: vmmu::MemFlags::GUEST_MEMFD.bits(),
                guest_phys_addr: GPA_BASE,
                memory_size: size,
                userspace_addr: HVA_BASE,
            },
            Some(&file),
            0,
        )
        .expect("create memslot");
        vm.set_memory_attributes(GPA_BASE, size, vmmu::MEMORY_ATTRIBUTE_PRIVATE, 0)
            .expect("make it private");
        let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
        vcpu.prepare_entry().expect("load root");
        let first = Gpa(GPA_BASE).gfn();
        let g = Guest {
            vm,
            vcpu,
            host,
            slot: GfnRange::new(first, first.add(size / PAGE_SIZE)),
        };
        (g, file)
    }

    /// Fault `n` pages `stride` bytes apart from the start of the slot with `ec`;
    /// returns how many returned [`RetPf::Fixed`].
    #[inline]
    pub fn fault_pages(&mut self, stride: u64, n: u64, ec: ErrorCode) -> u64 {
        let mut fixed = 0;
        for i in 0..n {
            let r = self.vcpu.page_fault(Gpa(GPA_BASE + i * stride), ec);
            fixed += u64::from(r == Ok(RetPf::Fixed));
        }
        fixed
    }

    /// Gfns of the first `n` pages of `stride` bytes.
    pub fn range(&self, stride: u64, n: u64) -> GfnRange {
        GfnRange::new(self.slot.start, self.slot.start.add(n * stride / PAGE_SIZE))
    }

    /// Zap the whole slot and consume the resulting flush request, as a vCPU would
    /// before its next entry.
    pub fn zap_slot(&mut self) {
        self.vm.zap_gfn_range(0, self.slot).expect("valid range");
        self.vcpu.prepare_entry().expect("re-enter");
    }
}
