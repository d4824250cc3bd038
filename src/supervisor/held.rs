//! The runtime and state dirs held for as long as `syncbus run` runs: private, locked.

use super::*;

/// The runtime and state dirs, held: opened without following symlinks, checked to be
/// this user's own and private ([`bus::private_dir`]), and locked, for as long as
/// `syncbus run` runs.
pub(super) struct Held {
    pub(super) runtime_dir: PathBuf,
    pub(super) state_dir: PathBuf,
    /// (device, inode) of the runtime dir as opened: the path naming another one later
    /// means it was removed (or replaced) under us.
    runtime_id: (u64, u64),
    _dirs: Vec<OwnedFd>,
    _locks: Vec<File>,
}

/// Why the runtime or state dir cannot be held; the kind decides the exit code.
#[derive(Debug, thiserror::Error)]
pub(super) enum HoldError {
    /// The dir is not fit for use: a symlink, someone else's, not private.
    #[error("cannot use the {what} `{}`: {message}", dir.display())]
    Unfit {
        what: &'static str,
        dir: PathBuf,
        message: String,
    },
    /// The dir's lock cannot be taken: another instance holds it, or its lock file
    /// cannot be opened.
    #[error("{0}")]
    Lock(String),
}

impl HoldError {
    /// 78 (EX_CONFIG) for a dir the config should not name, 69 (EX_UNAVAILABLE) for one
    /// that is taken.
    pub(super) fn exit_code(&self) -> u8 {
        (match self {
            HoldError::Unfit { .. } => EXIT_CONFIG,
            HoldError::Lock(_) => EXIT_UNAVAILABLE,
        }) as u8
    }
}

impl Held {
    pub(super) fn take(config: &Config) -> Result<Held, HoldError> {
        let open = |dir: &Path, what: &'static str| {
            bus::private_dir(dir).map_err(|message| HoldError::Unfit {
                what,
                dir: dir.to_path_buf(),
                message,
            })
        };
        let runtime = open(&config.runtime_dir, "runtime dir")?;
        let state = open(&config.retry.state_dir, "state dir")?;
        let id = |fd: &OwnedFd| {
            File::from(fd.try_clone().ok()?)
                .metadata()
                .ok()
                .map(|m| (m.dev(), m.ino()))
        };
        let runtime_id = id(&runtime).unwrap_or_default();
        let mut locks =
            vec![lock(&runtime, &config.runtime_dir, "runtime dir").map_err(HoldError::Lock)?];
        // One dir for both is one lock (a second flock of the same file would fail).
        if id(&state) != Some(runtime_id) {
            locks
                .push(lock(&state, &config.retry.state_dir, "state dir").map_err(HoldError::Lock)?);
        }
        Ok(Held {
            runtime_dir: config.runtime_dir.clone(),
            state_dir: config.retry.state_dir.clone(),
            runtime_id,
            _dirs: vec![runtime, state],
            _locks: locks,
        })
    }

    /// Whether the runtime dir's path still names the dir we hold.
    pub(super) fn runtime_dir_intact(&self) -> bool {
        std::fs::symlink_metadata(&self.runtime_dir)
            .is_ok_and(|m| m.is_dir() && (m.dev(), m.ino()) == self.runtime_id)
    }
}

/// Takes a dir's lock, so two instances never share sockets or a journal. The lock file
/// is opened inside the held dir, never through a symlink. `what` is "runtime dir" or
/// "state dir", for the message.
fn lock(dir_fd: &OwnedFd, dir: &Path, what: &str) -> Result<File, String> {
    let name = std::ffi::CString::new(instance::LOCK_FILE).expect("no NUL in a constant");
    // SAFETY: openat(2) relative to a directory fd we hold, with a NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir_fd.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    let path = dir.join(instance::LOCK_FILE);
    if fd < 0 {
        return Err(format!(
            "cannot open `{}`: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` was just opened and is owned by the File from here on.
    let mut f = unsafe { File::from_raw_fd(fd) };
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(format!(
            "another `syncbus run` (pid {}) uses the {what} `{}`; stop it, or give this one its own ({})",
            holder.trim(),
            dir.display(),
            if what == "state dir" {
                "`retry.state_dir` or `--state-dir`"
            } else {
                "`bus.runtime_dir` or `--runtime-dir`"
            }
        ));
    }
    use std::io::Write;
    let _ = f.set_len(0);
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}
