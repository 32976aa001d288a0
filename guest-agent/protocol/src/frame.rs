//! Framing of control messages.
//!
//! A frame is an 8-byte header followed by a JSON payload:
//!
//! ```text
//! +---------+---------+-------------------+-----------------+
//! | "BA"    | version | payload length    | payload (JSON)  |
//! | 2 bytes | u16 BE  | u32 BE            | length bytes    |
//! +---------+---------+-------------------+-----------------+
//! ```
//!
//! The magic catches a peer that is not the agent at all (a console, a stray listener); the
//! version lets a reader refuse a frame from a newer protocol with a message that says so; the
//! length is bounded by [`MAX_FRAME_LEN`] so a hostile or broken peer cannot make the reader
//! allocate without limit.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::PROTOCOL_VERSION;

/// The two bytes every frame starts with.
pub const FRAME_MAGIC: [u8; 2] = *b"BA";

/// Length of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 8;

/// Largest payload a reader accepts. Control messages are small; bulk data has its own streams.
pub const MAX_FRAME_LEN: u32 = 4 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("i/o error on the agent connection")]
    Io(#[source] io::Error),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("not a berth agent frame (bad magic {0:02x?})")]
    BadMagic([u8; 2]),
    #[error(
        "frame from protocol version {got}, newer than the {ours} this side speaks: \
         update berth so the host and the guest agent match"
    )]
    FutureVersion { got: u16, ours: u16 },
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u32 },
    #[error("malformed frame payload")]
    Payload(#[source] serde_json::Error),
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version the writer spoke.
    pub version: u16,
    /// Payload length in bytes.
    pub len: u32,
}

impl FrameHeader {
    /// Parses and validates a header.
    pub fn decode(bytes: [u8; FRAME_HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = [bytes[0], bytes[1]];
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_be_bytes([bytes[2], bytes[3]]);
        if version > PROTOCOL_VERSION {
            return Err(FrameError::FutureVersion {
                got: version,
                ours: PROTOCOL_VERSION,
            });
        }
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: MAX_FRAME_LEN,
            });
        }
        Ok(Self { version, len })
    }

    /// Serializes the header.
    pub fn encode(self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[..2].copy_from_slice(&FRAME_MAGIC);
        out[2..4].copy_from_slice(&self.version.to_be_bytes());
        out[4..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Encodes `message` as one complete frame of the current protocol version.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let payload = serde_json::to_vec(message).map_err(FrameError::Payload)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= MAX_FRAME_LEN)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
            max: MAX_FRAME_LEN,
        })?;
    let header = FrameHeader {
        version: PROTOCOL_VERSION,
        len,
    };
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    frame.extend_from_slice(&header.encode());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Writes `message` as one frame and flushes.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), FrameError> {
    let frame = encode_frame(message)?;
    writer.write_all(&frame).map_err(FrameError::Io)?;
    writer.flush().map_err(FrameError::Io)
}

/// Reads one frame and decodes its payload.
///
/// Returns `Ok(None)` when the peer closed the connection cleanly between frames.
pub fn read_frame<R: Read, T: DeserializeOwned>(reader: &mut R) -> Result<Option<T>, FrameError> {
    read_frame_payload(reader)?
        .map(|payload| serde_json::from_slice(&payload).map_err(FrameError::Payload))
        .transpose()
}

/// Reads one frame and returns its payload undecoded (the header is validated as in
/// [`read_frame`]).
///
/// For a reader that decodes in steps: the agent answers a request it cannot decode with that
/// request's own id, and keeps the connection, since the framing is intact.
pub fn read_frame_payload<R: Read>(reader: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    if !read_exact_or_eof(reader, &mut header)? {
        return Ok(None);
    }
    let header = FrameHeader::decode(header)?;
    let mut payload = vec![0u8; header.len as usize];
    if !read_exact_or_eof(reader, &mut payload)? && !payload.is_empty() {
        return Err(FrameError::Truncated);
    }
    Ok(Some(payload))
}

/// Fills `buf`, returning `Ok(false)` if the stream ended before the first byte and an error if
/// it ended part-way through.
fn read_exact_or_eof<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<bool, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::{Request, RequestEnvelope};

    fn ping_frame() -> Vec<u8> {
        encode_frame(&RequestEnvelope {
            id: 1,
            request: Request::Ping,
        })
        .unwrap()
    }

    #[test]
    fn read_frame_future_version_is_refused_with_clear_error() {
        let mut frame = ping_frame();
        // Rewrite the version field to one this build cannot know.
        frame[2..4].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());

        let err = read_frame::<_, RequestEnvelope>(&mut Cursor::new(frame)).unwrap_err();

        assert!(matches!(err, FrameError::FutureVersion { got, ours }
            if got == PROTOCOL_VERSION + 1 && ours == PROTOCOL_VERSION));
        assert!(err.to_string().contains("newer than the"));
    }

    #[test]
    fn read_frame_bad_magic_is_refused() {
        let mut frame = ping_frame();
        frame[0] = b'X';

        let err = read_frame::<_, RequestEnvelope>(&mut Cursor::new(frame)).unwrap_err();

        assert!(matches!(err, FrameError::BadMagic(_)));
    }

    #[test]
    fn read_frame_oversized_length_is_refused_before_allocating() {
        let header = FrameHeader {
            version: PROTOCOL_VERSION,
            len: MAX_FRAME_LEN,
        }
        .encode();
        let mut bytes = header.to_vec();
        // One more than the limit: the header alone must be enough to refuse it.
        bytes[4..8].copy_from_slice(&(MAX_FRAME_LEN + 1).to_be_bytes());

        let err = read_frame::<_, RequestEnvelope>(&mut Cursor::new(bytes)).unwrap_err();

        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[test]
    fn read_frame_clean_eof_between_frames_is_none() {
        let got = read_frame::<_, RequestEnvelope>(&mut Cursor::new(Vec::new())).unwrap();

        assert!(got.is_none());
    }

    #[test]
    fn read_frame_eof_inside_payload_is_truncated() {
        let mut frame = ping_frame();
        frame.truncate(frame.len() - 1);

        let err = read_frame::<_, RequestEnvelope>(&mut Cursor::new(frame)).unwrap_err();

        assert!(matches!(err, FrameError::Truncated));
    }

    #[test]
    fn read_frame_eof_inside_header_is_truncated() {
        let frame = ping_frame();

        let err = read_frame::<_, RequestEnvelope>(&mut Cursor::new(&frame[..3])).unwrap_err();

        assert!(matches!(err, FrameError::Truncated));
    }

    #[test]
    fn read_frame_garbage_payload_is_payload_error() {
        let payload = b"{not json";
        let mut bytes = FrameHeader {
            version: PROTOCOL_VERSION,
            len: payload.len() as u32,
        }
        .encode()
        .to_vec();
        bytes.extend_from_slice(payload);

        let err = read_frame::<_, RequestEnvelope>(&mut Cursor::new(bytes)).unwrap_err();

        assert!(matches!(err, FrameError::Payload(_)));
    }

    #[test]
    fn read_frame_payload_returns_payload_undecoded() {
        let payload = br#"{"id":1,"request":{"type":"Teleport"}}"#;
        let mut bytes = FrameHeader {
            version: PROTOCOL_VERSION,
            len: payload.len() as u32,
        }
        .encode()
        .to_vec();
        bytes.extend_from_slice(payload);

        let got = read_frame_payload(&mut Cursor::new(bytes)).unwrap();

        assert_eq!(got.as_deref(), Some(&payload[..]));
    }

    #[test]
    fn frames_back_to_back_are_read_in_order() {
        let mut bytes = Vec::new();
        for id in 0..3 {
            write_frame(
                &mut bytes,
                &RequestEnvelope {
                    id,
                    request: Request::Ping,
                },
            )
            .unwrap();
        }
        let mut reader = Cursor::new(bytes);

        let ids: Vec<u64> = std::iter::from_fn(|| {
            read_frame::<_, RequestEnvelope>(&mut reader)
                .unwrap()
                .map(|e| e.id)
        })
        .collect();

        assert_eq!(ids, vec![0, 1, 2]);
    }
}
