//! The converter against the stock sersync 2.5.4 file and variants of it.

#![allow(clippy::disallowed_methods)] // tests spawn the programs they check
use super::*;
use std::os::unix::fs::PermissionsExt;

use protocol::config::{Config, Endpoint};

const STOCK: &[u8] = include_bytes!("../../tests/fixtures/sersync/confxml.xml");

/// The stock file as text (it is ISO-8859-1), for variants made by replacing parts.
fn stock() -> String {
    STOCK.iter().map(|&b| char::from(b)).collect()
}

/// A tree for the converted config to point at: a watched dir, a 0600 password file.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tongbu")).unwrap();
        let pw = dir.path().join("rsync.pas");
        std::fs::write(&pw, "secret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        Tree { dir }
    }
    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }
    /// The stock file with its paths moved into this tree, then `edits` applied.
    fn xml(&self, edits: &[(&str, &str)]) -> String {
        let mut x = stock()
            .replace("/opt/tongbu", &self.path("tongbu"))
            .replace("/etc/rsync.pas", &self.path("rsync.pas"));
        for (from, to) in edits {
            assert!(x.contains(from), "the fixture has no `{from}`");
            x = x.replace(from, to);
        }
        x
    }
    fn convert(&self, edits: &[(&str, &str)]) -> Conversion {
        convert(self.xml(edits).as_bytes(), "confxml.xml").unwrap()
    }
    /// The TOML as `syncbus check-config` reads it.
    fn load(&self, c: &Conversion) -> Config {
        Config::parse(&c.toml, &self.dir.path().join("syncbus.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{}", c.toml))
    }
}

fn error(xml: &[u8]) -> String {
    convert(xml, "confxml.xml").unwrap_err().to_string()
}

fn has(list: &[String], needle: &str) -> bool {
    list.iter().any(|s| s.contains(needle))
}

#[test]
fn the_stock_file_maps_every_element_and_passes_check_config() {
    let t = Tree::new();
    let c = convert(STOCK, "confxml.xml").unwrap();
    assert!(c.toml.contains("path = \"/opt/tongbu\""), "{}", c.toml);
    let c2 = t.convert(&[]);
    let config = t.load(&c2);
    assert_eq!(config.roots.len(), 1);
    assert_eq!(config.roots[0].name, "tongbu");
    let ev = config.roots[0].events;
    assert!(ev.delete && ev.create_folder && ev.close_write && ev.moves);
    assert!(!ev.create_file && !ev.attrib && !ev.modify);
    assert_eq!(config.targets.len(), 1, "plugins are off: rsync only");
    let target = &config.targets[0];
    assert_eq!(target.name, "tongbu1");
    assert_eq!(
        target.endpoint,
        Endpoint::Rsync {
            url: "rsync://127.0.0.1/tongbu1/".into(),
            password_file: None
        }
    );
    assert_eq!(target.extra_args, vec!["-z"]);
    assert!(config.schedules.is_empty());
    // Every stock element is accounted for somewhere in the report.
    let all = [&c.mapped, &c.changed, &c.unsupported]
        .iter()
        .flat_map(|l| l.iter())
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    for element in [
        "<host",
        "<debug",
        "<fileSystem",
        "<filter",
        "<inotify",
        "<localpath",
        "<remote",
        "commonParams",
        "<auth",
        "<userDefinedPort",
        "<timeout",
        "<ssh",
        "<failLog",
        "<crontab",
        "<sersync><plugin",
        "<plugin name=\"command\"",
        "<plugin name=\"socket\"",
        "<plugin name=\"refreshCDN\"",
    ] {
        assert!(
            all.contains(element),
            "`{element}` not in the report:\n{all}"
        );
    }
    assert!(
        has(&c.mapped, "-a -r -t dropped as implied"),
        "{:?}",
        c.mapped
    );
    assert!(has(&c.mapped, "-z → `extra_args`"));
    assert!(has(&c.changed, "`-u` (`--update`) dropped"));
    assert!(has(&c.changed, "dotfiles"));
    assert!(has(&c.changed, "timeToExecute"));
    assert!(has(&c.unsupported, "<host"));
    assert!(c.report().contains("no equivalent:\n  - "));
}

#[test]
fn latin1_bytes_are_read_as_latin1_and_a_latin1_path_is_flagged() {
    let c = convert(STOCK, "confxml.xml").unwrap();
    assert!(
        !has(&c.changed, "ISO-8859-1 in the XML"),
        "only a comment had it"
    );
    let mut xml = STOCK.to_vec();
    let at = xml.windows(11).position(|w| w == b"/opt/tongbu").unwrap();
    xml.splice(at..at + 11, b"/opt/donn\xe9es".iter().copied());
    let c = convert(&xml, "confxml.xml").unwrap();
    assert!(c.toml.contains("path = \"/opt/données\""), "{}", c.toml);
    assert!(c.toml.contains("name = \"donn-es\""), "{}", c.toml);
    assert!(
        has(&c.changed, "was ISO-8859-1 in the XML"),
        "{:?}",
        c.changed
    );
    // The same file saved as UTF-8 by an editor (declaration unchanged).
    let utf8 = String::from_utf8_lossy(&xml)
        .replace('\u{FFFD}', "é")
        .into_bytes();
    let c = convert(&utf8, "confxml.xml").unwrap();
    assert!(c.toml.contains("path = \"/opt/données\""), "{}", c.toml);
    assert!(has(&c.changed, "read as UTF-8"));
    assert!(
        error(b"<?xml version=\"1.0\" encoding=\"GB2312\"?><head>\xc4\xe3</head>")
            .contains("iconv -f gb2312")
    );
}

#[test]
fn auth_port_and_timeout_go_into_the_url_and_the_target() {
    let t = Tree::new();
    let c = t.convert(&[
        ("<auth start=\"false\"", "<auth start=\"true\""),
        (
            "<userDefinedPort start=\"false\"",
            "<userDefinedPort start=\"true\"",
        ),
        ("<timeout start=\"false\"", "<timeout start=\"true\""),
    ]);
    let config = t.load(&c);
    let target = &config.targets[0];
    assert_eq!(
        target.endpoint,
        Endpoint::Rsync {
            url: "rsync://root@127.0.0.1:874/tongbu1/".into(),
            password_file: Some(t.path("rsync.pas").into())
        }
    );
    assert_eq!(target.timeout, 100);
    assert!(!has(&c.changed, "stalled rsync"));
    let bad = t.xml(&[(
        "<userDefinedPort start=\"false\" port=\"874\"",
        "<userDefinedPort start=\"true\" port=\"eight\"",
    )]);
    let e = convert(bad.as_bytes(), "confxml.xml")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("confxml.xml:34:6:") && e.contains("`eight` is not a TCP port"),
        "{e}"
    );
}

#[test]
fn ssh_makes_host_colon_path_targets_and_reports_what_ssh_ignores() {
    let t = Tree::new();
    let c = t.convert(&[
        ("<ssh start=\"false\"/>", "<ssh start=\"true\"/>"),
        ("name=\"tongbu1\"", "name=\"/srv/mirror\""),
        ("<auth start=\"false\"", "<auth start=\"true\""),
        (
            "<userDefinedPort start=\"false\"",
            "<userDefinedPort start=\"true\"",
        ),
    ]);
    let config = t.load(&c);
    match &config.targets[0].endpoint {
        Endpoint::Ssh { dest, port, .. } => {
            assert_eq!(dest, "root@127.0.0.1:/srv/mirror/");
            assert_eq!(*port, None, "sersync's --port never reached ssh");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(config.targets[0].name, "srv-mirror");
    assert!(
        has(&c.unsupported, "rsync refuses it over ssh"),
        "{:?}",
        c.unsupported
    );
    assert!(has(&c.unsupported, "rsync ignores over ssh"));
    assert!(!c.toml.contains("password_file"));
}

#[test]
fn crontab_becomes_a_schedule_with_the_crontabfilter_as_globs() {
    let t = Tree::new();
    let c = t.convert(&[
        ("<crontab start=\"false\"", "<crontab start=\"true\""),
        (
            "<crontabfilter start=\"false\"",
            "<crontabfilter start=\"true\"",
        ),
    ]);
    let config = t.load(&c);
    assert_eq!(config.schedules.len(), 1);
    assert_eq!(config.schedules[0].cron, "0 */8 * * *");
    assert_eq!(config.schedules[0].exclude_glob, vec!["*.php", "info/*"]);
    assert!(has(&c.changed, "every 480 min"), "{:?}", c.changed);
    let c = t.convert(&[(
        "<crontab start=\"false\" schedule=\"600\"",
        "<crontab start=\"true\" schedule=\"15\"",
    )]);
    assert!(c.toml.contains("cron = \"*/15 * * * *\""), "{}", c.toml);
    assert!(has(&c.mapped, "`<crontabfilter start=\"false\">`: off"));
}

#[test]
fn cron_intervals_are_exact_where_cron_can_repeat_them_and_never_longer() {
    for (minutes, cron, every) in [
        (0, "* * * * *", 1),
        (1, "* * * * *", 1),
        (7, "*/6 * * * *", 6),
        (30, "*/30 * * * *", 30),
        (60, "0 * * * *", 60),
        (90, "0 * * * *", 60),
        (600, "0 */8 * * *", 480),
        (720, "0 */12 * * *", 720),
        (1440, "0 0 * * *", 1440),
        (3000, "0 0 * * *", 1440),
        (100_000, "0 0 * * 0", 10080),
    ] {
        assert_eq!(cron_for(minutes), (cron.to_string(), every), "{minutes}");
        protocol::config::check_cron(cron).unwrap();
    }
}

#[test]
fn the_command_plugin_becomes_a_command_target_after_the_rsync_targets() {
    let t = Tree::new();
    let on = (
        "<plugin start=\"false\" name=\"command\"/>",
        "<plugin start=\"true\" name=\"command\"/>",
    );
    // Stock: `/bin/sh PATH` runs each changed file as a script: one run per path.
    let c = t.convert(&[
        on,
        (
            "<filter start=\"false\">\n\t    <include",
            "<filter start=\"true\">\n\t    <include",
        ),
    ]);
    let config = t.load(&c);
    let cmd = config.target("command").unwrap();
    match &cmd.endpoint {
        Endpoint::Command {
            argv,
            as_args,
            include,
            after,
            ..
        } => {
            assert_eq!(argv[..2], ["/bin/sh", "-c"]);
            assert!(argv[2].contains("{ /bin/sh \"$_f\" \n}"), "{argv:?}");
            assert!(as_args);
            assert_eq!(include, &["*.php", "*.sh"]);
            assert_eq!(after, &["tongbu1"]);
        }
        e => panic!("{e:?}"),
    }
    assert!(has(&c.changed, "exit status"));
    // A program with plain words is an argv, no shell.
    let c = t.convert(&[on, ("prefix=\"/bin/sh\"", "prefix=\"/bin/echo -n\"")]);
    let config = t.load(&c);
    match &config.target("command").unwrap().endpoint {
        Endpoint::Command { argv, include, .. } => {
            assert_eq!(argv, &["/bin/echo", "-n"]);
            assert!(include.is_empty());
        }
        e => panic!("{e:?}"),
    }
    assert!(has(&c.changed, "once per path too"));
    // A regex with no faithful glob leaves the target commented out.
    let c = t.convert(&[
        on,
        (
            "<filter start=\"false\">\n\t    <include",
            "<filter start=\"true\">\n\t    <include",
        ),
        ("(.*)\\.sh", "^/opt/(a|b)/.*"),
    ]);
    assert!(c.toml.contains("# command = "), "{}", c.toml);
    assert!(t.load(&c).target("command").is_none());
    assert!(has(&c.unsupported, "left commented out"));
}

#[test]
fn ignore_error_becomes_a_hook_that_logs_failures_and_runs_once_per_path() {
    // ignoreError="true" was turned into retry-forever.
    let t = Tree::new();
    let on = (
        "<plugin start=\"false\" name=\"command\"/>",
        "<plugin start=\"true\" name=\"command\"/>",
    );
    let c = t.convert(&[on]);
    assert!(c.toml.contains("on_failure = \"log\""), "{}", c.toml);
    let cmd = t.load(&c).target("command").unwrap().clone();
    assert_eq!(cmd.on_failure, protocol::config::OnFailure::Log);
    match &cmd.endpoint {
        Endpoint::Command { each, as_args, .. } => assert!(*each && *as_args),
        e => panic!("{e:?}"),
    }
    assert!(has(&c.changed, "never retried"));
    let c = t.convert(&[on, ("ignoreError=\"true\"", "ignoreError=\"false\"")]);
    assert!(!c.toml.contains("on_failure"), "{}", c.toml);
    let cmd = t.load(&c).target("command").unwrap().clone();
    assert_eq!(cmd.on_failure, protocol::config::OnFailure::Retry);
    assert!(has(&c.changed, "that path only"));
}

#[test]
fn refresh_cdn_becomes_a_webhook_without_the_password() {
    let t = Tree::new();
    let edits = [
        (
            "<plugin start=\"false\" name=\"command\"/>",
            "<plugin start=\"true\" name=\"refreshCDN\"/>",
        ),
        (
            "username=\"xxxx\" passwd=\"xxxx\"",
            "username=\"cdnuser\" passwd=\"s3cr3t\"",
        ),
    ];
    let c = t.convert(&edits);
    assert!(
        !c.toml.contains("s3cr3t") && !c.toml.contains("cdnuser"),
        "{}",
        c.toml
    );
    assert!(
        c.toml
            .contains("webhook = \"http://ccms.chinacache.com/index.jsp?ok=ok&urls={url}\""),
        "{}",
        c.toml
    );
    assert!(c
        .toml
        .contains("cdn_base_url = \"http://pic.xoyo.com/cms\""));
    assert!(c.toml.contains("after = [\"tongbu1\"]"));
    // check-config holds it back until the header file with the credentials exists.
    let errors = Config::parse(&c.toml, &t.dir.path().join("syncbus.toml")).unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert!(errors.0[0].key.ends_with("header_file"), "{errors}");
    let with_header = c
        .toml
        .replace("/etc/syncbus/cdn.header", &t.path("cdn.header"));
    std::fs::write(t.path("cdn.header"), "Authorization: Basic x\n").unwrap();
    std::fs::set_permissions(t.path("cdn.header"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = Config::parse(&with_header, &t.dir.path().join("syncbus.toml")).unwrap();
    assert!(
        matches!(&config.target("cdn").unwrap().endpoint, Endpoint::Http { method, .. } if method == "HEAD")
    );
    assert!(has(&c.unsupported, "`username`/`passwd`"));
    assert!(has(&c.changed, "refreshCDN watches"), "{:?}", c.changed);
    // regexurl regex="true": not supported, commented out.
    let mut with_regex = edits.to_vec();
    with_regex.push(("<regexurl regex=\"false\"", "<regexurl regex=\"true\""));
    let c = t.convert(&with_regex);
    assert!(c.toml.contains("# webhook = "), "{}", c.toml);
    assert!(has(&c.unsupported, "<regexurl regex=\"true\""));
}

#[test]
fn the_socket_plugin_becomes_a_tcp_target_with_sersync_framing() {
    let t = Tree::new();
    let on = (
        "<plugin start=\"false\" name=\"command\"/>",
        "<plugin start=\"true\" name=\"socket\"/>",
    );
    let c = t.convert(&[on]);
    let config = t.load(&c);
    let target = config
        .target("socket")
        .unwrap_or_else(|| panic!("{}", c.toml));
    assert_eq!(
        target.endpoint,
        Endpoint::Tcp {
            addr: "192.168.138.20:8009".into(),
            framing: protocol::config::Framing::Sersync,
            include: vec![],
            exclude: vec![],
            after: vec!["tongbu1".into()],
        }
    );
    assert_eq!(target.roots, ["tongbu"]);
    assert!(
        has(&c.mapped, "`url = \"tcp://192.168.138.20:8009\"`"),
        "{:?}",
        c.mapped
    );
    assert!(has(&c.changed, "journalled and sent again"));
    assert!(
        !has(&c.unsupported, "socket") && !c.toml.contains("tcp_changes"),
        "{:?}\n{}",
        c.unsupported,
        c.toml
    );
    // An IPv6 receiver is bracketed; a bad port is an error naming the line.
    let c = t.convert(&[on, ("ip=\"192.168.138.20\"", "ip=\"fe80::2\"")]);
    assert!(
        c.toml.contains("url = \"tcp://[fe80::2]:8009\""),
        "{}",
        c.toml
    );
    t.load(&c);
    let bad = t.xml(&[on, ("port=\"8009\"", "port=\"80099\"")]);
    let e = error(bad.as_bytes());
    assert!(
        e.contains("confxml.xml:58:") && e.contains("`80099`"),
        "{e}"
    );
}

#[test]
fn an_element_sersync_does_not_know_is_reported() {
    let t = Tree::new();
    let c = t.convert(&[(
        "<debug start=\"false\"/>",
        "<debug start=\"false\"><verbose/></debug>",
    )]);
    assert!(
        has(&c.unsupported, "`<verbose>` (line 6)"),
        "{:?}",
        c.unsupported
    );
}

#[test]
fn two_remotes_make_two_targets_with_distinct_names() {
    let t = Tree::new();
    let c = t.convert(&[(
        "<!--<remote ip=\"192.168.8.39\" name=\"tongbu\"/>-->",
        "<remote ip=\"::1\" name=\"tongbu1\"/>",
    )]);
    let config = t.load(&c);
    let urls: Vec<String> = config
        .targets
        .iter()
        .map(|t| t.destination("tongbu"))
        .collect();
    assert_eq!(
        urls,
        ["rsync://127.0.0.1/tongbu1/", "rsync://[::1]/tongbu1/"]
    );
    assert_eq!(config.targets[1].name, "tongbu1-2");
}

#[test]
fn the_filter_becomes_exclude_regexes_with_the_same_meaning() {
    let t = Tree::new();
    let c = t.convert(&[
        (
            "<filter start=\"false\">\n\t<exclude",
            "<filter start=\"true\">\n\t<exclude",
        ),
        ("^static/*", "^/cache/"),
    ]);
    let config = t.load(&c);
    let rules = &config.roots[0].rules;
    for (path, dir, excluded) in [
        ("a/b.svn", true, true),
        ("x.gz", false, true),
        ("info", true, true),
        ("info/deep/file", false, true),
        ("information", false, false),
        ("cache/x", false, true),
        ("src/cache.txt", false, false),
    ] {
        assert_eq!(rules.excludes(&path.into(), dir), excluded, "{path}");
    }
    assert!(
        has(&c.changed, "`^/cache/` → `^cache/?`"),
        "{:?}",
        c.changed
    );
}

#[test]
fn common_params_are_sorted_by_what_becomes_of_them() {
    let p = parse_params(
        "-artuzvP --bwlimit=100 --delete --timeout 30 -e ssh --exclude=*.tmp -H extra",
    );
    assert_eq!(p.implied, ["-a", "-r", "-t", "--delete"]);
    assert_eq!(p.kept, ["-z", "--partial", "-H"]);
    assert!(p.update);
    assert_eq!(p.quiet, ["-v", "--progress (of -P)"]);
    assert_eq!(p.bwlimit.as_deref(), Some("100"));
    assert_eq!(p.timeout, Some(30));
    assert_eq!(p.exclude, ["*.tmp"]);
    assert_eq!(p.refused.len(), 3, "{:?}", p.refused); // -e, its `ssh`, `extra`
}

#[test]
fn values_case_extra_localpaths_and_plugin_suffixes_convert_as_sersync_read_them() {
    // An option's value given as the next word stays with it (else rsync would
    // take the source directory for that value).
    let p = parse_params("-artuz --temp-dir /var/tmp --max-delete 100");
    assert_eq!(p.kept, ["-z", "--temp-dir=/var/tmp", "--max-delete=100"]);
    assert!(p.refused.is_empty(), "{:?}", p.refused);

    // Names are case-insensitive, as in sersync's parser.
    let t = Tree::new();
    let c = t.convert(&[
        ("<ssh start=\"false\"/>", "<SSH start=\"true\"/>"),
        ("name=\"tongbu1\"", "Name=\"/srv/m\""),
    ]);
    assert!(
        matches!(t.load(&c).targets[0].endpoint, Endpoint::Ssh { .. }),
        "{}",
        c.toml
    );

    // A second <localpath>, which sersync ignored, is written commented out.
    std::fs::create_dir(t.dir.path().join("other")).unwrap();
    let second = format!(
        "</localpath>\n<localpath watch=\"{}\"><remote ip=\"10.0.0.9\" name=\"x\"/></localpath>",
        t.path("other")
    );
    let c = t.convert(&[("</localpath>", &second)]);
    let config = t.load(&c);
    assert_eq!(
        (config.roots.len(), config.targets.len()),
        (1, 1),
        "{}",
        c.toml
    );
    assert!(
        c.toml.contains("# url = \"rsync://10.0.0.9/x\""),
        "{}",
        c.toml
    );

    // The command plugin's shell loop parses whatever the suffix ends with.
    for suffix in [">>/tmp/log 2>&1 # note", "&", "a;"] {
        let (argv, shell) = command_argv("/x.sh", suffix);
        assert!(shell);
        let ok = std::process::Command::new("sh")
            .args(["-n", "-c", &argv[2]])
            .status()
            .unwrap();
        assert!(ok.success(), "{suffix}: {}", argv[2]);
    }
    assert!(
        command_argv("/bin/sh -e", "").1,
        "a shell with options loops too"
    );

    // Deep nesting is refused, not recursed into.
    let deep = format!(
        "<head>{}{}</head>",
        "<y>".repeat(10_000),
        "</y>".repeat(10_000)
    );
    assert!(error(deep.as_bytes()).contains("nested"));

    // `(.*)/dir/` also matches at the top level, as sersync's leading `/` did.
    assert_eq!(filter_regex("(.*)/runtime/(.*)").0, "(?:.*/)?runtime/(.*)");

    // What `-a` adds to sersync's options is said; a schedule is read as atoi did.
    let c = t.convert(&[
        ("params=\"-artuz\"", "params=\"-rtuz\""),
        (
            "<crontab start=\"false\" schedule=\"600\">",
            "<crontab start=\"true\" schedule=\"120min\">",
        ),
    ]);
    assert!(has(&c.changed, "-l -p -g -o -D"), "{:?}", c.changed);
    assert!(c.toml.contains("cron = \"0 */2 * * *\""), "{}", c.toml);

    // Declared UTF-8 with a stray Latin-1 byte: an error where the byte is.
    let e = error(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<head>\n<!-- r\xe9 -->\n</head>");
    assert!(e.contains(":3:") && e.contains("UTF-8"), "{e}");
}

#[test]
fn quoting_survives_hostile_values() {
    let xml = stock()
        .replace("/opt/tongbu", "/opt/it's &quot;x&quot;\\y")
        .replace("(.*)\\.gz", "it's &quot;quoted&quot; \\\\ [x]")
        .replace("<filter start=\"false\">", "<filter start=\"true\">")
        .replace("name=\"tongbu1\"", "name=\"mod&amp;x\"");
    let c = convert(xml.as_bytes(), "confxml.xml").unwrap();
    let value: toml::Table = toml::from_str(&c.toml).unwrap();
    let root = &value["root"][0];
    assert_eq!(root["path"].as_str(), Some("/opt/it's \"x\"\\y"));
    assert!(root["exclude"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v.as_str() == Some("it's \"quoted\" \\\\ [x]")));
    let target = &value["target"][0];
    assert_eq!(target["url"].as_str(), Some("rsync://127.0.0.1/mod&x"));
    assert_eq!(target["name"].as_str(), Some("mod-x"));
}

#[test]
fn malformed_files_get_a_clear_error_with_file_and_line() {
    let t = Tree::new();
    let cases: Vec<(String, &str)> = vec![
        (
            t.xml(&[("<sersync>", "<sersyncx>"), ("</sersync>", "</sersyncx>")]),
            ":4:1: no `<sersync>` element",
        ),
        (
            t.xml(&[("<localpath watch=", "<localpath wotch=")]),
            ":26:2: `<localpath>` has no `watch`",
        ),
        (
            t.xml(&[("<remote ip=\"127.0.0.1\"", "<remote")]),
            ":27:6: `<remote>` has no `ip`",
        ),
        (
            t.xml(&[("<remote ip=\"127.0.0.1\" name=\"tongbu1\"/>", "")]),
            "nothing to mirror to",
        ),
        (
            t.xml(&[("</head>", "")]),
            "`<head>` (line 4) is never closed",
        ),
        (
            t.xml(&[("</rsync>", "</rsynk>")]),
            ":37:2: not well-formed XML",
        ),
        (
            "this is not XML at all\n".into(),
            ":1:1: text outside any element",
        ),
        (String::new(), "no XML element at all"),
        ("<config><a/></config>".into(), "not sersync's `<head>`"),
        (
            t.xml(&[(
                "<plugin start=\"false\" name=\"command\"/>",
                "<plugin start=\"true\" name=\"http\"/>",
            )]),
            "has no such plugin",
        ),
    ];
    for (xml, expected) in cases {
        let e = convert(xml.as_bytes(), "confxml.xml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("confxml.xml:"), "{e}");
        assert!(e.contains(expected), "expected `{expected}` in: {e}");
    }
    // Binary garbage is not a panic either.
    let garbage: Vec<u8> = (0..=255u8).cycle().take(2000).collect();
    assert!(convert(&garbage, "x.bin").is_err());
}

#[test]
fn a_plugin_alone_is_enough_to_mirror_to() {
    let t = Tree::new();
    let c = t.convert(&[
        ("<remote ip=\"127.0.0.1\" name=\"tongbu1\"/>", ""),
        (
            "<plugin start=\"false\" name=\"command\"/>",
            "<plugin start=\"true\" name=\"command\"/>",
        ),
        ("prefix=\"/bin/sh\"", "prefix=\"/bin/true\""),
    ]);
    let config = t.load(&c);
    assert_eq!(config.targets.len(), 1);
    assert!(has(&c.mapped, "runs on the changes themselves"));
}
