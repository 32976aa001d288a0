//! Pull and push against a scripted registry on 127.0.0.1, for what Debian's
//! `docker-registry` cannot show: the Bearer token flow (its token auth needs a separate token
//! server), an index with several platforms, registries that lie about digests, and exactly
//! what a push puts on the wire. The server is a few lines of
//! HTTP/1.1 over a `TcpListener`, one request per connection, answering from a handler the
//! test writes; it records every request so tests can check what the client sent.

// A test crate: its helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use berth_engine::images::registry::{self, RegistryAuth};
use berth_engine::images::{Digest, ImageError, ImageStore};
use berth_engine::ErrorKind;
use serde_json::json;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The token the scripted token server hands out and the registry accepts.
const TOKEN: &str = "t0k3n";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    /// Path and query.
    target: String,
    /// Header names lowercase.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Request {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// An answer: status, headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn new(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Self {
        Self {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.to_vec(),
        }
    }
}

type Handler = dyn Fn(&Request) -> Answer + Send + Sync;

/// The scripted server; stops on drop.
struct Server {
    addr: String,
    log: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `handler`, which gets the server's `host:port` with each request.
    fn start(handler: impl Fn(&str, &Request) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_log, thread_stop, thread_addr) = (log.clone(), stop.clone(), addr.clone());
        let handler: Box<Handler> = Box::new(move |request| handler(&thread_addr, request));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if let Some(request) = read_request(&stream) {
                    let answer = handler(&request);
                    thread_log.lock().unwrap().push(request);
                    write_answer(stream, &answer);
                }
            }
        });
        Self {
            addr,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

fn write_answer(mut stream: TcpStream, answer: &Answer) {
    let mut head = format!(
        "HTTP/1.1 {} X\r\nConnection: close\r\nContent-Length: {}\r\n",
        answer.status,
        answer.body.len()
    );
    for (name, value) in &answer.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&answer.body);
}

/// A small image as a registry holds it: gzip layer, config, manifest, and an index with an
/// arm64 entry (pointing nowhere: it must not be fetched) before the amd64 one.
struct RemoteImage {
    config: Vec<u8>,
    layer: Vec<u8>,
    manifest: Vec<u8>,
    index: Vec<u8>,
}

impl RemoteImage {
    fn new() -> Self {
        let tar = {
            let mut builder = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_size(3);
            builder
                .append_data(&mut header, "hi", &b"hi\n"[..])
                .unwrap();
            builder.into_inner().unwrap()
        };
        let layer = {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(&tar).unwrap();
            encoder.finish().unwrap()
        };
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/hi"]},
            "rootfs": {"type": "layers", "diff_ids": [Digest::of(&tar).as_str()]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of(&config).as_str(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": Digest::of(&layer).as_str(), "size": layer.len()}],
        }))
        .unwrap();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": Digest::of(b"arm64").as_str(), "size": 5, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": Digest::of(&manifest).as_str(), "size": manifest.len(), "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        }))
        .unwrap();
        Self {
            config,
            layer,
            manifest,
            index,
        }
    }

    /// Answers `/v2/<repo>/manifests/...` and `/blobs/...` for this image, with `tag`
    /// naming the index.
    fn serve(&self, request: &Request, tag: &str) -> Answer {
        let path = request.path();
        let index_digest = Digest::of(&self.index);
        let documents = [
            (format!("manifests/{tag}"), OCI_INDEX, &self.index),
            (format!("manifests/{index_digest}"), OCI_INDEX, &self.index),
            (
                format!("manifests/{}", Digest::of(&self.manifest)),
                OCI_MANIFEST,
                &self.manifest,
            ),
            (
                format!("blobs/{}", Digest::of(&self.config)),
                "application/octet-stream",
                &self.config,
            ),
            (
                format!("blobs/{}", Digest::of(&self.layer)),
                "application/octet-stream",
                &self.layer,
            ),
        ];
        for (tail, content_type, bytes) in documents {
            if path.ends_with(&tail) {
                let digest = Digest::of(bytes).to_string();
                return Answer::new(
                    200,
                    &[
                        ("Content-Type", content_type),
                        ("Docker-Content-Digest", &digest),
                    ],
                    bytes,
                );
            }
        }
        Answer::new(
            404,
            &[],
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        )
    }
}

/// A registry that wants a Bearer token from its own `/token` endpoint, which hands out
/// [`TOKEN`] to anyone (anonymous pulls) and records how it was asked.
fn token_registry(image: Arc<RemoteImage>) -> Server {
    Server::start(move |addr, request| {
        if request.path() == "/token" {
            let body =
                serde_json::to_vec(&json!({"token": TOKEN, "access_token": "unused"})).unwrap();
            return Answer::new(200, &[("Content-Type", "application/json")], &body);
        }
        if request.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
            let challenge = format!(
                r#"Bearer realm="http://{addr}/token",service="fake-registry",scope="repository:team/app:pull""#
            );
            return Answer::new(
                401,
                &[("WWW-Authenticate", &challenge)],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
        }
        if request.path() == "/v2/" {
            return Answer::new(200, &[], b"{}");
        }
        image.serve(request, "v1")
    })
}

fn fresh_store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

#[test]
fn bearer_flow_asks_token_for_the_scope_and_pulls_the_amd64_entry_of_the_index() {
    let image = Arc::new(RemoteImage::new());
    let server = token_registry(image.clone());
    let (_dir, store) = fresh_store();
    let reference = format!("{}/team/app:v1", server.addr);

    let pulled = registry::pull(&store, &reference, None, &mut |_| {}).unwrap();

    let requests = server.requests();
    let token_request = requests.iter().find(|r| r.path() == "/token").unwrap();
    assert_eq!(token_request.method, "GET");
    assert_eq!(
        token_request.target,
        "/token?service=fake-registry&scope=repository%3Ateam%2Fapp%3Apull"
    );
    assert_eq!(
        token_request.header("authorization"),
        None,
        "anonymous: no credentials sent"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.target.contains(Digest::of(b"arm64").hex())),
        "the arm64 entry was fetched"
    );
    assert_eq!(pulled.id, Digest::of(&image.config).to_string());
    assert_eq!(
        pulled.manifest_digest,
        Digest::of(&image.manifest).to_string()
    );
    assert_eq!(
        pulled.repo_digests,
        vec![format!(
            "{}/team/app@{}",
            server.addr,
            Digest::of(&image.index)
        )]
    );
    assert_eq!(pulled.repo_tags, vec![reference]);
}

#[test]
fn bearer_flow_sends_basic_credentials_to_the_token_server() {
    let server = token_registry(Arc::new(RemoteImage::new()));
    let (_dir, store) = fresh_store();
    let auth = RegistryAuth {
        username: "ann".into(),
        password: "secret".into(),
        ..RegistryAuth::default()
    };

    registry::pull(
        &store,
        &format!("{}/team/app:v1", server.addr),
        Some(&auth),
        &mut |_| {},
    )
    .unwrap();

    let requests = server.requests();
    let token_request = requests.iter().find(|r| r.path() == "/token").unwrap();
    // base64("ann:secret") = "YW5uOnNlY3JldA==".
    assert_eq!(
        token_request.header("authorization"),
        Some("Basic YW5uOnNlY3JldA==")
    );
    assert!(
        token_request.target.ends_with("&account=ann"),
        "{}",
        token_request.target
    );
}

#[test]
fn bearer_flow_exchanges_an_identity_token_with_a_post() {
    let server = token_registry(Arc::new(RemoteImage::new()));
    let (_dir, store) = fresh_store();
    let auth = RegistryAuth {
        identity_token: "refresh-me".into(),
        ..RegistryAuth::default()
    };

    registry::pull(
        &store,
        &format!("{}/team/app:v1", server.addr),
        Some(&auth),
        &mut |_| {},
    )
    .unwrap();

    let requests = server.requests();
    let token_request = requests.iter().find(|r| r.path() == "/token").unwrap();
    assert_eq!(token_request.method, "POST");
    let form = String::from_utf8(token_request.body.clone()).unwrap();
    assert!(
        form.starts_with(
            "grant_type=refresh_token&refresh_token=refresh-me&service=fake-registry&scope="
        ),
        "{form}"
    );
}

#[test]
fn pull_by_index_digest_verifies_it() {
    let image = Arc::new(RemoteImage::new());
    let server = token_registry(image.clone());
    let (_dir, store) = fresh_store();
    let by_digest = format!("{}/team/app@{}", server.addr, Digest::of(&image.index));

    let pulled = registry::pull(&store, &by_digest, None, &mut |_| {}).unwrap();

    assert_eq!(pulled.repo_digests, vec![by_digest]);
}

#[test]
fn manifest_that_does_not_match_docker_content_digest_is_refused() {
    let image = Arc::new(RemoteImage::new());
    let served = image.clone();
    let server = Server::start(move |_, request| {
        let mut answer = served.serve(request, "v1");
        if request.path().ends_with("/manifests/v1") {
            answer
                .headers
                .retain(|(name, _)| name != "Docker-Content-Digest");
            answer.headers.push((
                "Docker-Content-Digest".into(),
                Digest::of(b"other").to_string(),
            ));
        }
        if request.path() == "/v2/" {
            return Answer::new(200, &[], b"{}");
        }
        answer
    });
    let (_dir, store) = fresh_store();

    let error = registry::pull(
        &store,
        &format!("{}/team/app:v1", server.addr),
        None,
        &mut |_| {},
    )
    .unwrap_err();

    assert!(
        matches!(error, ImageError::DigestMismatch { .. }),
        "{error}"
    );
}

#[test]
fn blob_with_other_content_than_its_digest_is_refused_and_not_stored() {
    let image = Arc::new(RemoteImage::new());
    let served = image.clone();
    let layer_digest = Digest::of(&image.layer);
    let layer_path = format!("/v2/team/app/blobs/{layer_digest}");
    let server = Server::start(move |_, request| {
        if request.path() == "/v2/" {
            return Answer::new(200, &[], b"{}");
        }
        if request.path() == layer_path {
            let mut tampered = served.layer.clone();
            tampered[10] ^= 1;
            return Answer::new(200, &[], &tampered);
        }
        served.serve(request, "v1")
    });
    let (_dir, store) = fresh_store();

    let error = registry::pull(
        &store,
        &format!("{}/team/app:v1", server.addr),
        None,
        &mut |_| {},
    )
    .unwrap_err();

    assert!(
        matches!(error, ImageError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(!store.has_blob(layer_digest.as_str()));
}

#[test]
fn index_without_this_platform_is_not_found() {
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": Digest::of(b"s390x").as_str(), "size": 5, "platform": {"os": "linux", "architecture": "s390x"}}],
    }))
    .unwrap();
    let server = Server::start(move |_, request| match request.path() {
        "/v2/" => Answer::new(200, &[], b"{}"),
        _ => Answer::new(200, &[("Content-Type", OCI_INDEX)], &index),
    });
    let (_dir, store) = fresh_store();

    let error = registry::pull(
        &store,
        &format!("{}/team/app:v1", server.addr),
        None,
        &mut |_| {},
    )
    .unwrap_err();

    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert_eq!(
        error.to_string(),
        "no matching manifest for linux/amd64 in the manifest list entries"
    );
}

#[test]
fn token_server_refusing_credentials_is_a_clear_auth_error() {
    let server = Server::start(|addr, request| match request.path() {
        "/token" => Answer::new(401, &[], br#"{"details":"incorrect username or password"}"#),
        _ => Answer::new(
            401,
            &[(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="http://{addr}/token",service="s""#),
            )],
            b"",
        ),
    });
    let (_dir, store) = fresh_store();
    let auth = RegistryAuth {
        username: "ann".into(),
        password: "wrong".into(),
        ..RegistryAuth::default()
    };

    let error = registry::pull(
        &store,
        &format!("{}/team/app:v1", server.addr),
        Some(&auth),
        &mut |_| {},
    )
    .unwrap_err();

    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        error.to_string(),
        format!(
            "authentication to {} failed: unauthorized: incorrect username or password",
            server.addr
        )
    );
}

#[test]
fn push_sends_lengths_digests_and_media_types_on_the_wire() {
    let server = Server::start(
        |_, request| match (request.method.as_str(), request.path()) {
            ("GET", "/v2/") => Answer::new(200, &[], b"{}"),
            ("HEAD", _) => Answer::new(404, &[], b""),
            ("POST", "/v2/team/app/blobs/uploads/") => Answer::new(
                202,
                &[("Location", "/v2/team/app/blobs/uploads/u1?_state=s")],
                b"",
            ),
            ("PUT", path) if path.starts_with("/v2/team/app/blobs/uploads/u1") => {
                Answer::new(201, &[], b"")
            }
            ("PUT", "/v2/team/app/manifests/v1") => Answer::new(201, &[], b""),
            _ => Answer::new(500, &[], b""),
        },
    );
    let (_dir, store) = fresh_store();
    let reference = format!("{}/team/app:v1", server.addr);
    let rootfs = {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(3);
        builder
            .append_data(&mut header, "hi", &b"hi\n"[..])
            .unwrap();
        builder.into_inner().unwrap()
    };
    store.import(&rootfs[..], Some(&reference), None).unwrap();

    let digest = registry::push(&store, &reference, None, &mut |_| {}).unwrap();

    let requests = server.requests();
    let posts: Vec<&Request> = requests.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(
        posts.len(),
        2,
        "one upload for the layer, one for the config"
    );
    assert!(posts
        .iter()
        .all(|r| r.header("content-length") == Some("0")));
    let uploads: Vec<&Request> = requests
        .iter()
        .filter(|r| r.method == "PUT" && r.path().contains("/blobs/uploads/"))
        .collect();
    for upload in &uploads {
        let (_, digest_param) = upload.target.split_once("?_state=s&digest=").unwrap();
        assert_eq!(
            digest_param.replace("%3A", ":"),
            Digest::of(&upload.body).to_string()
        );
        assert_eq!(
            upload.header("content-type"),
            Some("application/octet-stream")
        );
    }
    let manifest = requests
        .iter()
        .find(|r| r.path() == "/v2/team/app/manifests/v1")
        .unwrap();
    assert_eq!(Digest::of(&manifest.body).to_string(), digest);
    assert_eq!(manifest.header("content-type"), Some(OCI_MANIFEST));
    let sent: serde_json::Value = serde_json::from_slice(&manifest.body).unwrap();
    let layer = &sent["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert!(uploads
        .iter()
        .any(|u| Digest::of(&u.body).as_str() == layer["digest"].as_str().unwrap()));
}
