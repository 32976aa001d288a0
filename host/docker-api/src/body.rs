//! Response bodies (whole, or streamed from a channel) and request body reading.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::{ApiError, ApiResult};

/// Largest JSON request body accepted (create bodies are a few KiB).
const MAX_JSON_BODY: usize = 16 << 20;

/// The body of every response: a whole buffer or a stream of chunks.
#[derive(Debug)]
pub enum ApiBody {
    /// All at once.
    Full(Full<Bytes>),
    /// Chunks as a task produces them; the body ends when the sender is dropped.
    Channel(mpsc::Receiver<Bytes>),
    /// Chunks that may end in an error, which aborts the response (the client sees the body
    /// cut short instead of a clean end).
    Fallible(mpsc::Receiver<io::Result<Bytes>>),
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Self::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| Ok(f.unwrap_or_else(|never| match never {})))),
            Self::Channel(receiver) => receiver
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c)))),
            Self::Fallible(receiver) => receiver
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| c.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(full) => full.is_end_stream(),
            Self::Channel(_) | Self::Fallible(_) => false,
        }
    }
}

/// A response as handlers build it.
pub type ApiResponse = Response<ApiBody>;

/// `status` with a JSON body.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> ApiResponse {
    match serde_json::to_vec(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            with_type(status, "application/json", Bytes::from(bytes))
        }
        Err(e) => error(&ApiError::internal(format!(
            "cannot encode the response: {e}"
        ))),
    }
}

/// A 200 response streaming chunks that may end in an error.
pub fn fallible_streaming(
    content_type: &'static str,
) -> (ApiResponse, mpsc::Sender<io::Result<Bytes>>) {
    let (sender, receiver) = mpsc::channel(16);
    let mut response = Response::new(ApiBody::Fallible(receiver));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    (response, sender)
}

/// `status` with no body.
pub fn empty(status: StatusCode) -> ApiResponse {
    let mut response = Response::new(ApiBody::Full(Full::new(Bytes::new())));
    *response.status_mut() = status;
    response
}

/// `status` with `body` of `content_type`.
pub fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> ApiResponse {
    let mut response = Response::new(ApiBody::Full(Full::new(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Docker's error response.
pub fn error(error: &ApiError) -> ApiResponse {
    if error.status == StatusCode::NOT_MODIFIED {
        return empty(StatusCode::NOT_MODIFIED);
    }
    json(
        error.status,
        &serde_json::json!({ "message": error.message }),
    )
}

/// A 200 response whose body the returned sender streams; the body ends when it is dropped.
pub fn streaming(content_type: &'static str) -> (ApiResponse, mpsc::Sender<Bytes>) {
    let (sender, receiver) = mpsc::channel(64);
    let mut response = Response::new(ApiBody::Channel(receiver));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    (response, sender)
}

/// One JSON value followed by a newline, as Docker's progress and event streams are.
pub fn json_line<T: Serialize>(value: &T) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Reads a whole request body, up to `limit` bytes.
pub async fn read_all(body: Incoming, limit: usize) -> ApiResult<Bytes> {
    let collected = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    Ok(collected.to_bytes())
}

/// Parses a JSON request body; an empty body is `T::default()`'s JSON `{}`.
pub async fn read_json<T: DeserializeOwned>(body: Incoming) -> ApiResult<T> {
    let bytes = read_all(body, MAX_JSON_BODY).await?;
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(text).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}
