//! Moving packets between the device's virtqueues and the [`VsockMuxer`].
//!
//! Both transports call these: our own VMM with the `Queue`s of its MMIO device, the
//! `berth-vsock` vhost-user backend with the queues inside its vrings. Every chain the guest
//! offers is validated by `virtio-vsock`'s parser; a malformed one is returned to the guest
//! unused (RX) or dropped with its connection reset (TX), never trusted and never a panic.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::Bytes;

use super::packet::Header;
use super::{VsockError, VsockMuxer, MAX_PKT_DATA};
use crate::GuestMemoryMmap;

/// Hands every packet the guest queued on TX to the muxer. Returns whether any chain was
/// completed (the guest should then be notified).
pub fn process_tx(
    muxer: &mut VsockMuxer,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, VsockError> {
    let mut completed = false;
    while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let first = chain.clone();
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => muxer.send_pkt(&pkt),
            Err(e) => {
                tracing::debug!("vsock: malformed TX chain: {e}");
                if let Some(header) = readable_header(mem, first) {
                    muxer.reject(&header);
                }
            }
        }
        queue.add_used(mem, head, 0).map_err(VsockError::Queue)?;
        completed = true;
    }
    Ok(completed)
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

/// The header of a TX chain's first descriptor, if it is device-readable, large enough and
/// inside guest memory.
fn readable_header(
    mem: &GuestMemoryMmap,
    mut chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<Header> {
    let desc = chain.next()?;
    if desc.is_write_only() || (desc.len() as usize) < PKT_HEADER_SIZE {
        return None;
    }
    let mut raw = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut raw, desc.addr()).ok()?;
    Some(Header::from_bytes(&raw))
}

#[cfg(test)]
mod tests;
