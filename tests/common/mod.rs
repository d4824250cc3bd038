//! Helpers shared by the system test binaries (`tests/system`, `tests/overflow`).
// Each binary uses a different subset.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::{eventually, wait_trees_equal, Proc, RsyncDaemon};

pub const CONVERGE: Duration = Duration::from_secs(60);

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_syncbus"))
}

/// A source tree, N rsync daemons as targets, and a config binding them.
pub struct Mirror {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub dsts: Vec<PathBuf>,
    pub daemons: Vec<RsyncDaemon>,
    pub config: PathBuf,
    pub proc: Option<Proc>,
    /// `RUST_LOG` for `syncbus run` (default: the test's own, else `info`).
    pub log_filter: Option<String>,
    ready_n: u32,
}

impl Mirror {
    /// `root_extra` is appended to the `[[root]]` table (excludes, events, …).
    pub fn new(targets: usize, root_extra: &str) -> Mirror {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        let mut daemons = Vec::new();
        let mut dsts = Vec::new();
        let mut text = format!(
            "[bus]\nruntime_dir = \"run\"\n\n[retry]\nstate_dir = \"state\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[[root]]\nname = \"r\"\npath = \"src\"\n{root_extra}\n"
        );
        for i in 0..targets {
            let dst = dir.path().join(format!("dst{i}"));
            let d = RsyncDaemon::start(&dst);
            text.push_str(&format!(
                "\n[[target]]\nname = \"t{i}\"\nurl = \"{}\"\ntimeout = 10\n",
                d.url()
            ));
            daemons.push(d);
            dsts.push(dst);
        }
        let config = dir.path().join("syncbus.toml");
        fs::write(&config, text).unwrap();
        Mirror {
            dir,
            src,
            dsts,
            daemons,
            config,
            proc: None,
            log_filter: None,
            ready_n: 0,
        }
    }

    /// Adds a `[[target]]` table (its keys in `keys`, without `name`: it is `t<N>`)
    /// mirroring into `dst`, a directory on this machine however it is reached.
    pub fn add_target(&mut self, keys: &str, dst: PathBuf) -> &mut Self {
        let mut text = fs::read_to_string(&self.config).unwrap();
        text.push_str(&format!(
            "\n[[target]]\nname = \"t{}\"\n{keys}",
            self.dsts.len()
        ));
        fs::write(&self.config, text).unwrap();
        fs::create_dir_all(&dst).unwrap();
        self.dsts.push(dst);
        self
    }

    pub fn start(&mut self) -> &mut Self {
        let args = [
            std::ffi::OsStr::new("run"),
            std::ffi::OsStr::new("--config"),
            self.config.as_os_str(),
        ];
        self.proc = Some(match &self.log_filter {
            Some(f) => Proc::start_logging(bin(), args, f),
            None => Proc::start(bin(), args),
        });
        self
    }

    /// Proves the whole pipeline is live: a file written now reaches every target.
    pub fn wait_ready(&mut self) -> &mut Self {
        self.ready_n += 1;
        let content = format!("ready {}\n", self.ready_n);
        let name = ".syncbus-test-ready";
        fs::write(self.src.join(name), &content).unwrap();
        for dst in &self.dsts {
            let p = dst.join(name);
            let r = std::panic::catch_unwind(|| {
                eventually(&format!("sentinel in {}", dst.display()), CONVERGE, || {
                    (fs::read_to_string(&p).ok()? == content).then_some(())
                })
            });
            if let Err(e) = r {
                eprintln!("--- syncbus log ---\n{}", self.log());
                std::panic::resume_unwind(e);
            }
        }
        self
    }

    pub fn converge(&self) {
        for dst in &self.dsts {
            self.converge_to(dst);
        }
    }

    pub fn converge_to(&self, dst: &Path) {
        let r = std::panic::catch_unwind(|| wait_trees_equal(&self.src, dst, CONVERGE));
        if let Err(e) = r {
            eprintln!("--- syncbus log ---\n{}", self.log());
            std::panic::resume_unwind(e);
        }
    }

    /// `eventually`, printing syncbus's log when it times out.
    pub fn wait_for<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(what, timeout, f)
        })) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("--- syncbus log ---\n{}", self.log());
                std::panic::resume_unwind(e);
            }
        }
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    pub fn s(&self, rel: &str) -> PathBuf {
        self.src.join(rel)
    }

    /// A crash of everything at once, as by the OOM killer: SIGKILL to `syncbus run`
    /// and to every stage it started (their rsyncs get their parent-death signal), so
    /// nothing drains and nothing is handed over.
    pub fn crash(&mut self) {
        let log = self.log();
        let mut pids = vec![self.proc.as_ref().unwrap().pid()];
        pids.extend(protocol::stage::STAGES.map(|stage| stage_pid(&log, stage)));
        for pid in pids {
            // SAFETY: kill(2) with pids of our child and its children.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.proc.as_mut().unwrap().wait_exit(CONVERGE);
    }
}

/// The pid of the newest start of `stage` in a supervisor log.
pub fn stage_pid(log: &str, stage: &str) -> i32 {
    log.lines()
        .rev()
        .filter(|l| l.contains("stage started") && l.contains(&format!("stage=\"{stage}\"")))
        .filter_map(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .next()
        .unwrap_or_else(|| panic!("no start of {stage} in log:\n{log}"))
}
