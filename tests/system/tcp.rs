//! TCP targets: sersync's socket-plugin receivers keep working, the
//! framed modes carry each path's operation, and a listener that is down gets its work
//! from the journal once it is back. The listeners are std `TcpListener`s on 127.0.0.1.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::{bin, Mirror, CONVERGE};

/// A listener that keeps the bytes of each connection, one entry per connection, in
/// the order they were accepted.
struct Listener {
    port: u16,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn bind(port: u16) -> Listener {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = l.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (keep, stopped) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for c in l.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = c else { continue };
                let mut bytes = Vec::new();
                if c.read_to_end(&mut bytes).is_ok() {
                    keep.lock().unwrap().push(bytes);
                }
            }
        });
        Listener {
            port,
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// Closes the listening socket: connections are refused from now on.
    fn close(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then drops the listener.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    fn connections(&self) -> Vec<Vec<u8>> {
        self.got.lock().unwrap().clone()
    }

    /// Every record of every connection so far, split at `sep`.
    fn records(&self, sep: u8) -> Vec<Vec<u8>> {
        self.connections()
            .iter()
            .flat_map(|c| {
                c.split(|b| *b == sep)
                    .filter(|r| !r.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// A mirror with no rsync target and the given tcp targets (`name`, port, framing).
fn with_tcp(targets: &[(&str, u16, &str)]) -> (Mirror, PathBuf) {
    let mut m = Mirror::new(0, "");
    let mut text = fs::read_to_string(&m.config).unwrap();
    text = text.replace("[retry]\n", "[retry]\ninitial_ms = 100\nmax_s = 1\n");
    for (name, port, framing) in targets {
        text.push_str(&format!(
            "\n[[target]]\nname = \"{name}\"\nurl = \"tcp://127.0.0.1:{port}\"\nframing = \"{framing}\"\ntimeout = 10\n"
        ));
    }
    fs::write(&m.config, text).unwrap();
    m.start();
    let root = fs::canonicalize(&m.src).unwrap();
    (m, root)
}

fn abs(root: &std::path::Path, rel: &[u8]) -> Vec<u8> {
    let mut p = root.as_os_str().as_bytes().to_vec();
    p.push(b'/');
    p.extend_from_slice(rel);
    p
}

#[test]
fn sersync_framing_is_one_connection_per_path_carrying_just_the_absolute_path() {
    let l = Listener::bind(0);
    let (m, root) = with_tcp(&[("sock", l.port, "sersync")]);
    // The start compare comes first, as the root's own path.
    let root_bytes = root.as_os_str().as_bytes().to_vec();
    m.wait_for("the start compare as the root path", CONVERGE, || {
        l.connections().contains(&root_bytes).then_some(())
    });
    let odd: &[u8] = b"odd name\n\xff";
    fs::write(m.s("a.html"), "a").unwrap();
    fs::create_dir(m.s("sub")).unwrap();
    fs::write(
        m.src.join("sub").join(std::ffi::OsStr::from_bytes(odd)),
        "x",
    )
    .unwrap();
    let want = [
        abs(&root, b"a.html"),
        abs(&root, b"sub"),
        abs(&root, &[b"sub/", odd].concat()),
    ];
    let got = m.wait_for("each path on a connection of its own", CONVERGE, || {
        let got = l.connections();
        want.iter().all(|w| got.contains(w)).then_some(got)
    });
    // Nothing but bare paths under the root: no newline, no operation, no framing.
    for c in &got {
        assert!(
            c.starts_with(&root_bytes),
            "{:?}",
            String::from_utf8_lossy(c)
        );
        assert!(
            !c.ends_with(b"\n") && !c.ends_with(b"/"),
            "{:?}",
            String::from_utf8_lossy(c)
        );
    }
}

#[test]
fn framed_targets_send_records_with_their_operation_deletes_included() {
    let (json, nul) = (Listener::bind(0), Listener::bind(0));
    let (m, root) = with_tcp(&[("j", json.port, "json"), ("n", nul.port, "nul")]);
    let parsed = |l: &Listener| -> Vec<serde_json::Value> {
        l.records(b'\n')
            .iter()
            .map(|r| serde_json::from_slice(r).unwrap())
            .collect()
    };
    let root_s = root.to_str().unwrap().to_string();
    m.wait_for(
        "the start compare as a resync of the root",
        CONVERGE,
        || {
            parsed(&json)
                .iter()
                .any(|v| v["op"] == "resync" && v["path"] == format!("{root_s}/"))
                .then_some(())
        },
    );
    fs::write(m.s("doc.txt"), "1").unwrap();
    let upsert = serde_json::json!({"op": "upsert", "root": "r", "path": format!("{root_s}/doc.txt"), "utf8": true});
    m.wait_for("the upsert", CONVERGE, || {
        parsed(&json).contains(&upsert).then_some(())
    });
    fs::remove_file(m.s("doc.txt")).unwrap();
    let delete = serde_json::json!({"op": "delete", "root": "r", "path": format!("{root_s}/doc.txt"), "utf8": true});
    m.wait_for("the delete", CONVERGE, || {
        parsed(&json).contains(&delete).then_some(())
    });
    let rec = |op: &str| [op.as_bytes(), b"\t", &abs(&root, b"doc.txt")].concat();
    m.wait_for("the same in NUL framing", CONVERGE, || {
        let r = nul.records(0);
        (r.contains(&rec("upsert")) && r.contains(&rec("delete"))).then_some(())
    });
}

#[test]
fn a_listener_that_is_down_gets_the_journalled_paths_when_it_is_back() {
    let mut l = Listener::bind(0);
    let port = l.port;
    let (m, root) = with_tcp(&[("sock", port, "sersync")]);
    let root_bytes = root.as_os_str().as_bytes().to_vec();
    m.wait_for("the start compare delivered", CONVERGE, || {
        l.connections().contains(&root_bytes).then_some(())
    });
    l.close();
    fs::write(m.s("while-down"), "x").unwrap();
    // Refused, and the work is in the retrier's journal (the fail log lists it).
    m.wait_for("the work journalled", CONVERGE, || {
        let out = Command::new(bin())
            .args(["fail-log", "--config"])
            .arg(&m.config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("target sock") && text.contains("tcp target")).then_some(())
    });
    assert!(m.log().contains("Connection refused"), "{}", m.log());
    let l = Listener::bind(port);
    let want = abs(&root, b"while-down");
    m.wait_for(
        "the path delivered once the listener is back",
        CONVERGE,
        || l.connections().contains(&want).then_some(()),
    );
    m.wait_for("nothing owed", CONVERGE, || {
        let (_, r) = crate::status::status(&m);
        (r["targets"]["sock"]["backlog"].as_u64() == Some(0)).then_some(())
    });
}
