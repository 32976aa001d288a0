//! `docker exec`: extra processes in a running container.
//!
//! An exec is created (stored, not run), then started: the agent runs the process in the
//! container's namespaces and cgroup, and its stdio streams are handed to the caller, which
//! pumps them to the client. The exit code is recorded before the output is reported ended, so
//! the `exec inspect` a client issues after the stream ends sees it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use agent_protocol::defaults::docker_default_spec;
use agent_protocol::{ExecProcess, StreamHeader, StreamKind};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::containers::logs::LogStream;
use crate::containers::spec::{self, SpecError};
use crate::containers::{new_id, Status};
use crate::machine::describe;
use crate::runtime::{blocking_image, Engine, EngineError};
use crate::sync::lock;

/// What `docker exec` asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// The command and its arguments.
    pub cmd: Vec<String>,
    /// Extra `KEY=value` pairs.
    pub env: Vec<String>,
    /// `user[:group]`; empty means the container's.
    pub user: String,
    /// Working directory; empty means the container's.
    pub working_dir: String,
    /// Run on a terminal.
    pub tty: bool,
    /// The client will send stdin.
    pub attach_stdin: bool,
    /// The client wants stdout.
    pub attach_stdout: bool,
    /// The client wants stderr.
    pub attach_stderr: bool,
    /// Terminal size at start (rows, columns).
    pub console_size: Option<(u16, u16)>,
}

/// Where an exec is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecState {
    /// It was started.
    pub started: bool,
    /// It runs.
    pub running: bool,
    /// Its exit code, once it ended.
    pub exit_code: Option<i32>,
}

/// One exec.
#[derive(Debug)]
pub struct Exec {
    /// The exec id.
    pub id: String,
    /// The container it runs in.
    pub container_id: String,
    /// What was asked.
    pub spec: ExecSpec,
    state: Mutex<ExecState>,
    done: watch::Sender<bool>,
}

impl Exec {
    /// Its state now.
    pub fn state(&self) -> ExecState {
        *lock(&self.state)
    }
}

/// A readable output stream of an exec.
pub type ExecReader = Pin<Box<dyn AsyncRead + Send>>;
/// The writable stdin of an exec.
pub type ExecWriter = Pin<Box<dyn AsyncWrite + Send>>;

/// A started exec's stdio, for the caller to pump.
pub struct ExecIo {
    /// Output streams; one `Stdout` stream for a terminal.
    pub outputs: Vec<(LogStream, ExecReader)>,
    /// Its stdin, if the client attaches one; shut it down for EOF.
    pub stdin: Option<ExecWriter>,
    /// Resolves once the exit code is recorded.
    pub done: watch::Receiver<bool>,
}

impl std::fmt::Debug for ExecIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecIo")
            .field("outputs", &self.outputs.len())
            .field("stdin", &self.stdin.is_some())
            .finish()
    }
}

impl Engine {
    /// `POST /containers/{id}/exec`: stores an exec for a running container.
    pub fn exec_create(&self, reference: &str, spec: ExecSpec) -> Result<String, EngineError> {
        let container = self.container(reference)?;
        match container.status() {
            Status::Running => {}
            Status::Paused => {
                return Err(EngineError::Paused(container.id.clone()));
            }
            _ => return Err(EngineError::NotRunning(container.id.clone())),
        }
        if spec.cmd.is_empty() {
            return Err(EngineError::InvalidArgument(
                "No exec command specified".into(),
            ));
        }
        let id = new_id();
        let exec = Arc::new(Exec {
            id: id.clone(),
            container_id: container.id.clone(),
            spec,
            state: Mutex::new(ExecState::default()),
            done: watch::channel(false).0,
        });
        let action = format!("exec_create: {}", exec.spec.cmd.join(" "));
        lock(&self.execs).insert(id.clone(), exec);
        self.events.emit(
            "container",
            action,
            &container.id,
            [("name", container.record().name)],
        );
        Ok(id)
    }

    /// An exec by id.
    pub fn exec(&self, id: &str) -> Result<Arc<Exec>, EngineError> {
        lock(&self.execs)
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NoSuchExec(id.to_owned()))
    }

    /// `POST /exec/{id}/start`: runs the exec and returns its stdio.
    pub async fn exec_start(self: &Arc<Self>, id: &str) -> Result<ExecIo, EngineError> {
        let exec = self.exec(id)?;
        {
            let mut state = lock(&exec.state);
            if state.started {
                return Err(EngineError::InvalidArgument(format!(
                    "Error: Exec command {id} has already run"
                )));
            }
            state.started = true;
        }
        let result = self.exec_run(&exec).await;
        if result.is_err() {
            let mut state = lock(&exec.state);
            state.running = false;
            state.exit_code = Some(126);
            exec.done.send_replace(true);
        }
        result
    }

    async fn exec_run(self: &Arc<Self>, exec: &Arc<Exec>) -> Result<ExecIo, EngineError> {
        let container = self.container(&exec.container_id)?;
        let session = self.running_session(&container).await?;
        let record = container.record();
        let store = Arc::clone(&self.images);
        let image_id = record.image_id.clone();
        let image = blocking_image(move || store.resolve(&image_id)).await?;
        let image_config = image.config.config().clone().unwrap_or_default();
        let hostname = spec::hostname(&record.spec, &container.id);
        let mut env = spec::environment(&record.spec, &image_config, &hostname);
        env.extend(exec.spec.env.iter().cloned());
        let mut process = docker_default_spec(exec.spec.cmd.clone())
            .map_err(|e| EngineError::Spec(SpecError::Build(e)))?
            .process()
            .clone()
            .ok_or_else(|| EngineError::InvalidArgument("no process in the default spec".into()))?;
        process.set_env(Some(env));
        let cwd = [
            exec.spec.working_dir.as_str(),
            record.spec.working_dir.as_str(),
        ]
        .into_iter()
        .find(|d| !d.is_empty())
        .map(str::to_owned)
        .or_else(|| image_config.working_dir().clone().filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".to_owned());
        process.set_cwd(cwd.into());
        let user = [exec.spec.user.as_str(), record.spec.user.as_str()]
            .into_iter()
            .find(|u| !u.is_empty())
            .map(str::to_owned)
            .or_else(|| image_config.user().clone().filter(|u| !u.is_empty()));
        if let Some(user) = user {
            let mut oci_user = process.user().clone();
            oci_user.set_username(Some(user));
            process.set_user(oci_user);
        }
        if let Some(size) = exec.spec.console_size.and_then(spec::console_size) {
            process.set_console_size(Some(size));
        }
        let request = ExecProcess {
            id: container.id.clone(),
            exec_id: exec.id.clone(),
            process: Box::new(process),
            tty: exec.spec.tty,
            stdin: exec.spec.attach_stdin,
        };
        session.call(move |a| a.exec_process(request)).await?;
        lock(&exec.state).running = true;
        self.events.emit(
            "container",
            format!("exec_start: {}", exec.spec.cmd.join(" ")),
            &container.id,
            [("name", record.name)],
        );
        let header = |kind| StreamHeader {
            container_id: container.id.clone(),
            exec_id: Some(exec.id.clone()),
            kind,
        };
        let mut outputs: Vec<(LogStream, ExecReader)> = Vec::new();
        let mut stdin: Option<ExecWriter> = None;
        if exec.spec.tty {
            let (read, write) = session
                .open_stream(header(StreamKind::Pty))
                .await?
                .into_split();
            outputs.push((LogStream::Stdout, Box::pin(read)));
            if exec.spec.attach_stdin {
                stdin = Some(Box::pin(write));
            }
        } else {
            let out = session.open_stream(header(StreamKind::Stdout)).await?;
            let err = session.open_stream(header(StreamKind::Stderr)).await?;
            outputs.push((LogStream::Stdout, Box::pin(out)));
            outputs.push((LogStream::Stderr, Box::pin(err)));
            if exec.spec.attach_stdin {
                stdin = Some(Box::pin(
                    session.open_stream(header(StreamKind::Stdin)).await?,
                ));
            }
        }
        let done = exec.done.subscribe();
        let waiter_exec = Arc::clone(exec);
        let container_id = container.id.clone();
        let exec_id = exec.id.clone();
        let events = Arc::clone(self);
        tokio::spawn(async move {
            let waited = session
                .call_dedicated(move |a| a.wait_exec(&container_id, &exec_id))
                .await;
            let code = match waited {
                Ok(exit) => exit.code,
                Err(e) => {
                    tracing::warn!(error = %describe(&e), "lost an exec's exit status");
                    126
                }
            };
            {
                let mut state = lock(&waiter_exec.state);
                state.running = false;
                state.exit_code = Some(code);
            }
            events.events.emit(
                "container",
                "exec_die",
                &waiter_exec.container_id,
                [
                    ("execID", waiter_exec.id.clone()),
                    ("exitCode", code.to_string()),
                ],
            );
            waiter_exec.done.send_replace(true);
        });
        Ok(ExecIo {
            outputs,
            stdin,
            done,
        })
    }

    /// `POST /exec/{id}/resize`.
    pub async fn exec_resize(&self, id: &str, rows: u16, cols: u16) -> Result<(), EngineError> {
        let exec = self.exec(id)?;
        let container = self.container(&exec.container_id)?;
        // An exec that ended (or a container that stopped) has no terminal left to resize.
        let Ok(session) = self.running_session(&container).await else {
            return Ok(());
        };
        if !exec.state().running {
            return Ok(());
        }
        let exec_id = exec.id.clone();
        let container_id = container.id.clone();
        session
            .call(move |a| a.resize_pty(&container_id, Some(&exec_id), rows, cols))
            .await?;
        Ok(())
    }
}
