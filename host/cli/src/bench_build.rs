//! `berth bench build`: the time of `docker build` of a 20-step Dockerfile through berthd,
//! cold (`--no-cache`) and served from the cache, against the same work done by a shell script
//! natively on the host (the RUN commands and the copies, in a scratch directory).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_engine::vm::select_backend;

use crate::bench::{docker, median, record_section, start_daemon, RunTools};

/// The RUN commands of the benchmark's Dockerfile; each also runs natively in the anchor.
const RUNS: [&str; 8] = [
    "mkdir -p /data && echo start > /data/log",
    "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i >> /data/log; done",
    "cp -r /app /data/app-copy",
    "seq 1 2000 > /data/numbers",
    "sort -r /data/numbers > /data/sorted",
    "tar -cf /data/app.tar /data/app-copy",
    "rm -rf /data/app-copy",
    "wc -l /data/sorted > /data/count",
];

/// Writes the context: a Dockerfile of 20 steps (FROM, 8 RUN, 4 COPY, 7 configuration steps)
/// and the files it copies.
fn write_context(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir.join("files")).context("creating the context")?;
    for i in 0..4 {
        let body: String = (0..2000).map(|n| format!("file {i} line {n}\n")).collect();
        fs::write(dir.join(format!("files/f{i}.txt")), body).context("writing a context file")?;
    }
    let mut steps = vec!["FROM busybox".to_owned()];
    steps.push("ENV APP=/app".into());
    steps.push("WORKDIR /app".into());
    for i in 0..4 {
        steps.push(format!("COPY files/f{i}.txt /app/"));
    }
    for run in RUNS {
        steps.push(format!("RUN {run}"));
    }
    steps.push("LABEL bench=build".into());
    steps.push("EXPOSE 8080".into());
    steps.push("USER 1000".into());
    steps.push("ENTRYPOINT [\"sh\", \"-c\"]".into());
    steps.push("CMD [\"cat /data/count\"]".into());
    if steps.len() != 20 {
        bail!("the benchmark Dockerfile has {} steps, not 20", steps.len());
    }
    fs::write(dir.join("Dockerfile"), steps.join("\n") + "\n").context("writing the Dockerfile")
}

/// The anchor: the same copies and commands natively, under a scratch root.
fn native_build(busybox: &Path, context: &Path, root: &Path) -> anyhow::Result<Duration> {
    let _ = fs::remove_dir_all(root);
    fs::create_dir_all(root.join("app")).context("creating the anchor root")?;
    let mut script = String::from("set -e\n");
    for i in 0..4 {
        script.push_str(&format!(
            "cp {ctx}/files/f{i}.txt {root}/app/\n",
            ctx = context.display(),
            root = root.display()
        ));
    }
    for run in RUNS {
        let native = run
            .replace(" /data", &format!(" {}/data", root.display()))
            .replace(" /app", &format!(" {}/app", root.display()));
        script.push_str(&native);
        script.push('\n');
    }
    let started = Instant::now();
    let status = Command::new(busybox)
        .args(["sh", "-c", &script])
        .status()
        .with_context(|| format!("running {}", busybox.display()))?;
    let took = started.elapsed();
    if !status.success() {
        bail!("the native anchor script failed: {status}");
    }
    Ok(took)
}

pub fn run(
    runs: usize,
    archive: &Path,
    tools: &RunTools,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let context = work.path().join("context");
    write_context(&context)?;
    let log = fs::File::create(work.path().join("berthd.log")).context("creating the log")?;
    let daemon = start_daemon(tools, work.path(), &log)?;
    let socket = daemon.socket.clone();
    docker(
        tools,
        &socket,
        &["load", "-i", &archive.display().to_string()],
    )?;
    // Boots the VM, so the first cold build does not pay for it.
    docker(tools, &socket, &["run", "--rm", "busybox", "true"])?;
    let ctx = context.display().to_string();
    let (mut cold, mut cached, mut native) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let started = Instant::now();
        docker(
            tools,
            &socket,
            &["build", "--no-cache", "-q", "-t", "bench:build", &ctx],
        )?;
        cold.push(started.elapsed());
        let started = Instant::now();
        docker(tools, &socket, &["build", "-q", "-t", "bench:build", &ctx])?;
        cached.push(started.elapsed());
        native.push(native_build(
            &tools.busybox,
            &context,
            &work.path().join("native"),
        )?);
        eprintln!(
            "build {}/{runs}: cold {} ms, cached {} ms, native {} ms",
            run + 1,
            cold[run].as_millis(),
            cached[run].as_millis(),
            native[run].as_millis()
        );
    }
    let output = docker(tools, &socket, &["run", "--rm", "bench:build"])?;
    if output.trim() != "2000 /data/sorted" {
        bail!("the built image printed {output:?}");
    }
    drop(daemon);
    let (cold, cached, native) = (median(&mut cold), median(&mut cached), median(&mut native));
    let ms = |d: Duration| d.as_millis();
    let markdown = format!(
        "Command: `berth bench build --runs {runs} --archive <busybox.tar> --record docs/benchmarks.md`\n\n\
         | figure | berth | anchor | ratio |\n|---|---|---|---|\n\
         | `docker build` of a 20-step Dockerfile (8 RUN, 4 COPY), cold (`--no-cache`), median of {runs} | {cold} ms | {native} ms (the same RUN commands and copies as a native shell script) | {ratio:.0}x |\n\
         | the same build again, every step from the cache | {cached} ms | | |\n\n\
         Accelerator: {accel:?}. Each RUN is a container started and stopped in the VM, and its \
         writable layer committed; under TCG every guest step is inflated.",
        cold = ms(cold),
        cached = ms(cached),
        native = ms(native),
        ratio = cold.as_secs_f64() / native.as_secs_f64().max(1e-9),
        accel = select_backend().backend.accel(),
    );
    println!("{markdown}");
    if let Some(path) = record {
        record_section(path, "build", &markdown)?;
        eprintln!("recorded in {}", path.display());
    }
    Ok(())
}
