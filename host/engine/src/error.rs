//! The classes of failure every engine error falls into, so the API layer can map any of them
//! to Docker's status codes without knowing each module's error enum.

/// What kind of failure an engine error is; the Docker API maps it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was malformed or named an invalid value (400).
    InvalidArgument,
    /// The request named an object that does not exist (404).
    NotFound,
    /// The request conflicts with the current state: a name in use, an image in use (409).
    Conflict,
    /// The request asks for the state the object is already in: start of a running
    /// container, stop of a stopped one (304).
    NotModified,
    /// Something failed inside Berth or the VM (500).
    Internal,
}
