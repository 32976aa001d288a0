//! The device event loop: one epoll over vCPU reports, the reset line, termination signals and
//! every device's fds, run on the main thread until the VM ends.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::Subscriber;
use crate::exit::VmOutcome;
use crate::signals::SignalFd;
use crate::vcpu::{GuestStop, VcpuEvent};

/// Errors of the event loop itself.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// An epoll call failed.
    #[error("epoll")]
    Epoll(#[source] std::io::Error),
    /// Reading the signalfd failed.
    #[error("cannot read the signalfd")]
    Signal(#[source] std::io::Error),
}

const TOKEN_VCPU: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_DEVICES: u64 = 3;

/// What the loop watches besides the devices.
#[derive(Debug)]
pub struct ControlFds {
    /// Written by a vCPU thread after it sent a [`VcpuEvent`].
    pub vcpu_wake: EventFd,
    /// Written by the i8042 on a reset command.
    pub reset: EventFd,
    /// Termination signals.
    pub signals: SignalFd,
    /// Set by the console when the guest kernel panicked.
    pub panicked: Arc<AtomicBool>,
}

/// Runs until the VM ends.
pub fn run(
    control: &ControlFds,
    vcpu_events: &Receiver<VcpuEvent>,
    subscribers: &[(String, Subscriber)],
) -> Result<VmOutcome, EventLoopError> {
    let epoll = Epoll::new().map_err(EventLoopError::Epoll)?;
    let add = |fd: RawFd, events: EventSet, token: u64| {
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(EventLoopError::Epoll)
    };
    add(control.vcpu_wake.as_raw_fd(), EventSet::IN, TOKEN_VCPU)?;
    add(control.reset.as_raw_fd(), EventSet::IN, TOKEN_RESET)?;
    add(control.signals.as_raw_fd(), EventSet::IN, TOKEN_SIGNAL)?;
    let mut device_fds = Vec::new();
    for (index, (_, subscriber)) in subscribers.iter().enumerate() {
        let interest = subscriber
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .interest();
        for (fd, events) in interest {
            add(fd, events, TOKEN_DEVICES + device_fds.len() as u64)?;
            device_fds.push((fd, index));
        }
    }

    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EventLoopError::Epoll(e)),
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_VCPU => {
                    let _ = control.vcpu_wake.read();
                    if let Ok(report) = vcpu_events.try_recv() {
                        return Ok(outcome_of(report, &control.panicked));
                    }
                }
                TOKEN_RESET => {
                    let _ = control.reset.read();
                    let panicked = control.panicked.load(Ordering::SeqCst);
                    return Ok(VmOutcome::from_stop(GuestStop::Reset, panicked));
                }
                TOKEN_SIGNAL => {
                    if let Some(signal) = control.signals.read().map_err(EventLoopError::Signal)? {
                        return Ok(VmOutcome::Signalled(signal));
                    }
                }
                token => {
                    let Some((fd, index)) = device_fds.get((token - TOKEN_DEVICES) as usize) else {
                        continue;
                    };
                    let (_, subscriber) = &subscribers[*index];
                    let mut device = subscriber.lock().unwrap_or_else(|e| e.into_inner());
                    device.process(*fd, event.event_set());
                }
            }
        }
    }
}

fn outcome_of(report: VcpuEvent, panicked: &AtomicBool) -> VmOutcome {
    match report {
        VcpuEvent::Stopped(stop) => VmOutcome::from_stop(stop, panicked.load(Ordering::SeqCst)),
        VcpuEvent::Failed(id, error) => {
            let mut message = format!("vcpu{id}: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            VmOutcome::InternalError(message)
        }
    }
}
