//! Hijacked connections (attach, exec start) and Docker's stdcopy framing.
//!
//! The client asks with `Connection: Upgrade` and `Upgrade: tcp`; the answer is
//! `101 UPGRADED` with the stream's content type, after which the connection carries raw bytes
//! both ways: the process's output to the client (framed when there is no terminal), the
//! client's input to the process, and the client's half-close as stdin EOF.

use berth_engine::containers::logs::LogStream;
use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::body::{self, ApiResponse};
use crate::error::{ApiError, ApiResult};

/// Content type of a terminal's raw stream.
pub const RAW_STREAM: &str = "application/vnd.docker.raw-stream";
/// Content type of stdcopy-framed stdout and stderr.
pub const MULTIPLEXED_STREAM: &str = "application/vnd.docker.multiplexed-stream";

/// The upgraded connection, as tokio I/O.
pub type HijackedIo = TokioIo<Upgraded>;

/// The content type for a process with or without a terminal.
pub fn content_type(tty: bool) -> &'static str {
    if tty {
        RAW_STREAM
    } else {
        MULTIPLEXED_STREAM
    }
}

/// Takes the upgrade from `request` if the client asked for one.
pub fn request_upgrade(request: &mut Request<Incoming>) -> Option<OnUpgrade> {
    let wants_upgrade = request
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("tcp"));
    wants_upgrade.then(|| hyper::upgrade::on(request))
}

/// The `101` answer that hands the connection over.
pub fn switching_protocols(tty: bool) -> ApiResponse {
    let mut response = body::empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("tcp"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type(tty)));
    response
}

/// Why a stream endpoint was called without an upgrade.
pub fn upgrade_required() -> ApiError {
    ApiError::bad_request(
        "this endpoint streams both ways: send Connection: Upgrade and Upgrade: tcp",
    )
}

/// Takes the upgrade from `request` and builds the `101` answer.
pub fn upgrade(request: &mut Request<Incoming>, tty: bool) -> ApiResult<(ApiResponse, OnUpgrade)> {
    let on_upgrade = request_upgrade(request).ok_or_else(upgrade_required)?;
    Ok((switching_protocols(tty), on_upgrade))
}

/// Waits for the client to take the upgraded connection.
pub async fn take(on_upgrade: OnUpgrade) -> Option<HijackedIo> {
    match on_upgrade.await {
        Ok(upgraded) => Some(TokioIo::new(upgraded)),
        Err(e) => {
            tracing::debug!(error = %e, "the client did not complete the upgrade");
            None
        }
    }
}

/// Output for the client: raw for a terminal, else with the stdcopy header
/// `[stream, 0, 0, 0, len as u32 BE]`.
pub fn frame(tty: bool, stream: LogStream, data: &[u8]) -> Bytes {
    if tty {
        return Bytes::copy_from_slice(data);
    }
    let kind = match stream {
        LogStream::Stdout => 1,
        LogStream::Stderr => 2,
    };
    let mut framed = BytesMut::with_capacity(8 + data.len());
    framed.put_u8(kind);
    framed.put_bytes(0, 3);
    framed.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    framed.put_slice(data);
    framed.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_without_tty_has_stdcopy_header() {
        let framed = frame(false, LogStream::Stderr, b"oops");

        assert_eq!(&framed[..], b"\x02\x00\x00\x00\x00\x00\x00\x04oops");
    }

    #[test]
    fn frame_with_tty_is_raw() {
        assert_eq!(&frame(true, LogStream::Stdout, b"hi")[..], b"hi");
    }
}
