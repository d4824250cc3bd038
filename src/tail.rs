//! `syncbus tail`: the change stream as lines, like `inotifywait -m` for the bus. Human
//! lines by default, one JSON object per line with `--json`; messages lost on the way
//! (a gap in `seq`, a restarted filter) are reported, never hidden.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use protocol::bus::{self, Endpoints};
use protocol::config::{Config, EXIT_BAD_CONFIG};
use protocol::seq::{Seen, SeqTracker};
use protocol::wire::{self, Change, ChangeBatch};

#[derive(clap::Args)]
pub struct TailArgs {
    /// The config file of the running syncbus (for its runtime dir).
    #[arg(long, short)]
    config: PathBuf,
    /// Only this root (repeatable).
    #[arg(long)]
    root: Vec<String>,
    /// Only paths matching this glob (`*` stays within a directory, `**` crosses them).
    #[arg(long)]
    path: Option<String>,
    /// One JSON object per line instead of human text.
    #[arg(long)]
    json: bool,
}

/// A path for people: UTF-8 as is, other bytes as `\xNN`.
fn show(path: &[u8]) -> String {
    let mut out = String::new();
    for chunk in path.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
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

fn loss(root: &str, seen: Seen, json: bool) -> Option<String> {
    let what = match seen {
        Seen::Gap { missed } => format!("{missed} message(s) lost"),
        Seen::NewEpoch => "the filter restarted".to_string(),
        Seen::First { .. } | Seen::InOrder => return None,
    };
    Some(if json {
        serde_json::json!({"stream": "changes", "root": root, "lost": what}).to_string()
    } else {
        format!("# {root}: {what}; changes may be missing here (syncbus itself resyncs)")
    })
}

pub fn run(args: TailArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    for r in &args.root {
        if config.root(r).is_none() {
            eprintln!("no root named `{r}` in {}", args.config.display());
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
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
            eprintln!("--path: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    let ctx = zmq::Context::new();
    let sub = match bus::socket(&ctx, zmq::SUB) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let topics: Vec<String> = if args.root.is_empty() {
        vec![wire::CHANGES_TOPIC.to_string()]
    } else {
        args.root.iter().map(|r| wire::changes_topic(r)).collect()
    };
    for t in &topics {
        if let Err(e) = sub.set_subscribe(t.as_bytes()) {
            eprintln!("cannot subscribe to `{t}`: {e}");
            return ExitCode::FAILURE;
        }
    }
    let endpoint = Endpoints::new(&config).changes;
    if let Err(e) = bus::connect(&sub, &endpoint) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    eprintln!("following {endpoint} (Ctrl-C to stop)");
    let mut trackers: std::collections::HashMap<String, SeqTracker> = Default::default();
    let stdout = std::io::stdout();
    loop {
        let parts = match sub.recv_multipart(0) {
            Ok(p) => p,
            Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                eprintln!("receive: {e}");
                return ExitCode::FAILURE;
            }
        };
        let Some(payload) = parts.get(1) else {
            continue;
        };
        let batch = match wire::decode::<ChangeBatch>(payload) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("undecodable message skipped: {e}");
                continue;
            }
        };
        let mut out = stdout.lock();
        let seen = trackers
            .entry(batch.root.clone())
            .or_default()
            .observe(batch.epoch, batch.seq);
        if let Some(l) = loss(&batch.root, seen, args.json) {
            let _ = writeln!(out, "{l}");
        }
        for c in &batch.changes {
            let keep = glob.as_ref().is_none_or(|g| {
                g.is_match(c.path.as_os_str())
                    || c.from.as_ref().is_some_and(|f| g.is_match(f.as_os_str()))
            });
            if keep && writeln!(out, "{}", line(&batch, c, args.json)).is_err() {
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
