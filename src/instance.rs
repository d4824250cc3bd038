//! Which syncbus instance a command means: its runtime dir (sockets, status files, the
//! lock), its state dir (journal, checkpoint) and the config its stages read.
//!
//! - `syncbus run --config FILE`: the config's own dirs, or `--runtime-dir` /
//!   `--state-dir` given on the command line (then the stages read a copy of the config
//!   with those dirs, written into the runtime dir once its lock is held).
//! - `syncbus run --source DIR --target URL…` (a one-liner): dirs of its own,
//!   `<default runtime dir>/instances/NAME` and `<default state dir>/instances/NAME`,
//!   where NAME is the source's base name and a hash of the source path and the target
//!   URLs. So one-liners run side by side with no extra flags, and the same one-liner
//!   started again finds its own journal, never another's.
//! - `status`, `tail` and `fail-log` find an instance by `--config`, by a one-liner's
//!   `--source DIR`, or by `--runtime-dir`; [`running`] lists the one-liners running.
//!
//! # Invariants
//! - Planning reads only: nothing is written into a runtime or state dir before
//!   `syncbus run` holds its locks ([`Plan::write_generated`] comes after them).
//! - A generated config reaches the stages as a sealed memfd the supervisor made
//!   (`--config /dev/fd/3`), never as a file they read back from the runtime dir; the
//!   copy written there is for `status`, `tail` and `fail-log` to find the instance.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use protocol::config::{self, Config};

/// The name of the config a runtime dir's instance was started with, when `syncbus run`
/// generated it (one-liners, and `--runtime-dir`/`--state-dir` overrides).
const GENERATED: &str = "generated.toml";
/// Where one-liners keep their dirs, under the default runtime and state dirs.
const INSTANCES: &str = "instances";

/// What `syncbus run` will run, worked out without writing anything.
pub(crate) struct Plan {
    /// The validated config.
    pub config: Config,
    /// The user's config file, or where the copy of a generated one goes.
    pub file: PathBuf,
    /// The config as the stages get it.
    pub text: String,
    /// Whether `text` was generated (a one-liner, or dirs given on the command line).
    pub generated: bool,
}

impl Plan {
    /// Writes the generated config, if any, into the runtime dir: only once the caller
    /// holds the runtime dir's lock, so a refused second instance never touches it.
    pub(crate) fn write_generated(&self) -> Result<(), String> {
        if !self.generated {
            return Ok(());
        }
        let text = &self.text;
        let tmp = self.file.with_extension("toml.tmp");
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.file));
        written.map_err(|e| format!("cannot write `{}`: {e}", self.file.display()))
    }
}

/// Why a plan could not be made.
pub(crate) enum PlanError {
    /// The command line is wrong (a message for the user).
    Usage(String),
    /// The config (the user's or the generated one) is invalid.
    Config(config::ConfigErrors, bool),
}

/// The options of `syncbus run` that say what to run.
pub(crate) struct RunWhat<'a> {
    pub config: Option<&'a Path>,
    pub source: Option<&'a Path>,
    pub targets: &'a [String],
    pub runtime_dir: Option<&'a Path>,
    pub state_dir: Option<&'a Path>,
    /// `--allow-wipe`: `allow_wipe = true` on every root of the generated config.
    pub allow_wipe: bool,
}

/// Works out the config, its dirs and the file the stages read. Reads only.
pub(crate) fn plan(what: &RunWhat) -> Result<Plan, PlanError> {
    let usage = PlanError::Usage;
    if let Some(c) = what.config {
        if what.runtime_dir.is_none() && what.state_dir.is_none() && !what.allow_wipe {
            let config = Config::load(c).map_err(|e| PlanError::Config(e, false))?;
            let text = std::fs::read_to_string(c)
                .map_err(|e| usage(format!("{}: cannot read: {e}", c.display())))?;
            return Ok(Plan {
                config,
                file: c.to_path_buf(),
                text,
                generated: false,
            });
        }
        // An override of the dirs: a copy of the config with them, paths made absolute
        // so the copy means the same from its own place.
        let config = Config::load(c).map_err(|e| PlanError::Config(e, false))?;
        let text = std::fs::read_to_string(c)
            .map_err(|e| usage(format!("{}: cannot read: {e}", c.display())))?;
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| usage(format!("{}: cannot parse: {e}", c.display())))?;
        let base = c
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        absolutize_paths(&mut table, &absolute(base).map_err(usage)?);
        let runtime_dir = match what.runtime_dir {
            Some(d) => absolute(d).map_err(usage)?,
            None => config.runtime_dir.clone(),
        };
        set_dirs(&mut table, Some(&runtime_dir), what.state_dir).map_err(usage)?;
        if what.allow_wipe {
            allow_wipe(&mut table);
        }
        return generated(table, &runtime_dir, false);
    }
    let Some(source) = what.source else {
        return Err(usage(
            "syncbus run: give `--config FILE`, or `--source DIR --target URL` (see `syncbus run --help`)".into(),
        ));
    };
    let src = std::fs::canonicalize(source)
        .map_err(|e| usage(format!("--source `{}`: {e}", source.display())))?;
    let src = src.to_str().ok_or_else(|| {
        usage(format!(
            "--source `{}`: a non-UTF-8 path cannot go in a config file",
            src.display()
        ))
    })?;
    let mut urls = Vec::new();
    for url in what.targets {
        urls.push(if config::is_local_url(url) {
            absolute(Path::new(url))
                .map_err(usage)?
                .to_string_lossy()
                .into_owned()
        } else {
            url.clone()
        });
    }
    let name = one_liner_name(src, &urls);
    let mut root = toml::Table::new();
    root.insert("name".into(), base_name(src).into());
    root.insert("path".into(), src.into());
    let targets = urls
        .into_iter()
        .enumerate()
        .map(|(i, url)| {
            let mut t = toml::Table::new();
            t.insert("name".into(), format!("target{}", i + 1).into());
            t.insert("url".into(), url.into());
            toml::Value::Table(t)
        })
        .collect();
    let mut table = toml::Table::new();
    table.insert(
        "root".into(),
        toml::Value::Array(vec![toml::Value::Table(root)]),
    );
    table.insert("target".into(), toml::Value::Array(targets));
    let runtime_dir = match what.runtime_dir {
        Some(d) => absolute(d).map_err(usage)?,
        None => config::default_runtime_dir().join(INSTANCES).join(&name),
    };
    let state_dir = match what.state_dir {
        Some(d) => absolute(d).map_err(usage)?,
        None => config::default_state_dir().join(INSTANCES).join(&name),
    };
    set_dirs(&mut table, Some(&runtime_dir), Some(&state_dir)).map_err(usage)?;
    if what.allow_wipe {
        allow_wipe(&mut table);
    }
    generated(table, &runtime_dir, true)
}

/// `allow_wipe = true` on every `[[root]]` (`syncbus run --allow-wipe`). Not part of a
/// one-liner's name: the same one-liner with the switch is the same instance.
fn allow_wipe(table: &mut toml::Table) {
    if let Some(toml::Value::Array(roots)) = table.get_mut("root") {
        for r in roots {
            if let toml::Value::Table(r) = r {
                r.insert("allow_wipe".into(), toml::Value::Boolean(true));
            }
        }
    }
}

fn generated(table: toml::Table, runtime_dir: &Path, one_liner: bool) -> Result<Plan, PlanError> {
    let text = format!(
        "# Generated by `syncbus run`; edit your own config instead.\n{}",
        toml::to_string(&table).map_err(|e| PlanError::Usage(e.to_string()))?
    );
    let file = runtime_dir.join(GENERATED);
    let config = Config::parse(&text, &file).map_err(|e| PlanError::Config(e, one_liner))?;
    Ok(Plan {
        config,
        file,
        text,
        generated: true,
    })
}

fn set_dirs(
    table: &mut toml::Table,
    runtime_dir: Option<&Path>,
    state_dir: Option<&Path>,
) -> Result<(), String> {
    for (section, key, value) in [
        ("bus", "runtime_dir", runtime_dir),
        ("retry", "state_dir", state_dir),
    ] {
        let Some(v) = value else { continue };
        let t = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if let toml::Value::Table(t) = t {
            let v = absolute(v)?.to_string_lossy().into_owned();
            t.insert(key.into(), toml::Value::String(v));
        }
    }
    Ok(())
}

/// A one-liner's instance name: the source's base name (for people) and a hash of the
/// source path and target URLs (for uniqueness), e.g. `www-5f0c1e2a`.
fn one_liner_name(source: &str, targets: &[String]) -> String {
    // FNV-1a, written out: the name must not change with a library's version.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in std::iter::once(source).chain(targets.iter().map(String::as_str)) {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let base: String = base_name(source).chars().take(24).collect();
    format!("{base}-{:08x}", (h >> 32) as u32 ^ h as u32)
}

/// The root name of a one-liner: the source's base name, in the characters names allow.
fn base_name(source: &str) -> String {
    Path::new(source)
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "source".into())
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("`{}`: {e}", p.display()))
}

/// Makes the relative paths of a config absolute, so a copy elsewhere means the same.
fn absolutize_paths(table: &mut toml::Table, base: &Path) {
    let fix = |v: &mut toml::Value, local_only: bool| {
        if let toml::Value::String(s) = v {
            if !Path::new(s.as_str()).is_absolute() && (!local_only || config::is_local_url(s)) {
                *s = base.join(s.as_str()).to_string_lossy().into_owned();
            }
        }
    };
    for (section, key) in [("bus", "runtime_dir"), ("retry", "state_dir")] {
        if let Some(toml::Value::Table(t)) = table.get_mut(section) {
            if let Some(v) = t.get_mut(key) {
                fix(v, false);
            }
        }
    }
    for (section, keys) in [
        ("root", &["path"][..]),
        (
            "target",
            &["url", "password_file", "identity_file", "header_file"][..],
        ),
    ] {
        if let Some(toml::Value::Array(items)) = table.get_mut(section) {
            for item in items {
                if let toml::Value::Table(t) = item {
                    for key in keys {
                        if let Some(v) = t.get_mut(*key) {
                            fix(v, *key == "url");
                        }
                    }
                    // A command named by a relative path (`./bin/hook`), not one from PATH.
                    if let Some(toml::Value::Array(argv)) = t.get_mut("command") {
                        if let Some(v @ toml::Value::String(_)) = argv.first_mut() {
                            if v.as_str().is_some_and(|p| p.contains('/')) {
                                fix(v, false);
                            }
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- finding one

/// How `status`, `tail` and `fail-log` name the instance they look at.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct Which {
    /// The config file of the running syncbus.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The source directory of a one-liner (`syncbus run --source DIR --target …`).
    #[arg(long, conflicts_with = "config")]
    pub source: Option<PathBuf>,
    /// The runtime dir the instance was started with (`syncbus run --runtime-dir`).
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
}

impl Which {
    pub(crate) fn is_default(&self) -> bool {
        self.config.is_none() && self.source.is_none() && self.runtime_dir.is_none()
    }
}

/// A one-liner (or an instance with overridden dirs) that is running now.
pub(crate) struct Running {
    pub runtime_dir: PathBuf,
    pub config: Config,
}

impl Running {
    /// `SOURCE → TARGET, …` for listings.
    pub(crate) fn describe(&self) -> String {
        let roots: Vec<String> = self
            .config
            .roots
            .iter()
            .map(|r| r.path.display().to_string())
            .collect();
        let targets: Vec<String> = self
            .config
            .targets
            .iter()
            .map(|t| {
                let d = t.destination(t.roots.first().map_or("", String::as_str));
                if d.is_empty() {
                    t.name.clone()
                } else {
                    d
                }
            })
            .collect();
        format!(
            "{} → {}  (--runtime-dir {})",
            roots.join(", "),
            targets.join(", "),
            self.runtime_dir.display()
        )
    }
}

/// The one-liners running as this user, found by their runtime dirs' held locks.
pub(crate) fn running() -> Vec<Running> {
    let base = config::default_runtime_dir().join(INSTANCES);
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Vec::new();
    };
    let mut out: Vec<Running> = entries
        .filter_map(|e| {
            let dir = e.ok()?.path();
            if !is_locked(&dir) {
                return None;
            }
            let config = Config::load(&dir.join(GENERATED)).ok()?;
            Some(Running {
                runtime_dir: dir,
                config,
            })
        })
        .collect();
    out.sort_by(|a, b| a.runtime_dir.cmp(&b.runtime_dir));
    out
}

/// Whether a `syncbus run` holds this runtime dir's lock now.
pub(crate) fn is_locked(runtime_dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(runtime_dir.join(LOCK_FILE)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; a lock we get is released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

/// The lock file `syncbus run` holds in its runtime dir (and in its state dir).
pub(crate) const LOCK_FILE: &str = "run.lock";

/// The instance `which` names: its config if one is known, and its runtime dir.
pub(crate) fn find(which: &Which) -> Result<(Option<Config>, PathBuf), String> {
    if let Some(source) = &which.source {
        let want = std::fs::canonicalize(source)
            .map_err(|e| format!("--source `{}`: {e}", source.display()))?;
        let all = running();
        let mut found: Vec<Running> = all
            .iter()
            .filter(|r| r.config.roots.iter().any(|root| root.path == want))
            .map(|r| Running {
                runtime_dir: r.runtime_dir.clone(),
                config: r.config.clone(),
            })
            .collect();
        return match found.len() {
            1 => {
                let r = found.remove(0);
                Ok((Some(r.config), r.runtime_dir))
            }
            0 => Err(format!(
                "no running `syncbus run --source` mirrors `{}`{}",
                want.display(),
                listing(&all)
            )),
            _ => Err(format!(
                "several running instances mirror `{}`; pick one with --runtime-dir{}",
                want.display(),
                listing(&found)
            )),
        };
    }
    if let Some(dir) = &which.runtime_dir {
        let dir = absolute(dir)?;
        let generated = dir.join(GENERATED);
        let config = match &which.config {
            _ if generated.exists() => Some(Config::load(&generated).map_err(|e| e.to_string())?),
            Some(c) => {
                let mut c = Config::load(c).map_err(|e| e.to_string())?;
                c.runtime_dir = dir.clone();
                Some(c)
            }
            None => None,
        };
        return Ok((config, dir));
    }
    match &which.config {
        Some(file) => {
            let c = Config::load(file).map_err(|e| e.to_string())?;
            let dir = c.runtime_dir.clone();
            Ok((Some(c), dir))
        }
        None => Ok((None, config::default_runtime_dir())),
    }
}

/// The config of the instance `which` names; an error saying how to name one when
/// none is known (no `--config`, and no one-liner found).
pub(crate) fn find_config(which: &Which) -> Result<Config, String> {
    let (config, dir) = find(which)?;
    config.ok_or_else(|| {
        let running = running();
        format!(
            "which syncbus? give `--config FILE`, a one-liner's `--source DIR`, or `--runtime-dir DIR` (nothing generated a config in `{}`){}",
            dir.display(),
            listing(&running)
        )
    })
}

/// The running one-liners as lines for a message, or nothing.
pub(crate) fn listing(all: &[Running]) -> String {
    if all.is_empty() {
        return String::new();
    }
    let mut s = String::from("\nrunning here:");
    for r in all {
        s.push_str("\n  ");
        s.push_str(&r.describe());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_liner_names_tell_sources_and_targets_apart_and_stay_put() {
        let a = one_liner_name("/srv/www", &["rsync://h/m/".into()]);
        assert_eq!(a, one_liner_name("/srv/www", &["rsync://h/m/".into()]));
        assert!(a.starts_with("www-") && a.len() == "www-".len() + 8, "{a}");
        assert_ne!(a, one_liner_name("/srv/www", &["rsync://h/n/".into()]));
        assert_ne!(a, one_liner_name("/old/www", &["rsync://h/m/".into()]));
        // The separator keeps `a`,`bc` apart from `ab`,`c`.
        assert_ne!(
            one_liner_name("/x", &["a".into(), "bc".into()]),
            one_liner_name("/x", &["ab".into(), "c".into()])
        );
        assert_eq!(base_name("/srv/my site"), "my_site");
        assert_eq!(base_name("/"), "source");
    }

    /// `--allow-wipe` reaches every root of the generated config, of a
    /// one-liner (same instance as without it) and of a config file alike.
    #[test]
    fn allow_wipe_goes_to_every_root_and_keeps_the_instance() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let targets = [d.path().join("t").display().to_string()];
        let what = |allow_wipe| RunWhat {
            config: None,
            source: Some(&src),
            targets: &targets,
            runtime_dir: Some(d.path()),
            state_dir: Some(d.path()),
            allow_wipe,
        };
        let (off, on) = (
            plan(&what(false)).ok().unwrap(),
            plan(&what(true)).ok().unwrap(),
        );
        assert!(!off.config.roots[0].allow_wipe);
        assert!(on.config.roots[0].allow_wipe);
        assert_eq!(off.config.roots[0].name, on.config.roots[0].name);

        std::fs::create_dir(d.path().join("src2")).unwrap();
        let file = d.path().join("c.toml");
        std::fs::write(
            &file,
            "[[root]]\nname = \"a\"\npath = \"src\"\n[[root]]\nname = \"b\"\npath = \"src2\"\n\
             [[target]]\nname = \"t\"\nurl = \"t\"\n",
        )
        .unwrap();
        let with_file = RunWhat {
            config: Some(&file),
            source: None,
            targets: &[],
            runtime_dir: Some(d.path()),
            state_dir: None,
            allow_wipe: true,
        };
        let p = match plan(&with_file) {
            Ok(p) => p,
            Err(PlanError::Usage(m)) => panic!("{m}"),
            Err(PlanError::Config(e, _)) => panic!("{e}"),
        };
        assert!(p.config.roots.iter().all(|r| r.allow_wipe));
    }
}
