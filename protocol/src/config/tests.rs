//! Whole configs parsed: defaults, each key's checks, errors with line and key.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

#[test]
fn a_target_is_probed_at_the_host_and_port_its_url_names() {
    let rsync = |url: &str| Endpoint::Rsync {
        url: url.into(),
        password_file: None,
    };
    let table = [
        ("rsync://h/m/", "h:873"),
        ("rsync://u@h:8730/m/sub/", "h:8730"),
        ("rsync://h:/m/", "h:873"),
        ("rsync://[::1]:9/m/", "[::1]:9"),
        ("rsync://[::1]/m/", "[::1]:873"),
    ];
    for (url, want) in table {
        assert_eq!(rsync(url).address().as_deref(), Some(want), "{url}");
    }
    let web = Endpoint::Http {
        url: "https://cdn.example/purge?x".into(),
        method: "POST".into(),
        base_url: None,
        header_file: None,
        include: vec![],
        exclude: vec![],
        after: vec![],
    };
    assert_eq!(web.address().as_deref(), Some("cdn.example:443"));
    let local = Endpoint::Local { path: "/m".into() };
    assert_eq!(local.address(), None);
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        Fixture { dir }
    }
    fn file(&self) -> PathBuf {
        self.dir.path().join("syncbus.toml")
    }
    fn parse(&self, text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, &self.file())
    }
    fn errors(&self, text: &str) -> Vec<ConfigError> {
        self.parse(text).expect_err("config should be rejected").0
    }
}

const MINIMAL: &str = "[[root]]\nname = \"www\"\npath = \"src\"\n";

#[test]
fn minimal_config_gets_the_defaults() {
    let f = Fixture::new();
    let c = f
        .parse(&format!(
            "{MINIMAL}[[target]]\nname = \"m\"\nurl = \"mirror\"\n"
        ))
        .unwrap();
    let r = &c.roots[0];
    assert_eq!(
        r.path,
        std::fs::canonicalize(f.dir.path().join("src")).unwrap()
    );
    assert_eq!(r.events, Events::default());
    assert!(
        r.events.attrib && r.events.create_file,
        "chmod and symlinks on by default"
    );
    assert_eq!(r.quiet, Duration::from_millis(DEFAULT_QUIET_MS));
    assert!(r.rules.excludes(&"x.swp".into(), false) || r.rules.excludes(&".x.swp".into(), false));
    let t = &c.targets[0];
    assert_eq!(t.roots, vec!["www"]);
    assert_eq!(t.timeout, DEFAULT_TIMEOUT_S);
    assert_eq!(
        t.endpoint,
        Endpoint::Local {
            path: f.dir.path().join("mirror")
        }
    );
    assert_eq!(
        t.destination("www"),
        format!("{}/", f.dir.path().join("mirror").display())
    );
}

#[test]
fn retry_and_schedule_defaults_and_values() {
    let f = Fixture::new();
    let c = f.parse(MINIMAL).unwrap();
    assert_eq!(
        c.retry.initial,
        Duration::from_millis(DEFAULT_RETRY_INITIAL_MS)
    );
    assert_eq!(c.retry.max, Duration::from_secs(DEFAULT_RETRY_MAX_S));
    assert!(c.schedules.is_empty());
    let c = f
        .parse(&format!(
            "{MINIMAL}[retry]\nstate_dir = \"state\"\nmax_s = 5\n\
             [[schedule]]\ncron = \"30 3 * * 1-5\"\nexclude_glob = [\"*.log\"]\n\
             [[schedule]]\ncron = \"@hourly\"\n"
        ))
        .unwrap();
    assert_eq!(c.retry.state_dir, f.dir.path().join("state"));
    assert_eq!(c.retry.max, Duration::from_secs(5));
    assert_eq!(c.schedules[0].roots, vec!["www"]);
    assert_eq!(c.schedules[0].exclude_glob, vec!["*.log"]);
    assert_eq!(c.schedules[1].cron, "@hourly");
}

#[test]
fn command_targets_are_validated_like_the_others() {
    let f = Fixture::new();
    let c = f
        .parse(&format!(
            "{MINIMAL}[[target]]\nname = \"hook\"\ncommand = [\"true\", \"x\"]\n\
             paths = \"args\"\ninclude = [\"*.html\"]\n"
        ))
        .unwrap();
    match &c.targets[0].endpoint {
        Endpoint::Command {
            argv,
            as_args,
            include,
            ..
        } => {
            assert_eq!(argv, &["true", "x"]);
            assert!(*as_args);
            assert_eq!(include, &["*.html"]);
        }
        other => panic!("{other:?}"),
    }
    let e = f.errors(&format!(
        "{MINIMAL}[[target]]\nname = \"a\"\ncommand = [\"/no/such/prog\"]\n\
         bwlimit = \"1M\"\npaths = \"pipe\"\n\
         [[target]]\nname = \"b\"\nurl = \"mirror\"\ninclude = [\"x\"]\n\
         [[target]]\nname = \"c\"\n"
    ));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "target[0].command[0]",
            "target[0].bwlimit",
            "target[0].paths",
            "target[1].include",
            "target[2].url"
        ],
        "{e:?}"
    );
    assert!(
        e[0].message.contains("not an executable"),
        "{}",
        e[0].message
    );
}

#[test]
fn on_failure_is_retry_or_log_and_only_for_hooks() {
    let f = Fixture::new();
    let c = f
        .parse(&format!(
            "{MINIMAL}[[target]]\nname = \"c\"\ncommand = [\"/bin/true\"]\npaths = \"each\"\n\
             on_failure = \"log\"\n[[target]]\nname = \"w\"\nwebhook = \"https://x/\"\n"
        ))
        .unwrap();
    assert_eq!(c.targets[0].on_failure, OnFailure::Log);
    assert!(matches!(
        c.targets[0].endpoint,
        Endpoint::Command { each: true, .. }
    ));
    assert_eq!(c.targets[1].on_failure, OnFailure::Retry);
    let e = f.errors(&format!(
        "{MINIMAL}[[target]]\nname = \"c\"\ncommand = [\"/bin/true\"]\non_failure = \"ignore\"\n\
         [[target]]\nname = \"r\"\nurl = \"rsync://h/m/\"\non_failure = \"log\"\n"
    ));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        ["target[0].on_failure", "target[1].on_failure"],
        "{e:?}"
    );
    assert!(e[0].message.contains("`retry`"), "{}", e[0].message);
    assert!(e.iter().all(|e| e.line > 0), "{e:?}");
}

#[test]
fn webhook_targets_keep_credentials_out_of_the_url() {
    let f = Fixture::new();
    let hdr = f.dir.path().join("h");
    std::fs::write(&hdr, "Authorization: Bearer x\n").unwrap();
    std::fs::set_permissions(&hdr, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = f
        .parse(&format!(
            "{MINIMAL}[[target]]\nname = \"w\"\nwebhook = \"https://cdn.example/purge\"\n\
             header_file = \"h\"\n"
        ))
        .unwrap();
    assert!(matches!(c.targets[0].endpoint, Endpoint::Http { .. }));
    std::fs::set_permissions(&hdr, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = f.errors(&format!(
        "{MINIMAL}[[target]]\nname = \"a\"\nwebhook = \"https://u:p@cdn.example/\"\n\
         [[target]]\nname = \"b\"\nwebhook = \"ftp://x/\"\nheader_file = \"h\"\n"
    ));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "target[0].webhook",
            "target[1].webhook",
            "target[1].header_file"
        ],
        "{e:?}"
    );
    assert!(e[0].message.contains("header_file"), "{}", e[0].message);
    assert!(e[2].message.contains("0600"), "{}", e[2].message);
    // A CDN refresh: `{url}` needs the public base; the method is checked.
    let e = f.errors(&format!(
        "{MINIMAL}[[target]]\nname = \"c\"\nwebhook = \"https://api.cdn/purge?u={{url}}\"\n\
         method = \"purge\"\n[[target]]\nname = \"d\"\nurl = \"mirror\"\nmethod = \"GET\"\n"
    ));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        ["target[0].method", "target[0].webhook", "target[1].method"],
        "{e:?}"
    );
}

#[test]
fn the_metrics_endpoint_is_loopback_by_default_and_can_be_moved_or_turned_off() {
    let f = Fixture::new();
    let c = f.parse(MINIMAL).unwrap();
    assert_eq!(c.metrics, Some("127.0.0.1:9477".parse().unwrap()));
    let listen = |v: &str| f.parse(&format!("[metrics]\nlisten = \"{v}\"\n{MINIMAL}"));
    assert_eq!(
        listen("9100").unwrap().metrics,
        Some("127.0.0.1:9100".parse().unwrap())
    );
    assert_eq!(
        listen("[::1]:9100").unwrap().metrics,
        Some("[::1]:9100".parse().unwrap())
    );
    assert_eq!(listen("off").unwrap().metrics, None);
    let e = f.errors(&format!("[metrics]\nlisten = \"localhost:1\"\n{MINIMAL}"));
    assert_eq!((e[0].key.as_str(), e[0].line), ("metrics.listen", 2));
}

#[test]
fn tcp_endpoints_are_loopback_unless_a_host_is_given() {
    let f = Fixture::new();
    let c = f.parse(MINIMAL).unwrap();
    assert_eq!(c.tcp_changes, None);
    let c = f
        .parse(&format!(
            "[bus]\ntcp_changes = \"7600\"\ntcp_deliveries = \"0.0.0.0:7601\"\n{MINIMAL}"
        ))
        .unwrap();
    assert_eq!(c.tcp_changes.as_deref(), Some("tcp://127.0.0.1:7600"));
    assert_eq!(c.tcp_deliveries.as_deref(), Some("tcp://0.0.0.0:7601"));
    let e = f.errors(&format!("[bus]\ntcp_changes = \"host:\"\n{MINIMAL}"));
    assert_eq!((e[0].key.as_str(), e[0].line), ("bus.tcp_changes", 2));
}

#[test]
fn bad_retry_and_schedule_values_name_line_and_key() {
    let f = Fixture::new();
    let e = f.errors(&format!(
        "{MINIMAL}[retry]\njitter = 2.0\nmax_s = 0\n\
         [[schedule]]\ncron = \"0 0 3 * * *\"\n\
         [[schedule]]\ncron = \"61 * * * *\"\nroots = [\"nope\"]\n"
    ));
    let keys: Vec<(&str, usize)> = e.iter().map(|e| (e.key.as_str(), e.line)).collect();
    assert_eq!(
        keys,
        [
            ("retry.max_s", 6),
            ("retry.jitter", 5),
            ("schedule[0].cron", 8),
            ("schedule[1].cron", 10),
            ("schedule[1].roots[0]", 11),
        ],
        "{e:?}"
    );
    assert!(e[2].message.contains("has 6 fields"), "{}", e[2].message);
}

#[test]
fn unknown_key_names_line_and_key() {
    let f = Fixture::new();
    let e = f.errors(&format!("{MINIMAL}colour = \"red\"\n"));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].line, 4);
    assert!(e[0].message.contains("colour"), "{}", e[0]);
    assert!(e[0]
        .to_string()
        .starts_with(&format!("{}:4:", f.file().display())));
}

#[test]
fn all_errors_are_reported_at_once_with_their_lines() {
    let f = Fixture::new();
    let text = "\
[[root]]
name = \"www\"
path = \"nope\"
exclude = [\"(\"]
[[target]]
name = \"t\"
url = \"rsync://host\"
roots = [\"www\", \"other\"]
";
    let e = f.errors(text);
    let got: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (3, "root[0].path"),
            (4, "root[0].exclude[0]"),
            (8, "target[0].roots[1]"),
            (7, "target[0].url"),
        ]
    );
}

#[test]
fn target_urls_are_classified_like_rsync_does() {
    let cases = [
        ("rsync://u@h:8730/mod/sub", "rsync://u@h:8730/mod/sub/"),
        ("h::mod/x", "rsync://h/mod/x/"),
        ("u@host:/srv/m", "u@host:/srv/m/"),
    ];
    for (url, want) in cases {
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"{url}\"\n"
            ))
            .unwrap();
        assert_eq!(c.targets[0].destination("www"), want, "{url}");
    }
    for bad in ["rsync://h", "rsync:///m", "http://x/y", ""] {
        let f = Fixture::new();
        let e = f.errors(&format!(
            "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"{bad}\"\n"
        ));
        assert_eq!(e[0].key, "target[0].url", "{bad}");
    }
}

#[test]
fn password_file_must_be_private() {
    let f = Fixture::new();
    let pw = f.dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = format!(
        "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"rsync://h/m\"\npassword_file = \"pw\"\n"
    );
    let e = f.errors(&text);
    assert_eq!(e[0].key, "target[0].password_file");
    assert_eq!(e[0].line, 7);
    assert!(
        e[0].message.contains("mode 0644, expected 0600"),
        "{}",
        e[0]
    );
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    f.parse(&text).unwrap();
}

#[test]
fn a_local_target_inside_its_root_is_refused() {
    let f = Fixture::new();
    let e = f.errors(&format!(
        "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"src/mirror\"\n"
    ));
    assert!(e[0].message.contains("mirror into itself"), "{}", e[0]);
}

#[test]
fn several_roots_on_one_target_get_subdirectories() {
    let f = Fixture::new();
    std::fs::create_dir(f.dir.path().join("b")).unwrap();
    let c = f
        .parse(&format!(
            "{MINIMAL}[[root]]\nname = \"b\"\npath = \"b\"\n[[target]]\nname = \"t\"\nurl = \"rsync://h/m\"\n"
        ))
        .unwrap();
    assert_eq!(c.targets[0].destination("b"), "rsync://h/m/b/");
}

#[test]
fn misplaced_and_reserved_options_are_errors() {
    let f = Fixture::new();
    let e = f.errors(&format!(
        "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"/tmp/x\"\nport = 22\nextra_args = [\"--from0\", \"oops\"]\nbwlimit = \"fast\"\n"
    ));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "target[0].port",
            "target[0].bwlimit",
            "target[0].extra_args[0]",
            "target[0].extra_args[1]"
        ]
    );
}

#[test]
fn options_that_change_what_a_run_means_are_errors() {
    let f = Fixture::new();
    let e = f.errors(&format!(
        "{MINIMAL}[[target]]\nname = \"t\"\nurl = \"/tmp/x\"\nextra_args = [\"-avn\", \"--dry-run\", \"--list-only\", \"--remove-source-files\", \"--existing\", \"-rtu\", \"--update\", \"--max-delete=5\", \"-T/tmp/nu\", \"-z\", \"--inplace\", \"--compress-level=3\"]\n"
    ));
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        (0..8)
            .map(|j| format!("target[0].extra_args[{j}]"))
            .collect::<Vec<_>>()
    );
    assert!(e[0].message.contains("`-n`"), "{}", e[0].message);
    assert!(e[3].message.contains("deletes files from the source"));
    assert!(e[6].message.contains("two_way"));
}

#[test]
fn duplicate_and_invalid_names() {
    let f = Fixture::new();
    let e = f.errors(&format!("{MINIMAL}{}", MINIMAL.replace("www", "w w")));
    assert_eq!(e[0].key, "root[1].name");
    let e = f.errors(&format!("{MINIMAL}{MINIMAL}"));
    assert!(e[0].message.contains("duplicate"));
}

#[test]
fn overlapping_roots_and_long_socket_paths_are_refused() {
    let f = Fixture::new();
    std::fs::create_dir(f.dir.path().join("src/inner")).unwrap();
    let e = f.errors(&format!(
        "{MINIMAL}[[root]]\nname = \"in\"\npath = \"src/inner\"\n"
    ));
    assert_eq!((e[0].key.as_str(), e[0].line), ("root[1].path", 6));
    assert!(e[0].message.contains("overlaps root `www`"), "{}", e[0]);
    let long = "x".repeat(120);
    let e = f.errors(&format!("[bus]\nruntime_dir = \"/tmp/{long}\"\n{MINIMAL}"));
    assert_eq!((e[0].key.as_str(), e[0].line), ("bus.runtime_dir", 2));
}

#[test]
fn no_roots_is_an_error() {
    let f = Fixture::new();
    assert_eq!(f.errors("")[0].key, "root");
}

#[test]
fn hard_links_are_kept_on_request_or_by_h_in_extra_args_and_only_for_one_way_rsync_targets() {
    let f = Fixture::new();
    let target =
        |keys: &str| format!("{MINIMAL}[[target]]\nname = \"t\"\nurl = \"/tmp/x\"\n{keys}");
    let on = |keys: &str| f.parse(&target(keys)).unwrap().targets[0].hard_links;
    assert!(!on(""));
    assert!(on("hard_links = true\n"));
    assert!(on("extra_args = [\"-H\"]\n"));
    assert!(on("extra_args = [\"--hard-links\"]\n"));
    assert!(on("extra_args = [\"-aHAX\"]\n"));
    assert!(!on("extra_args = [\"-T/tmp/H\"]\n"));
    let keys = |text: &str| -> Vec<String> { f.errors(text).into_iter().map(|e| e.key).collect() };
    assert_eq!(
        keys(&target("two_way = true\nhard_links = true\n")),
        ["target[0].hard_links"]
    );
    assert_eq!(
        keys(&target("two_way = true\nextra_args = [\"-aH\"]\n")),
        ["target[0].extra_args"]
    );
    assert_eq!(
        keys(&format!(
            "{MINIMAL}[[target]]\nname = \"t\"\ncommand = [\"/bin/true\"]\nhard_links = true\n"
        )),
        ["target[0].hard_links"]
    );
}
