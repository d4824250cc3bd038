//! The filter rules of a run (rsync's `--filter` merge file, NUL-separated): the
//! exclude globs and regex-excluded paths of a root, and the include chain that
//! restricts a resync to some subtrees.

use std::collections::BTreeSet;

use protocol::rules::{rsync_literal_rule, rsync_wildcard_prefix, Rules};
use protocol::PathBytes;

fn rule(out: &mut Vec<u8>, sign: u8, pattern: &[u8]) {
    out.push(sign);
    out.push(b' ');
    out.extend_from_slice(pattern);
    out.push(0);
}

/// The exclude rules of a run: every glob of `rules` as written, and each path of
/// `regex_excluded` as an anchored literal.
pub fn exclude_rules(rules: &Rules, regex_excluded: &BTreeSet<PathBytes>) -> Vec<u8> {
    let mut out = Vec::new();
    for g in rules.rsync_globs() {
        rule(&mut out, b'-', g.as_bytes());
    }
    for p in regex_excluded {
        rule(&mut out, b'-', &rsync_literal_rule(p));
    }
    out
}

/// The rules of a resync of `subtrees` (none within another): `excludes`, then the
/// include chain that lets rsync reach each subtree, then `- *`. Files outside the
/// subtrees are excluded on both sides, so `--delete` leaves them alone. A resync of the
/// root is just the excludes.
pub fn resync_rules(excludes: &[u8], subtrees: &[PathBytes]) -> Vec<u8> {
    let mut out = excludes.to_vec();
    if subtrees.iter().any(PathBytes::is_root) {
        return out;
    }
    let mut ancestors: Vec<PathBytes> = subtrees
        .iter()
        .flat_map(|s| s.ancestors().map(|a| PathBytes::new(a.to_vec())))
        .collect();
    ancestors.sort();
    ancestors.dedup();
    for a in &ancestors {
        let mut p = rsync_literal_rule(a);
        p.push(b'/');
        rule(&mut out, b'+', &p);
    }
    for s in subtrees {
        // `/S/***` alone does not match S when S is a file.
        rule(&mut out, b'+', &rsync_literal_rule(s));
        let mut p = rsync_wildcard_prefix(s);
        p.extend_from_slice(b"/***");
        rule(&mut out, b'+', &p);
    }
    rule(&mut out, b'-', b"*");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtree_resync_rules_file() {
        let rules = Rules::new(&[], &["*.log".into(), "#*#".into()], false).unwrap();
        let excludes = exclude_rules(&rules, &BTreeSet::new());
        let got = resync_rules(&excludes, &["a/b c/d".into(), "a/x*".into()]);
        let want: &[&[u8]] = &[
            b"- *.log",
            b"- #*#",
            b"+ /a/",
            b"+ /a/b c/",
            b"+ /a/b c/d",
            b"+ /a/b c/d/***",
            b"+ /a/x\\*",
            b"+ /a/x\\*/***",
            b"- *",
        ];
        let got: Vec<&[u8]> = got.split(|&b| b == 0).filter(|r| !r.is_empty()).collect();
        assert_eq!(got, want);
        assert_eq!(resync_rules(&excludes, &["".into()]), excludes);
    }
}
