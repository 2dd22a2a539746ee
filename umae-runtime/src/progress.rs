//! Progress bars on a terminal, quiet otherwise (logs and CI stay clean).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps labelled `what`, or `None` when stderr is not a terminal.
pub fn bar(len: u64, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_prefix(what.to_string());
    Some(b)
}

/// Advance an optional bar.
pub fn tick(bar: &Option<ProgressBar>, by: u64) {
    if let Some(b) = bar {
        b.inc(by);
    }
}

/// Clear an optional bar.
pub fn finish(bar: Option<ProgressBar>) {
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// A spinner with a message for work of unknown length, or `None` when stderr is not a
/// terminal.
pub fn spinner(what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new_spinner();
    b.set_style(
        ProgressStyle::with_template("{spinner} {prefix} {msg} ({elapsed})")
            .expect("valid template"),
    );
    b.set_prefix(what.to_string());
    b.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(b)
}
