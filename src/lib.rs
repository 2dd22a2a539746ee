//! The `umae` command line, also usable as a library: a binary that links extra plugin crates
//! and calls [`cli::main`] is umae plus those plugins.

pub mod cli;

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
