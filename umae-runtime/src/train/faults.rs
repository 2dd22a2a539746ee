//! What stops a run early: a NaN or Inf in a loss term or the gradients, and Ctrl-C / SIGTERM.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::checkpoint;

/// The error for a non-finite step the recipe does not let the run skip: where it happened,
/// that the last checkpoint is intact, and what to change.
pub(super) fn nonfinite_error(
    what: &str,
    at: &str,
    skipped: usize,
    run_dir: &Path,
) -> crate::Error {
    let last = checkpoint::list(run_dir)
        .last()
        .map(|d| {
            format!(
                "its last checkpoint {} is intact",
                d.file_name().unwrap_or_default().to_string_lossy()
            )
        })
        .unwrap_or_else(|| "no checkpoint was written yet".into());
    let after = if skipped > 0 {
        format!(" after {skipped} skipped step(s)")
    } else {
        String::new()
    };
    crate::Error::Failed(format!(
        "{what} at {at}{after}: the run stops here and {last}; lower the learning rate (optimizer.blr), set optimizer.clip_grad, or let train.skip_nonfinite skip such steps"
    ))
}

/// The flag SIGINT and SIGTERM set, cleared for a new run. The handlers are installed once per
/// process; with the flag already set, a second signal ends the process at once (exit 130).
pub(crate) fn interrupt_flag() -> Result<Arc<AtomicBool>, String> {
    static FLAG: std::sync::OnceLock<Result<Arc<AtomicBool>, String>> = std::sync::OnceLock::new();
    let flag = FLAG
        .get_or_init(|| {
            let flag = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())
                    .and_then(|_| signal_hook::flag::register(sig, flag.clone()))
                    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
            }
            Ok(flag)
        })
        .clone()?;
    flag.store(false, Ordering::SeqCst);
    Ok(flag)
}
