//! `docker commit`: a container's writable layer becomes the top layer of a new image.
//!
//! The agent writes the overlay upper directory as an image layer (whiteouts and opaque
//! directories in the image spec's form, `DiffLayer`) to a download stream; the image store
//! hashes and compresses it on the way in (`ImageStore::derive`). The stream's end is checked
//! against the agent's answer before the image is stored, so a diff cut short never becomes
//! an image. A running container is paused for the copy unless asked otherwise, as dockerd
//! does; a stopped one is held by its lifecycle lock, so it cannot start meanwhile.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use agent_protocol::{DiffLayer, StreamHeader, StreamKind};
use tokio::sync::oneshot;

use crate::containers::spec::{command_line, committed_config};
use crate::containers::{new_id, Container, Status};
use crate::images::{Derivation, Image};
use crate::machine::MachineError;
use crate::runtime::{blocking_image, guest_container_dir, Engine, EngineError};

/// What `docker commit` asks for besides the container.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// `repo[:tag]` for the new image.
    pub reference: Option<String>,
    /// The image's comment.
    pub comment: Option<String>,
    /// The image's author.
    pub author: Option<String>,
    /// Pause a running container while its layer is copied.
    pub pause: bool,
    /// `--change` lines: Dockerfile instructions applied to the run configuration.
    pub changes: Vec<String>,
}

impl Engine {
    /// `POST /commit`: a new image from `reference`'s container.
    pub async fn commit(
        self: &Arc<Self>,
        reference: &str,
        options: CommitOptions,
    ) -> Result<Image, EngineError> {
        let container = self.container(reference)?;
        let record = container.record();
        let store = Arc::clone(&self.images);
        let image_id = record.image_id.clone();
        let image = blocking_image(move || store.resolve(&image_id)).await?;
        let image_config = image.config.config().clone().unwrap_or_default();
        let mut config = committed_config(&record.spec, &image_config);
        let docker_config = crate::build::builder::apply_changes(&mut config, &options.changes)?;
        let paused = options.pause && container.status() == Status::Running;
        if paused {
            self.pause(&container.id).await?;
        }
        let derivation = Derivation {
            config: Some(config),
            created_by: command_line(&record.spec, &image_config).join(" "),
            comment: options.comment,
            author: options.author,
            docker_config,
        };
        let result = self
            .snapshot(&container, derivation, options.reference)
            .await;
        if paused {
            if let Err(e) = self.unpause(&container.id).await {
                tracing::warn!(id = %container.id, error = %e, "cannot unpause after commit");
            }
        }
        let image = result?;
        self.events.emit(
            "container",
            "commit",
            &container.id,
            [("name", record.name), ("imageID", image.id.clone())],
        );
        Ok(image)
    }

    /// Stores `container`'s writable layer on top of its image as a new image.
    pub(crate) async fn snapshot(
        self: &Arc<Self>,
        container: &Arc<Container>,
        derivation: Derivation,
        tag: Option<String>,
    ) -> Result<Image, EngineError> {
        let _lifecycle = if container.status().is_running() {
            None
        } else {
            Some(Arc::clone(&container.lifecycle).lock_owned().await)
        };
        let parent = container.record().image_id;
        let session = self.machine.session().await?;
        let upper_dir = guest_container_dir(&session, &container.id).join("upper");
        let dirs = vec![upper_dir.clone()];
        session.call(move |a| a.create_dirs(dirs)).await?;
        let stream_id = format!("diff-{}", &new_id()[..16]);
        let stream = session
            .open_stream(StreamHeader {
                container_id: stream_id.clone(),
                exec_id: None,
                kind: StreamKind::ArchiveDownload,
            })
            .await?
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
            .map_err(|e| EngineError::Io("open the diff stream", e))?;
        let (done_tx, done_rx) = oneshot::channel();
        let request = DiffLayer {
            upper_dir,
            stream_id,
        };
        let agent = tokio::spawn(async move {
            let result = session.call_dedicated(move |a| a.diff_layer(request)).await;
            let _ = done_tx.send(result.as_ref().map(drop).map_err(|e| e.to_string()));
            result
        });
        let store = Arc::clone(&self.images);
        let stored = blocking_image(move || {
            let mut diff = CheckedStream {
                stream,
                done: Some(done_rx),
            };
            store.derive(Some(&parent), Some(&mut diff), derivation, tag.as_deref())
        })
        .await;
        match agent.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(MachineError::Task(e.to_string()).into()),
        }
        stored
    }
}

/// A download stream whose end counts only if the agent says it wrote everything.
struct CheckedStream {
    stream: UnixStream,
    done: Option<oneshot::Receiver<Result<(), String>>>,
}

impl Read for CheckedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        match self.done.take().map(oneshot::Receiver::blocking_recv) {
            None | Some(Ok(Ok(()))) => Ok(0),
            Some(Ok(Err(message))) => Err(io::Error::other(message)),
            Some(Err(_)) => Err(io::Error::other("the agent call ended without an answer")),
        }
    }
}
