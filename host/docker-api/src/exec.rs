//! `/containers/{id}/exec` and `/exec/...`: create, start (hijacked), inspect, resize.

use std::sync::Arc;

use berth_engine::exec::{ExecIo, ExecSpec};
use berth_engine::Engine;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::body::{self, ApiResponse};
use crate::containers::terminal_size;
use crate::error::ApiResult;
use crate::hijack;
use crate::query::Query;

/// The body of `POST /containers/{id}/exec`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ExecCreateBody {
    pub attach_stdin: bool,
    pub attach_stdout: bool,
    pub attach_stderr: bool,
    pub tty: bool,
    pub env: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub user: String,
    pub working_dir: String,
    pub privileged: bool,
    pub console_size: Option<Vec<u16>>,
}

/// The body of `POST /exec/{id}/start`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ExecStartBody {
    pub detach: bool,
    pub tty: bool,
}

/// `POST /containers/{id}/exec`.
pub async fn create(
    engine: &Arc<Engine>,
    reference: &str,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let body: ExecCreateBody = body::read_json(request.into_body()).await?;
    if body.privileged {
        return Err(crate::error::ApiError::bad_request(
            "privileged exec is not supported by Berth yet",
        ));
    }
    let spec = ExecSpec {
        cmd: body.cmd.unwrap_or_default(),
        env: body.env.unwrap_or_default(),
        user: body.user,
        working_dir: body.working_dir,
        tty: body.tty,
        attach_stdin: body.attach_stdin,
        attach_stdout: body.attach_stdout,
        attach_stderr: body.attach_stderr,
        console_size: body
            .console_size
            .filter(|s| s.len() == 2)
            .map(|s| (s[0], s[1])),
    };
    let id = engine.exec_create(reference, spec)?;
    Ok(body::json(StatusCode::CREATED, &json!({ "Id": id })))
}

/// `POST /exec/{id}/start`: detached, or hijacked with the process's stdio.
pub async fn start(
    engine: &Arc<Engine>,
    id: &str,
    mut request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let exec = engine.exec(id)?;
    // The upgrade is taken before the body is read, which consumes the request.
    let on_upgrade = hijack::request_upgrade(&mut request);
    let body_bytes = body::read_all(request.into_body(), 1 << 20).await?;
    let start: ExecStartBody = if body_bytes.iter().all(u8::is_ascii_whitespace) {
        ExecStartBody::default()
    } else {
        serde_json::from_slice(&body_bytes)
            .map_err(|e| crate::error::ApiError::bad_request(format!("invalid JSON: {e}")))?
    };
    let tty = exec.spec.tty;
    if start.detach {
        let io = engine.exec_start(id).await?;
        tokio::spawn(drain(io));
        return Ok(body::empty(StatusCode::OK));
    }
    let on_upgrade = on_upgrade.ok_or_else(hijack::upgrade_required)?;
    if exec.state().started {
        return Err(crate::error::ApiError::conflict(format!(
            "Error: Exec command {id} has already run"
        )));
    }
    let response = hijack::switching_protocols(tty);
    let (want_stdout, want_stderr) = (exec.spec.attach_stdout, exec.spec.attach_stderr);
    let engine = Arc::clone(engine);
    let id = id.to_owned();
    tokio::spawn(async move {
        let Some(client) = hijack::take(on_upgrade).await else {
            return;
        };
        let (mut reader, mut writer) = tokio::io::split(client);
        // The process starts only once the client has the connection, as dockerd does it:
        // clients that parse the 101 with a buffered reader (docker-py) would otherwise swallow
        // output that arrives in the same read as the headers.
        let io = match engine.exec_start(&id).await {
            Ok(io) => io,
            Err(e) => {
                let message = format!("Error response from daemon: {e}\n");
                let _ = writer.write_all(message.as_bytes()).await;
                let _ = writer.shutdown().await;
                return;
            }
        };
        let ExecIo {
            outputs,
            stdin,
            mut done,
        } = io;
        let input = stdin.map(|mut stdin| {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 32 * 1024];
                loop {
                    match reader.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stdin.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stdin.shutdown().await;
            })
        });
        let (sender, mut receiver) = mpsc::channel::<Bytes>(64);
        for (stream, mut output) in outputs {
            let sender = sender.clone();
            let wanted = match stream {
                berth_engine::containers::logs::LogStream::Stdout => want_stdout,
                berth_engine::containers::logs::LogStream::Stderr => want_stderr,
            };
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 32 * 1024];
                loop {
                    match output.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) if wanted => {
                            if sender
                                .send(hijack::frame(tty, stream, &buffer[..n]))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
        drop(sender);
        while let Some(chunk) = receiver.recv().await {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        // The exit code is recorded before the client learns the output ended, so its
        // `exec inspect` sees it.
        let _ = done.wait_for(|d| *d).await;
        let _ = writer.shutdown().await;
        if let Some(input) = input {
            input.abort();
        }
    });
    Ok(response)
}

/// Reads and drops a detached exec's output, so it never blocks on a full pipe.
async fn drain(io: ExecIo) {
    for (_, mut output) in io.outputs {
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 32 * 1024];
            while matches!(output.read(&mut buffer).await, Ok(n) if n > 0) {}
        });
    }
    if let Some(mut stdin) = io.stdin {
        let _ = stdin.shutdown().await;
    }
}

/// `POST /exec/{id}/resize?h=&w=`.
pub async fn resize(engine: &Arc<Engine>, id: &str, query: &Query) -> ApiResult<ApiResponse> {
    let (rows, cols) = terminal_size(query)?;
    engine.exec_resize(id, rows, cols).await?;
    Ok(body::empty(StatusCode::CREATED))
}

/// `GET /exec/{id}/json`.
pub fn inspect(engine: &Arc<Engine>, id: &str) -> ApiResult<ApiResponse> {
    let exec = engine.exec(id)?;
    let state = exec.state();
    let (entrypoint, arguments) = exec
        .spec
        .cmd
        .split_first()
        .map_or((String::new(), Vec::new()), |(first, rest)| {
            (first.clone(), rest.to_vec())
        });
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "ID": exec.id,
            "Running": state.running,
            "ExitCode": state.exit_code,
            "ProcessConfig": {
                "tty": exec.spec.tty,
                "entrypoint": entrypoint,
                "arguments": arguments,
                "privileged": false,
                "user": exec.spec.user,
            },
            "OpenStdin": exec.spec.attach_stdin,
            "OpenStderr": exec.spec.attach_stderr,
            "OpenStdout": exec.spec.attach_stdout,
            "CanRemove": false,
            "ContainerID": exec.container_id,
            "DetachKeys": "",
            "Pid": 0,
        }),
    ))
}
