//! What an rsync exit code means for the work it carried: done, try again, narrow
//! it down to the paths that fail, or wait for someone to fix something.

use std::process::ExitStatus;

/// What to do after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Transient (network, target busy): try again soon.
    Retry,
    /// Some paths could not be sent and the rest was (rsync's 23): a failure, retried
    /// like `Retry`, but an incremental run is first narrowed to the paths that fail.
    Partial,
    /// Retrying will not help until someone changes something: try again rarely, loudly.
    Fatal,
}

/// rsync's exit code (`None`: killed by a signal) → what to do.
pub fn classify(code: Option<i32>) -> Outcome {
    match code {
        // 24: some source files vanished — they are gone, and their delete is on its way.
        Some(0 | 24) => Outcome::Success,
        // syntax/usage, protocol incompatibility, action not supported, --max-delete.
        Some(1 | 2 | 4 | 25) => Outcome::Fatal,
        Some(23) => Outcome::Partial,
        // 3 file selection, 5 starting protocol, 6 daemon log, 10 socket I/O, 11 file I/O,
        // 12 protocol stream, 13 diagnostics, 14 IPC, 20 signal, 21 waitpid, 22 memory,
        // 30 timeout, 35 connect timeout, 255 ssh, a signal, or anything unknown:
        // transient until proven otherwise.
        _ => Outcome::Retry,
    }
}

pub fn classify_status(status: ExitStatus) -> Outcome {
    classify(status.code())
}

/// A run to a two-way peer, given its outcome by exit code and its error line: a
/// usage error that only says the peer's `.syncbus/incoming` is missing means a peer
/// whose syncbus has not started yet (it makes the directory when it starts), so
/// try again.
pub fn classify_two_way(outcome: Outcome, error: &str) -> Outcome {
    if outcome == Outcome::Fatal && error.contains("temp-dir does not exist") {
        Outcome::Retry
    } else {
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_two_way_peer_not_started_yet_is_retried() {
        use Outcome::*;
        let missing = "rsync: [Receiver] temp-dir does not exist: .syncbus/incoming";
        let table = [
            (Fatal, missing, Retry),
            (Fatal, "rsync: unknown option", Fatal),
            (Retry, missing, Retry),
            (Success, "", Success),
        ];
        for (outcome, error, want) in table {
            assert_eq!(
                classify_two_way(outcome, error),
                want,
                "{outcome:?} {error}"
            );
        }
    }

    #[test]
    fn exit_code_table() {
        use Outcome::*;
        let table: &[(Option<i32>, Outcome)] = &[
            (Some(0), Success),
            (Some(24), Success),
            (Some(1), Fatal),
            (Some(2), Fatal),
            (Some(4), Fatal),
            (Some(25), Fatal),
            (Some(3), Retry),
            (Some(5), Retry),
            (Some(6), Retry),
            (Some(10), Retry),
            (Some(11), Retry),
            (Some(12), Retry),
            (Some(13), Retry),
            (Some(14), Retry),
            (Some(20), Retry),
            (Some(21), Retry),
            (Some(22), Retry),
            (Some(23), Partial),
            (Some(30), Retry),
            (Some(35), Retry),
            (Some(255), Retry),
            (Some(77), Retry),
            (None, Retry),
        ];
        for &(code, want) in table {
            assert_eq!(classify(code), want, "exit {code:?}");
        }
        assert_eq!(classify_status(ExitStatus::from_raw(9)), Retry, "SIGKILL");
        assert_eq!(classify_status(ExitStatus::from_raw(24 << 8)), Success);
    }
}
