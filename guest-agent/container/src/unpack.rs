//! Safe unpacking of an OCI image layer (a tar stream, optionally gzip or zstd compressed) into a
//! layer directory, in the form containerd's overlay snapshotter stores layers: whiteouts become
//! overlay whiteouts (character device 0:0) and opaque directories get
//! `trusted.overlay.opaque=y`.
//!
//! The layer is untrusted input, so every write is made relative to a directory file descriptor
//! that was reached from the layer root one component at a time with `O_NOFOLLOW`: nothing is
//! ever written outside the layer directory. The rules, chosen to match Docker where Docker is
//! safe and to be stricter where it is not:
//!
//! - A leading `/` is stripped, as Docker does: `/etc/x` lands in `<layer>/etc/x`. The same holds
//!   for hard link targets, which tar stores relative to the archive root.
//! - Any `..` component is refused (Docker cleans the path lexically first; we refuse instead,
//!   because a layer produced by walking a filesystem never contains one).
//! - A path whose parent is a symlink is refused, whatever the symlink points to: a layer
//!   produced by walking a filesystem never writes through a symlink, so such an entry can only
//!   be an attempt to escape.
//! - A hard link must name an existing non-directory entry of this layer.
//! - Device nodes are refused unless [`UnpackOptions::allow_devices`] is set (fifos are always
//!   allowed).
//! - Header fields are bounded: paths and link targets to `PATH_MAX`, components to `NAME_MAX`,
//!   GNU long name records to `PATH_MAX` and PAX records to [`MAX_PAX_HEADER`] bytes.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmodat, fstatat, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
use tar::{EntryType, Header};
use thiserror::Error;

/// Longest path or link target accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest single path component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT: usize = 255;
/// Largest PAX extended header accepted, in bytes. Generous for xattrs such as ACLs and file
/// capabilities, small enough that a hostile archive cannot make us buffer much.
pub const MAX_PAX_HEADER: u64 = 1024 * 1024;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Errors from unpacking a layer.
#[derive(Debug, Error)]
pub enum UnpackError {
    /// The layer directory could not be opened.
    #[error("cannot open layer directory {path}")]
    OpenTarget {
        /// The layer directory.
        path: String,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// The compressed stream could not be decoded or read.
    #[error("cannot read layer stream")]
    Read(#[source] io::Error),
    /// The zstd frame header was invalid.
    #[error("invalid zstd stream")]
    Zstd(#[source] ruzstd::decoding::errors::FrameDecoderError),
    /// An entry's path is not acceptable.
    #[error("entry {path:?}: {reason}")]
    BadPath {
        /// The entry path, lossily decoded for the message.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A header (GNU long name, PAX) is larger than we accept.
    #[error("{kind} header of {size} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge {
        /// The kind of header.
        kind: &'static str,
        /// Its declared size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The archive is malformed.
    #[error("malformed archive: {0}")]
    Malformed(&'static str),
    /// A header field could not be parsed.
    #[error("malformed header field")]
    Header(#[source] io::Error),
    /// A parent of the entry is a symlink (or not a directory).
    #[error("entry {path:?}: parent {component:?} is a symlink or not a directory, refusing to write through it")]
    ThroughSymlink {
        /// The entry path.
        path: String,
        /// The offending component.
        component: String,
    },
    /// A hard link names something that is not in the layer.
    #[error("entry {path:?}: hard link target {target:?} is not a file of this layer")]
    LinkTarget {
        /// The entry path.
        path: String,
        /// The link target.
        target: String,
    },
    /// A device node in a layer that does not allow them.
    #[error("entry {path:?}: device nodes are not allowed in this layer")]
    DeviceNotAllowed {
        /// The entry path.
        path: String,
    },
    /// An entry type we do not unpack.
    #[error("entry {path:?}: unsupported entry type {kind:?}")]
    UnsupportedType {
        /// The entry path.
        path: String,
        /// The tar type byte.
        kind: char,
    },
    /// A filesystem operation failed.
    #[error("entry {path:?}: cannot {op}")]
    Io {
        /// The entry path.
        path: String,
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How to unpack a layer.
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Create character and block device nodes found in the layer. Off by default: images
    /// rarely need them and the runtime creates `/dev` itself.
    pub allow_devices: bool,
}

/// What an unpack produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackSummary {
    /// Entries applied (files, directories, links, nodes, whiteouts).
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
}

/// The compression of a layer stream, detected from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

/// Detects the compression of a stream from its first bytes (at least four for zstd).
pub fn detect_compression(prefix: &[u8]) -> Compression {
    if prefix.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Unpacks the layer read from `reader` into the existing directory `target`.
pub fn unpack_layer<R: Read>(
    reader: R,
    target: &Path,
    options: &UnpackOptions,
) -> Result<UnpackSummary, UnpackError> {
    let root = open_dir_path(target).map_err(|source| UnpackError::OpenTarget {
        path: target.display().to_string(),
        source,
    })?;
    let mut buffered = BufReader::with_capacity(64 * 1024, reader);
    let prefix = buffered.fill_buf().map_err(UnpackError::Read)?;
    let stream: Box<dyn Read + '_> = match detect_compression(prefix) {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(ZstdFrames::new(buffered)?),
    };
    Unpacker {
        root,
        options: options.clone(),
        summary: UnpackSummary::default(),
        dir_times: Vec::new(),
    }
    .run(stream)
}

/// A reader over every frame of a zstd stream (ruzstd decodes one frame at a time).
struct ZstdFrames<R: BufRead> {
    decoder: Option<StreamingDecoder<R, FrameDecoder>>,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Result<Self, UnpackError> {
        let decoder = StreamingDecoder::new(source).map_err(UnpackError::Zstd)?;
        Ok(Self {
            decoder: Some(decoder),
        })
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(0);
            };
            let n = decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            let Some(decoder) = self.decoder.take() else {
                return Ok(0);
            };
            let (mut source, frame) = decoder.into_parts();
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            // `new_with_decoder` re-initialises the frame decoder from the next frame header.
            self.decoder =
                Some(StreamingDecoder::new_with_decoder(source, frame).map_err(io::Error::other)?);
        }
    }
}

/// Extension records that apply to the next entry.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// The metadata of one entry after GNU and PAX records are applied.
struct EntryMeta {
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    kind: EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
    dev: (u64, u64),
}

struct Unpacker {
    root: OwnedFd,
    options: UnpackOptions,
    summary: UnpackSummary,
    /// Directory mtimes, set at the end because adding children changes them.
    dir_times: Vec<(Vec<Vec<u8>>, TimeSpec)>,
}

impl Unpacker {
    fn run(mut self, stream: Box<dyn Read + '_>) -> Result<UnpackSummary, UnpackError> {
        let mut archive = tar::Archive::new(stream);
        let entries = archive.entries().map_err(UnpackError::Read)?.raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry = entry.map_err(UnpackError::Read)?;
            let header = entry.header().clone();
            let kind = header.entry_type();
            let size = header.entry_size().map_err(UnpackError::Header)?;
            if kind.is_gnu_longname() {
                set_once(
                    &mut pending.long_name,
                    read_bounded(&mut entry, size, "gnu long name", MAX_PATH as u64 + 1)?,
                )?;
                continue;
            }
            if kind.is_gnu_longlink() {
                set_once(
                    &mut pending.long_link,
                    read_bounded(&mut entry, size, "gnu long link", MAX_PATH as u64 + 1)?,
                )?;
                continue;
            }
            if kind.is_pax_local_extensions() {
                set_once(
                    &mut pending.pax,
                    read_bounded(&mut entry, size, "pax", MAX_PAX_HEADER)?,
                )?;
                continue;
            }
            if kind.is_pax_global_extensions() {
                // Global records carry nothing a layer needs (comments, charsets); bound and skip.
                read_bounded(&mut entry, size, "pax global", MAX_PAX_HEADER)?;
                continue;
            }
            let meta = entry_meta(&header, std::mem::take(&mut pending), size)?;
            self.apply(meta, &mut entry)?;
            self.summary.entries += 1;
        }
        if pending.long_name.is_some() || pending.long_link.is_some() || pending.pax.is_some() {
            return Err(UnpackError::Malformed(
                "extension header without a following entry",
            ));
        }
        self.finish_dir_times()?;
        Ok(self.summary)
    }

    fn apply(&mut self, meta: EntryMeta, data: &mut dyn Read) -> Result<(), UnpackError> {
        let shown = lossy(&meta.path);
        let components = split_path(&meta.path, &shown)?;
        let Some((name, parents)) = components.split_last() else {
            // The archive root itself ("./"): only a directory may describe it.
            if !meta.kind.is_dir() {
                return Err(bad_path(&shown, "empty path"));
            }
            return self.apply_dir_meta(&[], &meta, &shown);
        };
        let parent = self.walk(parents, &shown)?;

        if name.as_slice() == OPAQUE_MARKER {
            return set_xattr_at(&parent, None, OPAQUE_XATTR, b"y")
                .map_err(|e| io_err(&shown, "set the opaque xattr", e));
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(WHITEOUT_PREFIX) {
                // Other `.wh..wh.` names are aufs bookkeeping (hard link dirs): skip.
                return Ok(());
            }
            if hidden.is_empty() {
                return Err(bad_path(&shown, "empty whiteout name"));
            }
            let hidden = OsStr::from_bytes(hidden);
            remove_existing(&parent, hidden).map_err(|e| io_err(&shown, "replace", e))?;
            mknodat(
                Some(parent.as_raw_fd()),
                hidden,
                SFlag::S_IFCHR,
                Mode::empty(),
                0,
            )
            .map_err(|e| io_err(&shown, "create the whiteout", e.into()))?;
            return chown_at(&parent, hidden, &meta).map_err(|e| io_err(&shown, "chown", e));
        }

        let name = OsStr::from_bytes(name);
        let kind = meta.kind;
        if kind.is_dir() {
            let mut full = parents.to_vec();
            full.push(name.as_bytes().to_vec());
            return self.apply_dir(&parent, name, full, &meta, &shown);
        }
        remove_existing(&parent, name).map_err(|e| io_err(&shown, "replace", e))?;
        if kind.is_file() || kind.is_contiguous() {
            let written =
                write_file(&parent, name, data).map_err(|e| io_err(&shown, "write", e))?;
            self.summary.bytes += written;
        } else if kind.is_symlink() {
            let target = meta
                .link
                .as_deref()
                .ok_or_else(|| bad_path(&shown, "symlink without target"))?;
            if target.is_empty() {
                return Err(bad_path(&shown, "symlink without target"));
            }
            symlinkat(OsStr::from_bytes(target), Some(parent.as_raw_fd()), name)
                .map_err(|e| io_err(&shown, "create the symlink", e.into()))?;
        } else if kind.is_hard_link() {
            return self.apply_hard_link(&parent, name, &meta, &shown);
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let flag = if kind.is_fifo() {
                SFlag::S_IFIFO
            } else if !self.options.allow_devices {
                return Err(UnpackError::DeviceNotAllowed { path: shown });
            } else if kind.is_character_special() {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            let dev = libc::makedev(meta.dev.0 as u32, meta.dev.1 as u32);
            mknodat(
                Some(parent.as_raw_fd()),
                name,
                flag,
                Mode::from_bits_truncate(0o600),
                dev,
            )
            .map_err(|e| io_err(&shown, "create the node", e.into()))?;
        } else {
            return Err(UnpackError::UnsupportedType {
                path: shown,
                kind: kind.as_byte() as char,
            });
        }
        apply_meta(&parent, name, &meta, !kind.is_symlink())
            .map_err(|e| io_err(&shown, "set metadata", e))
    }

    fn apply_dir(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        full: Vec<Vec<u8>>,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let existing = fstatat(Some(parent.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW);
        let is_dir = matches!(existing, Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR);
        if !is_dir {
            remove_existing(parent, name).map_err(|e| io_err(shown, "replace", e))?;
            mkdirat(
                Some(parent.as_raw_fd()),
                name,
                Mode::from_bits_truncate(0o700),
            )
            .map_err(|e| io_err(shown, "create the directory", e.into()))?;
        }
        self.apply_dir_meta_at(parent, name, meta, shown)?;
        self.dir_times.push((full, meta.mtime));
        Ok(())
    }

    fn apply_dir_meta(
        &mut self,
        full: &[Vec<u8>],
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let dir = self.walk(full, shown)?;
        apply_meta(&dir, OsStr::new("."), meta, true)
            .map_err(|e| io_err(shown, "set metadata", e))?;
        set_xattrs(&dir, None, &meta.xattrs).map_err(|e| io_err(shown, "set xattrs", e))?;
        self.dir_times.push((full.to_vec(), meta.mtime));
        Ok(())
    }

    fn apply_dir_meta_at(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let dir =
            open_dir_at(parent, name).map_err(|e| io_err(shown, "open the directory", e.into()))?;
        apply_meta(&dir, OsStr::new("."), meta, true)
            .map_err(|e| io_err(shown, "set metadata", e))?;
        set_xattrs(&dir, None, &meta.xattrs).map_err(|e| io_err(shown, "set xattrs", e))
    }

    fn apply_hard_link(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let raw_target = meta.link.as_deref().unwrap_or_default();
        let target_shown = lossy(raw_target);
        let link_error = || UnpackError::LinkTarget {
            path: shown.to_string(),
            target: target_shown.clone(),
        };
        let components = split_path(raw_target, &target_shown)?;
        let Some((target_name, target_parents)) = components.split_last() else {
            return Err(link_error());
        };
        let target_dir = self.walk_existing(target_parents).ok_or_else(link_error)?;
        let target_name = OsStr::from_bytes(target_name);
        match fstatat(
            Some(target_dir.as_raw_fd()),
            target_name,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFDIR => {}
            _ => return Err(link_error()),
        }
        linkat(
            Some(target_dir.as_raw_fd()),
            target_name,
            Some(parent.as_raw_fd()),
            name,
            AtFlags::empty(),
        )
        .map_err(|e| io_err(shown, "create the hard link", e.into()))
    }

    /// Opens the directory reached by `components` from the root, creating missing directories
    /// and refusing to pass through symlinks or non-directories.
    fn walk(&self, components: &[Vec<u8>], shown: &str) -> Result<OwnedFd, UnpackError> {
        let mut dir =
            dup_fd(&self.root).map_err(|e| io_err(shown, "open the layer root", e.into()))?;
        for component in components {
            let name = OsStr::from_bytes(component);
            let next = match open_dir_at(&dir, name) {
                Err(Errno::ENOENT) => {
                    mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
                        .map_err(|e| io_err(shown, "create a parent directory", e.into()))?;
                    open_dir_at(&dir, name)
                }
                other => other,
            };
            dir = next.map_err(|e| match e {
                Errno::ELOOP | Errno::ENOTDIR => UnpackError::ThroughSymlink {
                    path: shown.to_string(),
                    component: lossy(component),
                },
                e => io_err(shown, "open a parent directory", e.into()),
            })?;
        }
        Ok(dir)
    }

    /// Like [`Self::walk`] but creates nothing: `None` when the path does not exist as real
    /// directories.
    fn walk_existing(&self, components: &[Vec<u8>]) -> Option<OwnedFd> {
        let mut dir = dup_fd(&self.root).ok()?;
        for component in components {
            dir = open_dir_at(&dir, OsStr::from_bytes(component)).ok()?;
        }
        Some(dir)
    }

    fn finish_dir_times(&mut self) -> Result<(), UnpackError> {
        let times = std::mem::take(&mut self.dir_times);
        for (components, mtime) in times.iter().rev() {
            let shown = lossy(&components.join(&b'/'));
            let dir = self.walk(components, &shown)?;
            utimensat(
                Some(dir.as_raw_fd()),
                ".",
                mtime,
                mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| io_err(&shown, "set the directory mtime", e.into()))?;
        }
        Ok(())
    }
}

fn set_once(slot: &mut Option<Vec<u8>>, value: Vec<u8>) -> Result<(), UnpackError> {
    if slot.replace(value).is_some() {
        return Err(UnpackError::Malformed(
            "two extension headers of one kind for one entry",
        ));
    }
    Ok(())
}

fn read_bounded(
    entry: &mut dyn Read,
    size: u64,
    kind: &'static str,
    max: u64,
) -> Result<Vec<u8>, UnpackError> {
    if size > max {
        return Err(UnpackError::HeaderTooLarge { kind, size, max });
    }
    let mut data = Vec::with_capacity(size as usize);
    entry
        .take(size)
        .read_to_end(&mut data)
        .map_err(UnpackError::Read)?;
    Ok(data)
}

/// Combines the ustar header with pending GNU and PAX records.
fn entry_meta(header: &Header, pending: Pending, size: u64) -> Result<EntryMeta, UnpackError> {
    let mut path = pending
        .long_name
        .map(trim_nul)
        .unwrap_or_else(|| header.path_bytes().into_owned());
    let mut link = pending
        .long_link
        .map(trim_nul)
        .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
    let mut uid = header.uid().map_err(UnpackError::Header)?;
    let mut gid = header.gid().map_err(UnpackError::Header)?;
    let mut mtime = TimeSpec::new(header.mtime().map_err(UnpackError::Header)? as i64, 0);
    let mut xattrs = Vec::new();
    if let Some(pax) = &pending.pax {
        for record in tar::PaxExtensions::new(pax) {
            let record = record.map_err(|_| UnpackError::Malformed("invalid pax record"))?;
            let key = record.key_bytes();
            let value = record.value_bytes();
            match key {
                b"path" => path = value.to_vec(),
                b"linkpath" => link = Some(value.to_vec()),
                b"uid" => uid = parse_pax_number(value)?,
                b"gid" => gid = parse_pax_number(value)?,
                b"mtime" => mtime = parse_pax_time(value)?,
                b"size" if parse_pax_number(value)? != size => {
                    return Err(UnpackError::Malformed(
                        "pax size record differs from the header size",
                    ));
                }
                _ if key.starts_with(b"GNU.sparse.") => {
                    return Err(UnpackError::Malformed("sparse files are not supported"));
                }
                _ if key.starts_with(b"SCHILY.xattr.") => {
                    let name = CString::new(&key[b"SCHILY.xattr.".len()..])
                        .map_err(|_| UnpackError::Malformed("xattr name contains nul"))?;
                    xattrs.push((name, value.to_vec()));
                }
                _ => {}
            }
        }
    }
    let shown = lossy(&path);
    if path.len() > MAX_PATH {
        let head: String = shown.chars().take(64).collect();
        return Err(bad_path(
            &format!("{head}..."),
            "path is longer than PATH_MAX",
        ));
    }
    if link.as_ref().is_some_and(|l| l.len() > MAX_PATH) {
        return Err(bad_path(&shown, "link target is longer than PATH_MAX"));
    }
    let kind = header.entry_type();
    // Device numbers mean something only for device nodes; many writers leave them blank
    // elsewhere.
    let dev = if kind.is_character_special() || kind.is_block_special() {
        (
            header
                .device_major()
                .map_err(UnpackError::Header)?
                .unwrap_or(0) as u64,
            header
                .device_minor()
                .map_err(UnpackError::Header)?
                .unwrap_or(0) as u64,
        )
    } else {
        (0, 0)
    };
    Ok(EntryMeta {
        path,
        link,
        kind,
        mode: header.mode().map_err(UnpackError::Header)? & 0o7777,
        uid: u32::try_from(uid).map_err(|_| UnpackError::Malformed("uid out of range"))?,
        gid: u32::try_from(gid).map_err(|_| UnpackError::Malformed("gid out of range"))?,
        mtime,
        xattrs,
        dev,
    })
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn parse_pax_number(value: &[u8]) -> Result<u64, UnpackError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or(UnpackError::Malformed("invalid pax number"))
}

fn parse_pax_time(value: &[u8]) -> Result<TimeSpec, UnpackError> {
    let text =
        std::str::from_utf8(value).map_err(|_| UnpackError::Malformed("invalid pax time"))?;
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs
        .parse()
        .map_err(|_| UnpackError::Malformed("invalid pax time"))?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        let n: i64 = digits
            .parse()
            .map_err(|_| UnpackError::Malformed("invalid pax time"))?;
        n * 10i64.pow(9 - digits.len() as u32)
    };
    Ok(TimeSpec::new(secs, nanos))
}

/// Splits a tar path into components: leading `/` and `.` components dropped, `..` refused.
fn split_path(raw: &[u8], shown: &str) -> Result<Vec<Vec<u8>>, UnpackError> {
    if raw.contains(&0) {
        return Err(bad_path(shown, "path contains a nul byte"));
    }
    let mut out = Vec::new();
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(bad_path(shown, "path contains '..'")),
            c if c.len() > MAX_COMPONENT => {
                return Err(bad_path(shown, "path component is longer than NAME_MAX"))
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn apply_meta(dir: &OwnedFd, name: &OsStr, meta: &EntryMeta, chmod: bool) -> io::Result<()> {
    // chown before chmod: chown clears set-id bits. xattrs after chown: it clears file
    // capabilities. Times last.
    chown_at(dir, name, meta)?;
    if chmod {
        fchmodat(
            Some(dir.as_raw_fd()),
            name,
            Mode::from_bits_truncate(meta.mode),
            FchmodatFlags::FollowSymlink,
        )?;
    }
    if name != "." {
        set_xattrs(dir, Some(name), &meta.xattrs)?;
    }
    utimensat(
        Some(dir.as_raw_fd()),
        name,
        &meta.mtime,
        &meta.mtime,
        UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

fn chown_at(dir: &OwnedFd, name: &OsStr, meta: &EntryMeta) -> io::Result<()> {
    fchownat(
        Some(dir.as_raw_fd()),
        name,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn set_xattrs(
    dir: &OwnedFd,
    name: Option<&OsStr>,
    xattrs: &[(CString, Vec<u8>)],
) -> io::Result<()> {
    for (key, value) in xattrs {
        let key = key
            .to_str()
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        set_xattr_at(dir, name, key, value)?;
    }
    Ok(())
}

/// Sets an xattr on `name` in `dir` (or on `dir` itself) without following a final symlink.
/// There is no `lsetxattrat` before Linux 6.13, so the path goes through `/proc/self/fd`, which
/// resolves to the already verified directory.
fn set_xattr_at(dir: &OwnedFd, name: Option<&OsStr>, key: &str, value: &[u8]) -> io::Result<()> {
    let key = CString::new(key).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let Some(name) = name else {
        // SAFETY: `dir` is an open descriptor, `key` a valid C string and `value` a valid buffer
        // of the given length for the duration of the call.
        let rc = unsafe {
            libc::fsetxattr(
                dir.as_raw_fd(),
                key.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        return if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
    };
    let mut path = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    path.push(b'/');
    path.extend_from_slice(name.as_bytes());
    let path = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both strings are valid nul-terminated C strings and `value` is a valid buffer of
    // the given length for the duration of the call.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn write_file(dir: &OwnedFd, name: &OsStr, data: &mut dyn Read) -> io::Result<u64> {
    let fd = openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    io::copy(data, &mut file)
}

/// Removes whatever is at `name` (recursively for directories); absent is fine.
fn remove_existing(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let st = match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let child = open_dir_at(dir, name)?;
        let mut listing = nix::dir::Dir::from_fd(dup_fd(&child)?.into_raw_fd())?;
        let names: Vec<Vec<u8>> = listing
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_bytes().to_vec())
            .filter(|n| n != b"." && n != b"..")
            .collect();
        for child_name in names {
            remove_existing(&child, OsStr::from_bytes(&child_name))?;
        }
        unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir)?;
    } else {
        unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)?;
    }
    Ok(())
}

fn open_dir_at(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    let fd = openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_path(path: &Path) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup_fd(fd: &OwnedFd) -> Result<OwnedFd, Errno> {
    fd.try_clone()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn bad_path(shown: &str, reason: &'static str) -> UnpackError {
    UnpackError::BadPath {
        path: shown.to_string(),
        reason,
    }
}

fn io_err(shown: &str, op: &'static str, source: io::Error) -> UnpackError {
    UnpackError::Io {
        path: shown.to_string(),
        op,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_compression_magic_bytes_recognised() {
        assert_eq!(detect_compression(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            detect_compression(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(detect_compression(b"etc/"), Compression::None);
        assert_eq!(detect_compression(&[]), Compression::None);
    }

    #[test]
    fn split_path_leading_slash_and_dots_dropped() {
        let parts = split_path(b"/./usr//bin/./sh", "x").expect("valid");

        assert_eq!(
            parts,
            vec![b"usr".to_vec(), b"bin".to_vec(), b"sh".to_vec()]
        );
    }

    #[test]
    fn split_path_dotdot_refused() {
        let err = split_path(b"usr/../../etc", "x").expect_err("refused");

        assert!(err.to_string().contains("'..'"));
    }

    #[test]
    fn split_path_long_component_refused() {
        let long = vec![b'a'; MAX_COMPONENT + 1];

        assert!(split_path(&long, "x").is_err());
    }

    #[test]
    fn parse_pax_time_fraction_becomes_nanoseconds() {
        let time = parse_pax_time(b"1700000000.5").expect("valid");

        assert_eq!(
            (time.tv_sec(), time.tv_nsec()),
            (1_700_000_000, 500_000_000)
        );
    }

    #[test]
    fn parse_pax_time_garbage_refused() {
        assert!(parse_pax_time(b"soon").is_err());
    }
}
