//! Tier-1 tests of layer unpacking: crafted malicious layers are refused with nothing written
//! outside the layer directory, and good layers keep their whiteouts, opaque directories, hard
//! links, nodes, xattrs, owners, modes and mtimes.

mod support;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_container::unpack::{unpack_layer, UnpackError, UnpackOptions};
use tar::{EntryType, Header};

/// A layer dir with an empty sentinel dir beside it; an escape would land in the sentinel.
struct Fixture {
    _tmp: tempfile::TempDir,
    layer: PathBuf,
    sentinel: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layer = tmp.path().join("layer");
        let sentinel = tmp.path().join("sentinel");
        std::fs::create_dir(&layer).expect("layer dir");
        std::fs::create_dir(&sentinel).expect("sentinel dir");
        Self {
            _tmp: tmp,
            layer,
            sentinel,
        }
    }

    fn unpack(&self, tar: &[u8]) -> Result<(), UnpackError> {
        self.unpack_with(tar, &UnpackOptions::default())
    }

    fn unpack_with(&self, tar: &[u8], options: &UnpackOptions) -> Result<(), UnpackError> {
        unpack_layer(tar, &self.layer, options).map(|_| ())
    }

    fn assert_sentinel_untouched(&self) {
        let entries: Vec<_> = std::fs::read_dir(&self.sentinel)
            .expect("read sentinel")
            .collect();
        assert!(
            entries.is_empty(),
            "something escaped into {:?}",
            self.sentinel
        );
        assert!(!Path::new("/etc/berth-unpack-test").exists());
    }
}

/// Builds tars with raw headers, so names the `tar` builder refuses (`..`) can be written.
#[derive(Default)]
struct TarBuilder {
    out: Vec<u8>,
}

impl TarBuilder {
    fn entry(self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_600_000_000);
        header.set_size(data.len() as u64);
        header.set_device_major(1).expect("device major");
        header.set_device_minor(3).expect("device minor");
        let bytes = header.as_mut_bytes();
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "use long names for longer"
        );
        bytes[..name.len()].copy_from_slice(name);
        bytes[157..157 + link.len()].copy_from_slice(link);
        header.set_cksum();
        self.raw(&header, data)
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(EntryType::Regular, name.as_bytes(), b"", data)
    }

    fn dir(self, name: &str) -> Self {
        self.entry(EntryType::Directory, name.as_bytes(), b"", b"")
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(EntryType::Symlink, name.as_bytes(), target.as_bytes(), b"")
    }

    fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(EntryType::Link, name.as_bytes(), target.as_bytes(), b"")
    }

    fn pax(self, records: &[(&str, &[u8])]) -> Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body_len = key.len() + value.len() + 3;
            let mut len = body_len + 1;
            while len != body_len + len.to_string().len() {
                len = body_len + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        self.entry(EntryType::XHeader, b"PaxHeader", b"", &data)
    }

    fn raw(mut self, header: &Header, data: &[u8]) -> Self {
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend(std::iter::repeat_n(0u8, 1024));
        self.out
    }
}

fn assert_refused(result: Result<(), UnpackError>) -> UnpackError {
    let err = result.expect_err("malicious layer must be refused");
    eprintln!("refused as expected: {err}");
    err
}

#[test]
fn unpack_parent_traversal_refused() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .file("../sentinel/x", b"evil")
        .finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(err.to_string().contains("'..'"), "{err}");
    fx.assert_sentinel_untouched();
}

#[test]
fn unpack_inner_traversal_refused() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .file("a/../../sentinel/x", b"evil")
        .finish();

    assert_refused(fx.unpack(&tar));

    fx.assert_sentinel_untouched();
}

#[test]
fn unpack_absolute_path_lands_inside_layer() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .file("/etc/berth-unpack-test", b"x")
        .finish();

    fx.unpack(&tar)
        .expect("absolute paths are stripped as Docker does");

    assert_eq!(
        std::fs::read(fx.layer.join("etc/berth-unpack-test")).expect("read"),
        b"x"
    );
    fx.assert_sentinel_untouched();
}

#[test]
fn unpack_write_through_symlink_to_root_refused() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .symlink("a", "/")
        .file("a/etc/berth-unpack-test", b"evil")
        .finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");
    fx.assert_sentinel_untouched();
}

#[test]
fn unpack_symlink_dotdot_chain_refused() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .symlink("a", "..")
        .symlink("b", "a/..")
        .file("a/sentinel/x", b"evil")
        .file("b/sentinel/y", b"evil")
        .finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");
    fx.assert_sentinel_untouched();
}

#[test]
fn unpack_symlink_to_sentinel_then_dir_entry_refused() {
    let fx = Fixture::new();
    let sentinel = fx.sentinel.to_str().expect("utf-8 path").to_string();
    let tar = TarBuilder::default()
        .symlink("s", &sentinel)
        .dir("s/sub")
        .finish();

    assert_refused(fx.unpack(&tar));

    fx.assert_sentinel_untouched();
}

#[test]
fn unpack_hardlink_to_host_file_refused() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .hardlink("passwd", "/etc/passwd")
        .finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(matches!(err, UnpackError::LinkTarget { .. }), "{err}");
    assert!(!fx.layer.join("passwd").exists());
}

#[test]
fn unpack_hardlink_with_dotdot_refused() {
    let fx = Fixture::new();
    std::fs::write(fx.sentinel.join("../outside"), b"host").expect("outside file");
    let tar = TarBuilder::default().hardlink("x", "../outside").finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(err.to_string().contains("'..'"), "{err}");
    assert!(!fx.layer.join("x").exists());
}

#[test]
fn unpack_hardlink_through_symlink_refused() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .symlink("up", "..")
        .hardlink("x", "up/outside")
        .finish();
    std::fs::write(fx.sentinel.join("../outside"), b"host").expect("outside file");

    let err = assert_refused(fx.unpack(&tar));

    assert!(matches!(err, UnpackError::LinkTarget { .. }), "{err}");
    assert!(!fx.layer.join("x").exists());
}

#[test]
fn unpack_device_node_when_disallowed_refused() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .entry(EntryType::Block, b"sda", b"", b"")
        .finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(matches!(err, UnpackError::DeviceNotAllowed { .. }), "{err}");
    assert!(!fx.layer.join("sda").exists());
}

#[test]
fn unpack_huge_gnu_long_name_refused() {
    let fx = Fixture::new();
    // One megabyte: far past PATH_MAX; must be refused before it is buffered.
    let long_name = vec![b'a'; 1024 * 1024];
    let tar = TarBuilder::default()
        .entry(EntryType::GNULongName, b"././@LongLink", b"", &long_name)
        .file("short", b"x")
        .finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(matches!(err, UnpackError::HeaderTooLarge { .. }), "{err}");
    assert!(!fx.layer.join("short").exists());
}

#[test]
fn unpack_huge_pax_path_refused() {
    let fx = Fixture::new();
    let long_name = vec![b'a'; 1024 * 1024];
    let tar = TarBuilder::default()
        .pax(&[("path", &long_name)])
        .file("short", b"x")
        .finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(matches!(err, UnpackError::HeaderTooLarge { .. }), "{err}");
}

#[test]
fn unpack_pax_path_over_path_max_refused() {
    let fx = Fixture::new();
    // 8 KiB of nested 200-byte components: within the PAX limit, past PATH_MAX.
    let component = "b".repeat(200);
    let long_path = vec![component.as_str(); 40].join("/");
    let tar = TarBuilder::default()
        .pax(&[("path", long_path.as_bytes())])
        .file("short", b"x")
        .finish();

    let err = assert_refused(fx.unpack(&tar));

    assert!(err.to_string().contains("PATH_MAX"), "{err}");
}

#[test]
fn unpack_pax_path_traversal_refused() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .pax(&[("path", b"../sentinel/x")])
        .file("innocent", b"evil")
        .finish();

    assert_refused(fx.unpack(&tar));

    fx.assert_sentinel_untouched();
}

fn good_layer() -> Vec<u8> {
    let mut builder = TarBuilder::default()
        .dir("./")
        .dir("etc/")
        .file("etc/hostname", b"berth\n");
    // A set-uid binary owned by 1000:1000 with an explicit mtime.
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_path("bin/tool").expect("path");
    header.set_mode(0o4755);
    header.set_uid(1000);
    header.set_gid(1000);
    header.set_mtime(1_234_567_890);
    header.set_size(4);
    header.set_cksum();
    builder = builder
        .dir("bin/")
        .raw(&header, b"tool")
        .hardlink("bin/tool-link", "bin/tool")
        .symlink("bin/sh", "tool")
        .entry(EntryType::Char, b"dev-null", b"", b"")
        .entry(EntryType::Fifo, b"pipe", b"", b"")
        .pax(&[("SCHILY.xattr.user.berth", b"value")])
        .file("with-xattr", b"x")
        .file(".wh.removed", b"")
        .dir("opaque/")
        .file("opaque/.wh..wh..opq", b"")
        .file("opaque/kept", b"k")
        .file("replaced", b"old")
        .file("replaced", b"new");
    builder.finish()
}

fn check_good_layer(layer: &Path) {
    assert_eq!(
        std::fs::read(layer.join("etc/hostname")).expect("hostname"),
        b"berth\n"
    );
    let tool = std::fs::symlink_metadata(layer.join("bin/tool")).expect("tool");
    assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
    assert_eq!((tool.uid(), tool.gid()), (1000, 1000));
    assert_eq!(tool.mtime(), 1_234_567_890);
    let link = std::fs::symlink_metadata(layer.join("bin/tool-link")).expect("link");
    assert_eq!(link.ino(), tool.ino());
    assert_eq!(
        std::fs::read_link(layer.join("bin/sh")).expect("sh"),
        Path::new("tool")
    );
    let null = std::fs::symlink_metadata(layer.join("dev-null")).expect("dev-null");
    assert!(null.file_type().is_char_device());
    assert!(std::fs::symlink_metadata(layer.join("pipe"))
        .expect("pipe")
        .file_type()
        .is_fifo());
    assert_eq!(
        get_xattr(&layer.join("with-xattr"), "user.berth"),
        Some(b"value".to_vec())
    );
    let whiteout = std::fs::symlink_metadata(layer.join("removed")).expect("whiteout");
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert!(!layer.join(".wh.removed").exists());
    assert_eq!(
        get_xattr(&layer.join("opaque"), "trusted.overlay.opaque"),
        Some(b"y".to_vec())
    );
    assert!(!layer.join("opaque/.wh..wh..opq").exists());
    assert_eq!(
        std::fs::read(layer.join("opaque/kept")).expect("kept"),
        b"k"
    );
    assert_eq!(
        std::fs::read(layer.join("replaced")).expect("replaced"),
        b"new"
    );
    let etc = std::fs::metadata(layer.join("etc")).expect("etc");
    assert_eq!(
        etc.mtime(),
        1_600_000_000,
        "directory mtimes are set after their children"
    );
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let name = std::ffi::CString::new(name).expect("name");
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn devices_allowed() -> UnpackOptions {
    UnpackOptions {
        allow_devices: true,
    }
}

#[test]
fn unpack_good_plain_layer_preserves_everything() {
    if !support::can_run(
        "unpack_good_plain_layer_preserves_everything",
        &support::need_root(),
    ) {
        return;
    }
    let fx = Fixture::new();

    fx.unpack_with(&good_layer(), &devices_allowed())
        .expect("unpack");

    check_good_layer(&fx.layer);
}

#[test]
fn unpack_good_gzip_layer_preserves_everything() {
    if !support::can_run(
        "unpack_good_gzip_layer_preserves_everything",
        &support::need_root(),
    ) {
        return;
    }
    let fx = Fixture::new();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(&good_layer()).expect("gzip");
    let gz = encoder.finish().expect("gzip");

    fx.unpack_with(&gz, &devices_allowed()).expect("unpack");

    check_good_layer(&fx.layer);
}

#[test]
fn unpack_good_zstd_layer_preserves_everything() {
    if !support::can_run(
        "unpack_good_zstd_layer_preserves_everything",
        &support::need_root(),
    ) {
        return;
    }
    let fx = Fixture::new();
    let zst = ruzstd::encoding::compress_to_vec(
        good_layer().as_slice(),
        ruzstd::encoding::CompressionLevel::Fastest,
    );

    fx.unpack_with(&zst, &devices_allowed()).expect("unpack");

    check_good_layer(&fx.layer);
}

#[test]
fn unpack_multi_frame_zstd_layer_reads_all_frames() {
    let fx = Fixture::new();
    let tar = TarBuilder::default()
        .file("a", b"1")
        .file("b", b"2")
        .finish();
    let (first, second) = tar.split_at(1024);
    let mut zst =
        ruzstd::encoding::compress_to_vec(first, ruzstd::encoding::CompressionLevel::Fastest);
    zst.extend(ruzstd::encoding::compress_to_vec(
        second,
        ruzstd::encoding::CompressionLevel::Fastest,
    ));

    fx.unpack(&zst).expect("unpack");

    assert_eq!(std::fs::read(fx.layer.join("b")).expect("b"), b"2");
}

#[test]
fn unpack_missing_parent_dirs_created() {
    let fx = Fixture::new();
    let tar = TarBuilder::default().file("usr/share/doc/x", b"x").finish();

    fx.unpack(&tar).expect("unpack");

    assert!(fx.layer.join("usr/share/doc/x").is_file());
}
