//! Live GC events: each collection the agent measures, delivered as it happens.
//!
//! The agent pushes `(:event :gc RECORD)` to the connections that sent `:subscribe`. A
//! [`GcFeed`] holds such a connection of its own for one target (so pushed events never queue
//! behind tool calls), subscribes again after a reconnect, and fans the events out to any
//! number of followers (`GET /events`, `sbmon events`). Dropping the feed closes its
//! connection, which is all the agent needs to stop sending.

use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::agent::ops::{Event, EventKind, SubscribeRequest};
use crate::agent::reply::PauseRecord;
use crate::agent::{AgentClient, Connection};
use crate::wire::Sexp;

/// Events a follower may fall behind by before it is told it missed some.
const FOLLOWER_BACKLOG: usize = 256;
/// How often a broken subscription is retried, and how often a quiet one checks its connection.
const RETRY: Duration = Duration::from_secs(1);

/// One garbage collection of one target, as measured inside the image.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct GcEvent {
    /// The target's name.
    pub target: String,
    /// Number of this collection among those the agent measured since it started.
    pub seq: u64,
    /// Generation collected (6 or more: a full collection).
    pub generation: u8,
    /// Wall-clock pause of the image, in seconds.
    pub wall_seconds: f64,
    /// CPU time of the collection, in seconds.
    pub cpu_seconds: f64,
    pub heap_before_bytes: u64,
    pub heap_after_bytes: u64,
    /// heap_before_bytes - heap_after_bytes (negative when promotion grew the heap).
    pub freed_bytes: i64,
    /// When the collection ended, in Unix seconds.
    pub time: f64,
    /// Collections between the previous event and this one that were not delivered (the
    /// agent keeps the last 64 for a slow subscriber; a reconnect loses those in between).
    pub missed: u64,
}

impl GcEvent {
    fn new(target: &str, record: PauseRecord, previous_seq: Option<u64>) -> Self {
        // A seq at or below the previous one means the image (or its agent) restarted.
        let missed = previous_seq
            .filter(|&p| record.seq > p)
            .map_or(0, |p| record.seq - p - 1);
        GcEvent {
            target: target.to_string(),
            seq: record.seq,
            generation: record.generation,
            wall_seconds: record.wall_seconds,
            cpu_seconds: record.cpu_seconds,
            heap_before_bytes: record.heap_before,
            heap_after_bytes: record.heap_after,
            freed_bytes: record.heap_before as i64 - record.heap_after as i64,
            time: record.time,
            missed,
        }
    }
}

/// The GC events of one target, shared by all who follow them.
pub struct GcFeed {
    events: broadcast::Sender<GcEvent>,
    /// True while the agent is sending this feed's events.
    subscribed: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl GcFeed {
    /// Subscribe to the GC events of the image `target_client` reaches (called `name` in
    /// the events) and stay subscribed until the feed is dropped. The feed has a connection
    /// of its own, so pushed events never queue behind tool calls.
    pub fn start(name: &str, target_client: &AgentClient) -> Self {
        let (events, _) = broadcast::channel(FOLLOWER_BACKLOG);
        let client = AgentClient::new(
            target_client.address().clone(),
            target_client.options().clone(),
        );
        let (set_subscribed, subscribed) = watch::channel(false);
        let task = tokio::spawn(follow(
            name.to_string(),
            client,
            events.clone(),
            set_subscribed,
        ));
        GcFeed {
            events,
            subscribed,
            task,
        }
    }

    /// Wait until the agent sends this feed's events (at most `timeout`); false if it does not.
    pub async fn subscribed(&self, timeout: Duration) -> bool {
        let mut subscribed = self.subscribed.clone();
        matches!(
            tokio::time::timeout(timeout, subscribed.wait_for(|on| *on)).await,
            Ok(Ok(_))
        )
    }

    /// Whether the agent is sending this feed's events, as it changes.
    pub fn status(&self) -> watch::Receiver<bool> {
        self.subscribed.clone()
    }

    /// A receiver of the events from now on.
    pub fn follow(&self) -> broadcast::Receiver<GcEvent> {
        self.events.subscribe()
    }
}

impl Drop for GcFeed {
    fn drop(&mut self) {
        // The task owns the feed's client; ending it closes the connection.
        self.task.abort();
    }
}

async fn follow(
    name: String,
    client: AgentClient,
    out: broadcast::Sender<GcEvent>,
    subscribed: watch::Sender<bool>,
) {
    let mut previous_seq = None;
    loop {
        match client.connection().await {
            Ok(conn) => {
                // Listen before subscribing, so nothing pushed right after is lost.
                let pushed = conn.events();
                let gc = SubscribeRequest {
                    events: vec![EventKind::Gc],
                };
                match conn.subscribe(&gc, client.options().call_timeout).await {
                    Ok(_) => {
                        subscribed.send_replace(true);
                        relay(&name, &conn, pushed, &out, &mut previous_seq).await;
                    }
                    Err(e) => tracing::debug!("cannot subscribe to {name}: {e}"),
                }
            }
            Err(e) => tracing::debug!("GC events of {name} unavailable: {e}"),
        }
        subscribed.send_replace(false);
        tokio::time::sleep(RETRY).await;
    }
}

/// Pass the GC events pushed on `conn` to `out` until the connection closes.
async fn relay(
    name: &str,
    conn: &Connection,
    mut pushed: broadcast::Receiver<(String, Sexp)>,
    out: &broadcast::Sender<GcEvent>,
    previous_seq: &mut Option<u64>,
) {
    loop {
        let event = tokio::select! {
            event = pushed.recv() => event,
            () = tokio::time::sleep(RETRY) => {
                if conn.is_closed() {
                    return;
                }
                continue;
            }
        };
        match event {
            Ok((kind, value)) => match Event::decode(&kind, &value) {
                Ok(Event::Gc(record)) => {
                    let seq = record.seq;
                    let _ = out.send(GcEvent::new(name, record, *previous_seq));
                    *previous_seq = Some(seq);
                }
                Ok(Event::Other(_)) => {}
                Err(e) => tracing::warn!("malformed {kind} event from {name}: {e}"),
            },
            // The seq numbers show followers the gap.
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> PauseRecord {
        PauseRecord {
            seq,
            generation: 0,
            wall_seconds: 0.001,
            cpu_seconds: 0.001,
            heap_before: 300,
            heap_after: 100,
            time: 1.0,
        }
    }

    #[test]
    fn missed_counts_the_gap_and_a_restart_starts_over() {
        assert_eq!(GcEvent::new("t", record(5), None).missed, 0);
        assert_eq!(GcEvent::new("t", record(6), Some(5)).missed, 0);
        assert_eq!(GcEvent::new("t", record(9), Some(5)).missed, 3);
        assert_eq!(GcEvent::new("t", record(1), Some(40)).missed, 0);
        assert_eq!(GcEvent::new("t", record(6), None).freed_bytes, 200);
    }
}
