//! The classic builder behind `POST /build`: a Dockerfile's stages run step by step, each
//! step an image, as dockerd's builder does.
//!
//! - `FROM` starts a stage from an image (pulled if missing or with `--pull`), an earlier
//!   stage, or `scratch`.
//! - `RUN` runs in a container of the step's image in the VM; its output streams to the client
//!   and its writable layer becomes the step's layer (`Engine::snapshot`, whiteouts included).
//! - `COPY` and `ADD` need no container: the files from the context (or from an earlier
//!   stage's or another image's filesystem, `--from`) are written straight into a layer tar,
//!   owned by root or `--chown`'s ids, with `--chmod`'s mode; `ADD` unpacks local tar archives
//!   (plain, gzip or zstd).
//! - Every other instruction changes only the run configuration: an image with no new layer.
//!
//! The cache is keyed like Docker's: the parent image, the instruction as the history records
//! it (with the build args RUN sees) and, for `COPY`/`ADD`, a checksum of the copied files'
//! names, modes and contents. A step whose key maps to an image still in the store is not run
//! again (`Using cache`). Intermediate images are left untagged; only the result is tagged.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::Config as ImageConfig;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::dockerfile::{self, Dockerfile, Healthcheck, Instruction, ShellOrExec, Stage};
use crate::containers::spec::{set_env, union, ContainerSpec};
use crate::images::{Derivation, Image};
use crate::runtime::{blocking_image, Engine, EngineError, WaitCondition};

/// The cache index, under the data root.
const CACHE_FILE: &str = "build-cache.json";

/// What `docker build` asks for besides the context.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// The Dockerfile's path in the context (`-f`); empty means `Dockerfile`.
    pub dockerfile: String,
    /// `-t` references for the result.
    pub tags: Vec<String>,
    /// `--target`: the stage to stop after.
    pub target: Option<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--pull`: pull base images even if present.
    pub pull: bool,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--label` values, added to the result.
    pub labels: BTreeMap<String, String>,
}

/// Where a build's progress goes: text for the client, as dockerd's `stream` messages.
pub type BuildOutput = mpsc::Sender<String>;

/// A failure that names the step, as dockerd reports build errors.
fn step_error(message: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument(message.into())
}

/// The state of the stage being built.
struct StageState {
    /// The image the next step starts from; `None` for `scratch` before its first step.
    image: Option<String>,
    config: ImageConfig,
    shell: Vec<String>,
    /// ARGs declared in this stage, with their values.
    args: BTreeMap<String, String>,
    escape: char,
    /// Docker-only configuration fields the next configuration step sets.
    docker_config: serde_json::Map<String, serde_json::Value>,
}

impl StageState {
    /// A variable as the stage's instructions see it: ENV first, then the declared ARGs.
    fn lookup(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.config
            .env()
            .iter()
            .flatten()
            .rev()
            .find_map(|e| e.strip_prefix(&prefix).map(str::to_owned))
            .or_else(|| self.args.get(name).cloned())
    }

    fn expand(&self, word: &str) -> Result<String, EngineError> {
        dockerfile::expand(word, &|name| self.lookup(name), self.escape)
            .map_err(|e| step_error(e.to_string()))
    }

    /// The declared ARGs not shadowed by ENV, as RUN's extra environment.
    fn arg_env(&self) -> Vec<String> {
        self.args
            .iter()
            .filter(|(name, _)| {
                let prefix = format!("{name}=");
                !self
                    .config
                    .env()
                    .iter()
                    .flatten()
                    .any(|e| e.starts_with(&prefix))
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }
}

impl Engine {
    /// Builds the Dockerfile of the unpacked context `context`; returns the image ID. Progress
    /// goes to `out`.
    pub async fn build(
        self: &Arc<Self>,
        context: &Path,
        options: BuildOptions,
        out: &BuildOutput,
    ) -> Result<String, EngineError> {
        let name = if options.dockerfile.is_empty() {
            "Dockerfile".to_owned()
        } else {
            options.dockerfile.clone()
        };
        let path = inside_context(context, &name)?;
        let text = fs::read_to_string(&path)
            .map_err(|e| step_error(format!("Cannot locate specified Dockerfile: {name}: {e}")))?;
        let parsed = dockerfile::parse(&text).map_err(|e| step_error(e.to_string()))?;
        let last = match &options.target {
            Some(target) => parsed.stage_index(target).ok_or_else(|| {
                step_error(format!(
                    "failed to reach build target {target} in Dockerfile"
                ))
            })?,
            None => parsed.stages.len() - 1,
        };
        let total: usize = parsed.stages[..=last]
            .iter()
            .map(|s| s.steps.len() + 1)
            .sum();
        let mut cache = BuildCache::open(self.data_root(), options.no_cache);
        let mut built: Vec<Option<String>> = Vec::new();
        let mut step = 0;
        let mut result = None;
        for stage in &parsed.stages[..=last] {
            let image = self
                .build_stage(
                    &parsed, stage, context, &options, &built, &mut cache, out, &mut step, total,
                )
                .await?;
            result = image.clone();
            built.push(image);
        }
        let mut id = result.ok_or_else(|| step_error("the build produced no image"))?;
        if !options.labels.is_empty() {
            let labels = options.labels.clone();
            id = self
                .derive_config(
                    Some(&id),
                    "LABEL (from --label)".into(),
                    Default::default(),
                    move |config| {
                        let mut all = config.labels().clone().unwrap_or_default();
                        all.extend(labels);
                        config.set_labels(Some(all));
                    },
                )
                .await?;
        }
        for tag in &options.tags {
            let (store, source, target) = (Arc::clone(&self.images), id.clone(), tag.clone());
            blocking_image(move || store.tag(&source, &target)).await?;
        }
        let short = id
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect::<String>();
        let _ = out.send(format!("Successfully built {short}\n")).await;
        for tag in &options.tags {
            let _ = out.send(format!("Successfully tagged {tag}\n")).await;
        }
        self.events.emit("image", "build", &id, []);
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    async fn build_stage(
        self: &Arc<Self>,
        parsed: &Dockerfile,
        stage: &Stage,
        context: &Path,
        options: &BuildOptions,
        built: &[Option<String>],
        cache: &mut BuildCache,
        out: &BuildOutput,
        step: &mut usize,
        total: usize,
    ) -> Result<Option<String>, EngineError> {
        // Global ARGs: their defaults, overridden by --build-arg, visible to FROM.
        let mut globals = BTreeMap::new();
        for arg in &parsed.global_args {
            let value = match options.build_args.get(&arg.name) {
                Some(value) => Some(value.clone()),
                None => arg
                    .default
                    .as_deref()
                    .map(|d| dockerfile::expand(d, &|n| globals_get(&globals, n), parsed.escape))
                    .transpose()
                    .map_err(|e| step_error(e.to_string()))?,
            };
            if let Some(value) = value {
                globals.insert(arg.name.clone(), value);
            }
        }
        *step += 1;
        let base = dockerfile::expand(&stage.base, &|n| globals_get(&globals, n), parsed.escape)
            .map_err(|e| step_error(e.to_string()))?;
        let header = match &stage.name {
            Some(name) => format!("FROM {base} AS {name}"),
            None => format!("FROM {base}"),
        };
        let _ = out.send(format!("Step {step}/{total} : {header}\n")).await;
        let image = if base.eq_ignore_ascii_case("scratch") {
            None
        } else if let Some(index) = parsed
            .stage_index(&base)
            .filter(|&i| i < built.len() && parsed.stages[i].name.is_some())
        {
            Some(
                built[index]
                    .clone()
                    .ok_or_else(|| step_error(format!("stage {base} produced no image")))?,
            )
        } else {
            Some(self.base_image(&base, options.pull, out).await?.id)
        };
        let config = match &image {
            Some(id) => {
                let (store, id) = (Arc::clone(&self.images), id.clone());
                blocking_image(move || store.resolve(&id))
                    .await?
                    .config
                    .config()
                    .clone()
                    .unwrap_or_default()
            }
            None => ImageConfig::default(),
        };
        if let Some(id) = &image {
            let _ = out.send(format!(" ---> {}\n", short(id))).await;
        }
        let mut state = StageState {
            image,
            config,
            shell: vec!["/bin/sh".into(), "-c".into()],
            args: BTreeMap::new(),
            escape: parsed.escape,
            docker_config: serde_json::Map::new(),
        };
        for instruction in &stage.steps {
            *step += 1;
            let _ = out
                .send(format!("Step {step}/{total} : {}\n", instruction.original))
                .await;
            self.run_step(
                &mut state,
                &instruction.instruction,
                &globals,
                context,
                options,
                parsed,
                built,
                cache,
                out,
            )
            .await
            .map_err(|e| match e {
                EngineError::InvalidArgument(message) => step_error(message),
                other => other,
            })?;
            if let Some(id) = &state.image {
                let _ = out.send(format!(" ---> {}\n", short(id))).await;
            }
        }
        Ok(state.image)
    }

    /// A base image: present, or pulled from its registry.
    async fn base_image(
        self: &Arc<Self>,
        reference: &str,
        pull: bool,
        out: &BuildOutput,
    ) -> Result<Image, EngineError> {
        let (store, name) = (Arc::clone(&self.images), reference.to_owned());
        let present = blocking_image(move || store.resolve(&name)).await;
        match present {
            Ok(image) if !pull => Ok(image),
            _ => {
                let _ = out.send(format!("Pulling {reference}\n")).await;
                let (store, name) = (Arc::clone(&self.images), reference.to_owned());
                blocking_image(move || {
                    crate::images::registry::pull(&store, &name, None, &mut |_| {})
                })
                .await?;
                let (store, name) = (Arc::clone(&self.images), reference.to_owned());
                blocking_image(move || store.resolve(&name)).await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        self: &Arc<Self>,
        state: &mut StageState,
        instruction: &Instruction,
        globals: &BTreeMap<String, String>,
        context: &Path,
        options: &BuildOptions,
        parsed: &Dockerfile,
        built: &[Option<String>],
        cache: &mut BuildCache,
        out: &BuildOutput,
    ) -> Result<(), EngineError> {
        let nop = |text: String| format!("/bin/sh -c #(nop)  {text}");
        match instruction {
            Instruction::Run { command } => {
                let argv = match command {
                    ShellOrExec::Exec(argv) => argv.clone(),
                    ShellOrExec::Shell(line) => {
                        let mut argv = state.shell.clone();
                        argv.push(line.clone());
                        argv
                    }
                };
                let args = state.arg_env();
                let created_by = if args.is_empty() {
                    argv.join(" ")
                } else {
                    format!("|{} {} {}", args.len(), args.join(" "), argv.join(" "))
                };
                let key = cache_key(state.image.as_deref(), &created_by, "");
                if let Some(hit) = cache.lookup(self, &key).await {
                    let _ = out.send(" ---> Using cache\n".to_owned()).await;
                    state.image = Some(hit);
                    return Ok(());
                }
                let Some(parent) = state.image.clone() else {
                    return Err(step_error(
                        "RUN in a stage FROM scratch needs files to run: COPY a shell first",
                    ));
                };
                let id = self
                    .run_in_container(&parent, argv, args, &state.config, created_by, out)
                    .await?;
                cache.insert(key, &id);
                state.image = Some(id);
            }
            Instruction::Copy {
                sources,
                dest,
                from,
                chown,
                chmod,
                ..
            } => {
                let sources: Vec<String> = sources
                    .iter()
                    .map(|s| state.expand(s))
                    .collect::<Result<_, _>>()?;
                let dest = state.expand(dest)?;
                let source = match from {
                    Some(from) => {
                        let from = state.expand(from)?;
                        let image = match parsed.stage_index(&from).filter(|&i| i < built.len()) {
                            Some(i) => built[i]
                                .clone()
                                .ok_or_else(|| step_error(format!("stage {from} is empty")))?,
                            None => self.base_image(&from, false, out).await?.id,
                        };
                        CopySource::Image(image)
                    }
                    None => CopySource::Context(context.to_owned()),
                };
                let what = format!("COPY {} {dest}", sources.join(" "));
                self.copy_step(
                    state, source, &sources, &dest, chown, chmod, false, what, cache, out,
                )
                .await?;
            }
            Instruction::Add {
                sources,
                dest,
                chown,
                chmod,
                ..
            } => {
                let sources: Vec<String> = sources
                    .iter()
                    .map(|s| state.expand(s))
                    .collect::<Result<_, _>>()?;
                if let Some(url) = sources.iter().find(|s| s.contains("://")) {
                    return Err(step_error(format!(
                        "ADD from a URL is not supported by this builder: {url}"
                    )));
                }
                let dest = state.expand(dest)?;
                let what = format!("ADD {} {dest}", sources.join(" "));
                let source = CopySource::Context(context.to_owned());
                self.copy_step(
                    state, source, &sources, &dest, chown, chmod, true, what, cache, out,
                )
                .await?;
            }
            Instruction::Arg(specs) => {
                for spec in specs {
                    let value = match options.build_args.get(&spec.name) {
                        Some(value) => Some(value.clone()),
                        None => match &spec.default {
                            Some(default) => Some(state.expand(default)?),
                            None => globals.get(&spec.name).cloned(),
                        },
                    };
                    state
                        .args
                        .insert(spec.name.clone(), value.unwrap_or_default());
                }
                let text = specs
                    .iter()
                    .map(|s| match &s.default {
                        Some(d) => format!("{}={d}", s.name),
                        None => s.name.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                self.config_step(state, nop(format!("ARG {text}")), cache, out, |_| Ok(()))
                    .await?;
            }
            Instruction::Shell(shell) => {
                if shell.is_empty() {
                    return Err(step_error("SHELL requires at least one argument"));
                }
                state.shell = shell.clone();
                state
                    .docker_config
                    .insert("Shell".into(), serde_json::json!(shell));
                let text = format!("SHELL {shell:?}");
                self.config_step(state, nop(text), cache, out, |_| Ok(()))
                    .await?;
            }
            other => {
                state.docker_config = docker_config_of(other);
                let change = config_change(state, other)?;
                let text = change.0.clone();
                let apply = change.1;
                self.config_step(state, nop(text), cache, out, apply)
                    .await?;
            }
        }
        Ok(())
    }

    /// A step that changes only the run configuration.
    async fn config_step(
        self: &Arc<Self>,
        state: &mut StageState,
        created_by: String,
        cache: &mut BuildCache,
        out: &BuildOutput,
        apply: impl FnOnce(&mut ImageConfig) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        apply(&mut state.config)?;
        let config = state.config.clone();
        let docker_config = std::mem::take(&mut state.docker_config);
        let key = cache_key(
            state.image.as_deref(),
            &created_by,
            &format!(
                "{}{}",
                serde_json::to_string(&config).unwrap_or_default(),
                serde_json::Value::Object(docker_config.clone())
            ),
        );
        if let Some(hit) = cache.lookup(self, &key).await {
            let _ = out.send(" ---> Using cache\n".to_owned()).await;
            state.image = Some(hit);
            return Ok(());
        }
        let id = self
            .derive_config(
                state.image.as_deref(),
                created_by,
                docker_config,
                move |c| *c = config,
            )
            .await?;
        cache.insert(key, &id);
        state.image = Some(id);
        Ok(())
    }

    /// A new image with no new layer, its configuration changed by `change`.
    async fn derive_config(
        self: &Arc<Self>,
        parent: Option<&str>,
        created_by: String,
        docker_config: serde_json::Map<String, serde_json::Value>,
        change: impl FnOnce(&mut ImageConfig) + Send + 'static,
    ) -> Result<String, EngineError> {
        let store = Arc::clone(&self.images);
        let parent = parent.map(str::to_owned);
        let image = blocking_image(move || {
            let mut config = match &parent {
                Some(id) => store
                    .resolve(id)?
                    .config
                    .config()
                    .clone()
                    .unwrap_or_default(),
                None => ImageConfig::default(),
            };
            change(&mut config);
            let derivation = Derivation {
                config: Some(config),
                created_by,
                docker_config,
                ..Default::default()
            };
            store.derive(parent.as_deref(), None, derivation, None)
        })
        .await?;
        Ok(image.id)
    }

    /// Runs `argv` in a container of `parent` and stores its writable layer as an image.
    async fn run_in_container(
        self: &Arc<Self>,
        parent: &str,
        argv: Vec<String>,
        arg_env: Vec<String>,
        config: &ImageConfig,
        created_by: String,
        out: &BuildOutput,
    ) -> Result<String, EngineError> {
        let spec = ContainerSpec {
            image: parent.to_owned(),
            entrypoint: Some(Vec::new()),
            cmd: argv.clone(),
            env: arg_env,
            ..Default::default()
        };
        let container = self.create(None, spec).await?;
        let _ = out
            .send(format!(" ---> Running in {}\n", &container.id[..12]))
            .await;
        let result = async {
            let mut output = container.hub.subscribe();
            let exited = self.wait(&container.id, WaitCondition::NextExit)?;
            self.start(&container.id).await?;
            while let Some(chunk) = output.recv().await {
                let _ = out
                    .send(String::from_utf8_lossy(&chunk.data).into_owned())
                    .await;
            }
            let report = exited.await;
            if report.code != 0 {
                return Err(step_error(format!(
                    "The command '{}' returned a non-zero code: {}",
                    argv.join(" "),
                    report.code
                )));
            }
            let derivation = Derivation {
                config: Some(config.clone()),
                created_by,
                ..Default::default()
            };
            self.snapshot(&container, derivation, None).await
        }
        .await;
        // With its anonymous volumes (an image's VOLUMEs), as dockerd's builder removes them.
        if let Err(e) = self.remove_with_volumes(&container.id, true, true).await {
            tracing::warn!(error = %e, "cannot remove a build container");
        }
        let _ = out
            .send(format!(
                "Removing intermediate container {}\n",
                &container.id[..12]
            ))
            .await;
        Ok(result?.id)
    }

    /// `COPY`/`ADD`: the files as a layer of their own.
    #[allow(clippy::too_many_arguments)]
    async fn copy_step(
        self: &Arc<Self>,
        state: &mut StageState,
        source: CopySource,
        sources: &[String],
        dest: &str,
        chown: &Option<String>,
        chmod: &Option<String>,
        unpack_archives: bool,
        what: String,
        cache: &mut BuildCache,
        out: &BuildOutput,
    ) -> Result<(), EngineError> {
        let workdir = state.config.working_dir().clone().unwrap_or_default();
        let dest = absolute_dest(&workdir, dest);
        let owner = match chown {
            Some(spec) => {
                let spec = state.expand(spec)?;
                let store = Arc::clone(&self.images);
                let image = state.image.clone();
                tokio::task::spawn_blocking(move || {
                    let files = image
                        .as_deref()
                        .map(|id| image_files(&store, id, &["etc/passwd", "etc/group"]))
                        .transpose()?
                        .unwrap_or_default();
                    parse_owner(&spec, &files)
                })
                .await
                .map_err(|e| step_error(e.to_string()))??
            }
            None => (0, 0),
        };
        let mode = chmod
            .as_deref()
            .map(|m| {
                u32::from_str_radix(m, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| step_error(format!("invalid chmod parameter: {m}")))
            })
            .transpose()?;
        let root = match &source {
            CopySource::Context(dir) => dir.clone(),
            CopySource::Image(image) => self.export_image(image).await?,
        };
        let sources = sources.to_vec();
        let plan = CopyPlan {
            owner,
            mode,
            unpack_archives,
        };
        let dest_for_layer = dest.clone();
        let scratch = matches!(source, CopySource::Image(_)).then(|| root.clone());
        let (tar, checksum) = tokio::task::spawn_blocking(move || {
            let layer = build_copy_layer(&root, &sources, &dest_for_layer, &plan);
            if let Some(dir) = scratch {
                // The stage's files were unpacked for this copy alone.
                let _ = fs::remove_dir_all(dir);
            }
            layer
        })
        .await
        .map_err(|e| step_error(e.to_string()))??;
        let created_by = format!("/bin/sh -c #(nop) {what} in {dest}");
        let key = cache_key(state.image.as_deref(), &created_by, &checksum);
        if let Some(hit) = cache.lookup(self, &key).await {
            let _ = out.send(" ---> Using cache\n".to_owned()).await;
            state.image = Some(hit);
            return Ok(());
        }
        let store = Arc::clone(&self.images);
        let parent = state.image.clone();
        let config = state.config.clone();
        let image = blocking_image(move || {
            let derivation = Derivation {
                config: Some(config),
                created_by,
                ..Default::default()
            };
            store.derive(parent.as_deref(), Some(&mut &tar[..]), derivation, None)
        })
        .await?;
        cache.insert(key, &image.id);
        state.image = Some(image.id);
        Ok(())
    }

    /// Unpacks an image's filesystem on the host, for `COPY --from`: its layers applied in
    /// order (whiteouts honoured) under the data root's build directory.
    async fn export_image(self: &Arc<Self>, image: &str) -> Result<PathBuf, EngineError> {
        let store = Arc::clone(&self.images);
        let image = image.to_owned();
        let dir = self
            .data_root()
            .join("build")
            .join(&crate::containers::new_id()[..16]);
        let target = dir.clone();
        blocking_image(move || {
            let image = store.resolve(&image)?;
            fs::create_dir_all(&target)
                .map_err(crate::images::ImageError::io("creating a build directory"))?;
            for layer in &image.layers {
                let blob = store.blob_path(&layer.blob_digest)?;
                apply_layer(&blob, &target)
                    .map_err(crate::images::ImageError::io("unpacking a stage's layer"))?;
            }
            Ok(())
        })
        .await?;
        Ok(dir)
    }
}

impl Engine {
    /// `docker builder prune`: forgets every cached step; returns the cache keys dropped. The
    /// step images themselves are untagged images, reclaimed by `docker image prune`.
    pub fn prune_build_cache(&self) -> Result<Vec<String>, EngineError> {
        let cache = BuildCache::open(self.data_root(), false);
        let keys: Vec<String> = cache.entries.keys().cloned().collect();
        match fs::remove_file(&cache.path) {
            Ok(()) => Ok(keys),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(EngineError::Io("remove the build cache", e)),
        }
    }
}

/// Applies `docker commit --change` lines (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER,
/// VOLUME, WORKDIR, STOPSIGNAL, HEALTHCHECK) to `config`, as the builder would.
pub fn apply_changes(
    config: &mut ImageConfig,
    changes: &[String],
) -> Result<serde_json::Map<String, serde_json::Value>, EngineError> {
    let mut docker_config = serde_json::Map::new();
    for change in changes {
        let parsed = dockerfile::parse(&format!("FROM scratch\n{change}\n"))
            .map_err(|e| step_error(e.message))?;
        let state = StageState {
            image: None,
            config: config.clone(),
            shell: vec!["/bin/sh".into(), "-c".into()],
            args: BTreeMap::new(),
            escape: parsed.escape,
            docker_config: serde_json::Map::new(),
        };
        for step in parsed.stages.iter().flat_map(|s| &s.steps) {
            match &step.instruction {
                Instruction::Run { .. }
                | Instruction::Copy { .. }
                | Instruction::Add { .. }
                | Instruction::Arg(_)
                | Instruction::Shell(_)
                | Instruction::Maintainer(_)
                | Instruction::Onbuild { .. }
                | Instruction::From { .. } => {
                    return Err(step_error(format!(
                        "{} is not a valid change command",
                        step.original.split_whitespace().next().unwrap_or_default()
                    )))
                }
                instruction => {
                    docker_config.extend(docker_config_of(instruction));
                    let (_, apply) = config_change(&state, instruction)?;
                    apply(config)?;
                }
            }
        }
    }
    Ok(docker_config)
}

fn globals_get(globals: &BTreeMap<String, String>, name: &str) -> Option<String> {
    globals.get(name).cloned()
}

fn short(id: &str) -> String {
    id.trim_start_matches("sha256:").chars().take(12).collect()
}

/// Where COPY reads from.
enum CopySource {
    Context(PathBuf),
    Image(String),
}

/// How COPY writes what it reads.
struct CopyPlan {
    owner: (u64, u64),
    mode: Option<u32>,
    unpack_archives: bool,
}

/// The change a configuration instruction makes, and the history text for it.
type ConfigChange = (
    String,
    Box<dyn FnOnce(&mut ImageConfig) -> Result<(), EngineError> + Send>,
);

fn config_change(
    state: &StageState,
    instruction: &Instruction,
) -> Result<ConfigChange, EngineError> {
    let argv = |command: &ShellOrExec, shell: &[String]| match command {
        ShellOrExec::Exec(argv) => argv.clone(),
        ShellOrExec::Shell(line) => {
            let mut argv = shell.to_vec();
            argv.push(line.clone());
            argv
        }
    };
    let change: ConfigChange = match instruction {
        Instruction::Env(pairs) => {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| Ok((k.clone(), state.expand(v)?)))
                .collect::<Result<_, EngineError>>()?;
            let text = pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            (
                format!("ENV {text}"),
                Box::new(move |c: &mut ImageConfig| {
                    let mut env = c.env().clone().unwrap_or_default();
                    for (key, value) in pairs {
                        set_env(&mut env, &format!("{key}={value}"));
                    }
                    c.set_env(Some(env));
                    Ok(())
                }),
            )
        }
        Instruction::Label(pairs) => {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| Ok((state.expand(k)?, state.expand(v)?)))
                .collect::<Result<_, EngineError>>()?;
            let text = pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            (
                format!("LABEL {text}"),
                Box::new(move |c: &mut ImageConfig| {
                    let mut labels = c.labels().clone().unwrap_or_default();
                    labels.extend(pairs);
                    c.set_labels(Some(labels));
                    Ok(())
                }),
            )
        }
        Instruction::Workdir(dir) => {
            let dir = state.expand(dir)?;
            let current = state.config.working_dir().clone().unwrap_or_default();
            let joined = absolute_dest(&current, &dir);
            (
                format!("WORKDIR {dir}"),
                Box::new(move |c: &mut ImageConfig| {
                    c.set_working_dir(Some(joined));
                    Ok(())
                }),
            )
        }
        Instruction::User(user) => {
            let user = state.expand(user)?;
            (
                format!("USER {user}"),
                Box::new(move |c: &mut ImageConfig| {
                    c.set_user(Some(user));
                    Ok(())
                }),
            )
        }
        Instruction::Cmd(command) => {
            let argv = argv(command, &state.shell);
            (
                format!("CMD {argv:?}"),
                Box::new(move |c: &mut ImageConfig| {
                    c.set_cmd(Some(argv));
                    Ok(())
                }),
            )
        }
        Instruction::Entrypoint(command) => {
            let argv = argv(command, &state.shell);
            (
                format!("ENTRYPOINT {argv:?}"),
                Box::new(move |c: &mut ImageConfig| {
                    c.set_entrypoint(Some(argv));
                    // As dockerd: a new entrypoint drops the inherited command.
                    c.set_cmd(None);
                    Ok(())
                }),
            )
        }
        Instruction::Expose(ports) => {
            let ports: Vec<String> = ports
                .iter()
                .map(|p| {
                    let p = state.expand(p)?;
                    Ok(if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    })
                })
                .collect::<Result<_, EngineError>>()?;
            (
                format!("EXPOSE {}", ports.join(" ")),
                Box::new(move |c: &mut ImageConfig| {
                    c.set_exposed_ports(Some(union(c.exposed_ports().clone(), ports)));
                    Ok(())
                }),
            )
        }
        Instruction::Volume(volumes) => {
            let volumes: Vec<String> = volumes
                .iter()
                .map(|v| state.expand(v))
                .collect::<Result<_, _>>()?;
            (
                format!("VOLUME {volumes:?}"),
                Box::new(move |c: &mut ImageConfig| {
                    c.set_volumes(Some(union(c.volumes().clone(), volumes)));
                    Ok(())
                }),
            )
        }
        Instruction::StopSignal(signal) => {
            let signal = state.expand(signal)?;
            (
                format!("STOPSIGNAL {signal}"),
                Box::new(move |c: &mut ImageConfig| {
                    c.set_stop_signal(Some(signal));
                    Ok(())
                }),
            )
        }
        Instruction::Maintainer(name) => {
            let name = name.clone();
            (format!("MAINTAINER {name}"), Box::new(|_| Ok(())))
        }
        Instruction::Healthcheck(check) => {
            // Recorded in Docker's `Healthcheck` field (`docker_config_of`), which the OCI
            // config does not have.
            let text = match check {
                Healthcheck::None => "HEALTHCHECK NONE".to_owned(),
                Healthcheck::Cmd { command, .. } => match command {
                    ShellOrExec::Exec(argv) => format!("HEALTHCHECK CMD {argv:?}"),
                    ShellOrExec::Shell(line) => format!("HEALTHCHECK CMD {line}"),
                },
            };
            (text, Box::new(|_| Ok(())))
        }
        Instruction::Onbuild { expression, .. } => {
            return Err(step_error(format!(
                "ONBUILD is not supported by this builder: ONBUILD {expression}"
            )))
        }
        Instruction::From { .. }
        | Instruction::Run { .. }
        | Instruction::Copy { .. }
        | Instruction::Add { .. }
        | Instruction::Arg(_)
        | Instruction::Shell(_) => {
            return Err(step_error("internal: not a configuration instruction"))
        }
    };
    Ok(change)
}

/// The Docker-only configuration fields an instruction sets: `Healthcheck` as dockerd stores
/// it (durations in nanoseconds, `NONE` as `["NONE"]`).
fn docker_config_of(instruction: &Instruction) -> serde_json::Map<String, serde_json::Value> {
    let mut fields = serde_json::Map::new();
    if let Instruction::Healthcheck(check) = instruction {
        let value = match check {
            Healthcheck::None => serde_json::json!({ "Test": ["NONE"] }),
            Healthcheck::Cmd { command, options } => {
                let test = match command {
                    ShellOrExec::Exec(argv) => std::iter::once("CMD".to_owned())
                        .chain(argv.clone())
                        .collect(),
                    ShellOrExec::Shell(line) => vec!["CMD-SHELL".to_owned(), line.clone()],
                };
                let nanos = |d: Option<std::time::Duration>| {
                    d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                };
                let mut value = serde_json::json!({ "Test": test });
                for (key, duration) in [
                    ("Interval", options.interval),
                    ("Timeout", options.timeout),
                    ("StartPeriod", options.start_period),
                    ("StartInterval", options.start_interval),
                ] {
                    if duration.is_some() {
                        value[key] = serde_json::json!(nanos(duration));
                    }
                }
                if let Some(retries) = options.retries {
                    value["Retries"] = serde_json::json!(retries);
                }
                value
            }
        };
        fields.insert("Healthcheck".into(), value);
    }
    fields
}

/// `dest` made absolute against the working directory, cleaned; a trailing `/` kept.
fn absolute_dest(workdir: &str, dest: &str) -> String {
    let joined = if dest.starts_with('/') {
        dest.to_owned()
    } else {
        format!("{}/{dest}", if workdir.is_empty() { "/" } else { workdir })
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    let mut out = format!("/{}", parts.join("/"));
    if (dest.ends_with('/') || dest.ends_with("/.") || dest == ".") && out != "/" {
        out.push('/');
    }
    out
}

/// `--chown`'s `user[:group]`: numeric ids, or names looked up in the image's `/etc/passwd`
/// and `/etc/group` (`files`, by path); a user alone also gives its primary group.
fn parse_owner(spec: &str, files: &BTreeMap<String, String>) -> Result<(u64, u64), EngineError> {
    let table = |path: &str, name: &str, field: usize| -> Option<u64> {
        files.get(path)?.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name))
                .then(|| fields.get(field)?.parse().ok())
                .flatten()
        })
    };
    let unknown = |what: &str, name: &str| {
        step_error(format!(
            "--chown={spec}: unable to find {what} {name}: no matching entries in the image's /etc/{}",
            if what == "user" { "passwd" } else { "group" }
        ))
    };
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let (uid, primary) = match user.parse::<u64>() {
        Ok(uid) => (uid, uid),
        Err(_) => {
            let uid = table("etc/passwd", user, 2).ok_or_else(|| unknown("user", user))?;
            let gid = table("etc/passwd", user, 3).unwrap_or(uid);
            (uid, gid)
        }
    };
    let gid = match group {
        None => primary,
        Some(group) => match group.parse::<u64>() {
            Ok(gid) => gid,
            Err(_) => table("etc/group", group, 2).ok_or_else(|| unknown("group", group))?,
        },
    };
    Ok((uid, gid))
}

/// The contents of `paths` (relative to the root) in an image, read from its layers, top-most
/// first; a path a layer deletes (whiteout) is absent.
fn image_files(
    store: &crate::images::ImageStore,
    image: &str,
    paths: &[&str],
) -> Result<BTreeMap<String, String>, EngineError> {
    let image = store.resolve(image)?;
    let mut found = BTreeMap::new();
    let mut settled: Vec<String> = Vec::new();
    let read_error = |e: io::Error| step_error(format!("cannot read the image's files: {e}"));
    for layer in image.layers.iter().rev() {
        let blob = store.blob_path(&layer.blob_digest)?;
        let mut archive = tar::Archive::new(open_decompressed(&blob).map_err(read_error)?);
        for entry in archive.entries().map_err(read_error)? {
            let mut entry = entry.map_err(read_error)?;
            let path = entry.path().map_err(read_error)?;
            let clean: PathBuf = path
                .components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .collect();
            let clean = clean.display().to_string();
            let whiteout = clean
                .rsplit_once('/')
                .map(|(dir, name)| (dir.to_owned(), name))
                .and_then(|(dir, name)| Some(format!("{dir}/{}", name.strip_prefix(".wh.")?)));
            if let Some(hidden) = whiteout.filter(|h| paths.contains(&h.as_str())) {
                if !settled.contains(&hidden) {
                    settled.push(hidden);
                }
                continue;
            }
            if paths.contains(&clean.as_str()) && !settled.contains(&clean) {
                let mut text = String::new();
                entry
                    .by_ref()
                    .take(1 << 20)
                    .read_to_string(&mut text)
                    .map_err(read_error)?;
                settled.push(clean.clone());
                found.insert(clean, text);
            }
        }
        if settled.len() == paths.len() {
            break;
        }
    }
    Ok(found)
}

/// `name` in the context `root`, refusing anything that leaves it.
fn inside_context(root: &Path, name: &str) -> Result<PathBuf, EngineError> {
    let mut path = root.to_owned();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !path.pop() || !path.starts_with(root) {
                    return Err(step_error(format!(
                        "forbidden path outside the build context: {name}"
                    )));
                }
            }
            Component::Prefix(_) => {}
        }
    }
    if !path.starts_with(root) {
        return Err(step_error(format!(
            "forbidden path outside the build context: {name}"
        )));
    }
    // A symlink in the context may not lead out of it either.
    if let Ok(real) = fs::canonicalize(&path) {
        let real_root = fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
        if !real.starts_with(&real_root) {
            return Err(step_error(format!(
                "forbidden path outside the build context: {name}"
            )));
        }
    }
    Ok(path)
}

/// The context paths a COPY source names: itself, or what its wildcard matches in its
/// directory.
fn expand_source(root: &Path, source: &str) -> Result<Vec<PathBuf>, EngineError> {
    let has_wildcard = source.contains(['*', '?', '[']);
    if !has_wildcard {
        let path = inside_context(root, source)?;
        if fs::symlink_metadata(&path).is_err() {
            return Err(step_error(format!(
                "COPY failed: file not found in build context or excluded by .dockerignore: stat {source}: file does not exist"
            )));
        }
        return Ok(vec![path]);
    }
    let (dir, pattern) = match source.rsplit_once('/') {
        Some((dir, pattern)) => (dir, pattern),
        None => ("", source),
    };
    if dir.contains(['*', '?', '[']) {
        return Err(step_error(format!(
            "wildcards are supported in the last path element only: {source}"
        )));
    }
    let dir = inside_context(root, dir)?;
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if glob_match(pattern, &name.to_string_lossy()) {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(step_error(format!(
            "COPY failed: no source files were specified: {source}"
        )));
    }
    Ok(found)
}

/// Go `filepath.Match` for one path element: `*`, `?`, `[...]` (with `^`/`!` and ranges).
fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => {
                let Some(close) = p.iter().skip(1).position(|&c| c == ']').map(|i| i + 1) else {
                    return !n.is_empty() && n[0] == '[' && go(&p[1..], &n[1..]);
                };
                let Some(&c) = n.first() else { return false };
                let class = &p[1..close];
                let (negate, class) = match class.first() {
                    Some('^' | '!') => (true, &class[1..]),
                    _ => (false, class),
                };
                let mut matched = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        matched |= class[i] <= c && c <= class[i + 2];
                        i += 3;
                    } else {
                        matched |= class[i] == c;
                        i += 1;
                    }
                }
                matched != negate && go(&p[close + 1..], &n[1..])
            }
            Some('\\') if p.len() > 1 => !n.is_empty() && n[0] == p[1] && go(&p[2..], &n[1..]),
            Some(&c) => !n.is_empty() && n[0] == c && go(&p[1..], &n[1..]),
        }
    }
    go(&p, &n)
}

/// Builds the layer tar of a COPY/ADD and a checksum of what it copies (names, modes,
/// owners, contents; not times), for the cache.
fn build_copy_layer(
    root: &Path,
    sources: &[String],
    dest: &str,
    plan: &CopyPlan,
) -> Result<(Vec<u8>, String), EngineError> {
    let mut paths = Vec::new();
    for source in sources {
        paths.extend(expand_source(root, source)?);
    }
    let into_dir = dest.ends_with('/') || paths.len() > 1;
    let mut writer = LayerWriter {
        builder: tar::Builder::new(Vec::new()),
        hasher: Sha256::new(),
        plan,
        written_dirs: Vec::new(),
    };
    let dest_dir = dest.trim_end_matches('/');
    let io_error = |e: io::Error| step_error(format!("COPY failed: {e}"));
    for path in &paths {
        let meta = fs::metadata(path).map_err(io_error)?;
        if meta.is_dir() {
            // A directory's contents go into the destination, not the directory itself.
            writer.parents(dest_dir).map_err(io_error)?;
            writer.add_dir(dest_dir, &meta).map_err(io_error)?;
            writer.add_tree(path, dest_dir).map_err(io_error)?;
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = if into_dir {
            format!("{dest_dir}/{name}")
        } else {
            dest_dir.to_owned()
        };
        if plan.unpack_archives && is_tar_archive(path) {
            writer.parents(&format!("{dest_dir}/x")).map_err(io_error)?;
            writer.add_archive(path, dest_dir).map_err(io_error)?;
            continue;
        }
        writer.parents(&target).map_err(io_error)?;
        writer.add_file(path, &target, &meta).map_err(io_error)?;
    }
    let checksum = format!("{:x}", writer.hasher.finalize_reset());
    let tar = writer.builder.into_inner().map_err(io_error)?;
    Ok((tar, checksum))
}

/// A file's contents, decompressed if it is gzip or zstd.
fn open_decompressed(path: &Path) -> io::Result<Box<dyn Read>> {
    let mut reader = io::BufReader::new(fs::File::open(path)?);
    let compression = crate::images::Compression::detect(reader.fill_buf()?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{} compression", e.0)))?;
    compression.decoder(reader)
}

/// Whether a context file is a tar archive ADD unpacks (plain, gzip or zstd).
fn is_tar_archive(path: &Path) -> bool {
    let Ok(mut reader) = open_decompressed(path) else {
        return false;
    };
    let mut head = [0u8; 512];
    read_full(&mut reader, &mut head).is_ok_and(|n| n == 512 && &head[257..262] == b"ustar")
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        let n = reader.read(&mut buf[total..])?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok(total)
}

struct LayerWriter<'a> {
    builder: tar::Builder<Vec<u8>>,
    hasher: Sha256,
    plan: &'a CopyPlan,
    written_dirs: Vec<String>,
}

impl LayerWriter<'_> {
    fn header(&mut self, name: &str, meta: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        let mode = match (self.plan.mode, kind) {
            (Some(mode), _) => mode,
            _ => meta.mode() & 0o7777,
        };
        header.set_mode(mode);
        header.set_uid(self.plan.owner.0);
        header.set_gid(self.plan.owner.1);
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        header.set_size(0);
        self.hasher
            .update(format!("{name}\0{mode:o}\0{:?}\0", self.plan.owner).as_bytes());
        header
    }

    /// Directory entries for every ancestor of `target` not written yet (root-owned 0755, as
    /// Docker creates missing parents).
    fn parents(&mut self, target: &str) -> io::Result<()> {
        let mut current = String::new();
        let parts: Vec<&str> = target.trim_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            current.push_str(part);
            current.push('/');
            if self.written_dirs.contains(&current) {
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_size(0);
            self.builder
                .append_data(&mut header, &current, io::empty())?;
            self.written_dirs.push(current.clone());
        }
        Ok(())
    }

    fn add_dir(&mut self, target: &str, meta: &fs::Metadata) -> io::Result<()> {
        let name = format!("{}/", target.trim_matches('/'));
        if name == "/" || self.written_dirs.contains(&name) {
            return Ok(());
        }
        let mut header = self.header(&name, meta, tar::EntryType::Directory);
        self.builder.append_data(&mut header, &name, io::empty())?;
        self.written_dirs.push(name);
        Ok(())
    }

    fn add_file(&mut self, path: &Path, target: &str, meta: &fs::Metadata) -> io::Result<()> {
        let name = target.trim_start_matches('/').to_owned();
        let link = fs::symlink_metadata(path)?;
        if link.file_type().is_symlink() {
            let to = fs::read_link(path)?;
            let mut header = self.header(&name, &link, tar::EntryType::Symlink);
            self.hasher.update(to.as_os_str().as_encoded_bytes());
            return self.builder.append_link(&mut header, &name, &to);
        }
        let mut header = self.header(&name, meta, tar::EntryType::Regular);
        let data = fs::read(path)?;
        self.hasher.update(&data);
        header.set_size(data.len() as u64);
        self.builder.append_data(&mut header, &name, &data[..])
    }

    fn add_tree(&mut self, dir: &Path, target: &str) -> io::Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let path = entry.path();
            let name = format!(
                "{}/{}",
                target.trim_end_matches('/'),
                entry.file_name().to_string_lossy()
            );
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                self.add_dir(&name, &meta)?;
                self.add_tree(&path, &name)?;
            } else if meta.is_file() || meta.file_type().is_symlink() {
                self.add_file(&path, &name, &meta)?;
            }
        }
        Ok(())
    }

    /// ADD of a local archive: its entries, under `target`.
    fn add_archive(&mut self, path: &Path, target: &str) -> io::Result<()> {
        let mut archive = tar::Archive::new(open_decompressed(path)?);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let relative = entry.path()?.into_owned();
            if relative
                .components()
                .any(|c| matches!(c, Component::ParentDir))
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the archive entry {} leaves the destination",
                        relative.display()
                    ),
                ));
            }
            let clean: PathBuf = relative
                .components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .collect();
            let name = format!("{}/{}", target.trim_matches('/'), clean.display())
                .trim_start_matches('/')
                .to_owned();
            let mut header = entry.header().clone();
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            self.hasher.update(name.as_bytes());
            self.hasher.update(&data);
            match header.entry_type() {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let to = entry
                        .link_name()?
                        .map(|l| l.into_owned())
                        .unwrap_or_default();
                    self.builder.append_link(&mut header, &name, to)?;
                }
                _ => self.builder.append_data(&mut header, &name, &data[..])?,
            }
        }
        Ok(())
    }
}

/// Applies one image layer to a directory on the host: entries written, whiteouts removing
/// what lower layers put there. Used to read a stage's files for `COPY --from`.
fn apply_layer(blob: &Path, target: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(open_decompressed(blob)?);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name {
            if name == ".wh..wh..opq" {
                if let Some(parent) = path.parent() {
                    let dir = target.join(parent);
                    if let Ok(entries) = fs::read_dir(&dir) {
                        for e in entries.flatten() {
                            let p = e.path();
                            let _ = if p.is_dir() && !p.is_symlink() {
                                fs::remove_dir_all(&p)
                            } else {
                                fs::remove_file(&p)
                            };
                        }
                    }
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let victim = target.join(path.with_file_name(hidden));
                let _ = if victim.is_dir() && !victim.is_symlink() {
                    fs::remove_dir_all(&victim)
                } else {
                    fs::remove_file(&victim)
                };
                continue;
            }
        }
        if matches!(
            entry.header().entry_type(),
            tar::EntryType::Char | tar::EntryType::Block
        ) {
            continue;
        }
        entry.unpack_in(target)?;
    }
    Ok(())
}

fn cache_key(parent: Option<&str>, created_by: &str, extra: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(parent.unwrap_or("scratch").as_bytes());
    hasher.update(b"\n");
    hasher.update(created_by.as_bytes());
    hasher.update(b"\n");
    hasher.update(extra.as_bytes());
    format!("{:x}", hasher.finalize())
}

/// Step keys to the images they produced, kept under the data root.
struct BuildCache {
    path: PathBuf,
    entries: BTreeMap<String, String>,
    disabled: bool,
}

impl BuildCache {
    fn open(data_root: &Path, disabled: bool) -> Self {
        let path = data_root.join(CACHE_FILE);
        let entries = fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            path,
            entries,
            disabled,
        }
    }

    /// The image a step with `key` produced, if it is still in the store.
    async fn lookup(&self, engine: &Arc<Engine>, key: &str) -> Option<String> {
        if self.disabled {
            return None;
        }
        let id = self.entries.get(key)?.clone();
        let store = Arc::clone(&engine.images);
        let present = blocking_image(move || store.resolve(&id)).await.ok()?;
        Some(present.id)
    }

    fn insert(&mut self, key: String, id: &str) {
        self.entries.insert(key, id.to_owned());
        let written = serde_json::to_vec(&self.entries)
            .map_err(io::Error::other)
            .and_then(|bytes| {
                let partial = self.path.with_extension("json.partial");
                fs::write(&partial, bytes)?;
                fs::rename(&partial, &self.path)
            });
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot store the build cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_dest_joins_the_workdir_and_keeps_a_trailing_slash() {
        assert_eq!(absolute_dest("/app", "bin/"), "/app/bin/");
        assert_eq!(absolute_dest("", "x"), "/x");
        assert_eq!(absolute_dest("/app", "/etc/../opt"), "/opt");
        assert_eq!(absolute_dest("/app", "."), "/app/");
    }

    #[test]
    fn apply_changes_sets_the_run_configuration_and_refuses_build_steps() {
        let mut config = ImageConfig::default();

        apply_changes(
            &mut config,
            &[
                "CMD [\"serve\"]".into(),
                "ENV A=1 B=\"two words\"".into(),
                "EXPOSE 80".into(),
            ],
        )
        .unwrap();
        let refused = apply_changes(&mut config, &["RUN rm -rf /".into()]).unwrap_err();

        assert_eq!(config.cmd().as_deref(), Some(&["serve".to_owned()][..]));
        assert_eq!(
            config.env().as_deref(),
            Some(&["A=1".to_owned(), "B=two words".to_owned()][..])
        );
        assert_eq!(
            config.exposed_ports().as_deref(),
            Some(&["80/tcp".to_owned()][..])
        );
        assert!(
            refused.to_string().contains("not a valid change command"),
            "{refused}"
        );
    }

    #[test]
    fn parse_owner_takes_ids_and_names_from_the_images_files() {
        let files: BTreeMap<String, String> = [
            (
                "etc/passwd".to_owned(),
                "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n".to_owned(),
            ),
            (
                "etc/group".to_owned(),
                "root:x:0:\nstaff:x:50:\n".to_owned(),
            ),
        ]
        .into_iter()
        .collect();

        assert_eq!(parse_owner("12:34", &files).unwrap(), (12, 34));
        assert_eq!(parse_owner("7", &files).unwrap(), (7, 7));
        assert_eq!(parse_owner("app", &files).unwrap(), (1000, 1001));
        assert_eq!(parse_owner("app:staff", &files).unwrap(), (1000, 50));
        assert!(parse_owner("ghost", &files)
            .unwrap_err()
            .to_string()
            .contains("unable to find user ghost"));
    }

    #[test]
    fn glob_match_follows_go_filepath_match() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(!glob_match("*.txt", "a.txt.bak"));
        assert!(glob_match("f?le", "file"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[!a-c]x", "bx"));
    }

    #[test]
    fn inside_context_refuses_paths_that_leave_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(inside_context(dir.path(), "../etc/passwd").is_err());
        assert!(inside_context(dir.path(), "a/../../x").is_err());
        assert_eq!(
            inside_context(dir.path(), "./a/b").unwrap(),
            dir.path().join("a/b")
        );
    }

    #[test]
    fn copy_layer_puts_a_directory_s_contents_under_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("src/sub")).unwrap();
        fs::write(dir.path().join("src/sub/a"), b"alpha").unwrap();
        fs::write(dir.path().join("top"), b"top").unwrap();
        let plan = CopyPlan {
            owner: (1000, 1000),
            mode: None,
            unpack_archives: false,
        };

        let (tar, sum) =
            build_copy_layer(dir.path(), &["src".into(), "top".into()], "/app/", &plan).unwrap();
        let (_, again) =
            build_copy_layer(dir.path(), &["src".into(), "top".into()], "/app/", &plan).unwrap();

        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<(String, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().uid().unwrap(),
                )
            })
            .collect();
        assert!(names.contains(&("app/sub/a".into(), 1000)), "{names:?}");
        assert!(names.contains(&("app/top".into(), 1000)), "{names:?}");
        assert_eq!(sum, again);
    }

    #[test]
    fn add_unpacks_a_gzip_tar_under_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let mut inner = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        header.set_cksum();
        inner
            .append_data(&mut header, "pkg/readme", &b"hello"[..])
            .unwrap();
        let tar = inner.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        fs::write(dir.path().join("pkg.tar.gz"), gz.finish().unwrap()).unwrap();
        let plan = CopyPlan {
            owner: (0, 0),
            mode: None,
            unpack_archives: true,
        };

        let (layer, _) =
            build_copy_layer(dir.path(), &["pkg.tar.gz".into()], "/opt/", &plan).unwrap();

        let mut archive = tar::Archive::new(&layer[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"opt/pkg/readme".to_owned()), "{names:?}");
    }

    #[test]
    fn copy_layer_of_a_missing_source_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let plan = CopyPlan {
            owner: (0, 0),
            mode: None,
            unpack_archives: false,
        };

        let err = build_copy_layer(dir.path(), &["nope".into()], "/x", &plan).unwrap_err();

        assert!(
            err.to_string().contains("file not found in build context"),
            "{err}"
        );
    }
}
