//! System tests: the real `syncbus` binary, real inotify, real ZeroMQ sockets and real
//! rsync daemons on 127.0.0.1; trees compared byte for byte (content, mode, mtime,
//! symlink targets). No fixed sleeps: every wait is a condition with a deadline.

#![allow(clippy::disallowed_methods)] // tests and their helpers spawn what they check

mod cli;
mod crash;
mod guard;
mod hard_links;
mod hardening;
mod hooks;
mod hot;
mod identity;
mod journal;
mod mirror;
mod moves;
mod reliability;
mod ssh;
mod status;
mod stream;
mod systemd;
mod tcp;
mod transient;
mod two_way;

#[path = "../common/mod.rs"]
mod common;

pub use common::*;
