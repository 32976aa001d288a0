//! Host file changes in bind-mounted directories, forwarded to the guest.
//!
//! virtio-fs does not carry the host's inotify events into the guest, so a file watcher in a
//! container (a dev server's rebuild loop) would never hear of an edit made on the host. The
//! engine watches the host side of every bind mount of a running container with inotify
//! (recursively: one watch per directory), batches what changes for a moment, translates host
//! paths into the guest's share mounts and sends them to the agent (`Request::Notify`), which
//! touches each path's attributes in the guest so the guest kernel raises the events local
//! watchers wait for. See `docs/design/file-sharing.md`.
//!
//! The agent's touch reaches the host file again as an attribute change; those echoes are
//! dropped for a short time after each forward, so the two sides do not ping-pong.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use crate::sync::lock;

/// How long changes are gathered before they are forwarded together.
const BATCH: Duration = Duration::from_millis(50);
/// How long an attribute change on a path just forwarded counts as the guest's echo.
const ECHO_WINDOW: Duration = Duration::from_secs(2);
/// The most directories watched for one container, so a bind of a huge tree cannot exhaust
/// the host's inotify watches.
const MAX_DIRS_PER_CONTAINER: usize = 8192;

/// What the host side reports: host paths that changed.
pub type ChangeBatch = Vec<PathBuf>;

#[derive(Debug, Default)]
struct Registry {
    /// Watch descriptor → the directory it watches.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Directory → its watch descriptor and the containers whose binds cover it.
    users: HashMap<PathBuf, (WatchDescriptor, HashSet<String>)>,
    /// Paths forwarded recently, whose attribute changes are echoes of the guest's touch.
    forwarded: HashMap<PathBuf, Instant>,
}

/// Recursive inotify watches over bind-mount sources, shared by every container.
#[derive(Debug)]
pub struct BindWatcher {
    inotify: Arc<Inotify>,
    registry: Arc<Mutex<Registry>>,
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ONLYDIR
}

impl BindWatcher {
    /// Starts the watcher thread; each batch of changed host paths goes to `changes`.
    pub fn start(changes: UnboundedSender<ChangeBatch>) -> std::io::Result<Self> {
        let inotify = Arc::new(Inotify::init(
            InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC,
        )?);
        let registry = Arc::new(Mutex::new(Registry::default()));
        let (reader, shared) = (Arc::clone(&inotify), Arc::clone(&registry));
        thread::Builder::new()
            .name("bind-watcher".into())
            .spawn(move || run(&reader, &shared, &changes))?;
        Ok(Self { inotify, registry })
    }

    /// Watches `roots` (directories) and everything below them for `container`.
    pub fn watch(&self, container: &str, roots: &[PathBuf]) {
        let mut registry = lock(&self.registry);
        let mut budget = MAX_DIRS_PER_CONTAINER;
        for root in roots {
            add_tree(&self.inotify, &mut registry, container, root, &mut budget);
        }
        if budget == 0 {
            warn!(%container, "too many directories in its bind mounts; not all are watched");
        }
    }

    /// Stops watching what only `container` needed.
    pub fn unwatch(&self, container: &str) {
        let mut registry = lock(&self.registry);
        let mut unused = Vec::new();
        for (dir, (wd, users)) in registry.users.iter_mut() {
            if users.remove(container) && users.is_empty() {
                unused.push((dir.clone(), *wd));
            }
        }
        for (dir, wd) in unused {
            registry.users.remove(&dir);
            registry.dirs.remove(&wd);
            // The directory may be gone already, taking its watch with it.
            let _ = self.inotify.rm_watch(wd);
        }
    }
}

fn add_tree(
    inotify: &Inotify,
    registry: &mut Registry,
    container: &str,
    dir: &Path,
    budget: &mut usize,
) {
    if *budget == 0 {
        return;
    }
    if let Some((_, users)) = registry.users.get_mut(dir) {
        users.insert(container.to_owned());
    } else {
        match inotify.add_watch(dir, mask()) {
            Ok(wd) => {
                registry.dirs.insert(wd, dir.to_owned());
                registry
                    .users
                    .insert(dir.to_owned(), (wd, HashSet::from([container.to_owned()])));
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch a bind-mounted directory");
                return;
            }
        }
    }
    *budget -= 1;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            add_tree(inotify, registry, container, &entry.path(), budget);
        }
    }
}

/// The watcher thread: waits for events, gathers them for [`BATCH`], forwards them.
fn run(inotify: &Inotify, registry: &Mutex<Registry>, changes: &UnboundedSender<ChangeBatch>) {
    loop {
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "the bind watcher stopped");
                return;
            }
        }
        thread::sleep(BATCH);
        let mut batch: Vec<PathBuf> = Vec::new();
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            let mut registry = lock(registry);
            for event in events {
                let Some(dir) = registry.dirs.get(&event.wd).cloned() else {
                    continue;
                };
                let path = match &event.name {
                    Some(name) => dir.join(OsStr::new(name)),
                    None => dir.clone(),
                };
                let is_echo = event.mask.contains(AddWatchFlags::IN_ATTRIB)
                    && registry
                        .forwarded
                        .get(&path)
                        .is_some_and(|at| at.elapsed() < ECHO_WINDOW);
                if is_echo {
                    continue;
                }
                if event
                    .mask
                    .contains(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ISDIR)
                {
                    let users: Vec<String> = registry
                        .users
                        .get(&dir)
                        .map(|(_, u)| u.iter().cloned().collect())
                        .unwrap_or_default();
                    for user in users {
                        let mut budget = MAX_DIRS_PER_CONTAINER;
                        add_tree(inotify, &mut registry, &user, &path, &mut budget);
                    }
                }
                if !batch.contains(&path) {
                    batch.push(path);
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        {
            let mut registry = lock(registry);
            let now = Instant::now();
            registry
                .forwarded
                .retain(|_, at| at.elapsed() < ECHO_WINDOW);
            for path in &batch {
                registry.forwarded.insert(path.clone(), now);
            }
        }
        if changes.send(batch).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_file_written_in_a_nested_dir_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let watcher = BindWatcher::start(sender).unwrap();
        watcher.watch("c1", &[dir.path().to_owned()]);

        std::fs::write(dir.path().join("sub/file"), "x").unwrap();

        let batch = receiver.blocking_recv().unwrap();
        assert!(batch.contains(&dir.path().join("sub/file")), "{batch:?}");
    }

    #[test]
    fn unwatch_last_user_stops_reporting() {
        let dir = tempfile::tempdir().unwrap();
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let watcher = BindWatcher::start(sender).unwrap();
        watcher.watch("c1", &[dir.path().to_owned()]);
        watcher.unwatch("c1");

        std::fs::write(dir.path().join("file"), "x").unwrap();
        thread::sleep(BATCH * 4);

        assert!(receiver.try_recv().is_err());
    }
}
