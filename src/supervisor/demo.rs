//! `syncbus demo`.

use super::*;

const DEMO_CONFIG: &str = include_str!("../../deploy/demo.toml");

/// `syncbus demo`: a local mirror with the embedded config, no remote server needed.
pub(crate) fn demo(dir: &Path) -> ExitCode {
    if let Err(msg) = dispatcher::find_rsync() {
        protocol::errln!("syncbus demo: {msg} (scripts/demo.sh does this for you)");
        return ExitCode::from(EXIT_UNAVAILABLE as u8);
    }
    let (src, mirror, file) = (
        dir.join("src"),
        dir.join("mirror"),
        dir.join("syncbus.toml"),
    );
    for d in [&src, &mirror] {
        if let Err(e) = std::fs::create_dir_all(d) {
            protocol::errln!("cannot create `{}`: {e}", d.display());
            return ExitCode::FAILURE;
        }
    }
    let hello = src.join("hello.txt");
    if !hello.exists() {
        let _ = std::fs::write(
            &hello,
            "Edit me: every change appears in demo/mirror within milliseconds.\n",
        );
    }
    if let Err(e) = std::fs::write(&file, DEMO_CONFIG) {
        protocol::errln!("cannot write `{}`: {e}", file.display());
        return ExitCode::FAILURE;
    }
    protocol::outln!(
        "syncbus demo: mirroring {} → {} (config: {}).\n\
         Try, in another terminal:  echo hi > {}/new.txt; ls -l {}\n\
         and see how it is doing:   syncbus status --config {}\n\
         Stop with Ctrl-C.",
        src.display(),
        mirror.display(),
        file.display(),
        src.display(),
        mirror.display(),
        file.display()
    );
    run(RunArgs {
        config: Some(file),
        source: None,
        targets: Vec::new(),
        runtime_dir: None,
        state_dir: None,
        allow_wipe: false,
        log_json: false,
    })
}
