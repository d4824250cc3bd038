//! Printing for people on stdout and stderr that never panics. `println!` and
//! `eprintln!` panic when the write fails, and it does whenever the reader went away:
//! `syncbus check-config FILE 2>&1 | head -1` closes the pipe after one line and the
//! next `eprintln!` turned a bad config (exit 78) into a panic (exit 101). What cannot
//! be written is dropped here; the exit code still says what happened. (SIGPIPE stays
//! ignored, as Rust sets it: a stage writing to an rsync that died must get EPIPE, not
//! die of the signal.)
//!
//! Logs go through `tracing`, whose writer drops failed writes the same way.

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

/// `eprintln!` that drops what a closed stderr cannot take.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that drops what a closed stderr cannot take.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::write!(::std::io::stderr(), $($arg)*);
    }};
}
