//! Pull and push against a real registry: Debian's `docker-registry` (the CNCF distribution
//! registry 2.8) serving plain HTTP on 127.0.0.1 from a temporary directory, one per test.
//!
//! A test that finds no `docker-registry` binary (or no `htpasswd` for the auth test) says so
//! and passes, except under CI (`CI=true`), where a skip is a failure:
//! `tests/install-deps.sh` installs both.

// A test crate: its helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use berth_engine::images::registry::{self, Progress, RegistryAuth};
use berth_engine::images::{Digest, ImageError, ImageStore};
use berth_engine::ErrorKind;
use serde_json::json;
use tempfile::TempDir;

/// How long a fresh registry gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How many ports a registry start tries.
const START_ATTEMPTS: usize = 5;

/// Where Debian installs the registry.
const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// Skips a test that cannot run here, or fails it under CI.
fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{reason} (CI=true turns this skip into a failure; tests/install-deps.sh installs it)"
        );
    }
    eprintln!("skipping: {reason}");
}

/// A `docker-registry` process on a free loopback port, killed on drop.
struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    addr: String,
    dir: TempDir,
}

impl Registry {
    /// Starts a registry, with htpasswd basic auth if `htpasswd` is given. `None` (after
    /// [`skip`]) when the binary is missing.
    fn start(htpasswd: Option<&Path>) -> Option<Self> {
        if !Path::new(REGISTRY_BINARY).is_file() {
            skip("docker-registry is not installed (apt-get install docker-registry)");
            return None;
        }
        let mut failures = Vec::new();
        // A port found free can be taken again before the registry binds it (tests run in
        // parallel and open sockets of their own): then it exits, and another port is tried.
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(htpasswd) {
                Ok(registry) => return Some(registry),
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "docker-registry did not start:\n{}",
            failures.join("\n---\n")
        );
    }

    fn try_start(htpasswd: Option<&Path>) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some(path) = htpasswd {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                path.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BINARY)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut registry = Self { child, addr, dir };
        let deadline = Instant::now() + START_TIMEOUT;
        // Ready means this registry answers: another test's listener may hold the port for
        // a moment, so a connection alone proves nothing.
        while !answers_as_registry(&registry.addr) {
            let exited = registry.child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(registry.dir.path().join("registry.log"))
                    .unwrap_or_default();
                return Err(format!("on {} ({exited:?}): {log}", registry.addr));
            }
            sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// `127.0.0.1:<port>/<path>`.
    fn reference(&self, path: &str) -> String {
        format!("{}/{path}", self.addr)
    }

    /// The file the registry keeps a blob in (filesystem driver layout).
    fn blob_file(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `addr` answers `GET /v2/` as a distribution registry does (200, or 401 with auth),
/// with its `Docker-Distribution-Api-Version` header.
fn answers_as_registry(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).contains("Docker-Distribution-Api-Version: registry/2.0")
}

/// A plain tar holding `files`.
fn layer_tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(content.len() as u64);
        builder
            .append_data(&mut header, path, content.as_bytes())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

/// A docker-archive (the layout `docker save` wrote before 25) of one image tagged `tag`
/// with two uncompressed layers, as `docker load` gets it.
fn docker_archive(tag: &str) -> Vec<u8> {
    let layers = [
        layer_tar(&[("etc/os-release", "NAME=berth-test\n")]),
        layer_tar(&[("bin/hello", "#!/bin/sh\necho hello\n")]),
    ];
    let diff_ids: Vec<String> = layers.iter().map(|l| Digest::of(l).to_string()).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/hello"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "layer 1"}, {"created_by": "layer 2"}],
    }))
    .unwrap();
    let config_name = format!("{}.json", Digest::of(&config).hex());
    let layer_names = ["l1/layer.tar", "l2/layer.tar"];
    let manifest = serde_json::to_vec(&json!([
        {"Config": config_name, "RepoTags": [tag], "Layers": layer_names}
    ]))
    .unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let entries = [
        (config_name.as_str(), &config),
        (layer_names[0], &layers[0]),
        (layer_names[1], &layers[1]),
        ("manifest.json", &manifest),
    ];
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, name, &data[..]).unwrap();
    }
    builder.into_inner().unwrap()
}

fn open_store(dir: &TempDir, name: &str) -> ImageStore {
    ImageStore::open(&dir.path().join(name)).unwrap()
}

/// A store holding the test image tagged `reference`.
fn store_with_image(dir: &TempDir, name: &str, reference: &str) -> ImageStore {
    let store = open_store(dir, name);
    store
        .load(&docker_archive(reference)[..], &mut |_| {})
        .unwrap();
    store
}

fn statuses(events: &[Progress]) -> Vec<String> {
    events
        .iter()
        .filter_map(|p| match p {
            Progress::Status { id: None, status } => Some(status.clone()),
            Progress::Status {
                id: Some(id),
                status,
            } => Some(format!("{id}: {status}")),
            Progress::Bytes { .. } => None,
        })
        .collect()
}

fn push(
    store: &ImageStore,
    reference: &str,
    auth: Option<&RegistryAuth>,
) -> (String, Vec<Progress>) {
    let mut events = Vec::new();
    let digest = registry::push(store, reference, auth, &mut |p| events.push(p)).unwrap();
    (digest, events)
}

fn pull(store: &ImageStore, reference: &str) -> (berth_engine::images::Image, Vec<Progress>) {
    let mut events = Vec::new();
    let image = registry::pull(store, reference, None, &mut |p| events.push(p)).unwrap();
    (image, events)
}

#[test]
fn push_rmi_pull_gives_same_image_id_and_manifest_digest() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = registry.reference("berth/test:v1");
    let store = store_with_image(&dir, "store", &reference);
    let loaded = store.resolve(&reference).unwrap();

    let (digest, events) = push(&store, &reference, None);
    let pushed = store.resolve(&reference).unwrap();
    store.remove(&reference, false, &|_| None).unwrap();
    let (pulled, _) = pull(&store, &reference);

    let lines = statuses(&events);
    assert_eq!(
        lines.first().unwrap(),
        &format!(
            "The push refers to repository [{}]",
            registry.reference("berth/test")
        )
    );
    let size = fs::metadata(registry.blob_file(&Digest::parse(&digest).unwrap()))
        .unwrap()
        .len();
    assert_eq!(
        lines.last().unwrap(),
        &format!("v1: digest: {digest} size: {size}")
    );
    assert!(events
        .iter()
        .any(|p| matches!(p, Progress::Bytes { status, .. } if status == "Pushing")));
    assert_eq!(
        pushed.repo_digests,
        vec![registry.reference(&format!("berth/test@{digest}"))]
    );
    assert_eq!(pulled.id, loaded.id);
    assert_eq!(pulled.manifest_digest, digest);
    assert_eq!(pulled.repo_tags, vec![reference.clone()]);
    assert_eq!(pulled.repo_digests, pushed.repo_digests);
    assert!(
        pulled
            .layers
            .iter()
            .all(|l| l.media_type.ends_with("+gzip")),
        "{:?}",
        pulled.layers
    );
    assert_eq!(
        pulled.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>(),
        loaded.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()
    );
}

#[test]
fn pull_into_fresh_store_reports_layers_then_again_is_up_to_date() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = registry.reference("berth/test:v1");
    let (digest, _) = push(
        &store_with_image(&dir, "source", &reference),
        &reference,
        None,
    );
    let store = open_store(&dir, "target");

    let (image, first) = pull(&store, &reference);
    let (again, second) = pull(&store, &reference);

    let first = statuses(&first);
    let short: Vec<String> = image
        .layers
        .iter()
        .map(|l| l.blob_digest[7..19].to_owned())
        .collect();
    assert_eq!(
        first[0],
        format!("v1: Pulling from {}", registry.reference("berth/test"))
    );
    for id in &short {
        assert!(
            first.contains(&format!("{id}: Pulling fs layer")),
            "{first:?}"
        );
        assert!(first.contains(&format!("{id}: Pull complete")), "{first:?}");
    }
    assert_eq!(first[first.len() - 2], format!("Digest: {digest}"));
    assert_eq!(
        first[first.len() - 1],
        format!("Status: Downloaded newer image for {reference}")
    );
    let second = statuses(&second);
    assert!(
        second.contains(&format!("{}: Already exists", short[0])),
        "{second:?}"
    );
    assert_eq!(
        second.last().unwrap(),
        &format!("Status: Image is up to date for {reference}")
    );
    assert_eq!(again.id, image.id);
}

#[test]
fn pull_by_digest_records_only_the_repo_digest() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = registry.reference("berth/test:v1");
    let (digest, _) = push(
        &store_with_image(&dir, "source", &reference),
        &reference,
        None,
    );
    let store = open_store(&dir, "target");
    let by_digest = registry.reference(&format!("berth/test@{digest}"));

    let (image, _) = pull(&store, &by_digest);

    assert_eq!(image.repo_tags, Vec::<String>::new());
    assert_eq!(image.repo_digests, vec![by_digest]);
    assert_eq!(image.manifest_digest, digest);
}

#[test]
fn push_twice_finds_layers_already_there_and_same_digest() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = registry.reference("berth/test:v1");
    let store = store_with_image(&dir, "store", &reference);

    let (first, _) = push(&store, &reference, None);
    let (second, events) = push(&store, &reference, None);

    let lines = statuses(&events);
    assert_eq!(second, first);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.ends_with(": Layer already exists"))
            .count(),
        2,
        "{lines:?}"
    );
    assert!(!events.iter().any(|p| matches!(p, Progress::Bytes { .. })));
}

#[test]
fn push_of_a_bare_name_pushes_every_tag() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_image(&dir, "store", &registry.reference("berth/test:v1"));
    store
        .tag(
            &registry.reference("berth/test:v1"),
            &registry.reference("berth/test:v2"),
        )
        .unwrap();

    let (_, events) = push(&store, &registry.reference("berth/test"), None);

    let lines = statuses(&events);
    assert!(
        lines.iter().any(|l| l.starts_with("v1: digest: ")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("v2: digest: ")),
        "{lines:?}"
    );
}

#[test]
fn pull_of_unknown_tag_is_not_found_in_dockerd_words() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir, "store");
    let mut events = Vec::new();

    let error = registry::pull(&store, &registry.reference("nope"), None, &mut |p| {
        events.push(p)
    })
    .unwrap_err();

    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert_eq!(
        error.to_string(),
        format!(
            "manifest for {}:latest not found: manifest unknown: manifest unknown",
            registry.reference("nope")
        )
    );
    assert_eq!(
        events,
        Vec::new(),
        "nothing is reported before the manifest is known"
    );
}

#[test]
fn push_of_missing_tag_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir, "store");

    let error = registry::push(&store, "127.0.0.1:1/absent:v1", None, &mut |_| {}).unwrap_err();

    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert_eq!(
        error.to_string(),
        "tag does not exist: 127.0.0.1:1/absent:v1"
    );
}

#[test]
fn pull_of_corrupted_blob_fails_verification_and_stores_nothing() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = registry.reference("berth/test:v1");
    let (digest, _) = push(
        &store_with_image(&dir, "source", &reference),
        &reference,
        None,
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(registry.blob_file(&Digest::parse(&digest).unwrap())).unwrap(),
    )
    .unwrap();
    let layer = Digest::parse(manifest["layers"][0]["digest"].as_str().unwrap()).unwrap();
    let blob = registry.blob_file(&layer);
    let mut bytes = fs::read(&blob).unwrap();
    // Same length, one byte flipped in the middle of the gzip stream.
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&blob, bytes).unwrap();
    let store = open_store(&dir, "target");

    let error = registry::pull(&store, &reference, None, &mut |_| {}).unwrap_err();

    assert!(
        matches!(error, ImageError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(store.resolve(&reference).is_err());
    assert!(!store.has_blob(layer.as_str()));
}

#[test]
fn pull_from_a_closed_port_names_the_registry() {
    // tcpmux's port: outside the ephemeral range, so no test's registry can take it, and
    // nothing listens on it on these machines.
    let port = 1;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir, "store");

    let error =
        registry::pull(&store, &format!("127.0.0.1:{port}/x"), None, &mut |_| {}).unwrap_err();

    assert_eq!(
        error.to_string(),
        format!("Get \"http://127.0.0.1:{port}/v2/\": connection refused")
    );
    assert_eq!(error.kind(), ErrorKind::Internal);
}

#[test]
fn basic_auth_registry_needs_credentials_and_accepts_right_ones() {
    let htpasswd_tool = Path::new("/usr/bin/htpasswd");
    if !htpasswd_tool.is_file() {
        skip("htpasswd is not installed (apt-get install apache2-utils)");
        return;
    }
    let auth_dir = tempfile::tempdir().unwrap();
    let htpasswd = auth_dir.path().join("htpasswd");
    // The registry accepts bcrypt entries only (-B).
    let output = Command::new(htpasswd_tool)
        .args(["-Bbn", "ann", "secret"])
        .output()
        .unwrap();
    assert!(output.status.success());
    fs::write(&htpasswd, output.stdout).unwrap();
    let Some(registry) = Registry::start(Some(&htpasswd)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = registry.reference("private/test:v1");
    let store = store_with_image(&dir, "store", &reference);
    let right = RegistryAuth {
        username: "ann".into(),
        password: "secret".into(),
        ..RegistryAuth::default()
    };
    let wrong = RegistryAuth {
        password: "guess".into(),
        ..right.clone()
    };

    let anonymous = registry::push(&store, &reference, None, &mut |_| {}).unwrap_err();
    let refused = registry::push(&store, &reference, Some(&wrong), &mut |_| {}).unwrap_err();
    let (digest, _) = push(&store, &reference, Some(&right));
    let target = open_store(&dir, "target");
    let anonymous_pull = registry::pull(&target, &reference, None, &mut |_| {}).unwrap_err();
    let pulled = registry::pull(&target, &reference, Some(&right), &mut |_| {}).unwrap();

    assert_eq!(anonymous.kind(), ErrorKind::InvalidArgument);
    assert!(
        anonymous.to_string().contains("no basic auth credentials"),
        "{anonymous}"
    );
    assert!(
        anonymous.to_string().contains(&registry.addr),
        "{anonymous}"
    );
    assert!(
        refused.to_string().starts_with(&format!(
            "authentication to {} failed: unauthorized",
            registry.addr
        )),
        "{refused}"
    );
    assert!(
        anonymous_pull
            .to_string()
            .contains("no basic auth credentials"),
        "{anonymous_pull}"
    );
    assert_eq!(pulled.manifest_digest, digest);
}
