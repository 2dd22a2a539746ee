//! The C allocator's settings for training.
//!
//! A training step allocates and frees the same few hundred buffers (activations, gradients,
//! kernel outputs) every step, many of them a few hundred KiB to a few MiB. glibc's malloc
//! serves such blocks with fresh `mmap`s (above a threshold that starts at 128 KiB) and gives
//! memory back to the kernel when it is freed, so every step page-faults its buffers in again;
//! with two threads in the process each of those faults also flushes the other core's TLB
//! (`perf` showed 13% of a Fashion-MNIST step in the kernel's `ptep_clear_flush`). Keeping
//! freed memory in the heap for reuse removes that cost; peak memory is unchanged.

/// The largest `mmap` threshold glibc accepts (32 MiB on 64-bit targets): blocks up to this
/// size come from the heap and are reused after `free`.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Free memory at the top of the heap is given back to the kernel only above this much.
pub const TRIM_THRESHOLD: usize = 512 << 20;

/// Whether the environment already sets one of the two thresholds, through `GLIBC_TUNABLES` or
/// `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` (then both are left as glibc has them).
pub fn user_tuned(vars: impl IntoIterator<Item = (String, String)>) -> bool {
    vars.into_iter().any(|(k, v)| match k.as_str() {
        "GLIBC_TUNABLES" => {
            v.contains("malloc.mmap_threshold") || v.contains("malloc.trim_threshold")
        }
        "MALLOC_MMAP_THRESHOLD_" | "MALLOC_TRIM_THRESHOLD_" => true,
        _ => false,
    })
}

/// Keep freed memory for reuse (see the module documentation), unless the environment sets
/// either threshold. Returns whether the settings were applied. Call it once at start-up,
/// before the first threads start.
pub fn keep_freed_memory() -> bool {
    if user_tuned(std::env::vars()) {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes allocator parameters; both values are within glibc's range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_users_malloc_settings_win() {
        assert!(!user_tuned(env(&[
            ("PATH", "/bin"),
            ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
        ])));
        assert!(user_tuned(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.mmap_threshold=65536"
        )])));
        assert!(!user_tuned(env(&[("MALLOC_ARENA_MAX", "x")])));
        assert!(user_tuned(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_settings() {
        // Out-of-range values make mallopt return 0; these are the ones keep_freed_memory sets.
        assert!(apply());
    }
}
