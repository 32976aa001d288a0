//! The disk image behind a block device: a raw file (or host block device) read and written at
//! byte offsets, straight into and out of guest memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::{BlockError, ID_BYTES, SECTOR_SHIFT};

/// Bytes of zeroes written per call when the file system cannot zero a range itself.
const ZERO_CHUNK: usize = 64 * 1024;

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    read_only: bool,
    sectors: u64,
    serial: [u8; ID_BYTES],
}

impl Disk {
    /// Opens the image at `path`, read-write unless `read_only`, and locks it against a second
    /// VM: exclusively for writing, shared for reading.
    ///
    /// The capacity is the file size in whole sectors; a partial last sector is not exposed.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        lock(&file, read_only).map_err(|source| BlockError::Locked {
            path: path.to_owned(),
            source,
        })?;
        let size_error = |source| BlockError::Size {
            path: path.to_owned(),
            source,
        };
        // Seeking to the end works for regular files and host block devices alike.
        let size = (&file).seek(SeekFrom::End(0)).map_err(size_error)?;
        let meta = file.metadata().map_err(size_error)?;
        if size % (1 << SECTOR_SHIFT) != 0 {
            tracing::warn!(
                "virtio-blk: {} is not a whole number of sectors; the tail is hidden",
                path.display()
            );
        }
        Ok(Self {
            file,
            read_only,
            sectors: size >> SECTOR_SHIFT,
            serial: serial(meta.dev(), meta.ino()),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The serial string `GET_ID` returns.
    pub fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }

    /// Fills `buf` from the image at byte `offset`.
    pub(super) fn read_exact_at<B: BitmapSlice>(
        &self,
        buf: &mut VolatileSlice<B>,
        offset: u64,
    ) -> Result<(), VolatileMemoryError> {
        FileAt::new(&self.file, offset).read_exact_volatile(buf)
    }

    /// Writes all of `buf` to the image at byte `offset`.
    pub(super) fn write_all_at<B: BitmapSlice>(
        &self,
        buf: &VolatileSlice<B>,
        offset: u64,
    ) -> Result<(), VolatileMemoryError> {
        FileAt::new(&self.file, offset).write_all_volatile(buf)
    }

    /// Makes every completed write durable (`fdatasync`).
    pub(super) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeroes. File systems that cannot
    /// punch holes make this a no-op: discard is only a hint.
    pub(super) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if is_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes `len` bytes at `offset` read back as zeroes, deallocating them when `unmap` allows
    /// it; falls back to writing zeroes where the file system offers neither.
    pub(super) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            let punched = self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
            match punched {
                Err(e) if is_unsupported(&e) => {}
                other => return other,
            }
        }
        let zeroed = self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        match zeroed {
            Err(e) if is_unsupported(&e) => self.write_zeroes_slowly(offset, len),
            other => other,
        }
    }

    fn write_zeroes_slowly(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let too_large = || io::Error::from(io::ErrorKind::InvalidInput);
        let offset = libc::off_t::try_from(offset).map_err(|_| too_large())?;
        let len = libc::off_t::try_from(len).map_err(|_| too_large())?;
        // SAFETY: fallocate only acts on the file behind our own open descriptor; no memory is
        // passed.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// `flock`s the image: shared when read-only, so several VMs may read one image, exclusive
/// otherwise. Never blocks.
fn lock(file: &File, read_only: bool) -> io::Result<()> {
    let kind = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock takes our own open descriptor and no memory.
    let ret = unsafe { libc::flock(file.as_raw_fd(), kind | libc::LOCK_NB) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A serial that stays the same for the same image file across VM runs, so the guest can tell
/// its disks apart: the device and inode numbers, hex, NUL-padded to [`ID_BYTES`].
fn serial(dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let text = format!("{dev:x}-{ino:x}");
    let mut serial = [0u8; ID_BYTES];
    let n = text.len().min(ID_BYTES);
    serial[..n].copy_from_slice(&text.as_bytes()[..n]);
    serial
}

/// The file at a moving offset, as vm-memory's volatile reader and writer: `pread`/`pwrite`
/// straight into and out of guest memory, without a bounce buffer.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> FileAt<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        Self { file, offset }
    }

    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput)))
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the pointer and length come from a `VolatileSlice`, which guarantees that the
        // memory is mapped and writable for `buf.len()` bytes while the guard lives; the kernel
        // writes at most that many bytes.
        let ret = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if ret < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let n = ret.unsigned_abs();
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the pointer and length come from a `VolatileSlice`, which guarantees that the
        // memory is mapped and readable for `buf.len()` bytes while the guard lives; the kernel
        // only reads it.
        let ret = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if ret < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let n = ret.unsigned_abs();
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn serial_short_id_is_nul_padded() {
        let serial = serial(0x803, 0x1234);

        assert_eq!(&serial[..10], b"803-1234\0\0");
    }

    #[test]
    fn serial_long_id_is_truncated_to_twenty_bytes() {
        let serial = serial(u64::MAX, u64::MAX);

        assert_eq!(&serial, b"ffffffffffffffff-fff");
    }

    #[test]
    fn open_partial_last_sector_is_hidden() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[1u8; 1000]).unwrap();

        let disk = Disk::open(file.path(), false).unwrap();

        assert_eq!(disk.sectors(), 1);
    }

    #[test]
    fn open_missing_image_fails() {
        let dir = tempfile::tempdir().unwrap();

        let err = Disk::open(&dir.path().join("absent.raw"), false).unwrap_err();

        assert!(matches!(err, BlockError::Open { .. }));
    }

    #[test]
    fn open_image_locked_for_writing_twice_fails() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let _first = Disk::open(file.path(), false).unwrap();

        let err = Disk::open(file.path(), false).unwrap_err();

        assert!(matches!(err, BlockError::Locked { .. }));
    }

    #[test]
    fn open_image_read_only_twice_succeeds() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let _first = Disk::open(file.path(), true).unwrap();

        assert!(Disk::open(file.path(), true).is_ok());
    }
}
