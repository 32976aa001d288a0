//! Tier-1 tests of path copies inside a container's root: an overlay mounted for one call,
//! symlinks that point at `/` resolving inside the root, and extraction landing in the upper
//! layer, nothing written on the host beside it.

mod support;

use std::os::unix::fs::symlink;
use std::path::Path;

use berth_container::archive::{
    export_root, extract_archive, in_root, stat_path, write_path_archive, ExtractOptions, Root,
};
use berth_container::mounts::OverlayConfig;

fn need_overlay(test: &str) -> bool {
    let mut problems = support::need_root();
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.contains("overlay") {
        problems.push("overlayfs is not available".to_string());
    }
    support::can_run(test, &problems)
}

struct Layers {
    _tmp: tempfile::TempDir,
    base: std::path::PathBuf,
    lower: std::path::PathBuf,
    upper: std::path::PathBuf,
    rootfs: std::path::PathBuf,
    overlay: OverlayConfig,
}

fn layers() -> Layers {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().to_owned();
    let lower = base.join("lower");
    let upper = base.join("upper");
    let work = base.join("work");
    let rootfs = base.join("rootfs");
    for dir in [&lower, &upper, &work, &rootfs] {
        std::fs::create_dir_all(dir).expect("dir");
    }
    std::fs::create_dir_all(lower.join("etc")).expect("test step");
    std::fs::write(lower.join("etc/hostname"), "inside\n").expect("test step");
    std::fs::create_dir_all(lower.join("tmp")).expect("test step");
    // Points at the container's root, never the host's.
    symlink("/", lower.join("up")).expect("test step");
    symlink("/etc", lower.join("etc-link")).expect("test step");
    let overlay = OverlayConfig {
        lower_dirs: vec![lower.clone()],
        upper_dir: Some(upper.clone()),
        work_dir: Some(work),
    };
    Layers {
        _tmp: tmp,
        base,
        lower,
        upper,
        rootfs,
        overlay,
    }
}

#[test]
fn paths_resolve_inside_an_overlay_root_and_writes_land_in_the_upper() {
    if !need_overlay("paths_resolve_inside_an_overlay_root_and_writes_land_in_the_upper") {
        return;
    }
    let layers = layers();
    let root = Root::Overlay {
        rootfs: &layers.rootfs,
        overlay: &layers.overlay,
    };
    let escape_name = format!("{}/up", layers.base.display());

    let (hostname, link, escaped) = in_root(root, || {
        let mut hostname = Vec::new();
        write_path_archive("/up/up/etc/hostname", &mut hostname)?;
        let link = stat_path("/etc-link")?;
        // The host path of the layers means nothing inside the root.
        let escaped = stat_path(&escape_name).is_ok();
        Ok((hostname, link, escaped))
    })
    .expect("test step");

    let mut archive = tar::Archive::new(&hostname[..]);
    let mut entry = archive
        .entries()
        .expect("test step")
        .next()
        .expect("test step")
        .expect("test step");
    assert_eq!(entry.path().expect("test step"), Path::new("hostname"));
    let mut text = String::new();
    std::io::Read::read_to_string(&mut entry, &mut text).expect("test step");
    assert_eq!(text, "inside\n");
    assert_eq!(link.link_target, "/etc");
    assert!(!escaped);
    // The call's mount is gone with its thread.
    assert!(std::fs::read_dir(&layers.rootfs)
        .expect("test step")
        .next()
        .is_none());

    let mut upload = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o600);
    header.set_cksum();
    upload
        .append_data(&mut header, "new.txt", &b"abc"[..])
        .expect("test step");
    let upload = upload.into_inner().expect("test step");
    let options = ExtractOptions {
        no_overwrite_dir_non_dir: true,
        owner: Some((1000, 1000)),
    };
    // Through an absolute symlink to `/`: still the container's /tmp.
    in_root(root, || extract_archive("/up/tmp", &upload[..], options)).expect("test step");

    let written = layers.upper.join("tmp/new.txt");
    assert_eq!(std::fs::read(&written).expect("test step"), b"abc");
    let meta = std::fs::metadata(&written).expect("test step");
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            std::os::unix::fs::MetadataExt::gid(&meta)
        ),
        (1000, 1000)
    );
    assert!(!layers.lower.join("tmp/new.txt").exists());
}

#[test]
fn export_leaves_out_filesystems_mounted_below_the_root() {
    if !need_overlay("export_leaves_out_filesystems_mounted_below_the_root") {
        return;
    }
    let layers = layers();
    std::fs::create_dir_all(layers.lower.join("proc")).expect("test step");
    let rootfs = layers.rootfs.clone();
    let root = Root::Overlay {
        rootfs: &layers.rootfs,
        overlay: &layers.overlay,
    };

    let exported = in_root(root, || {
        // A filesystem mounted inside the root, as /proc is in a running container.
        nix::mount::mount(
            Some("tmpfs"),
            "/proc",
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a tmpfs");
        std::fs::write("/proc/hidden", b"x").expect("test step");
        let mut out = Vec::new();
        export_root(&mut out)?;
        Ok(out)
    })
    .expect("test step");

    let mut archive = tar::Archive::new(&exported[..]);
    let names: Vec<String> = archive
        .entries()
        .expect("test step")
        .map(|e| {
            e.expect("test step")
                .path()
                .expect("test step")
                .display()
                .to_string()
        })
        .collect();
    assert!(names.contains(&"etc/hostname".to_string()), "{names:?}");
    assert!(names.contains(&"proc/".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("hidden")), "{names:?}");
    assert!(std::fs::read_dir(&rootfs)
        .expect("test step")
        .next()
        .is_none());
}

#[test]
fn layer_diff_of_an_upper_has_whiteouts_and_opaque_markers() {
    if !need_overlay("layer_diff_of_an_upper_has_whiteouts_and_opaque_markers") {
        return;
    }
    let layers = layers();
    std::fs::create_dir_all(layers.lower.join("cache")).expect("cache dir");
    std::fs::write(layers.lower.join("cache/old"), b"old").expect("old file");
    let root = Root::Overlay {
        rootfs: &layers.rootfs,
        overlay: &layers.overlay,
    };
    in_root(root, || {
        let step = |e| berth_container::archive::ArchiveError::Io {
            op: "change",
            path: "the overlay".into(),
            source: e,
        };
        std::fs::remove_file("/etc/hostname").map_err(step)?;
        std::fs::remove_dir_all("/cache").map_err(step)?;
        std::fs::create_dir("/cache").map_err(step)?;
        std::fs::write("/cache/new", b"new").map_err(step)?;
        Ok(())
    })
    .expect("change the overlay");
    let mut out = Vec::new();

    berth_container::archive::write_layer_diff(&layers.upper, &mut out).expect("diff");

    let mut archive = tar::Archive::new(&out[..]);
    let names: Vec<String> = archive
        .entries()
        .expect("a tar")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    assert!(names.contains(&"etc/.wh.hostname".to_string()), "{names:?}");
    assert!(
        names.contains(&"cache/.wh..wh..opq".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"cache/new".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.ends_with("old")), "{names:?}");
}
