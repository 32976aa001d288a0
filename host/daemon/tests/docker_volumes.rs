//! Tier 3: storage that outlives containers and VMs, driven with the stock docker CLI against
//! a real berthd: the guest's data disk, named and anonymous volumes, and `system df`/`prune`.
//!
//! Each scenario gets its own daemon (state, socket, VM, data disk); they run one at a time. A
//! scenario that cannot run here (no kernel built, no docker CLI) skips with the reason, and
//! fails under CI.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use berth_tests::daemon::TestDaemon;
use berth_tests::skip;

macro_rules! daemon_or_skip {
    () => {
        match TestDaemon::start(std::path::Path::new(env!("CARGO_BIN_EXE_berthd"))) {
            Ok(daemon) => daemon,
            Err(reason) => return skip(&reason),
        }
    };
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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

    let log = daemon.log();
    let reconciled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("guest storage reconciled"))
        .collect();
    assert_eq!(reconciled.len(), 2, "{log}");
    assert!(reconciled[0].contains("layers=0"), "{log}");
    assert!(reconciled[1].contains("layers=1"), "{log}");
    assert!(reconciled[1].contains("persistent=true"), "{log}");
}
