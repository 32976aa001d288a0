//! Guest RAM: one memfd, mapped shared, so another process can map the same pages.
//!
//! vhost-user backends (`virtiofsd`) run the guest's queues in their own process and read and
//! write guest buffers directly, so they need the memory as a file they can `mmap`; an anonymous
//! private mapping cannot be handed over. We always back RAM this way rather than only when a
//! share is configured: berthd always shares at least one directory, so this is the path that
//! runs and the only one worth testing, and a later free-page-reporting balloon needs a file too
//! (on shared memory `MADV_DONTNEED` frees nothing, `MADV_REMOVE` punches the hole). The cost is
//! that shmem gets transparent huge pages only where the host enables them for shmem
//! (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use berth_devices::GuestMemoryMmap;
use vm_memory::{FileOffset, GuestAddress};

/// The memfd's name, shown in `/proc/<pid>/maps` and `/proc/<pid>/fd`.
const MEMFD_NAME: &CStr = c"berth-guest-ram";

/// Errors of [`create_guest_memory`].
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `memfd_create` failed.
    #[error("cannot create the guest memory file")]
    Create(#[source] io::Error),
    /// The file could not be sized or sealed.
    #[error("cannot size the guest memory file to {0} bytes")]
    Size(u64, #[source] io::Error),
    /// The regions overflow the address space.
    #[error("guest memory regions are too large")]
    TooLarge,
    /// Mapping the file failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest memory for `ranges`, all backed by one memfd: each region maps the file at the offset
/// where the previous region ended.
pub fn create_guest_memory(
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let total = ranges
        .iter()
        .try_fold(0u64, |sum, (_, size)| sum.checked_add(*size as u64))
        .ok_or(MemoryError::TooLarge)?;
    let file = Arc::new(sized_memfd(total)?);
    let mut offset = 0u64;
    let regions: Vec<_> = ranges
        .iter()
        .map(|(start, size)| {
            let region = (
                *start,
                *size,
                Some(FileOffset::from_arc(file.clone(), offset)),
            );
            offset += *size as u64;
            region
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&regions).map_err(MemoryError::Map)
}

/// A memfd of `size` bytes (sparse: pages are allocated when first touched), sealed against
/// resizing so no process holding it can truncate it and fault the VMM's own mapping.
fn sized_memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a NUL-terminated string and the flags are valid; the result is
    // checked before use.
    let fd = unsafe {
        libc::memfd_create(
            MEMFD_NAME.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(MemoryError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(|e| MemoryError::Size(size, e))?;
    // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal flags; the result is checked.
    let sealed = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if sealed < 0 {
        return Err(MemoryError::Size(size, io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    const MIB: usize = 1 << 20;
    /// Two regions with a hole between them, as RAM around the MMIO gap is laid out.
    const RANGES: [(GuestAddress, usize); 2] =
        [(GuestAddress(0), MIB), (GuestAddress(4 * MIB as u64), MIB)];

    #[test]
    fn create_guest_memory_write_through_mapping_is_read_through_the_file() {
        let mem = create_guest_memory(&RANGES).unwrap();
        let addr = GuestAddress(4 * MIB as u64 + 16);
        mem.write_slice(b"berth", addr).unwrap();

        let region = mem.find_region(addr).unwrap();
        let file_offset = region.file_offset().unwrap();
        let mut bytes = [0u8; 5];
        file_offset
            .file()
            .read_exact_at(&mut bytes, file_offset.start() + 16)
            .unwrap();

        assert_eq!(&bytes, b"berth");
    }

    #[test]
    fn create_guest_memory_regions_follow_each_other_in_one_file() {
        let mem = create_guest_memory(&RANGES).unwrap();

        let offsets: Vec<(i32, u64)> = mem
            .iter()
            .map(|r| {
                let f = r.file_offset().unwrap();
                (f.file().as_raw_fd(), f.start())
            })
            .collect();

        assert_eq!(offsets[0].0, offsets[1].0);
        assert_eq!((offsets[0].1, offsets[1].1), (0, MIB as u64));
    }

    #[test]
    fn create_guest_memory_file_cannot_shrink() {
        let mem = create_guest_memory(&RANGES).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();

        let shrunk = region.file_offset().unwrap().file().set_len(0);

        assert!(shrunk.is_err());
    }
}
