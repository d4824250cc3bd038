//! The seam every transport sits behind: a `Runner` runs one target's work of one
//! lane, by rsync or by the target's program, webhook or TCP listener.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::config::{Endpoint, Target};

use crate::command::RunResult;
use ::rsync::Outcome;

use super::*;

/// Runs rsync for one target; one per thread (its rules file is its own).
pub(super) struct Runner {
    pub(super) target: Target,
    pub(super) tmp: tempfile::TempDir,
    pub(super) control: Arc<Control>,
    /// The full lane counts the entries its runs list (`--out-format=%n`), for the
    /// progress lines in the log.
    pub(super) progress: Option<Arc<AtomicU64>>,
    /// A command or webhook target's include/exclude globs, compiled once.
    pub(super) globs: Option<(GlobPair, GlobPair)>,
    /// Options the root guard adds to every run for a while (`--dry-run` for its
    /// probe, `--max-delete=0` for a compare that must not delete).
    pub(super) guard_args: Mutex<Vec<&'static str>>,
    /// A webhook target's HTTP client, kept so connections are reused across batches.
    pub(super) agent: Option<ureq::Agent>,
}

impl Runner {
    pub(super) fn new(
        target: Target,
        runtime_dir: &Path,
        lane: &str,
        control: Arc<Control>,
    ) -> std::io::Result<Self> {
        // Private (0700) scratch for rules files, inside the private runtime dir. Its
        // name is fixed per target and lane, so the one a killed dispatcher left behind
        // is removed here rather than piling up, one pair per crash.
        let name = format!("dispatcher-{}-{lane}.tmp", target.name);
        match std::fs::remove_dir_all(runtime_dir.join(&name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let tmp = tempfile::Builder::new()
            .prefix(&name)
            .rand_bytes(0)
            .tempdir_in(runtime_dir)?;
        let globs = match &target.endpoint {
            Endpoint::Command {
                include, exclude, ..
            }
            | Endpoint::Http {
                include, exclude, ..
            }
            | Endpoint::Tcp {
                include, exclude, ..
            } => Some((GlobPair::new(include), GlobPair::new(exclude))),
            _ => None,
        };
        let agent = matches!(target.endpoint, Endpoint::Http { .. }).then(|| {
            let timeout = (target.timeout > 0).then(|| Duration::from_secs(target.timeout));
            ureq::Agent::config_builder()
                .tls_config(
                    ureq::tls::TlsConfig::builder()
                        .root_certs(system_roots())
                        .build(),
                )
                .timeout_global(timeout)
                .http_status_as_error(false)
                .allow_non_standard_methods(true)
                .build()
                .into()
        });
        Ok(Runner {
            target,
            tmp,
            control,
            progress: None,
            globs,
            agent,
            guard_args: Default::default(),
        })
    }

    /// Counts a run for the status: runs, failed runs, bytes sent.
    pub(super) fn count_run(&self, result: &RunResult, sent: u64) {
        self.control.post(&self.target.name, |t| {
            t.runs += 1;
            t.failed_runs += u64::from(result.outcome != Outcome::Success);
            t.bytes_sent += sent;
        });
    }

    /// A command, webhook or tcp target: given the paths, no rsync.
    pub(super) fn is_hook(&self) -> bool {
        matches!(
            self.target.endpoint,
            Endpoint::Command { .. } | Endpoint::Http { .. } | Endpoint::Tcp { .. }
        )
    }

    pub(super) fn write_rules(&self, rules: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.tmp.path().join("rules");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(rules)?;
        Ok(path)
    }

    pub(super) fn set_guard_args(&self, args: &[&'static str]) {
        if let Ok(mut g) = self.guard_args.lock() {
            *g = args.to_vec();
        }
    }
}

/// The CA bundles of the usual distributions (the list openssl-probe knows), tried in
/// order after `SSL_CERT_FILE`.
const CA_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Arch, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/pki/tls/cacert.pem",            // OpenELEC
    "/etc/ssl/cert.pem",                  // Alpine, macOS-likes
];

/// The roots webhooks trust: the system's CA store (`update-ca-certificates` puts a
/// private CA from /usr/local/share/ca-certificates into the Debian bundle), or the
/// file `SSL_CERT_FILE` names, as curl and openssl do; the Mozilla roots compiled into
/// ureq only where the system has no bundle. Read once per worker, at its start.
fn system_roots() -> ureq::tls::RootCerts {
    let named = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let candidates = named
        .into_iter()
        .chain(CA_BUNDLES.iter().map(std::path::PathBuf::from));
    for path in candidates {
        let Ok(pem) = std::fs::read(&path) else {
            continue;
        };
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            tracing::debug!(bundle = %path.display(), certs = certs.len(), "webhook CA roots");
            return ureq::tls::RootCerts::new_with_certs(&certs);
        }
    }
    tracing::warn!("no system CA bundle found (SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt, …): webhooks trust the built-in Mozilla roots only");
    ureq::tls::RootCerts::WebPki
}
