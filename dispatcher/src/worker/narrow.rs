//! A run that sent all but some paths (rsync's 23), cut down to the paths that fail,
//! so that one path that cannot be sent neither fails its target nor delays the rest.

use std::collections::BTreeMap;
use std::time::Duration;

use protocol::PathBytes;

use crate::command::RunResult;
use crate::plan;
use ::rsync::Outcome;
use protocol::work::Touch;

use super::*;

/// An incremental run that sent all but some paths (rsync's 23), narrowed: the list is
/// halved until each path that fails stands alone, and each of those is replaced by a
/// compare of the nearest directory above it that exists here (which also clears what
/// a changed type left in the way on the target). A path that fails even then cannot
/// be sent: it is returned with rsync's reason, and the run is a success for the rest,
/// so one such path neither keeps the target failing nor delays its other work. Any
/// other failure (the target gone meanwhile) ends the narrowing with it.
pub(super) fn narrow(
    runner: &Runner,
    root: &str,
    info: &RootInfo,
    paths: BTreeMap<PathBytes, Touch>,
    failed: RunResult,
    tick: &mut dyn FnMut(Duration),
) -> (RunResult, BTreeMap<PathBytes, String>) {
    let mut alone: Vec<(PathBytes, String)> = Vec::new();
    let mut parts = vec![(paths, failed)];
    while let Some((mut part, failed)) = parts.pop() {
        if part.len() == 1 {
            let (p, _) = part.pop_first().expect("one path");
            alone.push((p, failed.error));
            continue;
        }
        let half = part
            .keys()
            .nth(part.len() / 2)
            .cloned()
            .expect("two or more");
        let upper = part.split_off(&half);
        for piece in [part, upper] {
            let r = runner.incremental(root, info, &piece, tick);
            match r.outcome {
                Outcome::Success => {}
                Outcome::Partial => parts.push((piece, r)),
                _ => return (r, BTreeMap::new()),
            }
        }
    }
    let mut compared: BTreeMap<PathBytes, Option<String>> = BTreeMap::new();
    let mut unsendable = BTreeMap::new();
    for (p, error) in alone {
        let dir = plan::nearest_dir(&info.path, &p);
        // The whole root is the full lane's, behind the root guard: not compared here.
        let failure = if dir.is_root() {
            Some(error)
        } else if let Some(f) = compared.get(&dir) {
            f.clone()
        } else {
            let r = runner.resync(root, info, std::slice::from_ref(&dir), &[], tick);
            let f = match r.outcome {
                Outcome::Success => None,
                Outcome::Partial => Some(r.error),
                _ => return (r, BTreeMap::new()),
            };
            compared.insert(dir, f.clone());
            f
        };
        if let Some(e) = failure {
            unsendable.insert(p, reason(&e));
        }
    }
    let ok = RunResult {
        outcome: Outcome::Success,
        error: String::new(),
    };
    (ok, unsendable)
}

/// The line of rsync's stderr that says what failed (`rsync: …`), else its first.
pub(super) fn reason(error: &str) -> String {
    let lines = || error.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.starts_with("rsync: ") && !l.starts_with("rsync error:"))
        .or_else(|| lines().next())
        .unwrap_or("")
        .to_string()
}
