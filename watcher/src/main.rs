//! `syncbus-watcher --config FILE [--log-json]`: see the `watcher` library.

fn main() -> std::process::ExitCode {
    protocol::stage::stage_main("watcher", std::env::args_os().skip(1), |c, _args, s| {
        watcher::run(c, s)
    })
}
