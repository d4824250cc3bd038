//! The stage around the [`Filter`]: sockets, the wait, publishing, the drain at a stop.
//!
//! One loop: publish heartbeats when due, wait for an [`Event`], act on it. Every reason
//! the stage wakes up is one arm of the `match` in [`run`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::bus::{self, BusError, Endpoints, Shutdown, HEARTBEAT};
use protocol::config::Config;
use protocol::seq::Stamp;
use protocol::stage::StageError;
use protocol::status::{self, StageStatus};
use protocol::wire::{self, Change, ChangeBatch, Op, RawBatch};

use crate::filter::Filter;

/// Changes per published message (keeps single messages small for slow subscribers).
const MAX_CHANGES_PER_MESSAGE: usize = 1000;
/// Heartbeats wait for the first raw batch, or this long: a dispatcher started just
/// after the filter then finds the watcher's start resync in message 1 and compares
/// each root once, rather than once at once (it joined late: it may have missed that
/// resync) and again when the resync comes.
const FIRST_HEARTBEAT_WAIT: Duration = Duration::from_secs(5);
/// Raw messages taken in per wake-up before what is ready is published.
const RAW_PER_WAKE: usize = 1024;

/// Why the loop woke up. A wake-up can bring several; they are handled in this order.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// SIGTERM or SIGINT: stop taking in, publish what is held, return.
    Stop,
    /// Deliveries of two-way targets are queued (see [`Filter::delivered`]).
    Deliveries,
    /// Every wake-up ends here, whether raw batches arrived or a deadline (a held
    /// change, a heartbeat) came: take in what is queued, publish what is ready.
    Tick,
}

/// Publishes change batches with a gap-free `seq` per topic.
struct Publisher {
    socket: zmq::Socket,
    epoch: u64,
    stamps: HashMap<String, Stamp>,
    /// The `safe_us` each root's last message said.
    safe: HashMap<String, u64>,
    /// Changes published per root, for the status file.
    board: Arc<Mutex<StageStatus>>,
}

impl Publisher {
    /// Publishes `changes` of `root` (a heartbeat when empty), each message saying
    /// `safe_us` ([`ChangeBatch::safe_us`]).
    fn publish(
        &mut self,
        root: &str,
        changes: Vec<Change>,
        safe_us: u64,
    ) -> Result<(), StageError> {
        let chunks: Vec<Vec<Change>> = if changes.is_empty() {
            vec![Vec::new()]
        } else {
            changes
                .chunks(MAX_CHANGES_PER_MESSAGE)
                .map(|c| c.to_vec())
                .collect()
        };
        if !changes.is_empty() {
            if let Ok(mut b) = self.board.lock() {
                let n = b.roots.entry(root.to_string()).or_default();
                n.changes = Some(n.changes.unwrap_or(0) + changes.len() as u64);
            }
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            // A message vouches only for what it and those before it carry: the
            // chunks before the last say what the root's last message said.
            let safe = if i == last {
                safe_us
            } else {
                self.safe.get(root).copied().unwrap_or(0)
            };
            let epoch = self.epoch;
            let (epoch, seq) = self
                .stamps
                .entry(root.to_string())
                .or_insert_with(|| Stamp::new(epoch))
                .stamp();
            if !chunk.is_empty() {
                let resyncs = chunk.iter().filter(|c| c.op == Op::Resync).count();
                tracing::debug!(
                    root,
                    seq,
                    changes = chunk.len(),
                    resyncs,
                    "publishing changes"
                );
                for c in &chunk {
                    tracing::trace!(root, op = ?c.op, path = %c.path, from = ?c.from.as_ref().map(|f| f.to_string()), "published");
                }
            }
            let msg = ChangeBatch {
                version: wire::VERSION,
                epoch,
                seq,
                root: root.to_string(),
                time_us: protocol::now_us(),
                safe_us: safe,
                changes: chunk,
            };
            bus::send(&self.socket, &wire::changes_topic(root), &msg)?;
        }
        self.safe.insert(root.to_string(), safe_us);
        Ok(())
    }

    /// Adds the echoes the filter recognised to the status file.
    fn count_echoes(&self, echoes: HashMap<String, u64>) {
        if echoes.is_empty() {
            return;
        }
        if let Ok(mut b) = self.board.lock() {
            for (root, n) in echoes {
                let r = b.roots.entry(root).or_default();
                r.echoes = Some(r.echoes.unwrap_or(0) + n);
            }
        }
    }
}

/// Runs the filter stage until SIGTERM/SIGINT, then publishes what it holds and returns.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), StageError> {
    let endpoints = Endpoints::new(config);
    let ctx = zmq::Context::new();
    let pull = bus::socket(&ctx, zmq::PULL)?;
    bus::bind(&pull, &endpoints.raw)?;
    let publisher = bus::socket(&ctx, zmq::PUB)?;
    bus::bind(&publisher, &endpoints.changes)?;
    if let Some(tcp) = &config.tcp_changes {
        bus::bind_public(&publisher, tcp, "change stream");
    }
    let mut out = Publisher {
        socket: publisher,
        epoch: bus::new_epoch(),
        stamps: HashMap::new(),
        safe: HashMap::new(),
        board: Arc::new(Mutex::new(StageStatus::new("filter", protocol::now_us()))),
    };
    let _status = status::Writer::shared(&config.runtime_dir, "filter", &out.board);
    let mut filter = Filter::new(config);
    // Two-way roots follow what reached the peer (see `Filter::delivered`).
    let peers = Filter::two_way_targets(config);
    let deliveries = bus::deliveries_of(
        &ctx,
        &endpoints.deliveries,
        peers.iter().map(String::as_str),
    )?;
    tracing::info!(
        epoch = out.epoch,
        raw = %endpoints.raw,
        changes = %endpoints.changes,
        roots = filter.root_names().len(),
        "filter ready"
    );
    let mut next_heartbeat = Instant::now() + FIRST_HEARTBEAT_WAIT;
    let mut heard = false;
    'run: loop {
        status::beat(&out.board);
        let now = Instant::now();
        if now >= next_heartbeat {
            for (root, safe) in filter.safe_us(Instant::now()) {
                out.publish(&root, Vec::new(), safe)?;
            }
            next_heartbeat = now + HEARTBEAT;
        }
        let wake = filter
            .next_deadline()
            .map_or(next_heartbeat, |d| d.min(next_heartbeat));
        for event in wait(&pull, &endpoints.raw, &deliveries, shutdown, wake)? {
            match event {
                Event::Stop => break 'run,
                Event::Deliveries => {
                    while let Some((_, payload)) = bus::try_recv(&deliveries)? {
                        if let Ok(d) = wire::decode::<wire::Delivery>(&payload) {
                            filter.delivered(&d);
                        }
                    }
                }
                Event::Tick => {
                    // Drain what is queued, then publish what is ready: one pass per
                    // wake-up.
                    for _ in 0..RAW_PER_WAKE {
                        let Some((_, payload)) = bus::try_recv(&pull)? else {
                            break;
                        };
                        if !heard {
                            heard = true;
                            next_heartbeat = next_heartbeat.min(Instant::now());
                        }
                        match wire::decode::<RawBatch>(&payload) {
                            Ok(batch) => filter.push_batch(&batch, Instant::now()),
                            Err(e) => {
                                tracing::warn!(error = %e, "undecodable raw message; resyncing every root");
                                filter.resync_all(Instant::now());
                            }
                        }
                    }
                    let ready = filter.ready(Instant::now());
                    if !ready.is_empty() {
                        // After `ready`: what it published holds nothing back now.
                        let safe = filter.safe_us(Instant::now());
                        for (root, changes) in ready {
                            let s = safe.get(&root).copied().unwrap_or(0);
                            out.publish(&root, changes, s)?;
                        }
                    }
                    out.count_echoes(filter.take_echoes());
                }
            }
        }
    }
    // What the watcher sent before it stopped may still be queued here: take it in
    // (without waiting for more), so the drain publishes it too.
    while let Some((_, payload)) = bus::try_recv(&pull)? {
        match wire::decode::<RawBatch>(&payload) {
            Ok(batch) => filter.push_batch(&batch, Instant::now()),
            Err(_) => filter.resync_all(Instant::now()),
        }
    }
    let held = filter.flush_all();
    let safe = filter.safe_us(Instant::now());
    let n: usize = held.iter().map(|(_, c)| c.len()).sum();
    for (root, changes) in held {
        let s = safe.get(&root).copied().unwrap_or(0);
        out.publish(&root, changes, s)?;
    }
    tracing::info!(flushed = n, "filter draining: published every held change");
    Ok(())
}

/// Waits until something is readable or `wake` comes, and says why it woke up: a stop
/// alone, or the deliveries (when queued) and then the tick.
fn wait(
    pull: &zmq::Socket,
    endpoint: &str,
    deliveries: &zmq::Socket,
    shutdown: &Shutdown,
    wake: Instant,
) -> Result<Vec<Event>, BusError> {
    let timeout = wake.saturating_duration_since(Instant::now());
    let mut items = [
        pull.as_poll_item(zmq::POLLIN),
        zmq::PollItem::from_fd(shutdown.fd(), zmq::POLLIN),
        deliveries.as_poll_item(zmq::POLLIN),
    ];
    match zmq::poll(&mut items, poll_ms(timeout)) {
        // A signal interrupted the wait: `shutdown` tells whether it asks to stop.
        Ok(_) | Err(zmq::Error::EINTR) => {}
        Err(source) => {
            return Err(BusError::Zmq {
                op: "poll",
                endpoint: endpoint.to_string(),
                source,
            })
        }
    }
    let [_raw, signal, delivered] = &items;
    if signal.is_readable() {
        shutdown.drain();
    }
    if shutdown.requested() {
        return Ok(vec![Event::Stop]);
    }
    let mut events = Vec::with_capacity(2);
    if delivered.is_readable() {
        events.push(Event::Deliveries);
    }
    events.push(Event::Tick);
    Ok(events)
}

/// zmq::poll takes milliseconds; round up so a deadline is never polled early forever.
fn poll_ms(d: Duration) -> i64 {
    (d.as_micros().div_ceil(1000)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_ms(Duration::ZERO), 0);
    }
}
