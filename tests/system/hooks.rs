//! Command hooks that fail: a hook that succeeded for a path is
//! never run again for it, and `on_failure = "log"` (sersync's `ignoreError="true"`)
//! logs and counts a failure instead of retrying it.

use std::fs;

use testkit::write_mode;

use crate::status::status;
use crate::{Mirror, CONVERGE};

/// A mirror with a command target `hook` that appends each path it is given to
/// `hook.log` and fails for names containing `bad`; retries come quickly.
fn with_hook(on_failure: &str) -> (Mirror, std::path::PathBuf) {
    let mut m = Mirror::new(1, "");
    let log = m.dir.path().join("hook.log");
    let script = m.dir.path().join("hook.sh");
    write_mode(
        &script,
        format!(
            "#!/bin/sh\necho \"$1\" >> '{}'\ncase \"$1\" in *bad*) exit 1;; esac\n",
            log.display()
        )
        .as_bytes(),
        0o755,
    );
    let mut text = fs::read_to_string(&m.config).unwrap();
    text = text.replace("[retry]\n", "[retry]\ninitial_ms = 100\nmax_s = 1\n");
    text.push_str(&format!(
        "\n[[target]]\nname = \"hook\"\ncommand = [\"{}\"]\npaths = \"each\"\n{on_failure}\n",
        script.display()
    ));
    fs::write(&m.config, text).unwrap();
    m.start().wait_ready();
    (m, log)
}

fn runs(log: &std::path::Path, path: &str) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == path)
        .count()
}

#[test]
fn a_hook_that_succeeded_for_a_path_is_not_run_again_when_another_fails() {
    let (m, log) = with_hook("");
    for name in ["good1", "bad", "good2"] {
        fs::write(m.s(name), name).unwrap();
    }
    m.wait_for("the failing path retried twice", CONVERGE, || {
        (runs(&log, "./bad") >= 3).then_some(())
    });
    assert_eq!(
        runs(&log, "./good1"),
        1,
        "{}",
        fs::read_to_string(&log).unwrap()
    );
    assert_eq!(
        runs(&log, "./good2"),
        1,
        "{}",
        fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn on_failure_log_counts_a_failed_hook_and_does_not_retry_it() {
    let (m, log) = with_hook("on_failure = \"log\"");
    fs::write(m.s("bad"), "x").unwrap();
    fs::write(m.s("good"), "y").unwrap();
    // Nothing is owed afterwards (a retried failure would stay in the backlog: this
    // hook always fails for it), and the failure is counted.
    m.wait_for("the failure counted, nothing owed", CONVERGE, || {
        let (_, r) = status(&m);
        let t = &r["targets"]["hook"];
        (runs(&log, "./good") == 1
            && t["ignored_failures"].as_u64() == Some(1)
            && t["backlog"].as_u64() == Some(0))
        .then_some(())
    });
    // Later work still runs, and the failed path was not run again meanwhile.
    fs::write(m.s("later"), "z").unwrap();
    m.wait_for("a later path ran", CONVERGE, || {
        (runs(&log, "./later") == 1).then_some(())
    });
    assert_eq!(
        runs(&log, "./bad"),
        1,
        "{}",
        fs::read_to_string(&log).unwrap()
    );
    assert!(m.log().contains("not retried"), "{}", m.log());
}
