//! How the stages get their config: the user's file, or a generated one as a sealed memfd.

use super::*;

/// How the stages get their config: the user's file by its path, or a generated one as
/// a sealed memfd each stage inherits as fd 3 (`--config /dev/fd/3`), so no stage ever
/// reads a config from a dir where someone else might have put one.
pub(super) enum StagedConfig {
    File(PathBuf),
    Memfd(OwnedFd),
}

/// The fd number a stage finds a generated config at.
pub(super) const CONFIG_FD: i32 = 3;

impl StagedConfig {
    pub(super) fn of(plan: &instance::Plan) -> std::io::Result<StagedConfig> {
        if !plan.generated {
            return Ok(StagedConfig::File(plan.file.clone()));
        }
        let name = std::ffi::CString::new("syncbus.toml").expect("no NUL in a constant");
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just made.
        let mut f = unsafe { File::from_raw_fd(fd) };
        std::io::Write::write_all(&mut f, plan.text.as_bytes())?;
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(StagedConfig::Memfd(OwnedFd::from(f)))
    }

    /// The `--config` argument, and the fd to hand over as [`CONFIG_FD`].
    pub(super) fn arg(&self) -> (std::ffi::OsString, Option<i32>) {
        match self {
            StagedConfig::File(p) => (p.clone().into_os_string(), None),
            StagedConfig::Memfd(fd) => {
                (format!("/dev/fd/{CONFIG_FD}").into(), Some(fd.as_raw_fd()))
            }
        }
    }
}
