//! Validating a `KVM_SET_USER_MEMORY_REGION(2)` call against the current
//! set and classifying it (`enum kvm_mr_change`), before anything changes.

use super::*;

/// What an update does (`enum kvm_mr_change`).
#[derive(Debug)]
pub(crate) enum Change {
    Create(Arc<Memslot>),
    Delete(Arc<Memslot>),
    Move {
        old: Arc<Memslot>,
        new: Arc<Memslot>,
    },
    FlagsOnly {
        old: Arc<Memslot>,
        new: Arc<Memslot>,
    },
    Nothing,
}

impl Change {
    /// The invalid copy that faults see while a delete or move zaps.
    pub(crate) fn invalid_copy(old: &Memslot) -> Arc<Memslot> {
        Arc::new(old.invalid_copy())
    }
}

/// Validate `region` against the current set and classify it, like
/// `kvm_set_memory_region` (all checks happen before anything changes).
#[cfg(test)]
pub(crate) fn classify(
    set: &MemslotSet,
    region: &UserMemoryRegion,
    address_spaces: u16,
    gfn_limit: u64,
) -> Result<Change> {
    classify_with(
        set,
        region,
        &Limits {
            address_spaces,
            gfn_limit,
            region2: false,
            gmem: false,
            dirty_initially_set: false,
            dirty_ring: false,
        },
        None,
    )
}

/// What the VM allows, for [`classify_with`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) address_spaces: u16,
    pub(crate) gfn_limit: u64,
    /// The call is `KVM_SET_USER_MEMORY_REGION2` (the only one with guest_memfd).
    pub(crate) region2: bool,
    /// The VM can bind guest_memfd files (its host provides their pages). As
    /// on KVM 6.18, any VM type can: on one without private memory the file
    /// only backs nothing private, and faults use the shared side.
    pub(crate) gmem: bool,
    /// Manual dirty-log protection with `INITIALLY_SET`: a new bitmap starts
    /// with every page marked.
    pub(crate) dirty_initially_set: bool,
    /// The VM logs into per-vCPU dirty rings: logging slots get no bitmap.
    pub(crate) dirty_ring: bool,
}

/// A guest_memfd given to `KVM_SET_USER_MEMORY_REGION2`, already checked to
/// belong to the VM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GmemArg<'a> {
    pub(crate) file: &'a Arc<GmemFile>,
    pub(crate) offset: u64,
}

/// [`classify`] for either call, with an optional guest_memfd.
pub(crate) fn classify_with(
    set: &MemslotSet,
    region: &UserMemoryRegion,
    limits: &Limits,
    gmem: Option<GmemArg<'_>>,
) -> Result<Change> {
    let (address_spaces, gfn_limit) = (limits.address_spaces, limits.gfn_limit);
    // KVM's check_memory_region_flags: guest_memfd only through the second call
    // and where guest_memfd is supported; no dirty logging or read-only on a
    // guest_memfd slot.
    let mut valid = SUPPORTED_FLAGS;
    if limits.region2 && limits.gmem {
        valid |= MemFlags::GUEST_MEMFD;
    }
    if region.flags & MemFlags::GUEST_MEMFD.bits() != 0 {
        valid.remove(MemFlags::LOG_DIRTY_PAGES | MemFlags::READONLY);
    }
    let flags = MemFlags::from_bits(region.flags)
        .filter(|f| valid.contains(*f))
        .ok_or(MemslotError::InvalidFlags {
            flags: region.flags,
            supported: valid.bits(),
        })?;
    let as_id = (region.slot >> 16) as u16;
    let id = region.slot & 0xffff;
    if as_id >= address_spaces || id >= USER_MEM_SLOTS {
        return Err(MemslotError::InvalidSlot {
            slot: region.slot,
            spaces: address_spaces,
            max: USER_MEM_SLOTS,
        });
    }
    let id = id as u16;
    for (what, value) in [
        ("size", region.memory_size),
        ("guest physical address", region.guest_phys_addr),
        ("userspace address", region.userspace_addr),
    ] {
        if value % PAGE_SIZE != 0 {
            return Err(MemslotError::Unaligned { what, value });
        }
    }
    let out_of_range = || MemslotError::OutOfRange {
        gpa: region.guest_phys_addr,
        size: region.memory_size,
        hva: region.userspace_addr,
    };
    let gpa_end = region
        .guest_phys_addr
        .checked_add(region.memory_size)
        .ok_or_else(out_of_range)?;
    let hva_end = region
        .userspace_addr
        .checked_add(region.memory_size)
        .ok_or_else(out_of_range)?;
    if hva_end > USER_ADDR_LIMIT {
        return Err(out_of_range());
    }
    let npages = region.memory_size / PAGE_SIZE;
    if npages > MEM_MAX_NR_PAGES || (npages > 0 && (gpa_end / PAGE_SIZE) > gfn_limit) {
        return Err(out_of_range());
    }

    let old = set.by_id(id).cloned();
    if npages == 0 {
        return match old {
            Some(old) => Ok(Change::Delete(old)),
            None => Err(MemslotError::NoSuchSlot { slot: region.slot }),
        };
    }
    if let Some(old) = &old {
        // A guest_memfd slot can only be deleted (KVM refuses moves and flag
        // changes of one).
        if old.has_guest_memfd() || flags.contains(MemFlags::GUEST_MEMFD) {
            let same = old.base_gfn.0 == region.guest_phys_addr / PAGE_SIZE
                && old.npages == npages
                && old.userspace_addr.0 == region.userspace_addr
                && old.flags == flags;
            if !same {
                return Err(MemslotError::IllegalChange {
                    slot: region.slot,
                    what: "a guest_memfd slot (it can only be deleted)",
                });
            }
        }
    }
    let slot_gmem = if flags.contains(MemFlags::GUEST_MEMFD) {
        let Some(g) = gmem else {
            return Err(MemslotError::NoGuestMemfd { slot: region.slot });
        };
        let bad = |what| MemslotError::GuestMemfd {
            slot: region.slot,
            what,
        };
        if !g.offset.is_multiple_of(PAGE_SIZE) {
            return Err(bad("offset is not page aligned"));
        }
        if g.offset
            .checked_add(region.memory_size)
            .is_none_or(|e| e > g.file.size)
        {
            return Err(bad("range passes the end of the file"));
        }
        // Whether the file range is free is decided once, by the bind that
        // creating the slot does (under the slots lock, before anything is
        // published).
        Some(SlotGmem {
            file: g.file.clone(),
            pgoff: g.offset / PAGE_SIZE,
        })
    } else {
        None
    };
    let base_gfn = Gfn(region.guest_phys_addr / PAGE_SIZE);
    let hva = Hva(region.userspace_addr);
    let check_overlap = |except: Option<u16>| -> Result<()> {
        let range = GfnRange::new(base_gfn, base_gfn.add(npages));
        match set.overlapping(range, except) {
            Some(o) => Err(MemslotError::Overlap {
                slot: region.slot,
                start: range.start.0,
                end: range.end.0,
                other: o.slot_number(),
            }),
            None => Ok(()),
        }
    };
    let dirty = |flags: MemFlags, old: Option<&Memslot>| -> Option<Arc<DirtyBitmap>> {
        if !flags.contains(MemFlags::LOG_DIRTY_PAGES) || limits.dirty_ring {
            return None;
        }
        old.and_then(|o| o.dirty_bitmap.clone()).or_else(|| {
            Some(Arc::new(if limits.dirty_initially_set {
                DirtyBitmap::all_set(npages)
            } else {
                DirtyBitmap::new(npages)
            }))
        })
    };
    match old {
        None => {
            check_overlap(None)?;
            Ok(Change::Create(Arc::new(Memslot {
                id,
                as_id,
                base_gfn,
                npages,
                userspace_addr: hva,
                flags,
                invalid: false,
                lpage: Arc::new(LpageInfo::new(base_gfn, npages, hva)),
                dirty_bitmap: dirty(flags, None),
                gmem: slot_gmem,
            })))
        }
        Some(old) => {
            if old.userspace_addr != hva {
                return Err(MemslotError::IllegalChange {
                    slot: region.slot,
                    what: "the userspace address",
                });
            }
            if old.npages != npages {
                return Err(MemslotError::IllegalChange {
                    slot: region.slot,
                    what: "the size",
                });
            }
            if (old.flags ^ flags).contains(MemFlags::READONLY) {
                return Err(MemslotError::IllegalChange {
                    slot: region.slot,
                    what: "read-only-ness",
                });
            }
            if old.base_gfn != base_gfn {
                check_overlap(Some(id))?;
                let new = Arc::new(Memslot {
                    base_gfn,
                    flags,
                    invalid: false,
                    lpage: Arc::new(LpageInfo::new(base_gfn, npages, hva)),
                    dirty_bitmap: dirty(flags, Some(&old)),
                    ..old.clone_shallow()
                });
                return Ok(Change::Move { old, new });
            }
            if old.flags != flags {
                let new = Arc::new(Memslot {
                    flags,
                    dirty_bitmap: dirty(flags, Some(&old)),
                    ..old.clone_shallow()
                });
                return Ok(Change::FlagsOnly { old, new });
            }
            Ok(Change::Nothing)
        }
    }
}
