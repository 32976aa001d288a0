//! The vsock packet header as plain values, and the key that names a connection.
//!
//! `virtio-vsock`'s `VsockPacket` validates the descriptor chain and gives access to the header
//! fields one by one; the muxer works on a copied [`Header`] so no decision depends on guest
//! memory that the guest could change while we look at it.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

use super::{HOST_CID, TYPE_STREAM};

/// A connection as the host sees it: our port and the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// The host-side port (the guest's `dst_port`).
    pub local_port: u32,
    /// The guest-side port (the guest's `src_port`).
    pub peer_port: u32,
}

/// Every field of a vsock packet header (virtio spec 5.10.6), in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's context ID.
    pub src_cid: u64,
    /// Receiver's context ID.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (only [`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (see [`super::op`]).
    pub op: u16,
    /// Operation flags (the `SHUTDOWN_*` bits).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, wrapping.
    pub fwd_cnt: u32,
}

impl Header {
    /// The header of a packet read from the guest.
    pub fn of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// A host-to-guest stream packet for connection `key` with operation `op`; the credit
    /// fields and `len` are filled by the caller.
    pub fn to_guest(guest_cid: u64, key: ConnKey, op: u16) -> Self {
        Self {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op,
            ..Self::default()
        }
    }

    /// The connection a guest-to-host packet belongs to.
    pub fn key(&self) -> ConnKey {
        ConnKey {
            local_port: self.dst_port,
            peer_port: self.src_port,
        }
    }

    /// Writes every field into `pkt`'s header buffer.
    pub fn write_to<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>) {
        pkt.set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(self.type_)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
    }

    /// The header as it sits in guest memory.
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut bytes = [0u8; PKT_HEADER_SIZE];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.type_.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    /// Parses a header as it sits in guest memory.
    pub fn from_bytes(bytes: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[i..i + 4]);
            u32::from_le_bytes(b)
        };
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_round_trip_every_field() {
        let header = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 17,
            type_: TYPE_STREAM,
            op: 5,
            flags: 3,
            buf_alloc: 0x4_0000,
            fwd_cnt: u32::MAX,
        };

        assert_eq!(Header::from_bytes(&header.to_bytes()), header);
    }

    #[test]
    fn header_key_of_guest_packet_is_dst_then_src_port() {
        let header = Header {
            src_port: 50_000,
            dst_port: 1024,
            ..Header::default()
        };

        assert_eq!(
            header.key(),
            ConnKey {
                local_port: 1024,
                peer_port: 50_000
            }
        );
    }
}
