//! SIGHUP: which stages read what of the config, and the restart of those whose part changed.

use super::checkpoint::clear_manifests;
use super::*;

/// The config sections each stage reads: a SIGHUP restarts only the stages whose
/// sections changed.
fn stage_sections(stage: &str) -> &'static [&'static str] {
    match stage {
        "watcher" | "filter" => &["bus", "root"],
        "dispatcher" => &["bus", "root", "target"],
        "retrier" => &["bus", "root", "target", "retry"],
        "scheduler" => &["bus", "root", "schedule"],
        "metrics" => &["bus", "root", "target", "metrics"],
        _ => &["bus", "root", "target", "retry", "schedule"],
    }
}

/// What of the config `stage` reads, as written: a SIGHUP restarts the stages whose
/// view changed. Roots take settings from the targets bound to them (a two-way target
/// makes its root tell the peer's writes apart, rest files, keep `.syncbus/` off every
/// target), so the watcher and the filter see those keys of the targets too.
fn stage_view(stage: &str, config: &toml::Table) -> toml::Table {
    let mut view: toml::Table = stage_sections(stage)
        .iter()
        .filter_map(|sec| Some((sec.to_string(), config.get(*sec)?.clone())))
        .collect();
    if matches!(stage, "watcher" | "filter") {
        if let Some(toml::Value::Array(targets)) = config.get("target") {
            let binding = targets
                .iter()
                .filter_map(|t| {
                    let t = t.as_table()?;
                    let keys = ["name", "roots", "two_way", "losers"];
                    let kept: toml::Table = keys
                        .iter()
                        .filter_map(|k| Some((k.to_string(), t.get(*k)?.clone())))
                        .collect();
                    Some(toml::Value::Table(kept))
                })
                .collect();
            view.insert("target".into(), toml::Value::Array(binding));
        }
    }
    view
}

/// A config's top-level tables as written (empty when unreadable: every stage then
/// counts as changed).
pub(super) fn sections(text: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_default()
}

impl Supervisor {
    /// SIGHUP: a valid new config restarts the stages whose sections changed, upstream
    /// first (a restarted watcher or filter means a resync; the journal keeps what is
    /// pending); an invalid one is reported and the running pipeline kept.
    pub(super) fn reload(&mut self, shutdown: &Shutdown) {
        // `READY=1` follows from the next ticks, once every root is watched again.
        self.service.reloading();
        let plan = match instance::plan(&self.args.what()) {
            Ok(p) => p,
            Err(PlanError::Config(errors, _)) => {
                tracing::error!(errors = %errors, "SIGHUP: new config is invalid; keeping the running one");
                return;
            }
            Err(PlanError::Usage(msg)) => {
                tracing::error!(error = %msg, "SIGHUP: cannot read the config; keeping the running one");
                return;
            }
        };
        if plan.config.runtime_dir != self.held.runtime_dir
            || plan.config.retry.state_dir != self.held.state_dir
        {
            tracing::error!("SIGHUP: the new config moves the runtime or state dir, which a running instance cannot do; keeping the running one (restart syncbus to move them)");
            return;
        }
        let staged = plan
            .write_generated()
            .map_err(std::io::Error::other)
            .and_then(|()| StagedConfig::of(&plan));
        match staged {
            Ok(s) => self.staged = s,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: cannot hand the new config to the stages; keeping the running one");
                return;
            }
        }
        self.config = plan.config.clone();
        self.crash = super::checkpoint::CrashCheckpoint::new(&self.config);
        let new = sections(&plan.text);
        let changed: Vec<&'static str> = self
            .stages
            .iter()
            .map(|s| s.name)
            .filter(|name| stage_view(name, &self.loaded) != stage_view(name, &new))
            .collect();
        self.loaded = new;
        if changed.is_empty() {
            tracing::info!("SIGHUP: config valid and unchanged; nothing restarted");
            return;
        }
        tracing::info!(stages = ?changed, "SIGHUP: config valid; restarting the stages it changes");
        let _ = self.stop(shutdown, &changed);
        // A watcher stopped for a reload leaves a stop time and manifests that no
        // checkpoint may take later: the final stop writes its own.
        if changed.contains(&"watcher") {
            let _ = std::fs::remove_file(self.runtime_dir.join(watcher::STOPPED_FILE));
            clear_manifests(&self.runtime_dir);
        }
        for s in self.stages.iter_mut().filter(|s| changed.contains(&s.name)) {
            s.next_start = Some(Instant::now());
            s.failures = 0;
        }
    }
}
