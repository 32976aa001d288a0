//! Moving packets between the device's virtqueues and the [`VsockMuxer`].
//!
//! Both transports call these: our own VMM with the `Queue`s of its MMIO device, the
//! `berth-vsock` vhost-user backend with the queues inside its vrings. Every chain the guest
//! offers is validated; a malformed one is returned to the guest unused (RX) or dropped with
//! its connection reset (TX), never trusted and never a panic.
//!
//! RX buffers are parsed by `virtio-vsock`'s `VsockPacket` (header and payload in one or two
//! buffers, which is what drivers give). TX chains are parsed here, because a driver may
//! scatter a payload over any number of buffers (Linux does for large sends, and the virtio
//! spec forbids a device to assume any framing), which `VsockPacket` rejects.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

use super::packet::Header;
use super::{VsockError, VsockMuxer, MAX_PKT_DATA};
use crate::GuestMemoryMmap;

/// Why a TX chain was refused.
#[derive(Debug, thiserror::Error)]
enum TxError {
    /// A buffer of the chain is device-writable.
    #[error("a TX buffer is device-writable")]
    WriteOnly,
    /// The buffers hold less than a header.
    #[error("the chain is shorter than a packet header")]
    ShortHeader,
    /// The header announces more than one packet may carry.
    #[error("payload of {0} bytes exceeds the maximum")]
    TooLong(u32),
    /// The buffers hold less than the payload the header announces.
    #[error("the chain is shorter than its announced payload")]
    ShortPayload,
    /// A buffer is not inside guest memory.
    #[error("a TX buffer is outside guest memory")]
    Memory(#[source] GuestMemoryError),
}

/// A guest-to-host packet: its header and its payload as guest memory slices, in order.
#[derive(Debug)]
struct TxPacket<'a> {
    header: Header,
    data: Vec<VolatileSlice<'a, ()>>,
}

/// Hands every packet the guest queued on TX to the muxer. Returns whether any chain was
/// completed (the guest should then be notified).
pub fn process_tx(
    muxer: &mut VsockMuxer,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, VsockError> {
    let mut completed = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match parse_tx(mem, chain) {
            Ok(pkt) => muxer.send_pkt(&pkt.header, &pkt.data),
            Err((header, e)) => {
                tracing::debug!("vsock: malformed TX chain: {e}");
                if let Some(header) = header {
                    muxer.reject(&header);
                }
            }
        }
        queue.add_used(mem, head, 0).map_err(VsockError::Queue)?;
        completed = true;
    }
    Ok(completed)
}

/// Reads a TX chain as the byte stream the spec defines: a header followed by `len` payload
/// bytes, over however many device-readable buffers. On error, the header if it was read.
fn parse_tx<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
) -> Result<TxPacket<'a>, (Option<Header>, TxError)> {
    let mut ranges = Vec::new();
    let mut total = 0u64;
    // The chain iterator stops at the queue size, so a looping chain ends too.
    for desc in chain {
        if desc.is_write_only() {
            return Err((None, TxError::WriteOnly));
        }
        ranges.push((desc.addr(), u64::from(desc.len())));
        total += u64::from(desc.len());
        if total >= (PKT_HEADER_SIZE as u64) + u64::from(MAX_PKT_DATA) {
            break;
        }
    }
    let mut raw = [0u8; PKT_HEADER_SIZE];
    let header_slices =
        slices_of(mem, &ranges, 0, PKT_HEADER_SIZE as u64).map_err(|e| (None, e))?;
    let mut filled = 0;
    for slice in header_slices {
        filled += slice.copy_to(&mut raw[filled..]);
    }
    let header = Header::from_bytes(&raw);
    if header.len > MAX_PKT_DATA {
        return Err((Some(header), TxError::TooLong(header.len)));
    }
    let data = slices_of(mem, &ranges, PKT_HEADER_SIZE as u64, u64::from(header.len))
        .map_err(|e| (Some(header), e))?;
    Ok(TxPacket { header, data })
}

/// The guest memory slices covering bytes `offset..offset + len` of the concatenated `ranges`.
fn slices_of<'a>(
    mem: &'a GuestMemoryMmap,
    ranges: &[(GuestAddress, u64)],
    offset: u64,
    len: u64,
) -> Result<Vec<VolatileSlice<'a, ()>>, TxError> {
    let short = if offset == 0 {
        TxError::ShortHeader
    } else {
        TxError::ShortPayload
    };
    let mut slices = Vec::new();
    let mut skip = offset;
    let mut want = len;
    for (addr, range_len) in ranges {
        if want == 0 {
            break;
        }
        if skip >= *range_len {
            skip -= range_len;
            continue;
        }
        let start = addr.checked_add(skip).ok_or(TxError::Memory(
            GuestMemoryError::InvalidGuestAddress(*addr),
        ))?;
        let count = (range_len - skip).min(want);
        skip = 0;
        want -= count;
        let count = usize::try_from(count).map_err(|_| TxError::TooLong(u32::MAX))?;
        let pieces = GuestMemory::get_slices(mem, start, count, Permissions::Read)
            .map_err(TxError::Memory)?;
        for piece in pieces {
            slices.push(piece.map_err(TxError::Memory)?);
        }
    }
    if want > 0 {
        return Err(short);
    }
    Ok(slices)
}

/// Fills RX buffers with the packets the muxer owes the guest, until either runs out. Returns
/// whether any chain was completed (the guest should then be notified).
pub fn process_rx(
    muxer: &mut VsockMuxer,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, VsockError> {
    let mut completed = false;
    while muxer.has_pending_rx() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(mut pkt) if pkt.data_slice().is_some() => match muxer.recv_pkt(&mut pkt) {
                Some(len) => len,
                None => {
                    // Nothing was owed after all: the buffer stays available for later.
                    queue.go_to_previous_position();
                    break;
                }
            },
            Ok(_) => {
                tracing::debug!("vsock: RX buffer without room for data, returned unused");
                0
            }
            Err(e) => {
                tracing::debug!("vsock: malformed RX chain, returned unused: {e}");
                0
            }
        };
        queue.add_used(mem, head, len).map_err(VsockError::Queue)?;
        completed = true;
    }
    Ok(completed)
}

#[cfg(test)]
mod tests;
