//! `syncbus tail`: the change and delivery streams as lines, like `inotifywait -m` for
//! the bus. Human lines by default, one JSON object per line with `--json`; messages
//! lost on the way (a gap in `seq`, a restarted publisher) are reported, never hidden.

use std::io::Write;
use std::process::ExitCode;

use protocol::bus::{self, Endpoints};
use protocol::seq::{Seen, SeqTracker};
use protocol::stage::EXIT_USAGE;
use protocol::wire::{self, Change, ChangeBatch, Delivery};
use protocol::PathBytes;

#[derive(clap::Args)]
pub(crate) struct TailArgs {
    /// Which instance: `--config`, a one-liner's `--source`, or `--runtime-dir`.
    #[command(flatten)]
    which: crate::instance::Which,
    /// Only this root (repeatable).
    #[arg(long)]
    root: Vec<String>,
    /// Only paths matching this glob (`*` stays within a directory, `**` crosses them).
    #[arg(long)]
    path: Option<String>,
    /// Only deliveries to this target (repeatable).
    #[arg(long)]
    target: Vec<String>,
    /// Which stream: what changed, what reached the targets, or both.
    #[arg(long, value_enum, default_value_t = Stream::Changes)]
    stream: Stream,
    /// One JSON object per line instead of human text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stream {
    Changes,
    Deliveries,
    All,
}

/// A path for people: UTF-8 as is, other bytes as `\xNN`.
fn show(path: &[u8]) -> String {
    protocol::path::escape_invalid_utf8(path)
}

fn line(batch: &ChangeBatch, c: &Change, json: bool) -> String {
    let op = match c.op {
        wire::Op::Upsert => "upsert",
        wire::Op::Delete => "delete",
        wire::Op::Move => "move",
        wire::Op::Resync => "resync",
    };
    if json {
        let mut v = serde_json::json!({
            "stream": "changes",
            "root": batch.root,
            "op": op,
            "path": show(c.path.as_bytes()),
            "utf8": std::str::from_utf8(c.path.as_bytes()).is_ok(),
            "dir": c.dir,
            "time_us": batch.time_us,
            "since_us": c.since_us,
            "epoch": batch.epoch,
            "seq": batch.seq,
        });
        if let Some(from) = &c.from {
            v["from"] = show(from.as_bytes()).into();
        }
        return v.to_string();
    }
    let mut s = format!("{} {op} {}", batch.root, show(c.path.as_bytes()));
    if c.dir {
        s.push('/');
    }
    if let Some(from) = &c.from {
        s.push_str(&format!(" (from {})", show(from.as_bytes())));
    }
    s
}

fn loss(stream: &str, of: &str, seen: Seen, json: bool) -> Option<String> {
    let what = match seen {
        Seen::Gap { missed } => format!("{missed} message(s) lost"),
        Seen::NewEpoch => "the publisher restarted".to_string(),
        Seen::First { .. } | Seen::InOrder => return None,
    };
    Some(if json {
        serde_json::json!({"stream": stream, "of": of, "lost": what}).to_string()
    } else {
        format!("# {stream} of {of}: {what}; lines may be missing here")
    })
}

/// The lines of one delivery: one per path and per compared subtree.
fn delivery_lines(d: &Delivery, keep: &dyn Fn(&PathBytes) -> bool, json: bool) -> Vec<String> {
    let mut out = Vec::new();
    let items = d
        .paths
        .iter()
        .map(|p| (&p.path, Some(p.since_us), false))
        .chain(d.resyncs.iter().map(|r| (r, None, true)));
    for (path, since, resync) in items {
        // A compared subtree may hold paths the glob wants: never hide it.
        if !resync && !keep(path) {
            continue;
        }
        let lag_ms = since
            .filter(|s| *s > 0)
            .map(|s| d.time_us.saturating_sub(s) / 1000);
        if json {
            let mut v = serde_json::json!({
                "stream": "deliveries",
                "target": d.target,
                "root": d.root,
                "ok": d.ok,
                "path": show(path.as_bytes()),
                "utf8": std::str::from_utf8(path.as_bytes()).is_ok(),
                "resync": resync,
                "time_us": d.time_us,
                "epoch": d.epoch,
                "seq": d.seq,
            });
            if let Some(l) = lag_ms {
                v["lag_ms"] = l.into();
            }
            if !d.ok {
                v["attempt"] = d.attempt.into();
                v["error"] = d.error.clone().into();
            }
            out.push(v.to_string());
        } else {
            let what = match (d.ok, resync) {
                (true, false) => "delivered",
                (true, true) => "compared",
                (false, _) => "FAILED",
            };
            let shown = if path.is_root() {
                ".".to_string()
            } else {
                show(path.as_bytes())
            };
            let mut l = format!("{} {} {what} {shown}", d.target, d.root);
            if let Some(lag) = lag_ms {
                l.push_str(&format!(" (lag {lag} ms)"));
            }
            if !d.ok {
                l.push_str(&format!(
                    ": {} (attempt {}; journalled, retried)",
                    d.error, d.attempt
                ));
            }
            out.push(l);
        }
    }
    out
}

/// A ZeroMQ connect to a socket we may not open succeeds and then reads nothing,
/// forever; a plain connect first tells a user without the right to read the
/// streams so. A socket not there yet is fine: the instance may still be starting.
fn may_connect(endpoint: &str) -> Result<(), String> {
    let Some(path) = endpoint.strip_prefix("ipc://") else {
        return Ok(());
    };
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
            "cannot read the stream at `{path}`: permission denied; run syncbus tail as \
             the user syncbus runs as (or root)"
        )),
        _ => Ok(()),
    }
}

pub(crate) fn run(args: TailArgs) -> ExitCode {
    let config = match crate::instance::find_config(&args.which) {
        Ok(c) => c,
        Err(e) => {
            protocol::errln!("{e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    for r in &args.root {
        if config.root(r).is_none() {
            protocol::errln!("no root named `{r}` in this instance's config");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    }
    let glob = match args.path.as_deref().map(|g| {
        globset::GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .map(|g| g.compile_matcher())
    }) {
        None => None,
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            protocol::errln!("--path: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    for t in &args.target {
        if config.target(t).is_none() {
            protocol::errln!("no target named `{t}` in this instance's config");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    }
    let keep = |p: &PathBytes| glob.as_ref().is_none_or(|g| g.is_match(p.as_os_str()));
    let ctx = zmq::Context::new();
    let eps = Endpoints::new(&config);
    let subscribe = |endpoint: &str, topics: Vec<String>| -> Result<zmq::Socket, String> {
        may_connect(endpoint)?;
        let sub = bus::socket(&ctx, zmq::SUB).map_err(|e| e.to_string())?;
        for t in &topics {
            sub.set_subscribe(t.as_bytes())
                .map_err(|e| format!("cannot subscribe to `{t}`: {e}"))?;
        }
        bus::connect(&sub, endpoint).map_err(|e| e.to_string())?;
        Ok(sub)
    };
    let changes = (args.stream != Stream::Deliveries).then(|| {
        let topics = if args.root.is_empty() {
            vec![wire::CHANGES_TOPIC.to_string()]
        } else {
            args.root.iter().map(|r| wire::changes_topic(r)).collect()
        };
        subscribe(&eps.changes, topics)
    });
    let deliveries = (args.stream != Stream::Changes).then(|| {
        let topics = if args.target.is_empty() {
            vec![wire::DELIVERIES_TOPIC.to_string()]
        } else {
            args.target
                .iter()
                .map(|t| wire::deliveries_topic(t))
                .collect()
        };
        subscribe(&eps.deliveries, topics)
    });
    let (changes, deliveries) = match (changes.transpose(), deliveries.transpose()) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => {
            protocol::errln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    protocol::errln!(
        "following {} (Ctrl-C to stop)",
        config.runtime_dir.display()
    );
    let mut trackers: std::collections::HashMap<(bool, String), SeqTracker> = Default::default();
    let stdout = std::io::stdout();
    loop {
        let mut items = Vec::new();
        if let Some(c) = &changes {
            items.push(c.as_poll_item(zmq::POLLIN));
        }
        if let Some(d) = &deliveries {
            items.push(d.as_poll_item(zmq::POLLIN));
        }
        match zmq::poll(&mut items, -1) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => {
                protocol::errln!("poll: {e}");
                return ExitCode::FAILURE;
            }
        }
        let mut lines = Vec::new();
        for sock in changes.iter().chain(deliveries.iter()) {
            while let Ok(Some((_, payload))) = bus::try_recv(sock) {
                if let Ok(batch) = wire::decode::<ChangeBatch>(&payload) {
                    if !args.root.is_empty() && !args.root.contains(&batch.root) {
                        continue;
                    }
                    let seen = trackers
                        .entry((false, batch.root.clone()))
                        .or_default()
                        .observe(batch.epoch, batch.seq);
                    lines.extend(loss("changes", &batch.root, seen, args.json));
                    for c in &batch.changes {
                        if keep(&c.path) || c.from.as_ref().is_some_and(keep) {
                            lines.push(line(&batch, c, args.json));
                        }
                    }
                } else if let Ok(d) = wire::decode::<Delivery>(&payload) {
                    let seen = trackers
                        .entry((true, d.target.clone()))
                        .or_default()
                        .observe(d.epoch, d.seq);
                    lines.extend(loss("deliveries", &d.target, seen, args.json));
                    if args.root.is_empty() || args.root.contains(&d.root) {
                        lines.extend(delivery_lines(&d, &keep, args.json));
                    }
                } else {
                    protocol::errln!("undecodable message skipped");
                }
            }
        }
        let mut out = stdout.lock();
        for l in lines {
            if writeln!(out, "{l}").is_err() {
                // The reader went away (e.g. `| head`): stop quietly.
                return ExitCode::SUCCESS;
            }
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_show_invalid_bytes_escaped() {
        assert_eq!(show(b"caf\xc3\xa9/\xff x"), "café/\\xff x");
    }
}
