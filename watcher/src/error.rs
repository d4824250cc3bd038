//! The watcher's errors: the inotify limits, which a restart cannot fix, and the rest.

use std::io;
use std::path::{Path, PathBuf};

use protocol::bus::BusError;
use protocol::stage::StageError;
use thiserror::Error;

/// Errors of this stage; all end up as a [`StageError`].
#[derive(Debug, Error)]
pub enum WatcherError {
    #[error(
        "inotify watch limit reached (fs.inotify.max_user_watches = {limit}) while watching \
         `{path}`: raise it with `sysctl fs.inotify.max_user_watches=…`",
        path = path.display()
    )]
    WatchLimit { limit: String, path: PathBuf },
    #[error(
        "cannot create an inotify instance: limit reached (fs.inotify.max_user_instances = \
         {limit}, or the open-file limit of this process): raise it with \
         `sysctl fs.inotify.max_user_instances=…`"
    )]
    InstanceLimit { limit: String },
    #[error("inotify {op}: {source}")]
    Inotify {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl WatcherError {
    /// The stage outcome: the inotify limits are [`StageError::Environment`] (a restart
    /// cannot fix them), everything else [`StageError::Failed`].
    pub fn into_stage_error(self) -> StageError {
        let e = self;
        match e {
            WatcherError::WatchLimit { .. } | WatcherError::InstanceLimit { .. } => {
                StageError::Environment(e.to_string())
            }
            WatcherError::Inotify { op, source } => {
                StageError::Failed(format!("inotify {op}: {source}"))
            }
            WatcherError::Bus(b) => StageError::from(b),
        }
    }
}

/// The current value of `/proc/sys/fs/inotify/<name>`, for error messages.
pub(crate) fn inotify_sysctl(name: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys/fs/inotify").join(name))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_errors_name_the_sysctl_and_are_environment_errors() {
        let e = WatcherError::WatchLimit {
            limit: "8192".into(),
            path: "/srv/www/a".into(),
        };
        let msg = e.to_string();
        assert_eq!(
            msg,
            "inotify watch limit reached (fs.inotify.max_user_watches = 8192) while watching \
             `/srv/www/a`: raise it with `sysctl fs.inotify.max_user_watches=…`"
        );
        assert!(matches!(e.into_stage_error(), StageError::Environment(m) if m == msg));
        let e = WatcherError::InstanceLimit {
            limit: "128".into(),
        };
        assert!(e
            .to_string()
            .contains("fs.inotify.max_user_instances = 128"));
        assert!(matches!(e.into_stage_error(), StageError::Environment(_)));
    }
}
