//! The corpus of `vmmu diff`: memslot call sequences and capabilities.

use vmmu::caps::Cap;

/// Where a region's `userspace_addr` points.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hva {
    /// This offset into the side's host buffer (16 MiB).
    Buf(u64),
    /// This address as it is (invalid ones: the same on both sides).
    Raw(u64),
}

/// One `KVM_SET_USER_MEMORY_REGION(2)` call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Op {
    pub(crate) v2: bool,
    pub(crate) slot: u32,
    pub(crate) flags: u32,
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    pub(crate) hva: Hva,
}

/// A named sequence of calls; every call's answer is compared.
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) ops: Vec<Op>,
}

const MB: u64 = 1 << 20;
const G1: u64 = 1 << 30;
const LOG: u32 = 1 << 0;
const RO: u32 = 1 << 1;
const GMEM: u32 = 1 << 2;

fn set(slot: u32, flags: u32, gpa: u64, size: u64, off: u64) -> Op {
    Op {
        v2: false,
        slot,
        flags,
        gpa,
        size,
        hva: Hva::Buf(off),
    }
}

fn set2(slot: u32, flags: u32, gpa: u64, size: u64, off: u64) -> Op {
    Op {
        v2: true,
        ..set(slot, flags, gpa, size, off)
    }
}

fn raw(slot: u32, gpa: u64, size: u64, hva: u64) -> Op {
    Op {
        hva: Hva::Raw(hva),
        ..set(slot, 0, gpa, size, 0)
    }
}

fn del(slot: u32) -> Op {
    set(slot, 0, 0, 0, 0)
}

/// The cases, for a guest physical width of `maxphyaddr` bits.
pub(crate) fn cases(maxphyaddr: u32) -> Vec<Case> {
    let _ = maxphyaddr;
    // The limit differs by MMU (52 bits with shadow paging): the cases probe
    // the 48-bit and the 52-bit boundaries, each side answering for its own.
    let top = 1u64 << 48;
    let top52 = 1u64 << 52;
    let c = |name, ops: Vec<Op>| Case { name, ops };
    vec![
        c("create", vec![set(0, 0, G1, 2 * MB, 0)]),
        c("create-region2", vec![set2(0, 0, G1, 2 * MB, 0)]),
        c("create-readonly", vec![set(0, RO, G1, 2 * MB, 0)]),
        c("create-dirty-log", vec![set(0, LOG, G1, 2 * MB, 0)]),
        c(
            "create-readonly-dirty-log",
            vec![set(0, RO | LOG, G1, 2 * MB, 0)],
        ),
        c("unaligned-gpa", vec![set(0, 0, G1 + 2048, 2 * MB, 0)]),
        c("unaligned-size", vec![set(0, 0, G1, 2 * MB + 100, 0)]),
        c("unaligned-hva", vec![set(0, 0, G1, 2 * MB, 8)]),
        c("unknown-flag", vec![set(0, 1 << 9, G1, 2 * MB, 0)]),
        c(
            "guest-memfd-flag-on-region1",
            vec![set(0, GMEM, G1, 2 * MB, 0)],
        ),
        c(
            "guest-memfd-flag-without-a-file",
            vec![set2(0, GMEM, G1, 2 * MB, 0)],
        ),
        c("gpa-wraps", vec![set(0, 0, u64::MAX - 4095, 2 * MB, 0)]),
        c("hva-wraps", vec![raw(0, G1, 2 * MB, u64::MAX - 4095)]),
        c(
            "hva-in-kernel-half",
            vec![raw(0, G1, 2 * MB, 0xffff_8000_0000_0000)],
        ),
        c("hva-past-user-space", vec![raw(0, G1, 2 * MB, 1u64 << 47)]),
        c(
            "last-page-below-48-bits",
            vec![set(0, 0, top - 2 * MB, 2 * MB, 0)],
        ),
        c("past-48-bits", vec![set(0, 0, top - MB, 2 * MB, 0)]),
        c(
            "last-page-below-52-bits",
            vec![set(0, 0, top52 - 2 * MB, 2 * MB, 0)],
        ),
        c("past-52-bits", vec![set(0, 0, top52 - MB, 2 * MB, 0)]),
        c("last-slot-id", vec![set(32763, 0, G1, 2 * MB, 0)]),
        c("slot-id-too-large", vec![set(32764, 0, G1, 2 * MB, 0)]),
        c("address-space-1", vec![set(1 << 16, 0, G1, 2 * MB, 0)]),
        c("address-space-2", vec![set(2 << 16, 0, G1, 2 * MB, 0)]),
        c(
            "same-gpa-in-two-address-spaces",
            vec![set(0, 0, G1, 2 * MB, 0), set(1 << 16, 0, G1, 2 * MB, 0)],
        ),
        c(
            "overlap",
            vec![
                set(0, 0, G1, 4 * MB, 0),
                set(1, 0, G1 + 2 * MB, 4 * MB, 4 * MB),
            ],
        ),
        c(
            "adjacent",
            vec![
                set(0, 0, G1, 4 * MB, 0),
                set(1, 0, G1 + 4 * MB, 4 * MB, 4 * MB),
            ],
        ),
        c(
            "same-hva-twice",
            vec![set(0, 0, G1, 2 * MB, 0), set(1, 0, 2 * G1, 2 * MB, 0)],
        ),
        c("delete", vec![set(0, 0, G1, 2 * MB, 0), del(0)]),
        c(
            "delete-twice",
            vec![set(0, 0, G1, 2 * MB, 0), del(0), del(0)],
        ),
        c("delete-missing", vec![del(5)]),
        c(
            "recreate-after-delete",
            vec![
                set(0, 0, G1, 2 * MB, 0),
                del(0),
                set(0, 0, 2 * G1, 4 * MB, 0),
            ],
        ),
        c(
            "move",
            vec![set(0, 0, G1, 2 * MB, 0), set(0, 0, 2 * G1, 2 * MB, 0)],
        ),
        c(
            "move-into-another-slot",
            vec![
                set(0, 0, G1, 2 * MB, 0),
                set(1, 0, 2 * G1, 2 * MB, 2 * MB),
                set(0, 0, 2 * G1, 2 * MB, 0),
            ],
        ),
        c(
            "resize",
            vec![set(0, 0, G1, 2 * MB, 0), set(0, 0, G1, 4 * MB, 0)],
        ),
        c(
            "change-hva",
            vec![set(0, 0, G1, 2 * MB, 0), set(0, 0, G1, 2 * MB, 2 * MB)],
        ),
        c(
            "toggle-dirty-log",
            vec![
                set(0, 0, G1, 2 * MB, 0),
                set(0, LOG, G1, 2 * MB, 0),
                set(0, 0, G1, 2 * MB, 0),
            ],
        ),
        c(
            "toggle-readonly",
            vec![set(0, 0, G1, 2 * MB, 0), set(0, RO, G1, 2 * MB, 0)],
        ),
        c(
            "move-and-log",
            vec![set(0, 0, G1, 2 * MB, 0), set(0, LOG, 2 * G1, 2 * MB, 0)],
        ),
        c(
            "refused-call-keeps-the-slot",
            vec![
                set(0, 0, G1, 2 * MB, 0),
                set(0, 0, G1, 4 * MB, 0),
                set(1, 0, G1, 2 * MB, 2 * MB),
            ],
        ),
        c("zero-size-create-of-a-new-id", vec![set(7, 0, G1, 0, 0)]),
        c(
            "region2-then-region1-update",
            vec![set2(0, 0, G1, 2 * MB, 0), set(0, LOG, G1, 2 * MB, 0)],
        ),
    ]
}

/// The capabilities vmmu answers for, with `KVM_CAP_*` numbers.
pub(crate) const CAPS: &[(&str, Cap, u32)] = &[
    ("KVM_CAP_NR_MEMSLOTS", Cap::NrMemslots, 10),
    ("KVM_CAP_MULTI_ADDRESS_SPACE", Cap::MultiAddressSpace, 118),
    ("KVM_CAP_MAX_VCPU_ID", Cap::MaxVcpuId, 128),
    ("KVM_CAP_USER_MEMORY2", Cap::UserMemory2, 231),
    ("KVM_CAP_MEMORY_FAULT_INFO", Cap::MemoryFaultInfo, 232),
    ("KVM_CAP_MEMORY_ATTRIBUTES", Cap::MemoryAttributes, 233),
    ("KVM_CAP_GUEST_MEMFD", Cap::GuestMemfd, 234),
    ("KVM_CAP_VM_TYPES", Cap::VmTypes, 235),
    ("KVM_CAP_GUEST_MEMFD_FLAGS", Cap::GuestMemfdFlags, 244),
];

/// Differences kept on purpose (docs/DESIGN.md, "Deviations from KVM"):
/// case or capability name → why.
pub(crate) fn deviation(name: &str) -> Option<&'static str> {
    Some(match name {
        "KVM_CAP_VM_TYPES" => {
            "vmmu offers the software-protected and SNP-like types besides the default one; a KVM offers what its host supports"
        }
        "KVM_CAP_MULTI_ADDRESS_SPACE" => {
            "a KVM built without SMM does not know the capability (0); vmmu's one-address-space VM stands for a protected-state VM of a KVM with SMM, which answers 1"
        }
        _ => return None,
    })
}
