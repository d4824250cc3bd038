//! What syncbus stages say to each other and what the config file says to them.
//!
//! Every crate of the pipeline depends on this one: [`config`] (the TOML model, validated
//! with errors that name file, line and key), [`wire`] (the MessagePack messages on the
//! bus), [`work`] (work owed to a target, one shape from batcher to journal), [`rules`] (exclude rules, shared by the filter and the dispatcher's full syncs),
//! [`seq`] (loss detection), [`manifest`] (what a two-way root held at a clean stop), [`status`] (the files `syncbus status` reads) and [`bus`] (ZeroMQ sockets, endpoints, shutdown signals).
//! Only `bus` does I/O on sockets; the message and config modules never import it.
//!
//! # Invariants
//! - Paths are bytes ([`PathBytes`]) everywhere; they are never decoded as UTF-8.
//! - Every message on the bus carries `version`, `epoch` and a gap-free `seq`.

#![warn(missing_docs, unreachable_pub)]

pub mod backoff;
pub mod bus;
pub mod config;
pub mod manifest;
pub mod notify;
pub mod out;
pub mod path;
pub mod rules;
pub mod seq;
pub mod stage;
pub mod status;
pub mod wire;
pub mod work;

pub use path::PathBytes;

/// Wall-clock microseconds since the Unix epoch, the time unit on the wire.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The earlier of two times in µs, where 0 means unknown (and loses to any known time).
pub fn earliest_us(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, t) | (t, 0) => t,
        (a, b) => a.min(b),
    }
}
