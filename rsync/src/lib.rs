//! rsync as syncbus uses it, pure: the command line of each kind of run and target
//! ([`build_args`]), what an exit code means ([`classify`]), and the filter rules a run
//! is given ([`exclude_rules`], [`resync_rules`]), and ssh's part ([`ssh`]: one shared
//! connection per target, the reason of a failed run). Nothing here spawns a process or
//! reads the tree: the dispatcher runs what this builds, and the retrier's fail log
//! prints the same command lines for a person to run.

#![warn(unreachable_pub)]

mod argv;
mod classify;
mod rules;
pub mod ssh;

pub use argv::{build_args, common_args, rsync_program, ArgError, Mode, Output, Run};
pub use classify::{classify, classify_status, classify_two_way, Outcome};
pub use rules::{exclude_rules, resync_rules};
