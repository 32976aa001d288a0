//! The image store against the real test image: `tests/images/make-busybox.sh` builds
//! busybox from Debian's busybox-static as a docker-archive and an OCI layout; both must
//! load as the same image, and a save of it must load again unchanged.
//!
//! Needs `/bin/busybox` (busybox-static), `jq` and GNU tar; skips without busybox, except
//! under `CI=true`, where a skip is a failure.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_engine::images::{Image, ImageStore};

/// Builds the test image into a fresh directory, or `None` (with the reason printed) when
/// this machine cannot.
fn build_busybox() -> Option<(tempfile::TempDir, String)> {
    if !Path::new("/bin/busybox").exists() {
        let reason = "/bin/busybox is missing (apt-get install busybox-static)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must not skip: {reason}"
        );
        eprintln!("skipping: {reason}");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/make-busybox.sh");
    let out = tempfile::tempdir().expect("temporary directory");
    let status = Command::new(&script)
        .arg(out.path())
        .status()
        .expect("run make-busybox.sh");
    assert!(status.success(), "make-busybox.sh failed: {status}");
    let id = std::fs::read_to_string(out.path().join("busybox.id")).expect("busybox.id");
    Some((out, id.trim().to_owned()))
}

fn load(store: &ImageStore, archive: PathBuf) -> (Vec<Image>, Vec<String>) {
    let mut lines = Vec::new();
    let file = File::open(&archive).expect("open archive");
    let images = store
        .load(file, &mut |line: &str| lines.push(line.to_owned()))
        .unwrap_or_else(|e| panic!("loading {}: {e}", archive.display()));
    (images, lines)
}

/// The files of the image's only layer, read back through the store's blob path.
fn layer_files(store: &ImageStore, image: &Image) -> Vec<(String, Vec<u8>)> {
    let path = store
        .blob_path(&image.layers[0].blob_digest)
        .expect("layer blob");
    let file = File::open(path).expect("open layer");
    let reader: Box<dyn Read> = match image.layers[0].media_type.ends_with("+gzip") {
        true => Box::new(flate2::read::MultiGzDecoder::new(file)),
        false => Box::new(file),
    };
    let mut archive = tar::Archive::new(reader);
    let mut files = Vec::new();
    for entry in archive.entries().expect("layer entries") {
        let mut entry = entry.expect("layer entry");
        let name = entry
            .path()
            .expect("entry path")
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("entry data");
        files.push((name, data));
    }
    files
}

#[test]
fn busybox_docker_archive_loads_with_applets_and_users() {
    let Some((out, id)) = build_busybox() else {
        return;
    };
    let store_dir = tempfile::tempdir().expect("temporary directory");
    let store = ImageStore::open(store_dir.path()).expect("open store");

    let (images, lines) = load(&store, out.path().join("busybox.tar"));

    assert_eq!(lines, ["Loaded image: busybox:latest"]);
    let image = &images[0];
    assert_eq!(image.id, id);
    assert_eq!(image.repo_tags, ["busybox:latest"]);
    assert_eq!(image.created.as_deref(), Some("1970-01-01T00:00:00Z"));
    let config = image.config.config().as_ref().expect("run config");
    assert_eq!(config.cmd().as_deref(), Some(&["sh".to_owned()][..]));
    assert_eq!(
        image.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );
    let files = layer_files(&store, image);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "bin/busybox",
        "bin/sh",
        "bin/httpd",
        "var/www/",
        "tmp/",
        "etc/passwd",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from the layer"
        );
    }
    assert!(!names.contains(&"etc/hostname"));
    let group = &files
        .iter()
        .find(|(n, _)| n == "etc/group")
        .expect("etc/group")
        .1;
    assert!(String::from_utf8_lossy(group).contains("staff:x:50:root\n"));
}

#[test]
fn busybox_oci_layout_loads_as_the_same_image() {
    let Some((out, id)) = build_busybox() else {
        return;
    };
    let store_dir = tempfile::tempdir().expect("temporary directory");
    let store = ImageStore::open(store_dir.path()).expect("open store");

    let (docker, _) = load(&store, out.path().join("busybox.tar"));
    let (oci, lines) = load(&store, out.path().join("busybox-oci.tar"));

    assert_eq!(lines, ["Loaded image: busybox:latest"]);
    assert_eq!(oci[0].id, id);
    assert_eq!(oci[0].layers[0].diff_id, docker[0].layers[0].diff_id);
    assert_eq!(store.list().expect("list").len(), 1);

    let fresh_dir = tempfile::tempdir().expect("temporary directory");
    let fresh = ImageStore::open(fresh_dir.path()).expect("open store");
    let (oci_only, _) = load(&fresh, out.path().join("busybox-oci.tar"));
    assert_eq!(
        oci_only[0].layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(oci_only[0].layers[0].chain_id, docker[0].layers[0].chain_id);
}

#[test]
fn busybox_save_loads_back_unchanged() {
    let Some((out, id)) = build_busybox() else {
        return;
    };
    let store_dir = tempfile::tempdir().expect("temporary directory");
    let store = ImageStore::open(store_dir.path()).expect("open store");
    load(&store, out.path().join("busybox.tar"));
    let saved = out.path().join("saved.tar");
    store
        .save(
            &["busybox".to_owned()],
            File::create(&saved).expect("create saved.tar"),
        )
        .expect("save");

    let other_dir = tempfile::tempdir().expect("temporary directory");
    let other = ImageStore::open(other_dir.path()).expect("open store");
    let (images, lines) = load(&other, saved);

    assert_eq!(lines, ["Loaded image: busybox:latest"]);
    assert_eq!(images[0].id, id);
    assert_eq!(
        images[0].layers,
        store.resolve("busybox").expect("resolve").layers
    );
}

/// Whether `tool` runs here; without it the test skips (fails under `CI=true`).
fn have_tool(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let reason = format!("{tool} is missing (apt-get install skopeo umoci)");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must not skip: {reason}"
        );
        eprintln!("skipping: {reason}");
    }
    found
}

/// Runs a command, failing the test with its output if it fails; returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn busybox_save_is_read_by_skopeo_and_umoci() {
    let Some((out, id)) = build_busybox() else {
        return;
    };
    if !have_tool("skopeo") || !have_tool("umoci") {
        return;
    }
    let store_dir = tempfile::tempdir().expect("temporary directory");
    let store = ImageStore::open(store_dir.path()).expect("open store");
    load(&store, out.path().join("busybox.tar"));
    let saved = out.path().join("saved.tar");
    store
        .save(
            &["busybox".to_owned()],
            File::create(&saved).expect("create saved.tar"),
        )
        .expect("save");
    let saved = saved.to_str().expect("utf-8 path");

    let inspect: serde_json::Value = serde_json::from_str(&run(
        "skopeo",
        &["inspect", &format!("docker-archive:{saved}")],
    ))
    .expect("skopeo inspect JSON");
    let as_oci: serde_json::Value = serde_json::from_str(&run(
        "skopeo",
        &[
            "inspect",
            "--config",
            &format!("oci-archive:{saved}:latest"),
        ],
    ))
    .expect("skopeo inspect --config JSON");
    let layout = out.path().join("layout");
    let bundle = out.path().join("bundle");
    let layout_ref = format!("{}:busybox", layout.display());
    run(
        "skopeo",
        &[
            "copy",
            &format!("docker-archive:{saved}"),
            &format!("oci:{layout_ref}"),
        ],
    );
    run(
        "umoci",
        &[
            "unpack",
            "--image",
            &layout_ref,
            bundle.to_str().expect("utf-8 path"),
        ],
    );

    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Layers"].as_array().map(Vec::len), Some(1));
    assert_eq!(as_oci["config"]["Cmd"][0], "sh");
    assert_eq!(
        as_oci["rootfs"]["diff_ids"][0],
        store.resolve(&id).expect("image").layers[0].diff_id
    );
    assert!(bundle.join("rootfs/bin/busybox").is_file());
    assert!(bundle.join("rootfs/bin/sh").is_symlink());
}

#[test]
fn skopeo_written_docker_archive_loads() {
    let Some((out, id)) = build_busybox() else {
        return;
    };
    if !have_tool("skopeo") {
        return;
    }
    let oci = out.path().join("busybox-oci.tar");
    let converted = out.path().join("from-skopeo.tar");
    run(
        "skopeo",
        &[
            "copy",
            &format!("oci-archive:{}", oci.display()),
            &format!(
                "docker-archive:{}:example.com/converted:1",
                converted.display()
            ),
        ],
    );
    let store_dir = tempfile::tempdir().expect("temporary directory");
    let store = ImageStore::open(store_dir.path()).expect("open store");

    let (images, lines) = load(&store, converted);

    assert_eq!(lines, ["Loaded image: example.com/converted:1"]);
    assert_eq!(images[0].id, id);
}

#[test]
fn busybox_save_with_gzip_layer_is_read_by_skopeo() {
    let Some((out, id)) = build_busybox() else {
        return;
    };
    if !have_tool("skopeo") {
        return;
    }
    let store_dir = tempfile::tempdir().expect("temporary directory");
    let store = ImageStore::open(store_dir.path()).expect("open store");
    load(&store, out.path().join("busybox-oci.tar"));
    let saved = out.path().join("saved-gzip.tar");
    store
        .save(
            &["busybox".to_owned()],
            File::create(&saved).expect("create saved-gzip.tar"),
        )
        .expect("save");
    let converted = out.path().join("converted-oci.tar");

    run(
        "skopeo",
        &[
            "copy",
            &format!("docker-archive:{}", saved.display()),
            &format!("oci-archive:{}:latest", converted.display()),
        ],
    );
    let config: serde_json::Value = serde_json::from_str(&run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--config",
            &format!("oci-archive:{}:latest", converted.display()),
        ],
    ))
    .expect("skopeo config JSON");

    let diff_id = &store.resolve(&id).expect("image").layers[0].diff_id;
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str(),
        Some(diff_id.as_str())
    );
}
