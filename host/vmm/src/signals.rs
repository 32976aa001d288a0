//! Termination signals as events: blocked in every thread and read from a signalfd by the
//! event loop, so SIGTERM ends the VM through the same path as a guest shutdown.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The signals that end the VM.
pub const TERMINATING: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// A signalfd for [`TERMINATING`].
#[derive(Debug)]
pub struct SignalFd(OwnedFd);

impl SignalFd {
    /// Blocks [`TERMINATING`] in the calling thread (and every thread it spawns afterwards) and
    /// returns a signalfd that reports them. Call before starting any thread.
    pub fn block_terminating() -> io::Result<Self> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is given a valid pointer to.
        unsafe { libc::sigemptyset(set.as_mut_ptr()) };
        // SAFETY: initialised by sigemptyset above.
        let mut set = unsafe { set.assume_init() };
        for signal in TERMINATING {
            // SAFETY: `set` is a valid, initialised signal set and `signal` a valid signal.
            unsafe { libc::sigaddset(&mut set, signal) };
        }
        // SAFETY: `set` is valid; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new fd; `set` is valid.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The next pending signal, if any.
    pub fn read(&self) -> io::Result<Option<i32>> {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is exactly one signalfd_siginfo, as signalfd requires.
        let n = unsafe { libc::read(self.0.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(err),
            };
        }
        if n as usize != size {
            return Ok(None);
        }
        // SAFETY: the kernel filled the whole structure (checked above).
        let info = unsafe { info.assume_init() };
        Ok(Some(info.ssi_signo as i32))
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
