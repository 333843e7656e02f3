//! The client's memory: the table that SET_MEM_TABLE (or ADD_MEM_REG/REM_MEM_REG)
//! describes, mapped into this process, and the translation of the frontend's
//! virtual addresses (vring addresses) to guest-physical ones.
//!
//! Layer: the control plane of the vhost front end; imports vm-memory and libc only.
//! The virtqueue code (`queue`, `blk`) reads guest memory through [`GuestMem`].
//!
//! # Ownership
//! A [`GuestMem`] is an `Arc` of one immutable mapping set. A new table builds a new
//! `GuestMem`; the old one is unmapped only when its last holder drops it, and every
//! in-flight request holds the `GuestMem` its buffers point into, so a table change
//! never unmaps memory the kernel is still reading or writing (plan of issue #13).
//!
//! # Bounds (the client is hostile)
//! At most [`MEM_REGIONS_MAX`] regions and [`MEM_TOTAL_MAX_BYTES`] mapped per
//! connection; every region non-empty; `gpa + size`, `user_addr + size` and
//! `mmap_offset + size` do not overflow; the offset is page-aligned (mmap needs it);
//! no two regions overlap in guest-physical or in frontend-virtual space; the fd is
//! a regular file (memfd, tmpfs, hugetlbfs) at least `mmap_offset + size` long, so
//! that no access through the mapping lies past its end (SIGBUS).
//!
//! A client that shrinks its own file after we checked it can still make an access
//! fault (it owns the file); QEMU's `memory-backend-memfd` seals the size
//! (`F_SEAL_SHRINK`), and a region whose file is not sealed so is logged once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory as the virtqueue code reads it: one immutable mapping set, shared.
pub type GuestMem = Arc<GuestMemoryMmap>;

/// Regions per connection at most (also the GET_MAX_MEM_SLOTS answer). QEMU sends 8
/// at most through SET_MEM_TABLE; libblkio adds one per buffer region it maps.
pub const MEM_REGIONS_MAX: usize = 32;

/// Bytes mapped per connection at most (1 TiB of address space; the mappings are
/// `MAP_NORESERVE` views of the client's own memory, not allocations).
pub const MEM_TOTAL_MAX_BYTES: u64 = 1 << 40;

/// Why a memory table (or region) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemError {
    #[error("too many memory regions (at most {MEM_REGIONS_MAX})")]
    TooManyRegions,
    #[error("{files} file descriptors for {regions} regions")]
    FdCount { files: usize, regions: usize },
    #[error("empty memory region")]
    ZeroSize,
    #[error("memory region address + size overflows")]
    Overflow,
    #[error("memory regions map more than {MEM_TOTAL_MAX_BYTES} bytes")]
    TooLarge,
    #[error("mmap offset {0:#x} is not page-aligned")]
    Unaligned(u64),
    #[error("memory regions overlap")]
    Overlap,
    #[error("the region's descriptor is not a regular file")]
    NotAFile,
    #[error("the region's file has {len} bytes, the region needs {need}")]
    FileTooSmall { len: u64, need: u64 },
    #[error("cannot map the region: {0}")]
    Map(String),
    #[error("no such memory region")]
    NotFound,
}

/// One region as the frontend describes it (all fields from the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub guest_phys_addr: u64,
    pub size: u64,
    /// The region's address in the frontend's process (vring addresses use these).
    pub user_addr: u64,
    /// Where the region starts in its file.
    pub mmap_offset: u64,
}

impl RegionSpec {
    /// The region's own checks (see module docs, *Bounds*).
    fn check(&self) -> Result<(), MemError> {
        if self.size == 0 {
            return Err(MemError::ZeroSize);
        }
        let ends = [
            self.guest_phys_addr.checked_add(self.size),
            self.user_addr.checked_add(self.size),
            self.mmap_offset.checked_add(self.size),
        ];
        if ends.iter().any(Option::is_none) || usize::try_from(self.size).is_err() {
            return Err(MemError::Overflow);
        }
        if self.size > MEM_TOTAL_MAX_BYTES {
            return Err(MemError::TooLarge);
        }
        if self.mmap_offset % page_size() != 0 {
            return Err(MemError::Unaligned(self.mmap_offset));
        }
        Ok(())
    }

    fn gpa_end(&self) -> u64 {
        self.guest_phys_addr.saturating_add(self.size)
    }

    fn va_end(&self) -> u64 {
        self.user_addr.saturating_add(self.size)
    }
}

/// Checks a whole table's specs: each region, their count and total, no overlap in
/// either address space. Pure (no descriptor): unit-tested on its own.
pub fn check_specs(specs: &[RegionSpec]) -> Result<(), MemError> {
    if specs.len() > MEM_REGIONS_MAX {
        return Err(MemError::TooManyRegions);
    }
    let mut total: u64 = 0;
    for s in specs {
        s.check()?;
        total = total.checked_add(s.size).ok_or(MemError::TooLarge)?;
    }
    if total > MEM_TOTAL_MAX_BYTES {
        return Err(MemError::TooLarge);
    }
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[i + 1..] {
            let gpa = a.guest_phys_addr < b.gpa_end() && b.guest_phys_addr < a.gpa_end();
            let va = a.user_addr < b.va_end() && b.user_addr < a.va_end();
            if gpa || va {
                return Err(MemError::Overlap);
            }
        }
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects; it returns -1 on error, which the
    // fallback below turns into the usual 4 KiB.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// One mapped region: what the frontend said, and the mapping.
#[derive(Clone, Debug)]
struct Region {
    spec: RegionSpec,
    mapped: Arc<GuestRegionMmap>,
}

/// The connection's memory table: its regions (sorted by guest address) and the
/// [`GuestMem`] built from them. Cheap to clone; changes build a new table.
#[derive(Clone, Debug, Default)]
pub struct MemTable {
    regions: Vec<Region>,
    mem: GuestMem,
}

impl MemTable {
    /// A table without regions (before SET_MEM_TABLE / the first ADD_MEM_REG).
    pub fn new() -> MemTable {
        MemTable::default()
    }

    /// SET_MEM_TABLE: maps every region (`files[i]` backs `specs[i]`).
    pub fn from_specs(specs: &[RegionSpec], files: Vec<File>) -> Result<MemTable, MemError> {
        if files.len() != specs.len() {
            return Err(MemError::FdCount {
                files: files.len(),
                regions: specs.len(),
            });
        }
        check_specs(specs)?;
        let mut regions = Vec::with_capacity(specs.len());
        for (spec, file) in specs.iter().zip(files) {
            regions.push(map_region(*spec, file)?);
        }
        MemTable::build(regions)
    }

    /// ADD_MEM_REG: a new table with `spec` added.
    pub fn add(&self, spec: RegionSpec, file: File) -> Result<MemTable, MemError> {
        let mut specs: Vec<RegionSpec> = self.regions.iter().map(|r| r.spec).collect();
        specs.push(spec);
        check_specs(&specs)?;
        let mut regions = self.regions.clone();
        regions.push(map_region(spec, file)?);
        MemTable::build(regions)
    }

    /// REM_MEM_REG: a new table without the region of the same guest address, user
    /// address and size (the spec's match; the offset is not compared).
    pub fn remove(&self, spec: RegionSpec) -> Result<MemTable, MemError> {
        let at = self
            .regions
            .iter()
            .position(|r| {
                r.spec.guest_phys_addr == spec.guest_phys_addr
                    && r.spec.size == spec.size
                    && r.spec.user_addr == spec.user_addr
            })
            .ok_or(MemError::NotFound)?;
        let mut regions = self.regions.clone();
        regions.remove(at);
        MemTable::build(regions)
    }

    fn build(mut regions: Vec<Region>) -> Result<MemTable, MemError> {
        regions.sort_by_key(|r| r.spec.guest_phys_addr);
        let mem = if regions.is_empty() {
            GuestMemoryMmap::default()
        } else {
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| r.mapped.clone()).collect())
                .map_err(|e| MemError::Map(e.to_string()))?
        };
        Ok(MemTable {
            regions,
            mem: Arc::new(mem),
        })
    }

    /// The mapping set for the virtqueues.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The regions, sorted by guest address.
    pub fn specs(&self) -> Vec<RegionSpec> {
        self.regions.iter().map(|r| r.spec).collect()
    }

    /// Frontend virtual address `va` → guest-physical, when all of `[va, va + len)`
    /// lies inside one region (a vring must: it is read through one mapping).
    pub fn va_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        translate(&self.specs(), va, len)
    }

    /// Whether `[gpa, gpa + len)` lies inside one region.
    pub fn contains_gpa(&self, gpa: u64, len: u64) -> bool {
        let end = match gpa.checked_add(len) {
            Some(e) => e,
            None => return false,
        };
        self.regions
            .iter()
            .any(|r| gpa >= r.spec.guest_phys_addr && end <= r.spec.gpa_end())
    }
}

/// [`MemTable::va_to_gpa`] over bare specs (unit-tested without mappings).
pub fn translate(specs: &[RegionSpec], va: u64, len: u64) -> Option<u64> {
    let end = va.checked_add(len)?;
    let r = specs
        .iter()
        .find(|r| va >= r.user_addr && end <= r.va_end())?;
    r.guest_phys_addr.checked_add(va - r.user_addr)
}

/// Checks `file` against `spec` and maps it shared, read-write.
fn map_region(spec: RegionSpec, file: File) -> Result<Region, MemError> {
    let meta = file.metadata().map_err(|e| MemError::Map(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(MemError::NotAFile);
    }
    let need = spec
        .mmap_offset
        .checked_add(spec.size)
        .ok_or(MemError::Overflow)?;
    if meta.len() < need {
        return Err(MemError::FileTooSmall {
            len: meta.len(),
            need,
        });
    }
    warn_if_shrinkable(&file, "memory");
    let size = usize::try_from(spec.size).map_err(|_| MemError::Overflow)?;
    let region = MmapRegion::from_file(FileOffset::new(file, spec.mmap_offset), size)
        .map_err(|e| MemError::Map(e.to_string()))?;
    let mapped = GuestRegionMmap::new(region, GuestAddress(spec.guest_phys_addr))
        .ok_or(MemError::Overflow)?;
    Ok(Region {
        spec,
        mapped: Arc::new(mapped),
    })
}

/// Logs (once per process) a client file (`what`: "memory", "inflight") that its
/// owner could still shrink under our mapping.
pub(crate) fn warn_if_shrinkable(file: &File, what: &str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // SAFETY: F_GET_SEALS reads the descriptor's seals; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let sealed = seals >= 0 && seals & libc::F_SEAL_SHRINK != 0;
    if !sealed && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(
            file = what,
            "a vhost-user client's file is not sealed against shrinking: the \
             client could make the server fault by truncating it (use \
             memory-backend-memfd, which seals it)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn spec(gpa: u64, size: u64, va: u64) -> RegionSpec {
        RegionSpec {
            guest_phys_addr: gpa,
            size,
            user_addr: va,
            mmap_offset: 0,
        }
    }

    fn memfd(len: u64) -> File {
        crate::inflight::memfd("ringblk-test", len).expect("memfd")
    }

    /// The bug guarded: a vring address translated through the wrong region, or a
    /// range that runs past its region's end accepted.
    #[test]
    fn translation_needs_the_whole_range_in_one_region() {
        let specs = [
            spec(0, 0x10000, 0x7f00_0000_0000),
            spec(0x10000, 0x1000, 0x5000),
        ];
        assert_eq!(translate(&specs, 0x7f00_0000_0000, 16), Some(0));
        assert_eq!(translate(&specs, 0x7f00_0000_0100, 0x100), Some(0x100));
        assert_eq!(translate(&specs, 0x5000, 0x1000), Some(0x10000));
        assert_eq!(translate(&specs, 0x5ff0, 0x10), Some(0x10ff0));
        // One byte past the end, before the start, overflow, no region.
        assert_eq!(translate(&specs, 0x5ff0, 0x11), None);
        assert_eq!(translate(&specs, 0x4fff, 2), None);
        assert_eq!(translate(&specs, u64::MAX, 2), None);
        assert_eq!(translate(&specs, 0x1000, 1), None);
    }

    #[test]
    fn bad_tables_are_refused() {
        let ok = spec(0, 0x1000, 0x1000);
        assert_eq!(check_specs(&[ok]), Ok(()));
        assert_eq!(check_specs(&[spec(0, 0, 0)]), Err(MemError::ZeroSize));
        assert_eq!(
            check_specs(&[spec(u64::MAX - 10, 0x1000, 0)]),
            Err(MemError::Overflow)
        );
        assert_eq!(
            check_specs(&[spec(0, 0x1000, u64::MAX)]),
            Err(MemError::Overflow)
        );
        let mut unaligned = ok;
        unaligned.mmap_offset = 12;
        assert_eq!(check_specs(&[unaligned]), Err(MemError::Unaligned(12)));
        // Overlap in guest-physical space, then in frontend-virtual space.
        assert_eq!(
            check_specs(&[ok, spec(0x800, 0x1000, 0x10_0000)]),
            Err(MemError::Overlap)
        );
        assert_eq!(
            check_specs(&[ok, spec(0x10_0000, 0x1000, 0x1800)]),
            Err(MemError::Overlap)
        );
        // Adjacent is fine.
        assert_eq!(check_specs(&[ok, spec(0x1000, 0x1000, 0x2000)]), Ok(()));
        let many: Vec<_> = (0..=MEM_REGIONS_MAX as u64)
            .map(|i| spec(i << 20, 0x1000, i << 20))
            .collect();
        assert_eq!(check_specs(&many), Err(MemError::TooManyRegions));
        assert_eq!(check_specs(&many[1..]), Ok(()));
        let huge = [spec(0, 1 << 40, 0), spec(1 << 40, 1 << 20, 1 << 40)];
        assert_eq!(check_specs(&huge), Err(MemError::TooLarge));
    }

    /// Real mappings: bytes written through the table land in the client's file,
    /// a file shorter than its region is refused (it would fault), ADD/REM rebuild
    /// the table and an old `GuestMem` stays readable after the table changed.
    #[test]
    fn mapped_table_reads_the_clients_file() {
        let f = memfd(0x2000);
        let g = f.try_clone().expect("dup");
        let t = MemTable::from_specs(&[spec(0x10000, 0x2000, 0x9000)], vec![f]).expect("map");
        t.mem()
            .write_obj(0xabcd_u32, GuestAddress(0x10010))
            .expect("write");
        let mut back = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&g, &mut back, 0x10).expect("read");
        assert_eq!(u32::from_le_bytes(back), 0xabcd);
        assert_eq!(t.va_to_gpa(0x9010, 4), Some(0x10010));
        assert!(t.contains_gpa(0x10000, 0x2000));
        assert!(!t.contains_gpa(0x10000, 0x2001));

        let short = memfd(0x1000);
        let err = MemTable::from_specs(&[spec(0, 0x2000, 0)], vec![short]).err();
        assert_eq!(
            err,
            Some(MemError::FileTooSmall {
                len: 0x1000,
                need: 0x2000
            })
        );
        let err = MemTable::from_specs(&[spec(0, 0x1000, 0)], vec![]).err();
        assert_eq!(
            err,
            Some(MemError::FdCount {
                files: 0,
                regions: 1
            })
        );

        let old = t.mem().clone();
        let t2 = t
            .add(spec(0, 0x1000, 0x100000), memfd(0x1000))
            .expect("add");
        assert_eq!(t2.mem().num_regions(), 2);
        assert_eq!(
            t.add(spec(0x11000, 0x1000, 0x200000), memfd(0x1000)).err(),
            Some(MemError::Overlap)
        );
        let t3 = t2.remove(spec(0x10000, 0x2000, 0x9000)).expect("remove");
        assert_eq!(t3.mem().num_regions(), 1);
        assert_eq!(
            t3.remove(spec(0x10000, 0x2000, 0x9000)).err(),
            Some(MemError::NotFound)
        );
        drop((t, t2, t3));
        assert_eq!(
            old.read_obj::<u32>(GuestAddress(0x10010)).ok(),
            Some(0xabcd)
        );
        let empty = MemTable::new();
        assert!(empty.is_empty() && empty.va_to_gpa(0, 1).is_none());
    }
}
