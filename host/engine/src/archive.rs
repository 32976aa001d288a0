//! `docker cp` and `docker export`: paths of a container's filesystem as tar streams.
//!
//! The agent does the filesystem work inside the container's root (see
//! `berth_container::archive`); here the engine picks that root and moves the bytes. A running
//! container is read and written as its processes see it. A stopped one is reached through its
//! overlay, which the agent mounts for the one request: its layers are made present in the
//! guest first, and the container's lifecycle lock is held until the transfer ends, so a start
//! cannot mount the same upper directory meanwhile.

use std::sync::Arc;

pub use agent_protocol::PathStat;

use agent_protocol::{
    ContainerPath, OverlayDirs, ReadArchive, StoppedRoot, StreamHeader, StreamKind, WriteArchive,
};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;

use crate::containers::{new_id, Container};
use crate::machine::{MachineError, Session};
use crate::runtime::{blocking_image, guest_container_dir, Engine, EngineError};
use crate::ErrorKind;

/// How `docker cp` into a container treats what it writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyInOptions {
    /// Refuse to replace a directory with a non-directory or the other way round.
    pub no_overwrite_dir_non_dir: bool,
    /// `docker cp -a`: entries get the container user's ids instead of the archive's.
    pub copy_uid_gid: bool,
}

/// A tar coming out of a container: read `stream` to its end, then [`ArchiveDownload::finish`]
/// says whether the whole tar was written.
#[derive(Debug)]
pub struct ArchiveDownload {
    /// The tar's bytes.
    pub stream: UnixStream,
    done: JoinHandle<Result<PathStat, MachineError>>,
    /// Held for a stopped container until the transfer ends.
    _lifecycle: Option<OwnedMutexGuard<()>>,
}

impl ArchiveDownload {
    /// Whether the agent wrote the whole tar; call after `stream` reported its end.
    pub async fn finish(self) -> Result<(), EngineError> {
        match self.done.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(MachineError::Task(e.to_string()).into()),
        }
    }
}

/// The root a path request works in, and the lock that keeps it valid.
struct PathRoot {
    session: Arc<Session>,
    target: ContainerPath,
    lifecycle: Option<OwnedMutexGuard<()>>,
}

impl Engine {
    /// `HEAD /containers/{id}/archive`: what `path` is in the container.
    pub async fn stat_path(
        self: &Arc<Self>,
        reference: &str,
        path: &str,
    ) -> Result<PathStat, EngineError> {
        let container = self.container(reference)?;
        let root = self.path_root(&container, path).await?;
        let target = root.target.clone();
        let result = root.session.call(move |a| a.stat_path(target)).await;
        result.map_err(|e| path_error(e, path, &container))
    }

    /// `GET /containers/{id}/archive`: what `path` is, and a tar of it.
    pub async fn read_archive(
        self: &Arc<Self>,
        reference: &str,
        path: &str,
    ) -> Result<(PathStat, ArchiveDownload), EngineError> {
        let container = self.container(reference)?;
        let root = self.path_root(&container, path).await?;
        let target = root.target.clone();
        let stat = root
            .session
            .call(move |a| a.stat_path(target))
            .await
            .map_err(|e| path_error(e, path, &container))?;
        let download = start_download(root, false).await?;
        Ok((stat, download))
    }

    /// `GET /containers/{id}/export`: a tar of the container's root filesystem.
    pub async fn export(self: &Arc<Self>, reference: &str) -> Result<ArchiveDownload, EngineError> {
        let container = self.container(reference)?;
        let root = self.path_root(&container, "/").await?;
        let download = start_download(root, true).await?;
        self.events.emit("container", "export", &container.id, []);
        Ok(download)
    }

    /// `PUT /containers/{id}/archive`: extracts the tar read from `body` into the directory
    /// `path`.
    pub async fn write_archive(
        self: &Arc<Self>,
        reference: &str,
        path: &str,
        mut body: impl AsyncRead + Send + Unpin + 'static,
        options: CopyInOptions,
    ) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        let record = container.record();
        if record.spec.host.readonly_rootfs {
            return Err(EngineError::InvalidArgument(
                "container rootfs is marked read-only".to_owned(),
            ));
        }
        let root = self.path_root(&container, path).await?;
        let stream_id = format!("archive-{}", &new_id()[..16]);
        let mut stream = root
            .session
            .open_stream(StreamHeader {
                container_id: stream_id.clone(),
                exec_id: None,
                kind: StreamKind::ArchiveUpload,
            })
            .await?;
        let writer = tokio::spawn(async move {
            let copied = tokio::io::copy(&mut body, &mut stream).await;
            // The end of the stream is the end of the tar, whatever happened to the body.
            let _ = stream.shutdown().await;
            copied
        });
        let owner = if options.copy_uid_gid {
            self.effective_user(&record.spec.user, &record.image_id)
                .await?
        } else {
            None
        };
        let request = WriteArchive {
            target: root.target.clone(),
            stream_id,
            no_overwrite_dir_non_dir: options.no_overwrite_dir_non_dir,
            owner,
        };
        let extracted = root
            .session
            .call_dedicated(move |a| a.write_archive(request))
            .await;
        let copied = writer.await;
        drop(root.lifecycle);
        extracted.map_err(|e| path_error(e, path, &container))?;
        match copied {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(EngineError::Io("read the archive from the client", e)),
            Err(e) => return Err(MachineError::Task(e.to_string()).into()),
        }
        self.events.emit(
            "container",
            "extract-to-dir",
            &container.id,
            [("name", record.name)],
        );
        Ok(())
    }

    /// The user a container runs as: its own `--user`, else its image's; `None` for root by
    /// default.
    async fn effective_user(
        &self,
        user: &str,
        image_id: &str,
    ) -> Result<Option<String>, EngineError> {
        if !user.is_empty() {
            return Ok(Some(user.to_owned()));
        }
        let store = Arc::clone(&self.images);
        let image_id = image_id.to_owned();
        let image = blocking_image(move || store.resolve(&image_id)).await?;
        Ok(image
            .config
            .config()
            .as_ref()
            .and_then(|c| c.user().clone())
            .filter(|u| !u.is_empty()))
    }

    /// The guest session and the path request for `path` in `container`: with its stopped
    /// root (layers present, directories made) so the agent can mount it if the container
    /// does not run, and for a container that does not run, its lifecycle lock.
    async fn path_root(
        self: &Arc<Self>,
        container: &Arc<Container>,
        path: &str,
    ) -> Result<PathRoot, EngineError> {
        let lifecycle = if container.status().is_running() {
            None
        } else {
            Some(Arc::clone(&container.lifecycle).lock_owned().await)
        };
        let record = container.record();
        let store = Arc::clone(&self.images);
        let image_id = record.image_id.clone();
        let image = blocking_image(move || store.resolve(&image_id)).await?;
        let session = self.machine.session().await?;
        let lower_dirs = self.ensure_layers(&session, &image).await?;
        let dir = guest_container_dir(&session, &container.id);
        let (rootfs, upper, work) = (dir.join("rootfs"), dir.join("upper"), dir.join("work"));
        let dirs = vec![rootfs.clone(), upper.clone(), work.clone()];
        session.call(move |a| a.create_dirs(dirs)).await?;
        Ok(PathRoot {
            session,
            target: ContainerPath {
                container_id: container.id.clone(),
                path: normalise(path),
                stopped_root: Some(StoppedRoot {
                    rootfs,
                    overlay: OverlayDirs {
                        lower_dirs,
                        upper_dir: Some(upper),
                        work_dir: Some(work),
                    },
                }),
            },
            lifecycle,
        })
    }
}

/// Opens a download stream and has the agent write the tar of `root`'s path (or of the
/// whole root) into it.
async fn start_download(root: PathRoot, export: bool) -> Result<ArchiveDownload, EngineError> {
    let stream_id = format!("archive-{}", &new_id()[..16]);
    let stream = root
        .session
        .open_stream(StreamHeader {
            container_id: stream_id.clone(),
            exec_id: None,
            kind: StreamKind::ArchiveDownload,
        })
        .await?;
    let request = ReadArchive {
        target: root.target,
        stream_id,
        export,
    };
    let session = root.session;
    let done = tokio::spawn(async move {
        session
            .call_dedicated(move |a| a.read_archive(request))
            .await
    });
    Ok(ArchiveDownload {
        stream,
        done,
        _lifecycle: root.lifecycle,
    })
}

/// An absolute path as Docker makes it (`filepath.Join("/", path)`), keeping a trailing `/`
/// or `/.`, which ask for the last element to be followed.
fn normalise(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// A path the agent did not find becomes Docker's message; the rest stays as it is.
fn path_error(error: MachineError, path: &str, container: &Container) -> EngineError {
    if error.kind() == ErrorKind::NotFound {
        return EngineError::NoSuchPath {
            path: path.to_owned(),
            container: container.record().name,
        };
    }
    error.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_makes_paths_absolute_and_keeps_trailing_dots() {
        assert_eq!(normalise("etc/hostname"), "/etc/hostname");
        assert_eq!(normalise("/etc/."), "/etc/.");
        assert_eq!(normalise("/tmp/"), "/tmp/");
    }
}
