//! Moves and renames are built on the target from what it holds at the old place: a
//! moved directory, a file renamed in place and a file moved to another directory
//! cost a small share of their bytes, to a daemon and to a local target alike, and
//! every target ends up the same as the source, with no file left hard-linked to
//! another.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::{Mirror, CONVERGE};

/// `n` bytes no compressor or delta can shrink.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Bytes the daemon received in the transfers its log lists after `from` lines
/// (`%b %o %n`: the bytes of each one).
fn bytes_received(log: &str, from: usize) -> u64 {
    log.lines()
        .skip(from)
        .filter(|l| l.contains(" recv "))
        .filter_map(|l| {
            let after_pid = l.split("] ").nth(1)?;
            after_pid.split(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Every regular file under `dir` has one link only.
fn no_shared_files(dir: &Path) {
    for e in walkdir(dir) {
        let m = fs::symlink_metadata(&e).unwrap();
        if m.is_file() {
            assert_eq!(m.nlink(), 1, "{} shares its data", e.display());
        }
    }
}

fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walkdir(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn moves_and_renames_reuse_what_the_target_holds() {
    const MIB: usize = 1 << 20;
    let mut m = Mirror::new(1, "");
    let local = m.dir.path().join("local");
    m.add_target(&format!("url = \"{}\"\n", local.display()), local.clone());
    m.log_filter = Some("info,dispatcher=debug,filter=debug".into());
    m.start().wait_ready();
    fs::create_dir_all(m.s("photos")).unwrap();
    for i in 0..8 {
        fs::write(m.s(&format!("photos/p{i}.jpg")), noise(MIB, i)).unwrap();
    }
    fs::write(m.s("big.bin"), noise(4 * MIB, 100)).unwrap();
    fs::create_dir_all(m.s("a")).unwrap();
    fs::create_dir_all(m.s("b")).unwrap();
    fs::create_dir_all(m.s("archive/2026")).unwrap();
    fs::write(m.s("a/f.bin"), noise(2 * MIB, 200)).unwrap();
    m.converge();
    // A run started before the trees matched may still be going (one that sends a
    // file again after a compare already brought it): the target's runs are one after
    // another, so once a marker's transfer is logged, every earlier one is.
    let logged = |name: &str| {
        let line = format!(" recv {name}");
        m.wait_for(&format!("{name} in the daemon's log"), CONVERGE, || {
            let log = m.daemons[0].log_text();
            log.lines().any(|l| l.ends_with(&line)).then_some(())
        });
    };
    fs::write(m.s("marker-before"), "m").unwrap();
    logged("marker-before");
    let moved = 14 * MIB as u64;
    let mark = m.daemons[0].log_text().lines().count();

    fs::rename(m.s("photos"), m.s("archive/2026/photos")).unwrap();
    fs::rename(m.s("big.bin"), m.s("big2.bin")).unwrap();
    fs::rename(m.s("a/f.bin"), m.s("b/f.bin")).unwrap();
    m.converge();
    fs::write(m.s("marker-after"), "m").unwrap();
    logged("marker-after");
    let sent = bytes_received(&m.daemons[0].log_text(), mark);
    eprintln!("moves of {moved} bytes cost {sent} bytes to the daemon");
    assert!(
        sent * 20 <= moved,
        "moves of {moved} bytes sent {sent} bytes again (more than 5%)\n{}",
        m.log()
    );
    m.converge();
    for dst in &m.dsts {
        no_shared_files(dst);
    }

    // A move after a move, and a moved directory changed before it went: the new
    // place holds what the source holds.
    fs::rename(m.s("archive/2026/photos"), m.s("photos-again")).unwrap();
    fs::write(m.s("photos-again/p3.jpg"), noise(MIB, 33)).unwrap();
    fs::rename(m.s("photos-again"), m.s("photos-final")).unwrap();
    fs::rename(m.s("big2.bin"), m.s("b/big3.bin")).unwrap();
    m.converge();
    for dst in &m.dsts {
        no_shared_files(dst);
    }

    // A rotation in one batch: the old place is made again from the moved copy. The
    // two places stay two files on the targets.
    fs::rename(m.s("photos-final"), m.s("photos-bak")).unwrap();
    fs::create_dir(m.s("photos-final")).unwrap();
    for e in fs::read_dir(m.s("photos-bak")).unwrap().flatten() {
        // As `cp -a`: the same content and time, which a quick check takes as equal.
        let copy = m.s("photos-final").join(e.file_name());
        fs::copy(e.path(), &copy).unwrap();
        let mtime = e.metadata().unwrap().modified().unwrap();
        fs::File::options()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }
    m.converge();
    for dst in &m.dsts {
        no_shared_files(dst);
    }
}
