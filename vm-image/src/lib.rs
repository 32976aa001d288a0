//! Reproducible initramfs images for the Berth guest.
//!
//! The guest boots from an uncompressed `newc` cpio archive holding the statically linked
//! `berth-agent` as `/init` and the few nodes the kernel needs before the agent mounts devtmpfs
//! (`/dev/console`, so PID 1 has a console from its first instruction). We write the archive
//! ourselves rather than calling `cpio` so that device nodes need no root, and so every header
//! field the host could leak (inode numbers, owners, mtimes, device numbers of the build
//! filesystem) is fixed: the same inputs give the same bytes.
//!
//! The archive is uncompressed on purpose: the kernel needs no decompressor, and under TCG
//! decompression costs more boot time than reading the extra bytes.

use std::io::{self, Write};

use thiserror::Error;

/// File-type bits of `st_mode`, as the newc format stores them.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

const NEWC_MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// Why an archive could not be written.
#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("invalid archive path {0:?}: must be relative, without `.` or `..` components")]
    InvalidPath(String),
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    #[error("{0:?} is {1} bytes, larger than newc's 4 GiB limit")]
    TooLarge(String, usize),
    #[error("failed to write the archive")]
    Io(#[source] io::Error),
}

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Directory,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A character device node.
    CharDevice { major: u32, minor: u32 },
}

/// One archive entry. Owners are always root: the guest has no other users at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, relative (`init`, `dev/console`).
    pub path: String,
    /// Permission bits (`0o755`).
    pub perm: u32,
    /// What the entry is.
    pub kind: EntryKind,
}

/// An initramfs under construction. Entries are written in the order added; parents must be
/// added before their children (the kernel creates entries in archive order).
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
}

impl Initramfs {
    /// The skeleton every Berth guest image has: `/dev/console` and the mount points PID 1 uses
    /// before it can create directories on a writable root.
    pub fn guest_skeleton() -> Self {
        let mut image = Self::default();
        for (dir, perm) in [
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("tmp", 0o1777),
        ] {
            image.entries.push(Entry {
                path: dir.into(),
                perm,
                kind: EntryKind::Directory,
            });
        }
        image.entries.push(Entry {
            path: "dev/console".into(),
            perm: 0o600,
            kind: EntryKind::CharDevice { major: 5, minor: 1 },
        });
        image
    }

    /// Adds an entry after checking its path.
    pub fn add(&mut self, entry: Entry) -> Result<(), ArchiveError> {
        validate_path(&entry.path)?;
        if self.entries.iter().any(|e| e.path == entry.path) {
            return Err(ArchiveError::Duplicate(entry.path));
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Writes the archive. `mtime` is the single timestamp every entry gets.
    pub fn write<W: Write>(&self, out: &mut W, mtime: u32) -> Result<(), ArchiveError> {
        let mut writer = NewcWriter {
            out,
            offset: 0,
            next_ino: 1,
        };
        for entry in &self.entries {
            writer.entry(entry, mtime)?;
        }
        writer.trailer()
    }
}

fn validate_path(path: &str) -> Result<(), ArchiveError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(ArchiveError::InvalidPath(path.into()));
    }
    Ok(())
}

struct NewcWriter<'a, W: Write> {
    out: &'a mut W,
    offset: usize,
    next_ino: u32,
}

impl<W: Write> NewcWriter<'_, W> {
    fn entry(&mut self, entry: &Entry, mtime: u32) -> Result<(), ArchiveError> {
        let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match &entry.kind {
            EntryKind::Directory => (S_IFDIR | entry.perm, &[], (0, 0)),
            EntryKind::File(data) => (S_IFREG | entry.perm, data, (0, 0)),
            EntryKind::CharDevice { major, minor } => (S_IFCHR | entry.perm, &[], (*major, *minor)),
        };
        let size = u32::try_from(data.len())
            .map_err(|_| ArchiveError::TooLarge(entry.path.clone(), data.len()))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if matches!(entry.kind, EntryKind::Directory) {
            2
        } else {
            1
        };
        self.header(
            &entry.path,
            [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev.0, rdev.1],
        )?;
        self.bytes(data)?;
        self.pad()
    }

    fn trailer(&mut self) -> Result<(), ArchiveError> {
        self.header(TRAILER, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
        self.out.flush().map_err(ArchiveError::Io)
    }

    /// Writes a header: `fields` are ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
    /// devminor, rdevmajor, rdevminor; namesize and check are derived.
    fn header(&mut self, name: &str, fields: [u32; 11]) -> Result<(), ArchiveError> {
        let mut header = String::with_capacity(110);
        header.push_str(NEWC_MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        let namesize = name.len() + 1;
        header.push_str(&format!("{namesize:08X}"));
        header.push_str("00000000");
        self.bytes(header.as_bytes())?;
        self.bytes(name.as_bytes())?;
        self.bytes(&[0])?;
        self.pad()
    }

    fn bytes(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        self.out.write_all(bytes).map_err(ArchiveError::Io)?;
        self.offset += bytes.len();
        Ok(())
    }

    /// newc aligns every header and every file body to four bytes.
    fn pad(&mut self) -> Result<(), ArchiveError> {
        let padding = (4 - self.offset % 4) % 4;
        self.bytes(&[0u8; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_entry(data: &[u8]) -> Entry {
        Entry {
            path: "init".into(),
            perm: 0o755,
            kind: EntryKind::File(data.to_vec()),
        }
    }

    fn build(data: &[u8], mtime: u32) -> Vec<u8> {
        let mut image = Initramfs::guest_skeleton();
        image.add(init_entry(data)).unwrap();
        let mut out = Vec::new();
        image.write(&mut out, mtime).unwrap();
        out
    }

    #[test]
    fn write_same_inputs_gives_same_bytes() {
        assert_eq!(build(b"agent", 0), build(b"agent", 0));
    }

    #[test]
    fn write_different_mtime_changes_bytes() {
        assert_ne!(build(b"agent", 0), build(b"agent", 1));
    }

    #[test]
    fn write_output_is_four_byte_aligned_and_ends_with_trailer() {
        let out = build(b"odd-length", 0);

        assert_eq!(out.len() % 4, 0);
        let tail = String::from_utf8_lossy(&out[out.len() - 16..]);
        assert!(tail.contains(TRAILER));
    }

    #[test]
    fn write_console_is_char_device_5_1() {
        let out = build(b"x", 0);
        let text = String::from_utf8_lossy(&out);
        let at = text.find("dev/console").unwrap();
        // The header precedes the name: 6 magic + 13 fields of 8 hex digits.
        let header = &text[at - 110..at];

        assert_eq!(&header[14..22], "00002180"); // S_IFCHR | 0o600
        assert_eq!(&header[78..86], "00000005"); // rdevmajor
        assert_eq!(&header[86..94], "00000001"); // rdevminor
    }

    #[test]
    fn add_parent_escape_is_refused() {
        let mut image = Initramfs::default();

        let err = image
            .add(Entry {
                path: "../etc/passwd".into(),
                perm: 0o644,
                kind: EntryKind::File(Vec::new()),
            })
            .unwrap_err();

        assert!(matches!(err, ArchiveError::InvalidPath(_)));
    }

    #[test]
    fn add_duplicate_is_refused() {
        let mut image = Initramfs::default();
        image.add(init_entry(b"a")).unwrap();

        let err = image.add(init_entry(b"b")).unwrap_err();

        assert!(matches!(err, ArchiveError::Duplicate(_)));
    }

    #[test]
    fn write_is_readable_by_gnu_cpio() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            // GNU cpio is an independent reader; without it this cross-check has nothing to run.
            eprintln!("skipping: cpio is not installed");
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI must have cpio"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("image.cpio");
        std::fs::write(&archive, build(b"hello init", 0)).unwrap();

        let listing = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();

        assert!(listing.status.success());
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(text.contains("init"), "{text}");
        assert!(text
            .lines()
            .any(|l| l.starts_with('c') && l.contains("dev/console")));
    }
}
