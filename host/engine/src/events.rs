//! What happened to containers and images, for `docker events`: a bounded history (so
//! `--since` can look back) and a broadcast to live listeners.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::broadcast;

use crate::sync::lock;

/// How many past events are kept for `--since`.
const HISTORY: usize = 1024;
/// How far a live listener may lag before it misses events.
const LIVE_BACKLOG: usize = 1024;

/// One event, in the terms of Docker's events API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `container`, `image`, `volume`, `network`, `daemon`.
    pub kind: &'static str,
    /// `create`, `start`, `die`, `destroy`, `tag`, `delete`, ...
    pub action: String,
    /// The object's id.
    pub actor_id: String,
    /// The object's attributes (name, image, exitCode, ...).
    pub attributes: BTreeMap<String, String>,
    /// When, in nanoseconds since the epoch.
    pub time_nanos: i64,
}

/// The event history and its live listeners.
#[derive(Debug)]
pub struct Events {
    history: Mutex<VecDeque<Event>>,
    live: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    /// No events yet.
    pub fn new() -> Self {
        Self {
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            live: broadcast::channel(LIVE_BACKLOG).0,
        }
    }

    /// Records an event now.
    pub fn emit(
        &self,
        kind: &'static str,
        action: impl Into<String>,
        actor_id: impl Into<String>,
        attributes: impl IntoIterator<Item = (&'static str, String)>,
    ) {
        let event = Event {
            kind,
            action: action.into(),
            actor_id: actor_id.into(),
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            time_nanos: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        };
        let mut history = lock(&self.history);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(event.clone());
        // Nobody listening is fine.
        let _ = self.live.send(event);
    }

    /// Past events at or after `since_nanos`, and a receiver of everything after them, with
    /// nothing lost or repeated between the two.
    pub fn subscribe(&self, since_nanos: Option<i64>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let history = lock(&self.history);
        let receiver = self.live.subscribe();
        let past = match since_nanos {
            Some(since) => history
                .iter()
                .filter(|e| e.time_nanos >= since)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        (past, receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_since_replays_history_then_live() {
        let events = Events::new();
        events.emit("container", "create", "c1", [("name", "web".to_owned())]);

        let (past, mut live) = events.subscribe(Some(0));
        events.emit("container", "start", "c1", []);

        assert_eq!(past.len(), 1);
        assert_eq!(past[0].action, "create");
        assert_eq!(live.try_recv().unwrap().action, "start");
    }
}
