//! API errors in Docker's shape: a status code and `{"message": "…"}`.

use berth_engine::{EngineError, ErrorKind};
use hyper::StatusCode;

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What the CLI prints after `Error response from daemon: `.
    pub message: String,
}

impl ApiError {
    /// 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 409 with `message`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// 500 with `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// Any status with `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// The status code Docker uses for each class of engine failure.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::NotModified => StatusCode::NOT_MODIFIED,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let status = status_for(error.kind());
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(error = %error, "internal error answered to a client");
        }
        Self::new(status, error.to_string())
    }
}

impl From<berth_engine::images::ImageError> for ApiError {
    fn from(error: berth_engine::images::ImageError) -> Self {
        EngineError::from(error).into()
    }
}

/// A result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_engine_error_no_such_container_is_404_with_docker_message() {
        let error = ApiError::from(EngineError::NoSuchContainer("web".into()));

        assert_eq!(error.status, StatusCode::NOT_FOUND);
        assert_eq!(error.message, "No such container: web");
    }

    #[test]
    fn from_engine_error_already_started_is_304() {
        let error = ApiError::from(EngineError::AlreadyInState("c".into(), "started"));

        assert_eq!(error.status, StatusCode::NOT_MODIFIED);
    }
}
