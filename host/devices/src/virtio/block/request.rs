//! One virtio-blk request: parse the chain, check every part, do the I/O, write the status.
//!
//! A chain is `header, data..., status`. The status descriptor is checked first, since without
//! it nothing can be reported; every other failure becomes a status byte. Checks all happen
//! before the first byte moves, so a refused write leaves the image untouched.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory, GuestMemoryError, Permissions, VolatileMemoryError};

use super::disk::Disk;
use super::{
    request_type, status, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS,
    SECTOR_SHIFT, SECTOR_SIZE,
};
use crate::GuestMemoryMmap;

/// Size of the request header: `le32 type, le32 reserved, le64 sector`.
const HEADER_SIZE: u32 = 16;
/// Size of one discard / write-zeroes segment: `le64 sector, le32 num_sectors, le32 flags`.
const SEGMENT_SIZE: u64 = 16;
/// The only segment flag: the device may deallocate a write-zeroes range.
const SEGMENT_FLAG_UNMAP: u32 = 1;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    /// The chain has no header before the status descriptor.
    #[error("request has no header")]
    MissingHeader,
    /// The header descriptor is device-writable or not 16 bytes long.
    #[error("header descriptor is device-writable or not {HEADER_SIZE} bytes ({0} bytes)")]
    HeaderDescriptor(u32),
    /// A data descriptor's direction does not match the request type.
    #[error("data descriptor direction does not match request type {0}")]
    DataDirection(u32),
    /// A request type that carries no data came with data descriptors.
    #[error("request type {0} takes no data")]
    UnexpectedData(u32),
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// An IN or OUT request's data is not a whole number of sectors.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    PartialSector(u64),
    /// The sectors are not all inside the disk.
    #[error("sectors {sector}+{count} are beyond the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The request type is unknown or not offered.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// The discard or write-zeroes segment list has the wrong size or too many entries.
    #[error("segment list of {0} bytes is malformed")]
    Segments(u64),
    /// A segment has flags the request type does not allow.
    #[error("segment flags {0:#x} are not supported")]
    SegmentFlags(u32),
    /// A segment covers more sectors than the config space allows.
    #[error("segment of {0} sectors is too large")]
    SegmentTooLarge(u32),
    /// Guest memory could not be accessed.
    #[error("guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    /// The image could not be read or written.
    #[error("disk I/O")]
    Io(#[source] std::io::Error),
}

impl RequestError {
    /// The status byte the driver sees.
    fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) | Self::SegmentFlags(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

impl From<VolatileMemoryError> for RequestError {
    /// A failed transfer between the image and guest memory: the image's fault when the
    /// system call failed, guest memory's otherwise.
    fn from(e: VolatileMemoryError) -> Self {
        match e {
            VolatileMemoryError::IOError(e) => Self::Io(e),
            other => Self::GuestMemory(GuestMemoryError::from(other)),
        }
    }
}

/// The request header, decoded.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u32,
    sector: u64,
}

impl Header {
    fn parse(raw: [u8; HEADER_SIZE as usize]) -> Self {
        let (kind, rest) = raw.split_at(4);
        let sector = &rest[4..];
        Self {
            kind: u32::from_le_bytes(kind.try_into().expect("4 bytes")),
            sector: u64::from_le_bytes(sector.try_into().expect("8 bytes")),
        }
    }
}

/// Serves the request in `chain`; returns the number of bytes written into the chain (the
/// used length): the data the device produced plus the status byte, or 0 when the status
/// descriptor itself is unusable.
pub(super) fn process(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    // The iterator stops after the queue size, so a looping chain cannot grow this.
    let descs: Vec<Descriptor> = chain.collect();
    let Some((status_desc, rest)) = descs.split_last() else {
        tracing::warn!("virtio-blk: empty chain");
        return 0;
    };
    let status_usable = status_desc.is_write_only()
        && status_desc.len() >= 1
        && mem.check_range(status_desc.addr(), 1, Permissions::Write);
    if !status_usable {
        tracing::warn!("virtio-blk: status descriptor is device-readable, empty or outside memory");
        return 0;
    }
    let (status, written) = match execute(disk, mem, rest) {
        Ok(written) => (status::OK, written),
        Err(e) => {
            tracing::warn!("virtio-blk: request failed: {e}");
            (e.status(), 0)
        }
    };
    if let Err(e) = mem.write_obj(status, status_desc.addr()) {
        tracing::warn!("virtio-blk: cannot write the status: {e}");
        return 0;
    }
    written.saturating_add(1)
}

/// Runs the request of `descs` (the chain without its status descriptor); returns the bytes
/// written into its data buffers.
fn execute(disk: &Disk, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<u32, RequestError> {
    let (header_desc, data) = descs.split_first().ok_or(RequestError::MissingHeader)?;
    if header_desc.is_write_only() || header_desc.len() != HEADER_SIZE {
        return Err(RequestError::HeaderDescriptor(header_desc.len()));
    }
    let mut raw = [0u8; HEADER_SIZE as usize];
    mem.read_slice(&mut raw, header_desc.addr())
        .map_err(RequestError::GuestMemory)?;
    let header = Header::parse(raw);
    match header.kind {
        request_type::IN => read(disk, mem, header.sector, data),
        request_type::OUT => write(disk, mem, header.sector, data).map(|()| 0),
        request_type::FLUSH => flush(disk, data).map(|()| 0),
        request_type::GET_ID => get_id(disk, mem, data),
        request_type::DISCARD | request_type::WRITE_ZEROES if !disk.read_only() => {
            discard_or_zero(disk, mem, header.kind, data).map(|()| 0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Checks that every buffer of `data` has the direction `kind` needs and lies inside guest
/// memory; returns their total length.
fn check_buffers(
    mem: &GuestMemoryMmap,
    kind: u32,
    data: &[Descriptor],
    device_writes: bool,
) -> Result<u64, RequestError> {
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    for desc in data {
        if desc.is_write_only() != device_writes {
            return Err(RequestError::DataDirection(kind));
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(RequestError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        total += u64::from(desc.len());
    }
    Ok(total)
}

/// Checks that `count` sectors from `sector` lie inside the disk; returns the byte offset.
fn check_sectors(disk: &Disk, sector: u64, count: u64) -> Result<u64, RequestError> {
    let inside = sector
        .checked_add(count)
        .is_some_and(|end| end <= disk.sectors());
    if !inside {
        return Err(RequestError::OutOfRange { sector, count });
    }
    Ok(sector << SECTOR_SHIFT)
}

/// Checks an IN or OUT request's buffers and range; returns the byte offset on the disk.
fn check_transfer(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    kind: u32,
    sector: u64,
    data: &[Descriptor],
) -> Result<u64, RequestError> {
    let total = check_buffers(mem, kind, data, kind == request_type::IN)?;
    if total % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector(total));
    }
    check_sectors(disk, sector, total >> SECTOR_SHIFT)
}

fn read(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    sector: u64,
    data: &[Descriptor],
) -> Result<u32, RequestError> {
    let mut offset = check_transfer(disk, mem, request_type::IN, sector, data)?;
    let mut written = 0u32;
    for desc in data {
        let slices =
            GuestMemory::get_slices(mem, desc.addr(), desc.len() as usize, Permissions::Write)
                .map_err(RequestError::GuestMemory)?;
        for slice in slices {
            let mut slice = slice.map_err(RequestError::GuestMemory)?;
            disk.read_exact_at(&mut slice, offset)?;
            offset += slice.len() as u64;
        }
        // The chain is shorter than 4 GiB in total (the queue stops iterating otherwise).
        written = written.saturating_add(desc.len());
    }
    Ok(written)
}

fn write(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    sector: u64,
    data: &[Descriptor],
) -> Result<(), RequestError> {
    if disk.read_only() {
        return Err(RequestError::ReadOnly);
    }
    let mut offset = check_transfer(disk, mem, request_type::OUT, sector, data)?;
    for desc in data {
        let slices =
            GuestMemory::get_slices(mem, desc.addr(), desc.len() as usize, Permissions::Read)
                .map_err(RequestError::GuestMemory)?;
        for slice in slices {
            let slice = slice.map_err(RequestError::GuestMemory)?;
            disk.write_all_at(&slice, offset)?;
            offset += slice.len() as u64;
        }
    }
    Ok(())
}

fn flush(disk: &Disk, data: &[Descriptor]) -> Result<(), RequestError> {
    if !data.is_empty() {
        return Err(RequestError::UnexpectedData(request_type::FLUSH));
    }
    disk.flush().map_err(RequestError::Io)
}

fn get_id(disk: &Disk, mem: &GuestMemoryMmap, data: &[Descriptor]) -> Result<u32, RequestError> {
    check_buffers(mem, request_type::GET_ID, data, true)?;
    let mut serial: &[u8] = disk.serial();
    let mut written = 0u32;
    for desc in data {
        let n = serial.len().min(desc.len() as usize);
        let (now, later) = serial.split_at(n);
        mem.write_slice(now, desc.addr())
            .map_err(RequestError::GuestMemory)?;
        serial = later;
        written += n as u32;
    }
    Ok(written)
}

/// One discard / write-zeroes range.
#[derive(Debug, Clone, Copy)]
struct Segment {
    sector: u64,
    sectors: u32,
    flags: u32,
}

impl Segment {
    fn parse(raw: &[u8; SEGMENT_SIZE as usize]) -> Self {
        let (sector, rest) = raw.split_at(8);
        let (sectors, flags) = rest.split_at(4);
        Self {
            sector: u64::from_le_bytes(sector.try_into().expect("8 bytes")),
            sectors: u32::from_le_bytes(sectors.try_into().expect("4 bytes")),
            flags: u32::from_le_bytes(flags.try_into().expect("4 bytes")),
        }
    }
}

fn discard_or_zero(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    kind: u32,
    data: &[Descriptor],
) -> Result<(), RequestError> {
    let total = check_buffers(mem, kind, data, false)?;
    let count = total / SEGMENT_SIZE;
    if total % SEGMENT_SIZE != 0 || count == 0 || count > u64::from(MAX_DISCARD_SEG) {
        return Err(RequestError::Segments(total));
    }
    // At most MAX_DISCARD_SEG segments, checked above: a small, bounded copy.
    let mut raw = vec![0u8; total as usize];
    let mut filled = 0;
    for desc in data {
        let end = filled + desc.len() as usize;
        mem.read_slice(&mut raw[filled..end], desc.addr())
            .map_err(RequestError::GuestMemory)?;
        filled = end;
    }
    let segments: Vec<Segment> = raw
        .chunks_exact(SEGMENT_SIZE as usize)
        .map(|chunk| Segment::parse(chunk.try_into().expect("exact chunk")))
        .collect();
    let (max_sectors, allowed_flags) = if kind == request_type::DISCARD {
        // The spec makes UNMAP on a discard an unsupported request.
        (MAX_DISCARD_SECTORS, 0)
    } else {
        (MAX_WRITE_ZEROES_SECTORS, SEGMENT_FLAG_UNMAP)
    };
    for segment in &segments {
        if segment.flags & !allowed_flags != 0 {
            return Err(RequestError::SegmentFlags(segment.flags));
        }
        if segment.sectors > max_sectors {
            return Err(RequestError::SegmentTooLarge(segment.sectors));
        }
        check_sectors(disk, segment.sector, u64::from(segment.sectors))?;
    }
    for segment in &segments {
        let offset = segment.sector << SECTOR_SHIFT;
        let len = u64::from(segment.sectors) << SECTOR_SHIFT;
        let result = if kind == request_type::DISCARD {
            disk.discard(offset, len)
        } else {
            disk.write_zeroes(offset, len, segment.flags & SEGMENT_FLAG_UNMAP != 0)
        };
        result.map_err(RequestError::Io)?;
    }
    Ok(())
}
