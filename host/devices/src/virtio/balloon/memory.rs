//! Giving the host memory behind a guest-physical range back to the host.

use std::io;

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::GuestMemoryMmap;

/// Why a range could not be released.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// Part of the range is not guest memory.
    #[error("range {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The range is backed by huge pages, which we do not release piecemeal.
    #[error("range {0:#x} is backed by huge pages")]
    HugePages(u64),
    /// `madvise` failed.
    #[error("madvise")]
    Advise(#[source] io::Error),
}

/// Releases the host memory behind `[addr, addr + len)`: only the whole host pages inside the
/// range, so memory the guest still uses next to it is never touched. Nothing is released
/// unless the whole range is guest memory.
///
/// Private mappings get `MADV_DONTNEED` (the pages read back as zeroes); shared mappings, which
/// is what a region with a file offset (a memfd or file) is, get `MADV_REMOVE`, since dropping
/// a shared page alone would leave its backing store allocated.
pub fn release(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), ReleaseError> {
    let outside = || ReleaseError::OutsideMemory { addr: addr.0, len };
    let inside = usize::try_from(len).is_ok_and(|n| mem.check_range(addr, n));
    if !inside {
        return Err(outside());
    }
    let mut cur = addr;
    let mut remaining = len;
    while remaining > 0 {
        let (region, offset) = mem.to_region_addr(cur).ok_or_else(outside)?;
        let chunk = remaining.min(region.len() - offset.raw_value());
        release_in_region(region, offset.raw_value(), chunk)?;
        remaining -= chunk;
        cur = cur.checked_add(chunk).ok_or_else(outside)?;
    }
    Ok(())
}

/// Releases the whole host pages of `[offset, offset + len)`, a range inside `region`.
fn release_in_region(
    region: &GuestRegionMmap<()>,
    offset: u64,
    len: u64,
) -> Result<(), ReleaseError> {
    if region.is_hugetlbfs() == Some(true) {
        return Err(ReleaseError::HugePages(region.start_addr().0 + offset));
    }
    let page = host_page_size();
    // The mapping starts on a page boundary, so aligning offsets aligns host addresses.
    let start = offset.next_multiple_of(page);
    let end = (offset + len) / page * page;
    if start >= end {
        return Ok(());
    }
    let advice = if region.flags() & libc::MAP_SHARED != 0 {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let host = region
        .get_host_address(MemoryRegionAddress(start))
        .map_err(|_| ReleaseError::OutsideMemory {
            addr: region.start_addr().0 + offset,
            len,
        })?;
    // SAFETY: `[start, end)` lies inside the region (the caller checked the range against
    // guest memory, and rounding only shrank it), so the advice only touches our own mapping
    // of guest memory. The guest gave these pages up; the VMM only ever reaches guest memory
    // through volatile accessors, so pages that read back as zeroes break no Rust invariant.
    let ret = unsafe { libc::madvise(host.cast(), (end - start) as usize, advice) };
    if ret < 0 {
        return Err(ReleaseError::Advise(io::Error::last_os_error()));
    }
    Ok(())
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system and takes no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, FileOffset};

    const PAGE: usize = 4096;
    const PATTERN: u8 = 0x5a;

    fn private_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap()
    }

    fn fill(mem: &GuestMemoryMmap, addr: u64, len: usize) {
        mem.write_slice(&vec![PATTERN; len], GuestAddress(addr))
            .unwrap();
    }

    fn bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn memfd(len: u64) -> File {
        // SAFETY: the name is a NUL-terminated literal; the returned fd is checked and then
        // owned by the File alone.
        let fd = unsafe { libc::memfd_create(c"berth-balloon-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn release_private_range_reads_back_zero() {
        let mem = private_memory();
        fill(&mem, 0, 16 * PAGE);

        release(&mem, GuestAddress(PAGE as u64), 2 * PAGE as u64).unwrap();

        assert_eq!(bytes(&mem, PAGE as u64, 2 * PAGE), vec![0u8; 2 * PAGE]);
        assert_eq!(bytes(&mem, 0, PAGE), vec![PATTERN; PAGE]);
        assert_eq!(bytes(&mem, 3 * PAGE as u64, PAGE), vec![PATTERN; PAGE]);
    }

    #[test]
    fn release_unaligned_range_keeps_partial_pages() {
        let mem = private_memory();
        fill(&mem, 0, 16 * PAGE);

        release(&mem, GuestAddress(PAGE as u64 / 2), 2 * PAGE as u64).unwrap();

        assert_eq!(
            bytes(&mem, PAGE as u64 / 2, PAGE / 2),
            vec![PATTERN; PAGE / 2]
        );
        assert_eq!(bytes(&mem, PAGE as u64, PAGE), vec![0u8; PAGE]);
        assert_eq!(
            bytes(&mem, 2 * PAGE as u64, PAGE / 2),
            vec![PATTERN; PAGE / 2]
        );
    }

    #[test]
    fn release_range_past_end_of_memory_fails_and_keeps_memory() {
        let mem = private_memory();
        fill(&mem, 0, 16 * PAGE);

        let err = release(&mem, GuestAddress(15 * PAGE as u64), 2 * PAGE as u64).unwrap_err();

        assert!(matches!(err, ReleaseError::OutsideMemory { .. }));
        assert_eq!(bytes(&mem, 15 * PAGE as u64, PAGE), vec![PATTERN; PAGE]);
    }

    #[test]
    fn release_huge_length_fails() {
        let mem = private_memory();

        let err = release(&mem, GuestAddress(0), u64::MAX).unwrap_err();

        assert!(matches!(err, ReleaseError::OutsideMemory { .. }));
    }

    #[test]
    fn release_shared_memfd_range_punches_hole() {
        let size = 16 * PAGE as u64;
        let file = memfd(size);
        let probe = file.try_clone().unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        fill(&mem, 0, size as usize);
        let blocks_before = probe.metadata().unwrap().blocks();

        release(&mem, GuestAddress(0), 8 * PAGE as u64).unwrap();

        assert!(probe.metadata().unwrap().blocks() < blocks_before);
        assert_eq!(bytes(&mem, 0, 8 * PAGE), vec![0u8; 8 * PAGE]);
        assert_eq!(bytes(&mem, 8 * PAGE as u64, PAGE), vec![PATTERN; PAGE]);
    }
}
