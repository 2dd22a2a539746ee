//! The `umae` command line, also usable as a library: a binary that links extra plugin crates
//! and calls [`cli::main`] is umae plus those plugins.
//!
//! Built as a shared library, `libumae.so`: the `umae` executable (src/main.rs) is a launcher
//! that loads it, after checking that the `libumae_sdk.so` beside it is the one it was built
//! with, and calls [`umae_main`].

pub mod cli;

/// The program's entry point for the launcher: runs [`cli::run`] and returns its exit code; a
/// panic (a bug) has already printed its message and returns 101, as a Rust `main` would.
#[no_mangle]
pub extern "C" fn umae_main() -> std::ffi::c_int {
    std::panic::catch_unwind(cli::run).map_or(101, std::ffi::c_int::from)
}

/// Keep the built-in plugin crates linked, so that their registrations are present.
pub fn builtin_plugins() -> [&'static str; 9] {
    [
        std::any::type_name::<umae_plugin_vit::Vit<umae_api::B>>(),
        std::any::type_name::<umae_plugin_mae::RandomMasker>(),
        std::any::type_name::<umae_plugin_pixels::Pixels>(),
        std::any::type_name::<umae_plugin_uniformity::Uniformity>(),
        std::any::type_name::<umae_plugin_simmim::BlockMasker>(),
        std::any::type_name::<umae_plugin_beit::Tokens>(),
        std::any::type_name::<umae_plugin_hog::Hog>(),
        std::any::type_name::<umae_plugin_regularizers::Decorrelation>(),
        umae_sdk::ABI,
    ]
}
