//! Printing for people on stdout and stderr that never panics. `println!` and
//! `eprintln!` panic when the write fails, and it does whenever the reader went away:
//! `syncbus check-config FILE 2>&1 | head -1` closes the pipe after one line and the
//! next `eprintln!` turned a bad config (exit 78) into a panic (exit 101). What cannot
//! be written is dropped here; the exit code still says what happened. (SIGPIPE stays
//! ignored, as Rust sets it: a stage writing to an rsync that died must get EPIPE, not
//! die of the signal.)
//!
//! Logs go through `tracing`, whose writer drops failed writes the same way.
//!
//! When stderr is the journal ([`stderr_is_journal`]), what `errln!` writes is an error
//! to journald: each line carries the `<3>` syslog prefix, so `journalctl -p err`
//! finds a bad config reported at start too.

use std::sync::OnceLock;

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM` to the
/// `device:inode` of the stream it connected, and it must be stderr's (a program that
/// redirected stderr elsewhere, or a child that inherited the variable with another
/// stderr, is not talking to the journal).
pub fn stderr_is_journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
            return false;
        };
        let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
            return false;
        };
        // SAFETY: fstat(2) fills one stat struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(libc::STDERR_FILENO, &mut st) } != 0 {
            return false;
        }
        st.st_dev as u64 == dev && st.st_ino as u64 == ino
    })
}

/// Writes `text` and a newline to stderr, each line `<3>`-prefixed for the journal;
/// drops what cannot be written.
pub fn err_line(text: std::fmt::Arguments) {
    use std::io::Write;
    let text = text.to_string();
    let mut e = std::io::stderr().lock();
    if stderr_is_journal() {
        for line in text.lines() {
            let _ = writeln!(e, "<3>{line}");
        }
    } else {
        let _ = writeln!(e, "{text}");
    }
}

/// `println!` that drops what a closed stdout cannot take.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that drops what a closed stdout cannot take (and flushes).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let mut o = ::std::io::stdout().lock();
        let _ = ::std::write!(o, $($arg)*).and_then(|()| o.flush());
    }};
}

/// `eprintln!` for errors: drops what a closed stderr cannot take, and marks each line
/// an error for the journal ([`out::err_line`](crate::out::err_line)).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::err_line(::std::format_args!($($arg)*))
    };
}

/// `eprint!` that drops what a closed stderr cannot take.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::write!(::std::io::stderr(), $($arg)*);
    }};
}
