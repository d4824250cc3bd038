//! Whether a failing target answers again: a TCP connect to its daemon or ssh port, a
//! look at a local target's parent. A probe runs on a thread of its own (a connect or a
//! DNS lookup may block); its answer comes back on a channel the loop reads.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use protocol::config::Endpoint;

/// How to tell cheaply whether a target is reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    Tcp(String),
    Dir(PathBuf),
    /// Nothing to probe (a command target): the backoff alone decides.
    None,
}

/// Probe answers: (target, reachable).
pub(crate) type ProbeTx = Sender<(String, bool)>;
pub(crate) type ProbeRx = Receiver<(String, bool)>;

pub(crate) fn probe_of(endpoint: &Endpoint) -> Probe {
    match (endpoint, endpoint.address()) {
        (_, Some(addr)) => Probe::Tcp(addr),
        (Endpoint::Local { path }, None) => Probe::Dir(
            path.parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| path.clone()),
        ),
        (_, None) => Probe::None,
    }
}

fn reachable(probe: &Probe) -> bool {
    match probe {
        Probe::Tcp(addr) => addr.to_socket_addrs().is_ok_and(|mut addrs| {
            addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
        }),
        Probe::Dir(p) => p.is_dir(),
        Probe::None => false,
    }
}

/// Probes `target` on a thread of its own, which sends the answer on `tx`. False when
/// no thread could be started (nothing will be sent).
pub(crate) fn spawn(target: &str, probe: Probe, tx: ProbeTx) -> bool {
    let who = target.to_string();
    std::thread::Builder::new()
        .name(format!("probe-{target}"))
        .spawn(move || {
            let _ = tx.send((who, reachable(&probe)));
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_address_the_daemon_or_ssh_port() {
        let rsync = |url: &str| Endpoint::Rsync {
            url: url.into(),
            password_file: None,
        };
        assert_eq!(
            probe_of(&rsync("rsync://127.0.0.1:8873/m/")),
            Probe::Tcp("127.0.0.1:8873".into())
        );
        assert_eq!(
            probe_of(&rsync("rsync://u@backup/m/sub/")),
            Probe::Tcp("backup:873".into())
        );
        assert_eq!(
            probe_of(&rsync("rsync://[::1]:9/m/")),
            Probe::Tcp("[::1]:9".into())
        );
        let ssh = Endpoint::Ssh {
            dest: "me@web2:/srv/www/".into(),
            port: Some(2222),
            identity_file: None,
            options: vec![],
        };
        assert_eq!(probe_of(&ssh), Probe::Tcp("web2:2222".into()));
        let local = Endpoint::Local {
            path: "/mnt/backup/www".into(),
        };
        assert_eq!(probe_of(&local), Probe::Dir("/mnt/backup".into()));
        let tcp = Endpoint::Tcp {
            addr: "192.168.138.20:8009".into(),
            framing: protocol::config::Framing::Sersync,
            include: vec![],
            exclude: vec![],
            after: vec![],
        };
        assert_eq!(probe_of(&tcp), Probe::Tcp("192.168.138.20:8009".into()));
    }
}
