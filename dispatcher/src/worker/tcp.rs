//! TCP targets (`url = "tcp://host:port"`): each changed path pushed to a listener.
//!
//! `framing = "sersync"` is sersync's socket plugin to the byte: one connection per
//! path carrying its absolute path (no newline, no operation), then closed; a receiver
//! written for sersync runs unchanged. `"json"` and `"nul"` send a batch on one
//! connection, one record per path with its operation, and count it delivered once the
//! receiver has read to the end and closed its side (an acknowledgement sersync's
//! framing cannot give: there, a path is delivered once written).
//!
//! The operation is the tree's truth when the batch goes: a path that no longer exists
//! is a `delete`, one that does an `upsert`, and an entry that stands for everything
//! below it (the root at a start compare, a subtree too large to list) a `resync`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use protocol::config::{Endpoint, Framing};
use protocol::PathBytes;

use crate::command::RunResult;
use ::rsync::Outcome;

use super::*;

/// What happened to a path, as a tcp target's records say it (the words of
/// `syncbus tail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TcpOp {
    Upsert,
    Delete,
    /// Everything below the path may have changed.
    Resync,
}

impl TcpOp {
    fn word(self) -> &'static str {
        match self {
            TcpOp::Upsert => "upsert",
            TcpOp::Delete => "delete",
            TcpOp::Resync => "resync",
        }
    }
}

/// The absolute path of a hook entry (`./a/b`, `./dir/`, `./`) under `root_path`; a
/// directory keeps its trailing `/` (the root's too).
pub(super) fn absolute(root_path: &Path, entry: &[u8]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = root_path.as_os_str().as_bytes().to_vec();
    let rel = entry.strip_prefix(b"./").unwrap_or(entry);
    if !out.ends_with(b"/") && (!rel.is_empty() || entry.ends_with(b"/")) {
        out.push(b'/');
    }
    out.extend_from_slice(rel);
    out
}

/// One path's bytes on the wire in `framing`. Sersync's is the bare path without a
/// trailing `/` (sersync sent no `/` after a directory).
pub(super) fn record(framing: Framing, root: &str, op: TcpOp, abs: &[u8]) -> Vec<u8> {
    match framing {
        Framing::Sersync => {
            let trimmed = abs.strip_suffix(b"/").filter(|t| !t.is_empty());
            trimmed.unwrap_or(abs).to_vec()
        }
        Framing::Json => {
            let mut line = serde_json::json!({
                "op": op.word(),
                "root": root,
                "path": protocol::path::escape_invalid_utf8(abs),
                "utf8": std::str::from_utf8(abs).is_ok(),
            })
            .to_string()
            .into_bytes();
            line.push(b'\n');
            line
        }
        Framing::Nul => {
            let mut out = op.word().as_bytes().to_vec();
            out.push(b'\t');
            out.extend_from_slice(abs);
            out.push(0);
            out
        }
    }
}

/// Connects to `addr` (every address it resolves to, in turn) within `timeout` (none
/// when zero); reads and writes get the same limit.
fn connect(addr: &str, timeout: Option<Duration>) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        let s = match timeout {
            Some(t) => TcpStream::connect_timeout(&a, t),
            None => TcpStream::connect(a),
        };
        match s {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_write_timeout(timeout)?;
                s.set_read_timeout(timeout)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host")
    }))
}

/// Writes `bytes` and closes the sending side; with `wait_close`, then reads (and
/// drops) what the receiver says until it closes too: the batch is delivered.
fn send(
    addr: &str,
    timeout: Option<Duration>,
    bytes: &[u8],
    wait_close: bool,
) -> Result<(), String> {
    let mut s = connect(addr, timeout).map_err(|e| format!("cannot connect: {e}"))?;
    s.write_all(bytes)
        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
        .map_err(|e| format!("cannot send: {e}"))?;
    if wait_close {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(format!(
                        "the receiver did not close the connection after the records: {e}"
                    ))
                }
            }
        }
    }
    Ok(())
}

impl Runner {
    /// A tcp target's run: the entries (already through its include/exclude globs) as
    /// records; a failure is retried like any target's. In sersync framing each path
    /// has its connection, so what went before a failure is not owed again.
    pub(super) fn push(
        &self,
        root: &str,
        info: &RootInfo,
        entries: &[HookEntry],
    ) -> (RunResult, Option<Vec<PathBytes>>) {
        let Endpoint::Tcp { addr, framing, .. } = &self.target.endpoint else {
            unreachable!("only called for tcp targets")
        };
        let timeout = (self.target.timeout > 0).then(|| Duration::from_secs(self.target.timeout));
        let fail = |error: String| RunResult {
            outcome: Outcome::Retry,
            error: format!("tcp://{addr}: {error}"),
        };
        let records = entries.iter().map(|(p, e, all_below)| {
            let op = if *all_below {
                TcpOp::Resync
            } else if std::fs::symlink_metadata(p.under(&info.path)).is_err() {
                TcpOp::Delete
            } else {
                TcpOp::Upsert
            };
            record(*framing, root, op, &absolute(&info.path, e))
        });
        if *framing == Framing::Sersync {
            for (i, r) in records.enumerate() {
                let sent = if self.control.must_stop() {
                    Err("stopped by the shutdown deadline".to_string())
                } else {
                    send(addr, timeout, &r, false)
                };
                if let Err(e) = sent {
                    let owed = entries[i..].iter().map(|(p, _, _)| p.clone()).collect();
                    return (fail(e), Some(owed));
                }
            }
        } else {
            let bytes: Vec<u8> = records.flatten().collect();
            if let Err(e) = send(addr, timeout, &bytes, true) {
                return (fail(e), None);
            }
        }
        let ok = RunResult {
            outcome: Outcome::Success,
            error: String::new(),
        };
        (ok, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths_join_the_root_and_keep_a_directory_slash() {
        let root = Path::new("/opt/tongbu");
        assert_eq!(absolute(root, b"./a/b.html"), b"/opt/tongbu/a/b.html");
        assert_eq!(absolute(root, b"./dir/"), b"/opt/tongbu/dir/");
        assert_eq!(absolute(root, b"./"), b"/opt/tongbu/");
        assert_eq!(absolute(Path::new("/"), b"./x"), b"/x");
    }

    #[test]
    fn sersync_framing_is_the_bare_absolute_path() {
        let r = |op, p: &[u8]| record(Framing::Sersync, "www", op, p);
        assert_eq!(
            r(TcpOp::Upsert, b"/opt/tongbu/a b\n\xff"),
            b"/opt/tongbu/a b\n\xff"
        );
        assert_eq!(r(TcpOp::Delete, b"/opt/tongbu/gone"), b"/opt/tongbu/gone");
        assert_eq!(r(TcpOp::Upsert, b"/opt/tongbu/dir/"), b"/opt/tongbu/dir");
        assert_eq!(r(TcpOp::Resync, b"/"), b"/");
    }

    #[test]
    fn json_framing_is_one_object_per_line_with_bytes_escaped() {
        let line = record(Framing::Json, "www", TcpOp::Delete, b"/srv/a\n\xffb");
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(
            line.iter().filter(|b| **b == b'\n').count(),
            1,
            "a newline in a name is escaped"
        );
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op": "delete", "root": "www", "path": "/srv/a\n\\xffb", "utf8": false})
        );
        let v: serde_json::Value =
            serde_json::from_slice(&record(Framing::Json, "www", TcpOp::Resync, b"/srv/")).unwrap();
        assert_eq!(
            (v["op"].as_str(), v["utf8"].as_bool()),
            (Some("resync"), Some(true))
        );
    }

    #[test]
    fn nul_framing_is_op_tab_raw_path_nul() {
        assert_eq!(
            record(Framing::Nul, "www", TcpOp::Upsert, b"/srv/a\tb\n\xff"),
            b"upsert\t/srv/a\tb\n\xff\0"
        );
        assert_eq!(
            record(Framing::Nul, "www", TcpOp::Delete, b"/srv/x"),
            b"delete\t/srv/x\0"
        );
    }

    #[test]
    fn a_framed_batch_is_delivered_once_the_receiver_closed_and_refused_when_down() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let reader = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            got
        });
        let t = Some(Duration::from_secs(5));
        send(&addr, t, b"upsert\t/a\0", true).unwrap();
        assert_eq!(reader.join().unwrap(), b"upsert\t/a\0");
        // The listener is gone now: refused, an error to retry.
        let e = send(&addr, t, b"x", true).unwrap_err();
        assert!(e.starts_with("cannot connect"), "{e}");
    }
}
