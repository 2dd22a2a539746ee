//! umae-api, burn and the plugin registry as one shared library.
//!
//! The `umae` binary and every dynamic plugin link this library, so they share one copy of
//! burn (its autodiff graph, device clients and allocators) and one plugin registry: a plugin's
//! `register!` lines add to the same list the binary reads. A dynamic plugin crate depends on
//! `umae-api` (for its types and macros) and on this crate, and declares itself with
//! [`declare_plugin!`]:
//!
//! ```ignore
//! umae_sdk::declare_plugin!();
//! umae_api::register!(Regularizer, "my-term", MyParams, build, "what it is (source)");
//! ```

pub use umae_api;

/// What a plugin must have been built against: this umae-api, this burn with these backends
/// (the features of this crate) and this rustc.
pub const ABI: &str = env!("UMAE_ABI");

/// [`ABI`] under a C name, for the `umae` launcher: it loads this library alone and checks the
/// build identity before it loads the program that links it (src/main.rs).
#[no_mangle]
pub extern "C" fn umae_sdk_abi() -> *const std::ffi::c_char {
    concat!(env!("UMAE_ABI"), "\0").as_ptr().cast()
}

/// Bytes that start a plugin's ABI record inside its shared library file.
pub const MARKER: &[u8] = b"\0UMAE-PLUGIN-ABI\0";

/// Size of the ABI record: marker, ABI string, zero padding.
pub const RECORD_LEN: usize = 192;

/// The ABI record a plugin embeds (see [`declare_plugin!`]).
pub const fn abi_record() -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    let (m, a) = (MARKER, ABI.as_bytes());
    assert!(m.len() + a.len() < RECORD_LEN, "ABI string too long");
    let mut i = 0;
    while i < m.len() {
        out[i] = m[i];
        i += 1;
    }
    let mut j = 0;
    while j < a.len() {
        out[m.len() + j] = a[j];
        j += 1;
    }
    out
}

/// The ABI string recorded in a shared library file, `None` when it has no record (it is not
/// a umae plugin). Read from the file's bytes, before the library is loaded.
pub fn read_abi(bytes: &[u8]) -> Option<String> {
    let start = bytes.windows(MARKER.len()).position(|w| w == MARKER)? + MARKER.len();
    let rest = &bytes[start..(start + RECORD_LEN - MARKER.len()).min(bytes.len())];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Declares a crate as a umae plugin: embeds the record of the umae-api, burn and rustc it was
/// built against, which `umae` checks before loading the library. One line, once per plugin.
#[macro_export]
macro_rules! declare_plugin {
    () => {
        #[used]
        #[no_mangle]
        pub static UMAE_PLUGIN_ABI: [u8; $crate::RECORD_LEN] = $crate::abi_record();
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_reads_back_from_surrounding_bytes() {
        let mut file = vec![7u8; 1000];
        file.extend_from_slice(&abi_record());
        file.extend_from_slice(&[9u8; 50]);
        assert_eq!(read_abi(&file).as_deref(), Some(ABI));
        assert!(
            ABI.starts_with(if cfg!(any(feature = "cuda", feature = "tch")) {
                "umae-api 0.1.0; burn 0.21.0 (flex+"
            } else {
                "umae-api 0.1.0; burn 0.21.0 (flex); rustc "
            }),
            "{ABI}"
        );
        assert_eq!(read_abi(&[1, 2, 3]), None);
    }

    #[test]
    fn the_burn_version_is_the_workspace_pin() {
        let manifest =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
        assert!(
            manifest.contains("burn = { version = \"=0.21.0\""),
            "update ABI with the pin"
        );
    }
}
