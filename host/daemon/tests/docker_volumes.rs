//! Tier 3: storage that outlives containers and VMs, driven with the stock docker CLI against
//! a real berthd: the guest's data disk, named and anonymous volumes, and `system df`/`prune`.
//!
//! Each scenario gets its own daemon (state, socket, VM, data disk); they run one at a time. A
//! scenario that cannot run here (no kernel built, no docker CLI) skips with the reason, and
//! fails under CI.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use berth_tests::daemon::TestDaemon;
use berth_tests::{daemon_or_skip, skip, text};

/// `text` without the terminal colour sequences berthd's log may carry.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The data disk berthd creates in its data directory.
fn data_disk(daemon: &TestDaemon) -> PathBuf {
    daemon.dir.path().join("data/vm/data.raw")
}

#[test]
fn writable_layer_survives_stop_and_a_berthd_and_vm_restart() {
    let mut daemon = daemon_or_skip!();
    daemon.load_busybox();
    // Prints what an earlier run left, then leaves a note for the next run.
    let script = "cat /root/note 2>/dev/null; echo kept > /root/note";
    let first = daemon.docker_ok(&["run", "--name", "keeper", "busybox", "sh", "-c", script]);

    // berthd restarts over the same data dir: a new VM boots from the same data disk.
    daemon.restart();
    let second = daemon.docker_ok(&["start", "-a", "keeper"]);

    assert_eq!(first, "");
    assert_eq!(second, "kept\n", "berthd log:\n{}", daemon.log());
    let disk = std::fs::metadata(data_disk(&daemon)).expect("the data disk exists");
    assert!(disk.blocks() * 512 < disk.len(), "the data disk is sparse");
}

#[test]
fn layers_on_the_data_disk_are_not_uploaded_again_after_a_restart() {
    let mut daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&["run", "--rm", "busybox", "true"]);

    daemon.restart();
    daemon.docker_ok(&["run", "--rm", "busybox", "true"]);

    let log = strip_ansi(&daemon.log());
    let reconciled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("guest storage reconciled"))
        .collect();
    assert_eq!(reconciled.len(), 2, "{log}");
    assert!(reconciled[0].contains("layers=0"), "{log}");
    assert!(reconciled[1].contains("layers=1"), "{log}");
    assert!(reconciled[1].contains("persistent=true"), "{log}");
}

#[test]
fn volume_create_ls_inspect_rm_in_docker_shapes() {
    let daemon = daemon_or_skip!();

    let created = daemon.docker_ok(&["volume", "create", "--label", "team=a", "data"]);
    let listed = daemon.docker_ok(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    let inspected = daemon.docker_ok(&[
        "volume",
        "inspect",
        "--format",
        "{{.Name}} {{.Labels.team}} {{.Scope}}",
        "data",
    ]);
    daemon.docker_ok(&["volume", "rm", "data"]);
    let missing = daemon.docker(&["volume", "inspect", "data"]);

    assert_eq!(created, "data\n");
    assert_eq!(listed, "local data\n");
    assert_eq!(inspected, "data a local\n");
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("no such volume"),
        "{}",
        text(&missing.stderr)
    );
}

#[test]
fn volume_invalid_name_is_refused_with_dockerd_message() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();

    let create = daemon.docker(&["volume", "create", "bad$name"]);
    let run = daemon.docker(&["run", "--rm", "-v", "bad$name:/x", "busybox", "true"]);

    for output in [&create, &run] {
        assert!(!output.status.success());
        assert!(
            text(&output.stderr).contains("includes invalid characters for a local volume name"),
            "{}",
            text(&output.stderr)
        );
    }
    assert_eq!(daemon.docker_ok(&["volume", "ls", "-q"]), "");
}

#[test]
fn named_volume_keeps_data_across_rm_and_a_vm_restart_and_refuses_rm_in_use() {
    let mut daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&[
        "run",
        "--name",
        "writer",
        "-v",
        "keep:/data",
        "busybox",
        "sh",
        "-c",
        "echo survived > /data/f",
    ]);

    let in_use = daemon.docker(&["volume", "rm", "keep"]);
    daemon.docker_ok(&["rm", "writer"]);
    daemon.restart();
    let read = daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "keep:/data",
        "busybox",
        "cat",
        "/data/f",
    ]);

    assert!(!in_use.status.success());
    assert!(
        text(&in_use.stderr).contains("volume is in use"),
        "{}",
        text(&in_use.stderr)
    );
    assert_eq!(read, "survived\n", "berthd log:\n{}", daemon.log());
}

#[test]
fn fresh_volume_is_filled_with_the_image_content_and_nocopy_is_not() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();

    // A fresh volume on /bin: without copy-up the container would find no shell at all.
    let seeded = daemon.docker_ok(&["run", "--rm", "-v", "seeded:/bin", "busybox", "true"]);
    let listed = daemon.docker_ok(&["run", "--rm", "-v", "seeded:/x", "busybox", "ls", "/x"]);
    // With nocopy the volume keeps none of the image's /etc (only what the runtime mounts).
    let bare = daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "bare:/etc:nocopy",
        "busybox",
        "ls",
        "-A",
        "/etc",
    ]);
    let copied = daemon.docker_ok(&["run", "--rm", "-v", "full:/etc", "busybox", "ls", "/etc"]);
    let empty = daemon.docker_ok(&["run", "--rm", "-v", "other:/x", "busybox", "ls", "-A", "/x"]);

    assert_eq!(seeded, "");
    assert!(listed.lines().any(|l| l == "busybox"), "{listed}");
    assert!(!bare.lines().any(|l| l == "passwd"), "{bare}");
    assert!(copied.lines().any(|l| l == "passwd"), "{copied}");
    assert_eq!(empty, "");
}

#[test]
fn anonymous_volume_is_shared_by_volumes_from_and_removed_by_rm_v() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&[
        "run",
        "--name",
        "owner",
        "-v",
        "/cache",
        "busybox",
        "sh",
        "-c",
        "echo hi > /cache/x",
    ]);
    let anonymous = daemon.docker_ok(&["volume", "ls", "-q"]);

    let shared = daemon.docker_ok(&[
        "run",
        "--rm",
        "--volumes-from",
        "owner:ro",
        "busybox",
        "cat",
        "/cache/x",
    ]);
    let read_only = daemon.docker(&[
        "run",
        "--rm",
        "--volumes-from",
        "owner:ro",
        "busybox",
        "touch",
        "/cache/y",
    ]);
    daemon.docker_ok(&["rm", "-v", "owner"]);
    let after = daemon.docker_ok(&["volume", "ls", "-q"]);

    assert_eq!(anonymous.trim().len(), 64, "{anonymous}");
    assert_eq!(shared, "hi\n");
    assert!(!read_only.status.success());
    assert!(
        text(&read_only.stderr).contains("Read-only file system"),
        "{}",
        text(&read_only.stderr)
    );
    assert_eq!(after, "");
}

#[test]
fn volume_prune_frees_space_in_the_host_disk_file() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    // 48 MiB of incompressible data (urandom: zeroes would never be allocated).
    daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "big:/data",
        "busybox",
        "dd",
        "if=/dev/urandom",
        "of=/data/blob",
        "bs=1M",
        "count=48",
    ]);
    let disk = data_disk(&daemon);
    let allocated = || std::fs::metadata(&disk).expect("the data disk").blocks() * 512;
    let before = allocated();

    let pruned = daemon.docker_ok(&["volume", "prune", "--all", "--force"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while allocated() + (40 << 20) > before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let after = allocated();

    assert!(pruned.contains("big"), "{pruned}");
    assert!(
        after + (40 << 20) <= before,
        "allocated {before} before, {after} after the prune"
    );
}

/// A scratch directory under the system temp dir, one of berthd's default shared roots.
fn shared_scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("berth-bind-")
        .tempdir_in(std::env::temp_dir())
        .expect("a temp dir")
}

#[test]
fn bind_mount_round_trips_files_and_honours_read_only() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let dir = shared_scratch();
    std::fs::write(dir.path().join("from-host"), "host says hi\n").unwrap();
    let bind = format!("{}:/work", dir.path().display());
    let bind_ro = format!("{bind}:ro");

    let read = daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &bind,
        "busybox",
        "cat",
        "/work/from-host",
    ]);
    daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &bind,
        "busybox",
        "sh",
        "-c",
        "echo container says hi > /work/from-ctr",
    ]);
    let mount = format!(
        "type=bind,source={},target=/work,readonly",
        dir.path().display()
    );
    let refused = daemon.docker(&[
        "run", "--rm", "--mount", &mount, "busybox", "touch", "/work/x",
    ]);
    let refused_v = daemon.docker(&["run", "--rm", "-v", &bind_ro, "busybox", "touch", "/work/x"]);

    assert_eq!(read, "host says hi\n", "berthd log:\n{}", daemon.log());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("from-ctr")).unwrap(),
        "container says hi\n"
    );
    for output in [&refused, &refused_v] {
        assert!(!output.status.success());
        assert!(
            text(&output.stderr).contains("Read-only file system"),
            "{}",
            text(&output.stderr)
        );
    }
    assert!(!dir.path().join("x").exists());
}

#[test]
fn bind_mount_files_created_in_a_container_belong_to_the_share_owner() {
    // The owner berthd maps container users to; not root, so the mapping is visible.
    const OWNER: u32 = 4321;
    let daemon = match TestDaemon::start_with_env(
        std::path::Path::new(env!("CARGO_BIN_EXE_berthd")),
        &[("BERTH_SHARE_OWNER", "4321:4321")],
    ) {
        Ok(daemon) => daemon,
        Err(reason) => return skip(&reason),
    };
    daemon.load_busybox();
    let dir = shared_scratch();
    std::fs::write(dir.path().join("mine"), "x").unwrap();
    // The share's user owns their directories, as a home directory's owner does.
    std::os::unix::fs::chown(dir.path(), Some(OWNER), Some(OWNER)).unwrap();
    std::os::unix::fs::chown(dir.path().join("mine"), Some(OWNER), Some(OWNER)).unwrap();
    let bind = format!("{}:/work", dir.path().display());

    daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &bind,
        "busybox",
        "sh",
        "-c",
        "touch /work/by-root && mkdir /work/d && chown 1000:1000 /work/d",
    ]);
    let seen = daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &bind,
        "busybox",
        "stat",
        "-c",
        "%u:%g",
        "/work/mine",
    ]);

    let meta = std::fs::metadata(dir.path().join("by-root")).expect("created on the host");
    assert_eq!((meta.uid(), meta.gid()), (OWNER, OWNER));
    let meta = std::fs::metadata(dir.path().join("d")).expect("created on the host");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (OWNER, OWNER),
        "other guest ids are squashed"
    );
    assert_eq!(
        seen, "0:0\n",
        "the owner's files are root's in the container"
    );
}

#[test]
fn bind_mount_bad_sources_are_refused_with_clear_messages() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let dir = shared_scratch();
    // A symlink inside the share that points outside it.
    std::os::unix::fs::symlink("/etc", dir.path().join("escape")).unwrap();
    let missing = format!("type=bind,source={}/nope,target=/x", dir.path().display());
    let outside = "/opt/berth-not-shared:/x".to_owned();
    let dot_dot = format!("{}/../../etc:/x", dir.path().display());
    let via_link = format!("{}/escape:/x", dir.path().display());

    let no_source = daemon.docker(&["run", "--rm", "--mount", &missing, "busybox", "true"]);
    let not_shared = daemon.docker(&["run", "--rm", "-v", &outside, "busybox", "true"]);
    let escaped = daemon.docker(&["run", "--rm", "-v", &dot_dot, "busybox", "true"]);
    let linked = daemon.docker(&["run", "--rm", "-v", &via_link, "busybox", "true"]);
    // Mounting the share itself, the symlink resolves inside the container, never on the host.
    let share = format!("{}:/work", dir.path().display());
    let through = daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        &share,
        "busybox",
        "cat",
        "/work/escape/hostname",
    ]);

    assert!(
        text(&no_source.stderr).contains("bind source path does not exist"),
        "{}",
        text(&no_source.stderr)
    );
    for output in [&not_shared, &escaped, &linked] {
        assert!(!output.status.success());
        assert!(
            text(&output.stderr).contains("is not shared from the host")
                && text(&output.stderr).contains("BERTH_SHARES"),
            "{}",
            text(&output.stderr)
        );
    }
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    assert_ne!(
        through, host_hostname,
        "the container's own /etc, not the host's"
    );
    assert_eq!(
        daemon.docker_ok(&["ps", "-aq"]),
        "",
        "nothing was left behind"
    );
}

/// Builds `tests/images/inotify-probe.c` statically into `dir` (Debian's busybox-static has no
/// `inotifyd`); the test bind-mounts it into the container.
fn build_inotify_probe(dir: &std::path::Path) -> Result<PathBuf, String> {
    let source =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/inotify-probe.c");
    let output = dir.join("inotify-probe");
    let status = std::process::Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&output)
        .arg(&source)
        .status()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if status.success() {
        Ok(output)
    } else {
        Err(format!("cc failed on {} ({status})", source.display()))
    }
}

#[test]
fn host_edit_wakes_inotify_in_a_container_within_a_second() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let tools = shared_scratch();
    let probe = match build_inotify_probe(tools.path()) {
        Ok(probe) => probe,
        Err(reason) => return skip(&reason),
    };
    let dir = shared_scratch();
    let watched = dir.path().join("watched.txt");
    std::fs::write(&watched, "v1\n").unwrap();
    let bind = format!("{}:/work", dir.path().display());
    let probe_bind = format!("{}:/probe:ro", probe.display());
    daemon.docker_ok(&[
        "run",
        "-d",
        "--name",
        "watcher",
        "-v",
        &bind,
        "-v",
        &probe_bind,
        "busybox",
        "/probe",
        "/work/watched.txt",
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !daemon.docker_ok(&["logs", "watcher"]).contains("watching") {
        assert!(
            std::time::Instant::now() < deadline,
            "the probe did not start:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let edited = std::time::Instant::now();
    std::fs::write(&watched, "v2\n").unwrap();
    let mut logs = String::new();
    while !logs.contains("event") && edited.elapsed() < std::time::Duration::from_secs(10) {
        logs = daemon.docker_ok(&["logs", "watcher"]);
    }
    let latency = edited.elapsed();
    daemon.docker_ok(&["rm", "-f", "watcher"]);

    assert!(
        logs.contains("event"),
        "no event: {logs:?}\n{}",
        daemon.log()
    );
    eprintln!(
        "host edit seen in the container after {} ms",
        latency.as_millis()
    );
    assert!(
        latency < std::time::Duration::from_secs(1),
        "took {latency:?}"
    );
}

#[test]
fn system_df_reports_guest_sizes_and_rmi_removes_unused_guest_layers() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&[
        "run", "--name", "sized", "-v", "sized:/data", "busybox", "sh", "-c",
        "dd if=/dev/urandom of=/data/v bs=1M count=8 && dd if=/dev/urandom of=/root/w bs=1M count=4",
    ]);

    let df = daemon.docker_ok(&["system", "df", "--format", "{{.Type}}={{.Size}}"]);
    daemon.docker_ok(&["rm", "-v", "sized"]);
    daemon.docker_ok(&["volume", "rm", "sized"]);
    daemon.docker_ok(&["rmi", "busybox"]);

    let sizes: std::collections::HashMap<&str, &str> =
        df.lines().filter_map(|l| l.split_once('=')).collect();
    assert!(sizes["Local Volumes"].starts_with("8."), "{df}");
    assert!(sizes["Containers"].starts_with("4."), "{df}");
    let log = strip_ansi(&daemon.log());
    assert!(
        log.contains("removed unused layers from the guest count=1"),
        "{log}"
    );
}

#[test]
fn run_rm_removes_anonymous_volumes_but_keeps_named_ones() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();

    daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "/anon",
        "-v",
        "named:/named",
        "busybox",
        "true",
    ]);

    assert_eq!(daemon.docker_ok(&["volume", "ls", "-q"]), "named\n");
}

#[test]
fn run_rm_that_cannot_start_leaves_no_container_and_no_anonymous_volume() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();

    let started = std::time::Instant::now();
    let failed = daemon.docker(&["run", "--rm", "-v", "/anon", "busybox", "/no/such/program"]);

    assert!(!failed.status.success());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "docker run waited for a removal that never came"
    );
    assert_eq!(daemon.docker_ok(&["ps", "-aq"]), "");
    assert_eq!(daemon.docker_ok(&["volume", "ls", "-q"]), "");
}

#[test]
fn system_prune_with_volumes_reclaims_unused_volumes_and_layers() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    // As with dockerd (API 1.42+), only anonymous volumes go; named ones stay.
    daemon.docker_ok(&[
        "run",
        "--name",
        "gone",
        "-v",
        "/junk",
        "-v",
        "kept:/kept",
        "busybox",
        "true",
    ]);

    let pruned = daemon.docker(&["system", "prune", "--all", "--volumes", "--force"]);

    assert!(pruned.status.success(), "{}", text(&pruned.stderr));
    assert_eq!(daemon.docker_ok(&["ps", "-aq"]), "");
    assert_eq!(daemon.docker_ok(&["volume", "ls", "-q"]), "kept\n");
    assert_eq!(daemon.docker_ok(&["images", "-q"]), "");
}

#[test]
fn bind_mount_missing_v_source_is_created_as_dockerd_does() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let dir = shared_scratch();
    let fresh = dir.path().join("fresh/sub");
    let bind = format!("{}:/x", fresh.display());

    daemon.docker_ok(&["run", "--rm", "-v", &bind, "busybox", "touch", "/x/made"]);

    assert!(fresh.join("made").is_file());
}

#[test]
fn volume_removed_while_the_vm_is_down_comes_back_empty_under_the_same_name() {
    let mut daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "reused:/data",
        "busybox",
        "sh",
        "-c",
        "echo old > /data/f",
    ]);
    // A fresh berthd has no VM running yet.
    daemon.restart();

    daemon.docker_ok(&["volume", "rm", "reused"]);
    let listed = daemon.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "reused:/data",
        "busybox",
        "ls",
        "-A",
        "/data",
    ]);

    assert_eq!(listed, "");
}
