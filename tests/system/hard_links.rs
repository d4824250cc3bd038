//! `hard_links = true`: names of one file in the source are names of one file on the
//! target, from the start compare and live, also when a new name joins an old file.
//! A target without it gets separate copies (the test's control).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::{Mirror, CONVERGE};

/// Whether `a` and `b` under `dir` are one file.
fn same_file(dir: &Path, a: &str, b: &str) -> bool {
    match (fs::metadata(dir.join(a)), fs::metadata(dir.join(b))) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[test]
fn hard_links_stay_links_on_a_target_that_asks_for_them_also_live() {
    // t0 plain, t1 (the last table) keeps hard links.
    let mut m = Mirror::new(2, "");
    let mut text = fs::read_to_string(&m.config).unwrap();
    text.push_str("hard_links = true\n");
    fs::write(&m.config, text).unwrap();
    fs::create_dir(m.s("d")).unwrap();
    fs::write(m.s("a"), "one file, two names").unwrap();
    fs::hard_link(m.s("a"), m.s("d/b")).unwrap();
    m.start().wait_ready();
    m.converge();
    let (plain, linked) = (m.dsts[0].clone(), m.dsts[1].clone());
    assert!(
        same_file(&linked, "a", "d/b"),
        "the start compare kept the link"
    );
    assert!(!same_file(&plain, "a", "d/b"), "the control target copies");

    // Live: a new file and a second name for it, and a new name for an old file.
    fs::write(m.s("c"), "new").unwrap();
    fs::hard_link(m.s("c"), m.s("d/c2")).unwrap();
    fs::hard_link(m.s("a"), m.s("e")).unwrap();
    m.converge();
    m.wait_for("the live links on the target", CONVERGE, || {
        (same_file(&linked, "c", "d/c2") && same_file(&linked, "a", "e")).then_some(())
    });
    assert!(same_file(&linked, "a", "d/b"));
    assert!(!same_file(&plain, "a", "e"));
}
