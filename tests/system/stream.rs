//! The open bus (issue #4): outsiders follow the change stream.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Mirror, CONVERGE};

/// examples/subscribe.py (pyzmq + msgpack), run against a live syncbus, prints the
/// changes it decodes, odd names included.
#[test]
fn the_python_example_subscriber_decodes_the_change_stream() {
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    let out = m.dir.path().join("subscriber.out");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/subscribe.py");
    let mut py = KillOnDrop(
        Command::new("python3")
            .arg(&script)
            .arg("--runtime-dir")
            .arg(m.dir.path().join("run"))
            .stdout(fs::File::create(&out).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    m.wait_for("the subscriber is connected", CONVERGE, || {
        if let Ok(Some(st)) = py.0.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = py.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("the subscriber exited ({st}); pyzmq and msgpack installed? {err}");
        }
        fs::read_to_string(&out)
            .ok()?
            .contains("subscribed")
            .then_some(())
    });
    // A subscription takes a moment to reach the publisher: write until one arrives.
    m.wait_for("a first change seen", CONVERGE, || {
        fs::write(m.s("py-probe"), "p").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        fs::read_to_string(&out)
            .ok()?
            .contains("r upsert py-probe")
            .then_some(())
    });
    fs::write(m.s("py file"), "a").unwrap();
    fs::write(m.src.join(std::ffi::OsStr::from_bytes(b"py-\xff")), "b").unwrap();
    m.wait_for("both changes decoded", CONVERGE, || {
        let text = fs::read_to_string(&out).ok()?;
        (text.contains("r upsert py file\n") && text.contains("r upsert py-\\xff\n")).then_some(())
    });
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `syncbus tail --json --path GLOB`: one JSON object per change, filtered by path, odd
/// names shown with their bytes escaped.
#[test]
fn syncbus_tail_prints_the_changes_as_json_and_filters_by_path() {
    let mut m = Mirror::new(1, "");
    m.start().wait_ready();
    let out = m.dir.path().join("tail.out");
    let _tail = KillOnDrop(
        Command::new(crate::bin())
            .args(["tail", "--json", "--path", "keep/**", "--config"])
            .arg(&m.config)
            .stdout(fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    fs::create_dir(m.s("keep")).unwrap();
    fs::create_dir(m.s("skip")).unwrap();
    let lines = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    // The subscription needs a moment to reach the filter: write until one shows.
    m.wait_for("a first change in tail's output", CONVERGE, || {
        fs::write(m.s("keep/probe"), "p").unwrap();
        fs::write(m.s("skip/probe"), "p").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let text = fs::read_to_string(&out).ok()?;
        lines(&text)
            .iter()
            .any(|v| v["path"] == "keep/probe")
            .then_some(())
    });
    fs::write(
        m.src.join(std::ffi::OsStr::from_bytes(b"keep/odd \xff")),
        "o",
    )
    .unwrap();
    let odd = m.wait_for("the odd name", CONVERGE, || {
        let text = fs::read_to_string(&out).ok()?;
        lines(&text)
            .into_iter()
            .find(|v| v["path"] == "keep/odd \\xff")
    });
    assert_eq!(odd["root"], "r");
    assert_eq!(odd["op"], "upsert");
    assert_eq!(odd["utf8"], false);
    let text = fs::read_to_string(&out).unwrap();
    assert!(
        lines(&text)
            .iter()
            .all(|v| v["path"].as_str().unwrap().starts_with("keep/")),
        "--path let other paths through:\n{text}"
    );
}
