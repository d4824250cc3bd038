//! The config file as written: serde structs that keep each value's position.

use serde::Deserialize;
use toml::Spanned;

use super::Events;

// ---------------------------------------------------------------- raw, as written

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) bus: RawBus,
    #[serde(default)]
    pub(super) root: Vec<Spanned<RawRoot>>,
    #[serde(default)]
    pub(super) target: Vec<Spanned<RawTarget>>,
    #[serde(default)]
    pub(super) retry: RawRetry,
    #[serde(default)]
    pub(super) schedule: Vec<Spanned<RawSchedule>>,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) state_dir: Option<Spanned<String>>,
    pub(super) initial_ms: Option<Spanned<u64>>,
    pub(super) max_s: Option<Spanned<u64>>,
    pub(super) jitter: Option<Spanned<f64>>,
    pub(super) probe_ms: Option<Spanned<u64>>,
    pub(super) max_paths: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    pub(super) cron: Spanned<String>,
    pub(super) roots: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(super) exclude_glob: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBus {
    pub(super) runtime_dir: Option<Spanned<String>>,
    pub(super) tcp_changes: Option<Spanned<String>>,
    pub(super) tcp_deliveries: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoot {
    pub(super) name: Spanned<String>,
    pub(super) path: Spanned<String>,
    #[serde(default)]
    pub(super) exclude: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) exclude_glob: Vec<Spanned<String>>,
    #[serde(default = "yes")]
    pub(super) builtin_excludes: bool,
    pub(super) quiet_ms: Option<Spanned<u64>>,
    pub(super) max_hold_ms: Option<Spanned<u64>>,
    pub(super) stable_ms: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) events: Events,
    #[serde(default)]
    pub(super) allow_wipe: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) name: Spanned<String>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) command: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) webhook: Option<Spanned<String>>,
    pub(super) header_file: Option<Spanned<String>>,
    pub(super) method: Option<Spanned<String>>,
    pub(super) cdn_base_url: Option<Spanned<String>>,
    pub(super) paths: Option<Spanned<String>>,
    pub(super) on_failure: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) after: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) include: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) exclude: Vec<Spanned<String>>,
    pub(super) roots: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) password_file: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<u64>>,
    pub(super) bwlimit: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) extra_args: Vec<Spanned<String>>,
    pub(super) port: Option<Spanned<u16>>,
    pub(super) identity_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) ssh_options: Vec<Spanned<String>>,
    pub(super) two_way: Option<Spanned<bool>>,
    pub(super) losers: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) allow_wipe: bool,
    pub(super) hard_links: Option<Spanned<bool>>,
    pub(super) framing: Option<Spanned<String>>,
}

pub(super) fn yes() -> bool {
    true
}

impl RawTarget {
    /// The keys only rsync targets take that this table sets, with where they stand:
    /// the other kinds refuse each of them.
    pub(super) fn rsync_only_keys(&self) -> Vec<(&'static str, std::ops::Range<usize>)> {
        let raw = self;
        [
            raw.password_file
                .as_ref()
                .map(|p| ("password_file", p.span())),
            raw.bwlimit.as_ref().map(|p| ("bwlimit", p.span())),
            raw.extra_args.first().map(|p| ("extra_args", p.span())),
            raw.port.as_ref().map(|p| ("port", p.span())),
            raw.identity_file
                .as_ref()
                .map(|p| ("identity_file", p.span())),
            raw.ssh_options.first().map(|p| ("ssh_options", p.span())),
            raw.two_way.as_ref().map(|p| ("two_way", p.span())),
            raw.losers.as_ref().map(|p| ("losers", p.span())),
            raw.hard_links.as_ref().map(|p| ("hard_links", p.span())),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}
