//! Shutdown: what happens after the host's `Shutdown` request has been answered.
//!
//! As PID 1 that is a power-off: kill what still runs (the host stops containers before it asks,
//! so this only catches stragglers), `sync`, unmount what can be unmounted so the data disk is
//! clean, `sync` again, and `reboot(RB_AUTOBOOT)`. The kernel runs with `reboot=t panic=-1` and
//! the VMM (or QEMU with `-no-reboot`) ends the VM process on a guest reset, so a reboot request
//! is the way out; power-off and halt are tried next in case it fails. PID 1 never returns from
//! here.
//!
//! In native mode a shutdown must not touch the host: the process just exits with status 0.

use std::fs;
use std::process;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{sync, Pid};

use crate::log::console;
use crate::Mode;

/// Filesystems with nothing to flush; failing to unmount them at power-off is not worth a word.
const VIRTUAL_FILESYSTEMS: [&str; 16] = [
    "rootfs",
    "ramfs",
    "tmpfs",
    "devtmpfs",
    "devpts",
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "bpf",
    "pstore",
    "configfs",
];

/// Set by the first shutdown; a second request (another connection) has nothing left to do.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// One line of `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted, unescaped.
    pub target: String,
    /// The filesystem type.
    pub fstype: String,
}

/// Shuts down as `mode` allows. As PID 1 this does not return; in native mode it exits the
/// process. Returns at once if a shutdown is already under way.
pub fn shutdown(mode: Mode) {
    if SHUTTING_DOWN.swap(true, Ordering::SeqCst) {
        return;
    }
    match mode {
        Mode::Pid1 => power_off(),
        Mode::Native => {
            console!("shutdown requested, exiting");
            process::exit(0);
        }
    }
}

fn power_off() -> ! {
    console!("powering off");
    // Every process but PID 1 itself; kernel threads ignore it.
    if let Err(e) = kill(Pid::from_raw(-1), Signal::SIGKILL) {
        console!("cannot kill the remaining processes: {e}");
    }
    sync();
    unmount_all();
    sync();
    for how in [
        RebootMode::RB_AUTOBOOT,
        RebootMode::RB_POWER_OFF,
        RebootMode::RB_HALT_SYSTEM,
    ] {
        let Err(e) = reboot(how);
        console!("reboot({how:?}) failed: {e}");
    }
    console!("could not power off; idling");
    loop {
        thread::park();
    }
}

/// Unmounts everything but `/`, innermost first. A filesystem that stays busy is remounted
/// read-only, which flushes it just as well; only failures on real filesystems are logged.
fn unmount_all() {
    let mounts = match fs::read_to_string("/proc/self/mounts") {
        Ok(text) => parse_mounts(&text),
        Err(e) => {
            console!("cannot list mounts, leaving them mounted: {e}");
            return;
        }
    };
    for entry in mounts.iter().rev().filter(|entry| entry.target != "/") {
        let target = entry.target.as_str();
        if umount2(target, MntFlags::empty()).is_ok()
            || VIRTUAL_FILESYSTEMS.contains(&entry.fstype.as_str())
        {
            continue;
        }
        let readonly = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, readonly, None::<&str>) {
            console!("cannot unmount or remount read-only {target}: {e}");
        }
    }
}

/// Parses `/proc/self/mounts` text, undoing the kernel's octal escapes in mount points.
pub fn parse_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = unescape_mount_field(fields.next()?);
            let fstype = fields.next()?.to_owned();
            Some(MountEntry { target, fstype })
        })
        .collect()
}

/// Undoes the `\ooo` escapes the kernel writes for space, tab, newline and backslash.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mounts_sample_lists_targets_and_types_in_order() {
        let text = "\
rootfs / rootfs rw 0 0
devtmpfs /dev devtmpfs rw,nosuid,size=250000k,mode=755 0 0
/dev/vda /var/lib/berth ext4 rw,relatime 0 0
";

        let mounts = parse_mounts(text);

        let targets: Vec<&str> = mounts.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(targets, ["/", "/dev", "/var/lib/berth"]);
        assert_eq!(mounts[2].fstype, "ext4");
    }

    #[test]
    fn parse_mounts_escaped_space_is_unescaped() {
        let mounts = parse_mounts("share /mnt/my\\040files virtiofs rw 0 0\n");

        assert_eq!(mounts[0].target, "/mnt/my files");
    }

    #[test]
    fn parse_mounts_short_line_is_skipped() {
        assert!(parse_mounts("garbage\n").is_empty());
    }

    #[test]
    fn unescape_mount_field_lone_backslash_is_kept() {
        assert_eq!(unescape_mount_field("a\\b"), "a\\b");
    }
}
