//! `berth bench vsock`: throughput of the host⇄guest transport, host to guest and guest to
//! host, in writes of 64 KiB.
//!
//! The guest end is the agent's transport probes ([`StreamKind::Discard`] swallows and counts,
//! [`StreamKind::Zeros`] sends), so nothing but the vsock path is timed: the host's hybrid
//! socket, the VMM's vsock device (berth-vmm's own, or berth-vsock behind QEMU's
//! vhost-user-vsock), the guest kernel's vsock and the agent's reads or writes. Each side boots
//! a fresh VM of its backend; under the vmm backend QEMU microvm on the same KVM runs the same
//! guest beside berth-vmm. The anchor is the same transfers over a unix socket pair on the
//! host, against a thread playing the agent's part, in the same run.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use agent_protocol::{serve_probe, StreamHeader, StreamKind, PROBE_COUNT_LEN, PROBE_WRITE_LEN};
use anyhow::{bail, Context};
use berth_engine::agent_client::open_stream_vsock;
use berth_engine::vm::qemu::{Accel, QemuBackend};
use berth_engine::vm::{error_chain, BackendKind, VmBackend};
use berth_engine::{select_backend, Vm};

use crate::bench::{median, record_section};
use crate::{vm_config, VmSizeArgs};

/// How long opening a probe stream may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// The two directions, in report order.
const DIRECTIONS: [Direction; 2] = [Direction::ToGuest, Direction::FromGuest];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToGuest,
    FromGuest,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Self::ToGuest => "host → guest",
            Self::FromGuest => "guest → host",
        }
    }

    /// The probe the agent serves for this direction.
    fn probe(self, bytes: u64) -> StreamKind {
        match self {
            Self::ToGuest => StreamKind::Discard,
            Self::FromGuest => StreamKind::Zeros(bytes),
        }
    }
}

/// One column of the report: a name and the median MB/s of each direction.
#[derive(Debug)]
struct Column {
    name: String,
    mb_per_s: [f64; 2],
}

pub fn run(runs: usize, mib: u64, size: &VmSizeArgs, record: Option<&Path>) -> anyhow::Result<()> {
    if runs == 0 || mib == 0 {
        bail!("--runs and --mib must be at least 1");
    }
    let bytes = mib * 1024 * 1024;
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let choice = select_backend();
    eprintln!("bench vsock: {}", choice.reason);
    // Figures on berth-vmm (the KVM box) and on QEMU alone are kept apart.
    let section = match choice.backend.kind() {
        BackendKind::Vmm => "vmm-vsock",
        BackendKind::Qemu => "vsock",
    };
    let mut sides: Vec<(String, Box<dyn VmBackend + Send + Sync>)> = Vec::new();
    if choice.backend.kind() == BackendKind::Vmm {
        sides.push(("berth-vmm".into(), choice.backend));
        sides.push((
            "QEMU microvm".into(),
            Box::new(QemuBackend::new(Accel::Kvm)),
        ));
    } else {
        let name = format!("QEMU microvm ({:?})", choice.backend.accel());
        sides.push((name, choice.backend));
    }

    let mut columns = Vec::new();
    for (index, (name, backend)) in sides.iter().enumerate() {
        let config = vm_config(size, work.path().join(format!("vm-{index}")));
        let (vm, _agent) =
            Vm::start(backend.as_ref(), &config).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        let uds = config.vsock_socket();
        let measured = measure(name, runs, bytes, |direction| {
            let header = StreamHeader {
                container_id: String::new(),
                exec_id: None,
                kind: direction.probe(bytes),
            };
            open_stream_vsock(&uds, &header, STREAM_TIMEOUT)
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        });
        vm.stop(Duration::from_secs(60));
        columns.push(measured?);
    }
    let native = measure("unix socket pair", runs, bytes, |direction| {
        native_peer(direction.probe(bytes))
    })?;

    let markdown = report(&columns, &native, runs, mib, size);
    println!("{markdown}");
    if let Some(path) = record {
        record_section(path, section, &markdown)?;
        eprintln!("recorded in {}", path.display());
    }
    Ok(())
}

/// `runs` transfers of `bytes` each way over streams `open` connects, interleaving the
/// directions; the median of each.
fn measure(
    name: &str,
    runs: usize,
    bytes: u64,
    mut open: impl FnMut(Direction) -> anyhow::Result<UnixStream>,
) -> anyhow::Result<Column> {
    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for (slot, direction) in DIRECTIONS.into_iter().enumerate() {
            let mut stream = open(direction)?;
            let elapsed = match direction {
                Direction::ToGuest => send(&mut stream, bytes),
                Direction::FromGuest => receive(&mut stream, bytes),
            }
            .with_context(|| format!("{name}: {} transfer", direction.label()))?;
            samples[slot].push(elapsed);
        }
        eprintln!(
            "{name}, run {}/{runs}: {:.1} MB/s to the guest, {:.1} MB/s from it",
            run + 1,
            mb_per_s(bytes, samples[0][run]),
            mb_per_s(bytes, samples[1][run])
        );
    }
    Ok(Column {
        name: name.into(),
        mb_per_s: samples.map(|mut s| mb_per_s(bytes, median(&mut s))),
    })
}

/// Writes `bytes` in 64 KiB writes, half-closes, and waits for the peer's count of what
/// arrived: the time from the first write to the count.
fn send(stream: &mut UnixStream, bytes: u64) -> anyhow::Result<Duration> {
    let chunk = vec![0xa5u8; PROBE_WRITE_LEN];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(PROBE_WRITE_LEN, |l| l.min(PROBE_WRITE_LEN));
        stream.write_all(&chunk[..n]).context("writing")?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write).context("half-closing")?;
    let mut count = [0u8; PROBE_COUNT_LEN];
    stream
        .read_exact(&mut count)
        .context("reading the peer's count")?;
    let elapsed = started.elapsed();
    let received = u64::from_be_bytes(count);
    if received != bytes {
        bail!("sent {bytes} bytes, the peer counted {received}");
    }
    Ok(elapsed)
}

/// Reads until the peer's half-close: the time to the last byte, checked against `bytes`.
fn receive(stream: &mut UnixStream, bytes: u64) -> anyhow::Result<Duration> {
    let mut buffer = vec![0u8; PROBE_WRITE_LEN];
    let started = Instant::now();
    let mut received = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading"),
        }
    }
    let elapsed = started.elapsed();
    if received != bytes {
        bail!("expected {bytes} bytes, the stream ended after {received}");
    }
    Ok(elapsed)
}

/// One end of a socket pair, the other served on a thread the way the agent serves `probe`.
fn native_peer(probe: StreamKind) -> anyhow::Result<UnixStream> {
    let (ours, mut theirs) = UnixStream::pair().context("creating a socket pair")?;
    thread::spawn(move || -> io::Result<()> {
        serve_probe(&mut theirs, probe)?;
        theirs.shutdown(Shutdown::Write)
    });
    Ok(ours)
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

/// The markdown table: one row per direction, one column per VM and the native anchor, and
/// each VM's ratio to the anchor (and berth-vmm's to QEMU when both ran).
fn report(columns: &[Column], native: &Column, runs: usize, mib: u64, size: &VmSizeArgs) -> String {
    let mut header = String::from("| direction |");
    let mut rule = String::from("|---|");
    for column in columns.iter().chain([native]) {
        header.push_str(&format!(" {} MB/s |", column.name));
        rule.push_str("---|");
    }
    for column in columns {
        header.push_str(&format!(" {} / native |", column.name));
        rule.push_str("---|");
    }
    if let [first, second] = columns {
        header.push_str(&format!(" {} / {} |", first.name, second.name));
        rule.push_str("---|");
    }
    let mut rows = String::new();
    for (slot, direction) in DIRECTIONS.into_iter().enumerate() {
        rows.push_str(&format!("| {} |", direction.label()));
        for column in columns.iter().chain([native]) {
            rows.push_str(&format!(" {:.1} |", column.mb_per_s[slot]));
        }
        for column in columns {
            rows.push_str(&format!(
                " {:.3} |",
                column.mb_per_s[slot] / native.mb_per_s[slot].max(1e-9)
            ));
        }
        if let [first, second] = columns {
            rows.push_str(&format!(
                " {:.2} |",
                first.mb_per_s[slot] / second.mb_per_s[slot].max(1e-9)
            ));
        }
        rows.push('\n');
    }
    format!(
        "{header}\n{rule}\n{rows}\n\
         Median of {runs} transfers of {mib} MiB each way, in 64 KiB writes, between the host \
         and the agent's transport probes over the hybrid vsock socket; each VM freshly booted \
         ({mem} MiB, {cpus} vCPUs). Native: the same transfers over a unix socket pair on the \
         host. Command: `berth bench vsock --runs {runs} --mib {mib} --memory {mem} --cpus \
         {cpus} --record docs/benchmarks.md` (with `BERTH_BACKEND=vmm` for berth-vmm against \
         QEMU).",
        mem = size.memory,
        cpus = size.cpus,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_and_receive_move_exact_counts_over_a_native_peer() {
        let bytes = 3 * PROBE_WRITE_LEN as u64 + 17;

        send(&mut native_peer(StreamKind::Discard).unwrap(), bytes).unwrap();
        receive(&mut native_peer(StreamKind::Zeros(bytes)).unwrap(), bytes).unwrap();
    }

    #[test]
    fn receive_refuses_a_short_stream() {
        let short = native_peer(StreamKind::Zeros(10)).unwrap();

        let error = receive(&mut { short }, 11).unwrap_err();

        assert!(error.to_string().contains("after 10"), "{error}");
    }

    #[test]
    fn report_has_a_ratio_per_vm_and_between_the_vmms() {
        let column = |name: &str, a, b| Column {
            name: name.into(),
            mb_per_s: [a, b],
        };
        let size = VmSizeArgs {
            memory: 512,
            cpus: 2,
            boot_timeout: 60,
        };

        let text = report(
            &[
                column("berth-vmm", 50.0, 40.0),
                column("QEMU microvm", 25.0, 40.0),
            ],
            &column("unix socket pair", 1000.0, 800.0),
            3,
            64,
            &size,
        );

        assert!(text.contains("| host → guest | 50.0 | 25.0 | 1000.0 | 0.050 | 0.025 | 2.00 |"));
        assert!(text.contains("| guest → host | 40.0 | 40.0 | 800.0 | 0.050 | 0.050 | 1.00 |"));
    }
}
