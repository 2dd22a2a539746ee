//! Dynamic plugins: shared libraries that register components in the same registry as the
//! built-ins.
//!
//! Before a library is loaded its file is read for the ABI record that
//! `umae_sdk::declare_plugin!` embeds; a library without one, or built against another
//! umae-api, burn or rustc, is refused before any of its code runs. After loading, components
//! whose kind and name are already taken are refused. Libraries are never unloaded: their
//! registrations live in them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use umae_api::registry::{self, Plugin};

static LOADED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// What one library added: `(kind, name)` of each component.
pub type Added = Vec<(String, String)>;

/// Resolve a plugin path: as given (relative to the current directory), else relative to
/// `base` (the recipe's folder).
pub fn resolve(path: &str, base: Option<&Path>) -> PathBuf {
    let p = PathBuf::from(path);
    if p.exists() || p.is_absolute() {
        return p;
    }
    match base.map(|b| b.join(&p)) {
        Some(q) if q.exists() => q,
        _ => p,
    }
}

/// Check and load one plugin library. Loading the same file twice does nothing.
pub fn load(path: &Path) -> Result<Added, String> {
    let shown = path.display();
    if !path.is_file() {
        return Err(format!(
            "plugin {shown}: no such file. A plugin is the lib<name>.so that `cargo build --release` writes to target/release/ of the plugin's workspace; check the path"
        ));
    }
    let canonical = path
        .canonicalize()
        .map_err(|e| format!("plugin {shown}: {e}"))?;
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if loaded.contains(&canonical) {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("plugin {shown}: cannot read: {e}"))?;
    match umae_sdk::read_abi(&bytes) {
        None => {
            return Err(format!(
                "{shown} is not a umae plugin (it has no umae ABI record): a plugin crate has `crate-type = [\"dylib\"]`, depends on umae-sdk and declares itself with `umae_sdk::declare_plugin!();` (see docs/plugins.md)"
            ))
        }
        Some(abi) if abi != umae_sdk::ABI => {
            return Err(format!(
                "{shown} was built against {abi}, but this umae is built with {}: rebuild the plugin with the same umae sources and toolchain (`cargo build --release` in the same workspace)",
                umae_sdk::ABI
            ))
        }
        Some(_) => {}
    }
    let before: HashSet<usize> = registry::all_registered()
        .into_iter()
        .map(|p| p as *const Plugin as usize)
        .collect();
    let taken: Vec<(registry::PluginKind, &'static str)> = registry::plugins()
        .into_iter()
        .map(|p| (p.kind(), p.name))
        .collect();
    // SAFETY: the file carries the ABI record of this very build of umae-sdk, so it links the
    // same shared umae-api and burn; its initialisers only add registry entries.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        let e = e.to_string();
        if e.contains("undefined symbol") {
            format!(
                "plugin {shown} was built against another build of umae-sdk than this umae's ({e}). \
                 Rust symbols carry a hash of how their crate was compiled, so a plugin must be built \
                 in umae's workspace (under plugins/) by the same toolchain, with the same features as \
                 umae: `cargo build --release -p NAME`, adding `--features umae-sdk/cuda` (or \
                 umae-sdk/tch) for a CUDA (libtorch) build of umae; see docs/plugins.md"
            )
        } else {
            format!("cannot load plugin {shown}: {e}")
        }
    })?;
    // Never unloaded: registry entries point into the library.
    std::mem::forget(lib);
    loaded.push(canonical);
    let new: Vec<&'static Plugin> = registry::all_registered()
        .into_iter()
        .filter(|p| !before.contains(&(*p as *const Plugin as usize)))
        .collect();
    let mut clashes = Vec::new();
    for p in &new {
        if taken.contains(&(p.kind(), p.name))
            || new
                .iter()
                .any(|q| !std::ptr::eq(*q, *p) && q.kind() == p.kind() && q.name == p.name)
        {
            clashes.push(format!("{} `{}`", p.kind(), p.name));
        }
    }
    if !clashes.is_empty() {
        for p in &new {
            registry::refuse(p);
        }
        clashes.dedup();
        return Err(format!(
            "plugin {shown} registers {}, a name already taken: rename it in the plugin (names are unique per kind; see `umae plugins`)",
            clashes.join(", ")
        ));
    }
    if new.is_empty() {
        return Err(format!(
            "plugin {shown} registers no components: add `umae_api::register!(...)` lines"
        ));
    }
    Ok(new
        .iter()
        .map(|p| (p.kind().to_string(), p.name.to_string()))
        .collect())
}

/// Load every plugin a recipe names (paths relative to the current directory or the recipe's
/// folder).
pub fn load_all(paths: &[String], base: Option<&Path>) -> Result<(), String> {
    for p in paths {
        let added = load(&resolve(p, base))?;
        if !added.is_empty() {
            tracing::info!(
                "plugin {p}: {}",
                added
                    .iter()
                    .map(|(k, n)| format!("{k} `{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}
