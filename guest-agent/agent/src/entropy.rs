//! Seeds the kernel's entropy pool from the virtio-rng device.
//!
//! A fresh micro-VM has little entropy of its own; the VMM offers the host's through virtio-rng
//! as `/dev/hwrng`. Recent kernels feed the pool from hwrng by themselves, but only at the
//! device's declared quality and after a delay; PID 1 reads a few bytes at boot and credits them
//! with `RNDADDENTROPY` so that early `getrandom` callers (TLS in containers) do not wait.
//!
//! This runs on a thread of its own with a deadline: a missing or slow device must never hold
//! up boot. Every outcome is one line on the console.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use thiserror::Error;

use crate::log::{console, Chain};

/// The hardware RNG device (virtio-rng in a Berth guest).
pub const HWRNG: &str = "/dev/hwrng";

/// Where entropy is credited.
pub const URANDOM: &str = "/dev/urandom";

/// How many bytes to read: 512 bits fill the kernel's pool.
pub const SEED_BYTES: usize = 64;

/// How long to keep trying before giving up on a slow device.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Pause between reads of a device that had nothing ready.
const READ_RETRY: Duration = Duration::from_millis(20);

/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])` from `<linux/random.h>` (not in the libc crate).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Why no entropy was credited.
#[derive(Debug, Error)]
pub enum EntropyError {
    #[error("no hardware RNG at {HWRNG}, skipping entropy seeding")]
    NoDevice,
    #[error("cannot open {path}")]
    Open {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {HWRNG}")]
    Read(#[source] io::Error),
    #[error("{HWRNG} gave no bytes within {0:?}")]
    Empty(Duration),
    #[error("RNDADDENTROPY on {URANDOM} failed")]
    Credit(#[source] Errno),
}

/// Starts the seeding thread and returns at once.
pub fn spawn_seeder() {
    let started = thread::Builder::new().name("entropy".into()).spawn(|| {
        match seed(Path::new(HWRNG), Path::new(URANDOM)) {
            Ok(bytes) => console!("credited {bytes} bytes of entropy from {HWRNG}"),
            Err(e) => console!("{}", Chain(&e)),
        }
    });
    if let Err(e) = started {
        console!("cannot start the entropy thread: {e}");
    }
}

/// Reads up to [`SEED_BYTES`] from `hwrng` and credits them to the pool through `pool`.
/// Returns how many bytes were credited.
pub fn seed(hwrng: &Path, pool: &Path) -> Result<usize, EntropyError> {
    let mut device = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(hwrng)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => EntropyError::NoDevice,
            _ => EntropyError::Open {
                path: HWRNG,
                source,
            },
        })?;
    let bytes = read_bounded(&mut device, SEED_BYTES, READ_DEADLINE)?;
    let pool = File::open(pool).map_err(|source| EntropyError::Open {
        path: URANDOM,
        source,
    })?;
    credit(&pool, &bytes)?;
    Ok(bytes.len())
}

/// Reads up to `max` bytes from a non-blocking `reader`, retrying while it has nothing ready,
/// until `deadline` has passed. Fails only if no byte at all arrived.
pub fn read_bounded(
    reader: &mut impl Read,
    max: usize,
    deadline: Duration,
) -> Result<Vec<u8>, EntropyError> {
    let give_up = Instant::now() + deadline;
    let mut bytes = vec![0u8; max];
    let mut filled = 0;
    while filled < max {
        match reader.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= give_up {
                    break;
                }
                thread::sleep(READ_RETRY);
            }
            // The node exists but no hardware RNG is registered behind it.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Err(EntropyError::NoDevice),
            Err(e) => return Err(EntropyError::Read(e)),
        }
    }
    if filled == 0 {
        return Err(EntropyError::Empty(deadline));
    }
    bytes.truncate(filled);
    Ok(bytes)
}

/// Builds a `struct rand_pool_info` crediting every bit of `bytes`: `entropy_count` (bits),
/// `buf_size` (bytes), then the bytes, padded to whole `u32` words as the struct's `__u32 buf[]`
/// demands.
pub fn rand_pool_info(bytes: &[u8]) -> Vec<u32> {
    let bits = i32::try_from(bytes.len() * 8).unwrap_or(i32::MAX);
    let size = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    let mut words = Vec::with_capacity(2 + bytes.len().div_ceil(4));
    words.push(bits as u32);
    words.push(size as u32);
    words.extend(bytes.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        u32::from_ne_bytes(word)
    }));
    words
}

fn credit(pool: &File, bytes: &[u8]) -> Result<(), EntropyError> {
    let info = rand_pool_info(bytes);
    // SAFETY: `info` is a complete `struct rand_pool_info` whose `buf_size` matches the bytes
    // that follow it (see `rand_pool_info`); the kernel only reads it, and it outlives the call.
    let rc = unsafe { libc::ioctl(pool.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    Errno::result(rc).map(drop).map_err(EntropyError::Credit)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// A reader that has nothing ready, forever.
    struct NeverReady;

    impl Read for NeverReady {
        fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    #[test]
    fn rand_pool_info_header_credits_every_bit() {
        let info = rand_pool_info(&[0xAB; 6]);

        assert_eq!(info[..2], [48, 6]);
        assert_eq!(info.len(), 2 + 2);
    }

    #[test]
    fn rand_pool_info_bytes_follow_header_in_memory_order() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);

        let payload: Vec<u8> = info[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(payload, [1, 2, 3, 4, 5, 0, 0, 0]);
    }

    #[test]
    fn read_bounded_stops_at_max() {
        let mut source = Cursor::new(vec![7u8; 100]);

        let bytes = read_bounded(&mut source, SEED_BYTES, READ_DEADLINE).unwrap();

        assert_eq!(bytes.len(), SEED_BYTES);
    }

    #[test]
    fn read_bounded_device_never_ready_gives_up_after_deadline() {
        let deadline = Duration::from_millis(50);

        let err = read_bounded(&mut NeverReady, SEED_BYTES, deadline).unwrap_err();

        assert!(matches!(err, EntropyError::Empty(_)));
    }

    #[test]
    fn seed_missing_device_is_no_device() {
        let dir = tempfile::tempdir().unwrap();

        let err = seed(&dir.path().join("hwrng"), Path::new(URANDOM)).unwrap_err();

        assert!(matches!(err, EntropyError::NoDevice));
    }
}
