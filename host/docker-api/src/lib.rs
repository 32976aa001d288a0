//! The Docker Engine REST API of Berth, on hyper over a unix socket.
//!
//! [`serve`] accepts connections; each request goes through [`router::route`], which strips
//! and checks the `/v1.NN` prefix and hands the request to one handler per resource
//! (`system`, `containers`, `exec`, `images`). Handlers parse, call one engine method, and
//! render Docker's JSON; errors become Docker's `{"message": …}` with its status codes
//! ([`error::ApiError`]). Attach and exec start hijack the connection ([`hijack`]).

#![recursion_limit = "256"]

pub mod archive;
pub mod body;
pub mod build;
pub mod commit;
pub mod containers;
pub mod error;
pub mod exec;
pub mod hijack;
pub mod images;
pub mod networks;
pub mod query;
pub mod router;
pub mod system;
pub mod volumes;

use std::sync::Arc;

use berth_engine::Engine;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tracing::debug;

/// The API version berthd implements and advertises.
pub const API_VERSION: &str = "1.47";
/// The oldest API version berthd accepts (dockerd's minimum).
pub const MIN_API_VERSION: &str = "1.24";
/// The Docker engine version berthd reports itself compatible with.
pub const ENGINE_VERSION: &str = "27.5.0-berth";

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, engine: Arc<Engine>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let engine = Arc::clone(&engine);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let engine = Arc::clone(&engine);
                async move { Ok::<_, std::convert::Infallible>(router::route(engine, request).await) }
            });
            let connection = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
        });
    }
}
