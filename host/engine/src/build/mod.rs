//! The pure front half of `docker build` (the classic builder behind `POST /build`): the
//! Dockerfile parser with Docker's variable expansion, and the `.dockerignore` matcher.
//!
//! Nothing here touches the filesystem or the network: the builder hands in the Dockerfile text,
//! the `.dockerignore` text and the paths of the build context, and gets typed instructions and
//! yes/no answers back. Both inputs come from the user, so every function returns an error
//! instead of panicking, whatever the input.

pub mod builder;
pub mod dockerfile;
pub mod dockerignore;
