//! `syncbus generate-docs DIR` (not in `--help`; `scripts/package.sh` calls it): the man
//! pages and the bash, zsh and fish completions, written by clap's own generators
//! (clap_mangen, clap_complete) from the definition that parses the command line, so they
//! cannot drift from it. DIR gets `man1/syncbus.1` plus one `syncbus-SUBCOMMAND.1` per
//! subcommand, and `completions/syncbus.bash`, `completions/_syncbus` (zsh) and
//! `completions/syncbus.fish`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

pub(crate) fn run(dir: &Path) -> ExitCode {
    match write(dir) {
        Ok(files) => {
            for f in files {
                protocol::outln!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            protocol::errln!("cannot write the docs into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn write(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man = dir.join("man1");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(crate::Cli::command(), &man)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = crate::Cli::command();
        files.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            "syncbus",
            &completions,
        )?);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    #[test]
    fn man_pages_and_completions_name_the_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        let files = super::write(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "syncbus.1",
            "syncbus-run.1",
            "syncbus-check-config.1",
            "syncbus.bash",
            "_syncbus",
            "syncbus.fish",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        // The hidden generator stays out of what users read.
        assert!(
            !names.iter().any(|n| n.contains("generate-docs")),
            "{names:?}"
        );
        let man = std::fs::read_to_string(dir.path().join("man1/syncbus.1")).unwrap();
        assert!(man.contains(".TH syncbus 1"), "{man}");
        assert!(man.contains("check\\-config"), "{man}");
        for f in ["syncbus.bash", "_syncbus", "syncbus.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(f)).unwrap();
            assert!(text.contains("check-config"), "{f}: {text}");
            assert!(
                !text.contains("generate-docs"),
                "{f} offers the hidden command"
            );
        }
    }
}
