//! `berth bench container`: one container's create, start and wait of `true` through the agent
//! in a warm VM, beside `crun run` of the same root filesystem natively on the host.
//!
//! The host's cgroup hierarchy here is hybrid, which crun refuses; the anchor runs crun with
//! `--cgroup-manager=disabled` in a private mount namespace with cgroup2 mounted at
//! `/sys/fs/cgroup` (`unshare -m`), so it sets up namespaces, mounts and the process as it
//! would, minus cgroup writes. That setup cost is part of every anchor run, as the agent's
//! cgroup setup is part of ours.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use agent_protocol::defaults::docker_default_spec;
use agent_protocol::{ContainerConfig, CreateContainer, StreamHeader, StreamKind, UnpackLayer};
use anyhow::{bail, Context};
use berth_engine::agent_client::open_stream_vsock;
use berth_engine::vm::error_chain;
use berth_engine::{select_backend, Vm};

use crate::bench::{median, record_section};
use crate::{vm_config, VmSizeArgs};

const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(
    runs: usize,
    layer: &Path,
    size: &VmSizeArgs,
    crun: &Path,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let layer_bytes = fs::read(layer).with_context(|| format!("reading {}", layer.display()))?;
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let bundle = prepare_crun_bundle(work.path(), layer, crun)?;
    let choice = select_backend();
    eprintln!("bench container: {}", choice.reason);
    let config = vm_config(size, work.path().join("vm"));
    let uds = config.vsock_socket();
    let (vm, mut agent) = Vm::start(choice.backend.as_ref(), &config)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let rootfs = PathBuf::from("/var/lib/berth/bench-rootfs");
    let header = |id: &str, kind| StreamHeader {
        container_id: id.into(),
        exec_id: None,
        kind,
    };
    let mut upload = open_stream_vsock(
        &uds,
        &header("bench-layer", StreamKind::LayerUpload),
        STREAM_TIMEOUT,
    )
    .context("opening the layer upload")?;
    let writer = thread::spawn(move || {
        let written = upload.write_all(&layer_bytes);
        let _ = upload.shutdown(std::net::Shutdown::Write);
        written
    });
    agent
        .unpack_layer(UnpackLayer {
            upload_id: "bench-layer".into(),
            dir: rootfs.clone(),
            allow_devices: false,
        })
        .context("unpacking the layer in the guest")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the upload thread panicked"))?
        .context("uploading the layer")?;

    let mut berth = Vec::with_capacity(runs);
    let mut anchor = Vec::with_capacity(runs);
    for run in 0..runs {
        let id = format!("bench-{run}");
        let spec = docker_default_spec(vec!["true".into()]).context("building the spec")?;
        let started = Instant::now();
        agent
            .create_container(CreateContainer {
                id: id.clone(),
                config: Box::new(ContainerConfig {
                    spec,
                    rootfs: rootfs.clone(),
                    overlay: None,
                    cgroup_parent: PathBuf::from("berth-bench"),
                    hostname_file: None,
                    hosts_file: None,
                    resolv_conf_file: None,
                    seccomp_unconfined: false,
                    network: None,
                }),
                stdin: false,
                tty: false,
            })
            .context("create")?;
        let drains: Vec<_> = [StreamKind::Stdout, StreamKind::Stderr]
            .into_iter()
            .map(|kind| {
                let mut stream = open_stream_vsock(&uds, &header(&id, kind), STREAM_TIMEOUT)?;
                Ok(thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = stream.read_to_end(&mut sink);
                }))
            })
            .collect::<Result<_, berth_engine::AgentClientError>>()
            .context("attaching output")?;
        agent.start_container(&id).context("start")?;
        let exit = agent.wait_container(&id).context("wait")?;
        berth.push(started.elapsed());
        for drain in drains {
            let _ = drain.join();
        }
        agent.delete_container(&id).context("delete")?;
        if exit.code != 0 {
            bail!("`true` in the guest exited with {}", exit.code);
        }
        anchor.push(crun_once(crun, &bundle, &format!("bench-anchor-{run}"))?);
        eprintln!(
            "run {}/{runs}: berth {} ms, crun {} ms",
            run + 1,
            berth[run].as_millis(),
            anchor[run].as_millis()
        );
    }
    drop(agent);
    vm.stop(Duration::from_secs(30));
    let berth = median(&mut berth);
    let anchor = median(&mut anchor);
    let report = format!(
        "Command: `berth bench container --runs {runs} --layer <busybox layer.tar> --record docs/benchmarks.md`\n\n\
         | figure | time |\n|---|---|\n\
         | create + start + wait of `true` through the agent, warm VM, median of {runs} | {} ms |\n\
         | anchor: `crun run` of the same rootfs natively on the host (private mount ns, cgroup2, no cgroup manager), median of {runs} | {} ms |\n\
         | ratio berth / anchor | {:.2} |\n\n\
         Accelerator: {:?}; guest {} MiB, {} vCPUs.",
        berth.as_millis(),
        anchor.as_millis(),
        berth.as_secs_f64() / anchor.as_secs_f64().max(1e-9),
        choice.backend.accel(),
        size.memory,
        size.cpus,
    );
    println!("{report}");
    if let Some(path) = record {
        record_section(path, "container", &report)?;
        eprintln!("recorded in {}", path.display());
    }
    Ok(())
}

/// An OCI bundle for crun with the layer unpacked as its root, running `true`.
fn prepare_crun_bundle(work: &Path, layer: &Path, crun: &Path) -> anyhow::Result<PathBuf> {
    let bundle = work.join("crun-bundle");
    fs::create_dir_all(bundle.join("rootfs")).context("creating the bundle")?;
    let status = Command::new("tar")
        .arg("-xf")
        .arg(layer)
        .arg("-C")
        .arg(bundle.join("rootfs"))
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("unpacking {} failed", layer.display());
    }
    let status = Command::new(crun)
        .arg("spec")
        .current_dir(&bundle)
        .status()
        .with_context(|| format!("running {} spec", crun.display()))?;
    if !status.success() {
        bail!("crun spec failed");
    }
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).context("reading config.json")?)
            .context("parsing config.json")?;
    spec["process"]["terminal"] = serde_json::Value::Bool(false);
    spec["process"]["args"] = serde_json::json!(["true"]);
    fs::write(
        &path,
        serde_json::to_vec_pretty(&spec).context("encoding config.json")?,
    )
    .context("writing config.json")?;
    Ok(bundle)
}

fn crun_once(crun: &Path, bundle: &Path, id: &str) -> anyhow::Result<Duration> {
    let script = format!(
        "mount -t cgroup2 none /sys/fs/cgroup && exec {} --cgroup-manager=disabled run {id}",
        crun.display()
    );
    let started = Instant::now();
    let status = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .current_dir(bundle)
        .stdin(Stdio::null())
        .status()
        .context("running unshare")?;
    let elapsed = started.elapsed();
    if !status.success() {
        bail!("crun run failed: {status}");
    }
    Ok(elapsed)
}
