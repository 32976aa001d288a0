//! The reaper: collects the exit status of every child, including orphans.
//!
//! PID 1 inherits every orphaned process in the guest, and each one stays a zombie until PID 1
//! waits for it. One thread, the reaper, does all the waiting; nothing else in the agent may
//! call `wait*` (it would steal statuses the reaper is owed, or find them already stolen). Code
//! that starts a process asks the reaper instead: [`Reaper::spawn`] returns a [`Receiver`] that
//! yields the child's [`ExitStatus`], and [`Reaper::watch`] does the same for a pid started
//! elsewhere (say, a container's init started by a helper that exited).
//!
//! Two races shape the design:
//! - A child can exit before whoever spawned it registers interest. [`Reaper::spawn`] holds the
//!   registry lock while spawning, and the reaper takes that lock before it reaps, so the pid is
//!   registered before its status can be recorded. Statuses nobody has asked for are kept (a
//!   bounded number) so a late [`Reaper::watch`] still gets them.
//! - `std::process::Command::spawn` itself waits for a child whose `exec` failed, and panics if
//!   that child was already reaped. The reaper therefore first *peeks* at an exited child
//!   (`waitid(WNOWAIT)`), then takes the lock (which a spawn in progress holds), and only then
//!   reaps, tolerating a child that is already gone.
//!
//! When there are no children at all, the reaper sleeps in `sigtimedwait(SIGCHLD)`: an orphan
//! reparented to PID 1 raises SIGCHLD when it exits, and [`Reaper::spawn`] pokes the reaper
//! thread with a SIGCHLD of its own. That only works if SIGCHLD is blocked in every thread (a
//! blocked signal stays pending; an unblocked one with the default action is discarded), hence
//! [`block_sigchld`] at the very start of `main`. A one-second timeout backs all of this up.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::os::unix::thread::JoinHandleExt;
use std::process::{Child, Command, ExitStatus};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::time::TimeSpec;
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use thiserror::Error;

use crate::log::console;

/// How many statuses nobody has asked for are kept. Orphans that nobody will ever ask about
/// would otherwise grow the map forever; a watcher arrives within moments of a spawn, so the
/// oldest entries are safe to forget.
pub const UNCLAIMED_LIMIT: usize = 4096;

/// How long the idle reaper sleeps before looking again, in case a SIGCHLD went astray.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Set once a reaper thread runs: two threads calling `waitid(P_ALL)` would steal from each
/// other.
static STARTED: AtomicBool = AtomicBool::new(false);

/// Why the reaper could not start.
#[derive(Debug, Error)]
pub enum ReaperError {
    #[error("a reaper already runs in this process")]
    AlreadyRunning,
    #[error("cannot start the reaper thread")]
    Thread(#[source] io::Error),
    #[error("cannot block SIGCHLD")]
    SignalMask(#[source] nix::Error),
}

/// Blocks SIGCHLD in the calling thread, and so in every thread it starts afterwards. Call it
/// first thing in `main`. Children started through `std::process::Command` get an empty mask
/// again.
pub fn block_sigchld() -> Result<(), ReaperError> {
    sigchld_set()
        .thread_block()
        .map_err(ReaperError::SignalMask)
}

fn sigchld_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set
}

/// Exit statuses waiting for a watcher, and watchers waiting for an exit status.
///
/// Pure bookkeeping, no syscalls: the reaper thread feeds it with [`Registry::record`].
#[derive(Debug, Default)]
pub struct Registry {
    watchers: HashMap<u32, Vec<Sender<ExitStatus>>>,
    unclaimed: HashMap<u32, ExitStatus>,
    /// Pids of `unclaimed` in the order they exited, oldest first.
    unclaimed_order: VecDeque<u32>,
}

impl Registry {
    /// Records that `pid` exited with `status`, telling its watchers or keeping it for later.
    pub fn record(&mut self, pid: u32, status: ExitStatus) {
        let Some(watchers) = self.watchers.remove(&pid) else {
            self.keep_unclaimed(pid, status);
            return;
        };
        for watcher in watchers {
            // A watcher that dropped its receiver no longer cares.
            let _ = watcher.send(status);
        }
    }

    /// Returns a receiver for the exit status of `pid`, which may already have been recorded.
    pub fn watch(&mut self, pid: u32) -> Receiver<ExitStatus> {
        let (sender, receiver) = channel();
        match self.take_unclaimed(pid) {
            // The receiver is still in hand, so the send cannot fail.
            Some(status) => drop(sender.send(status)),
            None => self.watchers.entry(pid).or_default().push(sender),
        }
        receiver
    }

    /// Like [`Registry::watch`] for a pid that was just created: a status already recorded under
    /// that pid belonged to an earlier process that had the same number, and is dropped.
    pub fn watch_new(&mut self, pid: u32) -> Receiver<ExitStatus> {
        self.take_unclaimed(pid);
        self.watch(pid)
    }

    /// How many statuses wait for a watcher.
    pub fn unclaimed_len(&self) -> usize {
        self.unclaimed.len()
    }

    fn keep_unclaimed(&mut self, pid: u32, status: ExitStatus) {
        if self.unclaimed.insert(pid, status).is_none() {
            self.unclaimed_order.push_back(pid);
        }
        while self.unclaimed.len() > UNCLAIMED_LIMIT {
            let Some(oldest) = self.unclaimed_order.pop_front() else {
                break;
            };
            self.unclaimed.remove(&oldest);
        }
    }

    fn take_unclaimed(&mut self, pid: u32) -> Option<ExitStatus> {
        let status = self.unclaimed.remove(&pid)?;
        self.unclaimed_order.retain(|p| *p != pid);
        Some(status)
    }
}

/// Handle to the process's reaper thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Reaper {
    registry: Arc<Mutex<Registry>>,
    thread: libc::pthread_t,
}

impl Reaper {
    /// Starts the reaper thread. At most one reaper runs per process.
    pub fn start() -> Result<Self, ReaperError> {
        if STARTED.swap(true, Ordering::SeqCst) {
            return Err(ReaperError::AlreadyRunning);
        }
        let registry = Arc::new(Mutex::new(Registry::default()));
        let thread_registry = Arc::clone(&registry);
        let handle = thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(&thread_registry))
            .map_err(|e| {
                STARTED.store(false, Ordering::SeqCst);
                ReaperError::Thread(e)
            })?;
        let thread = handle.as_pthread_t();
        // The thread never ends; dropping the handle detaches it.
        drop(handle);
        Ok(Self { registry, thread })
    }

    /// Spawns `command` and returns the child with a receiver for its exit status. Do not call
    /// `wait` on the child: the reaper collects it.
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, Receiver<ExitStatus>)> {
        self.spawn_with(|| {
            let child = command.spawn()?;
            let pid = child.id();
            Ok((child, pid))
        })
    }

    /// Runs `spawn`, which starts one child and returns a value and the child's pid, with the
    /// registry locked, so the child cannot be reaped before it is registered.
    pub fn spawn_with<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(T, u32), E>,
    ) -> Result<(T, Receiver<ExitStatus>), E> {
        let (value, receiver) = {
            let mut registry = lock(&self.registry);
            let (value, pid) = spawn()?;
            (value, registry.watch_new(pid))
        };
        self.wake();
        Ok((value, receiver))
    }

    /// Returns a receiver for the exit status of `pid`, a process that became our child (or
    /// orphan) without going through [`Reaper::spawn`]. A status recorded before this call is
    /// delivered at once.
    pub fn watch(&self, pid: u32) -> Receiver<ExitStatus> {
        lock(&self.registry).watch(pid)
    }

    /// Pokes the reaper out of its idle sleep: there is a child to wait for now.
    fn wake(&self) {
        // SAFETY: `self.thread` names the reaper thread, which never exits (`reap_forever`
        // does not return), so the handle stays valid; SIGCHLD is blocked there and only wakes
        // its `sigtimedwait`.
        let rc = unsafe { libc::pthread_kill(self.thread, libc::SIGCHLD) };
        if rc != 0 {
            console!(
                "reaper: cannot wake the reaper thread: {}",
                Errno::from_raw(rc)
            );
        }
    }
}

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // The registry stays consistent across a panic in a holder (every update is one call), so
    // a poisoned lock is still usable.
    registry.lock().unwrap_or_else(PoisonError::into_inner)
}

fn reap_forever(registry: &Mutex<Registry>) -> ! {
    // Here too, in case the caller of `start` did not block it: `wake` relies on it.
    if let Err(e) = block_sigchld() {
        console!("reaper: cannot block SIGCHLD: {e}");
    }
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    reap(registry, pid);
                }
            }
            Err(Errno::ECHILD) => wait_for_sigchld(IDLE_RECHECK),
            Err(Errno::EINTR) => {}
            Err(e) => {
                console!("reaper: waitid failed: {e}");
                thread::sleep(IDLE_RECHECK);
            }
        }
    }
}

/// Reaps `pid`, which `waitid(WNOWAIT)` reported exited, and records its status.
fn reap(registry: &Mutex<Registry>, pid: Pid) {
    // Locked before reaping: a spawn in progress holds the lock until its child is registered,
    // and std reaps by itself a child whose exec failed (see the module doc).
    let mut registry = lock(registry);
    let mut raw = 0;
    // SAFETY: `waitpid` writes only to `raw`, a live c_int.
    let rc = unsafe { libc::waitpid(pid.as_raw(), &mut raw, libc::WNOHANG) };
    if rc == pid.as_raw() {
        if let Ok(pid) = u32::try_from(pid.as_raw()) {
            registry.record(pid, ExitStatus::from_raw(raw));
        }
    }
    // Otherwise std's spawn reaped its failed child while we waited for the lock.
}

/// Sleeps until SIGCHLD is pending for this thread or `timeout` passes.
fn wait_for_sigchld(timeout: Duration) {
    let set = sigchld_set();
    let timeout = TimeSpec::from_duration(timeout);
    // SAFETY: `set` and `timeout` are live for the call; a null siginfo pointer is allowed. The
    // result does not matter: a signal, a timeout and EINTR all mean "look again".
    unsafe { libc::sigtimedwait(set.as_ref(), ptr::null_mut(), timeout.as_ref()) };
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::sync::OnceLock;

    use super::*;

    /// Generous bound for a short-lived child to be reaped on a loaded machine.
    const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

    fn exited_with(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    /// The one reaper of the test process, shared by every test that spawns: a second would
    /// steal children from the first. The test process becomes a subreaper so orphans of the
    /// children come back to it, as they would to PID 1.
    fn test_reaper() -> &'static Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        REAPER.get_or_init(|| {
            nix::sys::prctl::set_child_subreaper(true).unwrap();
            Reaper::start().unwrap()
        })
    }

    #[test]
    fn registry_exit_after_watch_is_delivered() {
        let mut registry = Registry::default();
        let exited = registry.watch(42);

        registry.record(42, exited_with(3));

        assert_eq!(exited.try_recv().unwrap().code(), Some(3));
    }

    #[test]
    fn registry_exit_before_watch_is_kept_for_the_watcher() {
        let mut registry = Registry::default();
        registry.record(42, exited_with(3));

        let exited = registry.watch(42);

        assert_eq!(exited.try_recv().unwrap().code(), Some(3));
        assert_eq!(registry.unclaimed_len(), 0);
    }

    #[test]
    fn registry_every_watcher_of_a_pid_is_told() {
        let mut registry = Registry::default();
        let first = registry.watch(42);
        let second = registry.watch(42);

        registry.record(42, exited_with(0));

        assert!(first.try_recv().is_ok() && second.try_recv().is_ok());
    }

    #[test]
    fn registry_watch_new_discards_status_of_an_earlier_process_with_that_pid() {
        let mut registry = Registry::default();
        registry.record(42, exited_with(9));

        let exited = registry.watch_new(42);

        assert!(exited.try_recv().is_err());
    }

    #[test]
    fn registry_unclaimed_beyond_limit_forgets_the_oldest() {
        let mut registry = Registry::default();
        for pid in 0..=UNCLAIMED_LIMIT as u32 {
            registry.record(pid, exited_with(0));
        }

        let oldest = registry.watch(0);
        let newest = registry.watch(UNCLAIMED_LIMIT as u32);

        assert!(oldest.try_recv().is_err());
        assert!(newest.try_recv().is_ok());
    }

    #[test]
    fn reaper_second_start_is_refused() {
        test_reaper();

        assert!(matches!(Reaper::start(), Err(ReaperError::AlreadyRunning)));
    }

    #[test]
    fn reaper_spawned_child_exit_status_is_delivered() {
        let (_child, exited) = test_reaper()
            .spawn(Command::new("sh").args(["-c", "exit 3"]))
            .unwrap();

        let status = exited.recv_timeout(EXIT_TIMEOUT).unwrap();

        assert_eq!(status.code(), Some(3));
    }

    #[test]
    fn reaper_orphaned_grandchild_is_reaped_and_reported() {
        // The shell starts a background sleep, prints its pid and exits: the sleep is orphaned
        // and reparented to this (subreaper) process.
        let (mut child, shell_exited) = test_reaper()
            .spawn(
                Command::new("sh")
                    .args(["-c", "sleep 0.2 >/dev/null 2>&1 & echo $!"])
                    .stdout(Stdio::piped()),
            )
            .unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let orphan: u32 = out.trim().parse().unwrap();
        shell_exited.recv_timeout(EXIT_TIMEOUT).unwrap();

        let status = test_reaper()
            .watch(orphan)
            .recv_timeout(EXIT_TIMEOUT)
            .unwrap();

        assert!(status.success());
    }

    #[test]
    fn reaper_spawn_exec_failure_is_an_error_not_a_panic() {
        // Setting the uid (to our own) makes std fork and wait for the failed child itself,
        // the path that must not race with the reaper.
        let uid = nix::unistd::getuid().as_raw();

        let result = test_reaper().spawn(Command::new("/nonexistent/berth-test").uid(uid));

        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
