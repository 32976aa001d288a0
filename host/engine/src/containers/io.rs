//! A container's stdio on the host side.
//!
//! berthd, not the client, holds a running container's output streams from the agent: every
//! chunk goes to the log first and then to each attached client ([`OutputHub`]), so the log is
//! complete whether or not anyone is attached, and a slow client slows the container (as a
//! full pipe would) rather than losing bytes. Input from attached clients goes through a
//! [`StdinChannel`] to the agent's stdin stream of the current run.

use std::io;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::containers::logs::{LogStream, LogWriter};
use crate::sync::lock;

/// How many chunks an attached client may lag behind before the container waits for it.
const SUBSCRIBER_BACKLOG: usize = 64;
/// How many input chunks may queue for the container's stdin.
const STDIN_BACKLOG: usize = 64;

/// A piece of a container's output.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Which stream it came from.
    pub stream: LogStream,
    /// The bytes.
    pub data: Bytes,
}

#[derive(Debug)]
struct HubInner {
    log: LogWriter,
    subscribers: Vec<mpsc::Sender<Chunk>>,
}

/// Fans a container's output out to its log and attached clients.
#[derive(Debug)]
pub struct OutputHub {
    inner: Mutex<HubInner>,
}

impl OutputHub {
    /// A hub logging to `log_path` (appended to).
    pub fn open(log_path: &Path) -> io::Result<Self> {
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Self {
            inner: Mutex::new(HubInner {
                log: LogWriter::open(log_path)?,
                subscribers: Vec::new(),
            }),
        })
    }

    /// A receiver of the output of the current run, or of the next one if none runs. It
    /// ends when that run's output ends.
    pub fn subscribe(&self) -> mpsc::Receiver<Chunk> {
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_BACKLOG);
        lock(&self.inner).subscribers.push(sender);
        receiver
    }

    /// Like [`OutputHub::subscribe`], also returning how long the log is at that instant:
    /// every byte before is in the file, every byte after comes through the receiver.
    pub fn subscribe_at(&self, log_path: &Path) -> (u64, mpsc::Receiver<Chunk>) {
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_BACKLOG);
        let mut inner = lock(&self.inner);
        // The writer flushes after every write, so the file length is every record written.
        let length = std::fs::metadata(log_path).map(|m| m.len()).unwrap_or(0);
        inner.subscribers.push(sender);
        (length, receiver)
    }

    /// Logs a chunk and hands it to every attached client.
    pub async fn publish(&self, stream: LogStream, data: Bytes) {
        let subscribers = {
            let mut inner = lock(&self.inner);
            let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
            if let Err(e) = inner.log.write(stream, &data, now) {
                tracing::warn!(error = %e, "cannot write a container log");
            }
            inner.subscribers.clone()
        };
        let chunk = Chunk { stream, data };
        let mut gone = false;
        for subscriber in subscribers {
            gone |= subscriber.send(chunk.clone()).await.is_err();
        }
        if gone {
            lock(&self.inner).subscribers.retain(|s| !s.is_closed());
        }
    }

    /// The run's output has ended: writes unfinished lines and ends every subscription.
    pub fn end_run(&self) {
        let mut inner = lock(&self.inner);
        if let Err(e) = inner.log.flush() {
            tracing::warn!(error = %e, "cannot write a container log");
        }
        inner.subscribers.clear();
    }
}

/// Input for a container's stdin.
#[derive(Debug, Clone)]
pub enum StdinMessage {
    /// Bytes to write.
    Data(Bytes),
    /// Close the container's stdin.
    Eof,
}

/// The queue from attached clients to the container's stdin, renewed for each run.
#[derive(Debug)]
pub struct StdinChannel {
    sender: Mutex<mpsc::Sender<StdinMessage>>,
    receiver: Mutex<Option<mpsc::Receiver<StdinMessage>>>,
}

impl Default for StdinChannel {
    fn default() -> Self {
        Self::new()
    }
}

impl StdinChannel {
    /// An empty channel.
    pub fn new() -> Self {
        let (sender, receiver) = mpsc::channel(STDIN_BACKLOG);
        Self {
            sender: Mutex::new(sender),
            receiver: Mutex::new(Some(receiver)),
        }
    }

    /// Where an attached client sends its input.
    pub fn sender(&self) -> mpsc::Sender<StdinMessage> {
        lock(&self.sender).clone()
    }

    /// Taken by a run to feed its process's stdin.
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<StdinMessage>> {
        lock(&self.receiver).take()
    }

    /// A fresh channel for the next run; senders of the old one find it closed.
    pub fn renew(&self) {
        let (sender, receiver) = mpsc::channel(STDIN_BACKLOG);
        *lock(&self.sender) = sender;
        *lock(&self.receiver) = Some(receiver);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::logs::{log_path, read_log, LogFilter};

    #[tokio::test]
    async fn publish_reaches_log_and_subscriber_then_end_run_closes() {
        let dir = tempfile::tempdir().unwrap();
        let hub = OutputHub::open(&log_path(dir.path())).unwrap();
        let mut receiver = hub.subscribe();

        hub.publish(LogStream::Stdout, Bytes::from_static(b"hi\n"))
            .await;
        hub.end_run();

        let chunk = receiver.recv().await.unwrap();
        assert_eq!(&chunk.data[..], b"hi\n");
        assert!(receiver.recv().await.is_none());
        let filter = LogFilter {
            stdout: true,
            stderr: true,
            ..LogFilter::default()
        };
        assert_eq!(read_log(&log_path(dir.path()), &filter).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn subscribe_at_splits_output_between_file_and_receiver() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        let hub = OutputHub::open(&path).unwrap();
        hub.publish(LogStream::Stdout, Bytes::from_static(b"before\n"))
            .await;

        let (length, mut receiver) = hub.subscribe_at(&path);
        hub.publish(LogStream::Stdout, Bytes::from_static(b"after\n"))
            .await;

        assert_eq!(length, std::fs::metadata(&path).unwrap().len() - (13 + 6));
        assert_eq!(&receiver.recv().await.unwrap().data[..], b"after\n");
    }

    #[tokio::test]
    async fn stdin_channel_renew_closes_old_senders() {
        let channel = StdinChannel::new();
        let old = channel.sender();
        drop(channel.take_receiver());

        channel.renew();

        assert!(old.send(StdinMessage::Eof).await.is_err());
        assert!(channel.take_receiver().is_some());
    }
}
