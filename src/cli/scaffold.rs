//! `umae new-plugin`: a ready-to-build dynamic plugin crate from a template.

use std::path::{Path, PathBuf};

use super::Error;

/// Templates by kind; each is also compiled and tested inside umae's own test suite.
const TEMPLATES: [(&str, &str); 5] = [
    ("masker", include_str!("templates/masker.rs")),
    ("encoder", include_str!("templates/encoder.rs")),
    ("decoder", include_str!("templates/decoder.rs")),
    ("target", include_str!("templates/target.rs")),
    ("regularizer", include_str!("templates/regularizer.rs")),
];

/// `my-term` -> `MyTerm`.
fn camel(name: &str) -> String {
    name.split(['-', '_'])
        .filter(|s| !s.is_empty())
        .map(|s| {
            let mut c = s.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The files of a new plugin crate `name` of this kind, as (relative path, contents).
pub fn files(
    name: &str,
    kind: &str,
    umae_src: Option<&Path>,
) -> Result<Vec<(String, String)>, String> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(format!(
            "plugin name `{name}`: use lowercase letters, digits and dashes, starting with a letter (like `my-term`)"
        ));
    }
    let Some((_, template)) = TEMPLATES.iter().find(|(k, _)| *k == kind) else {
        return Err(format!(
            "unknown plugin kind `{kind}`: use masker, encoder, decoder, target or regularizer"
        ));
    };
    let deps = match umae_src {
        Some(root) => format!(
            "umae-api = {{ path = \"{0}/umae-api\" }}\numae-sdk = {{ path = \"{0}/umae-sdk\" }}\n",
            root.display()
        ),
        None => format!(
            "umae-api = \"{0}\"\numae-sdk = \"{0}\"\n",
            env!("CARGO_PKG_VERSION")
        ),
    };
    let cargo = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         # A shared library that `umae --plugin` loads.\n[lib]\ncrate-type = [\"dylib\"]\n\n\
         [dependencies]\n{deps}"
    );
    let config = "# Plugins share the standard library with umae: link it dynamically.\n\
                  [build]\nrustflags = [\"-C\", \"prefer-dynamic\"]\n"
        .to_string();
    let lib = format!(
        "//! The `{name}` {kind} plugin for umae.\n//!\n\
         //! Built in umae's workspace (this crate in its plugins/ folder), from its root:\n//!\n\
         //!     cargo build --release -p {name}\n\
         //!     umae --plugin target/release/lib{lib}.so plugins --kind {kind}\n\n\
         umae_sdk::declare_plugin!();\n\n{body}",
        lib = name.replace('-', "_"),
        body = template
            .replace("my-plugin", name)
            .replace("MyPlugin", &camel(name))
    );
    Ok(vec![
        ("Cargo.toml".into(), cargo),
        (".cargo/config.toml".into(), config),
        ("src/lib.rs".into(), lib),
    ])
}

/// Where `umae new-plugin` writes a crate, and whether it lands in umae's workspace.
enum Place {
    /// `SRC/plugins/NAME`: a member of umae's workspace (`plugins/*`).
    Member { src: PathBuf },
    /// Anywhere else, or umae's sources are not known.
    Outside { src: Option<PathBuf> },
}

fn place(dir: &Path, src: Option<&Path>) -> Place {
    let Some(src) = src else {
        return Place::Outside { src: None };
    };
    let src = src.canonicalize().unwrap_or_else(|_| src.to_path_buf());
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent
        .unwrap_or(Path::new("."))
        .canonicalize()
        .unwrap_or_default();
    if parent == src.join("plugins") {
        Place::Member { src }
    } else {
        Place::Outside { src: Some(src) }
    }
}

pub fn new_plugin(name: &str, kind: &str, output: Option<PathBuf>) -> Result<(), Error> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    let umae_src = src.join("umae-sdk").is_dir().then_some(src);
    let dir = output.unwrap_or_else(|| match umae_src {
        Some(src) => src.join("plugins").join(name),
        None => PathBuf::from(name),
    });
    if dir.exists() {
        return Err(Error::command_line(format!(
            "{} already exists: choose another --output",
            dir.display()
        )));
    }
    let mut files = files(name, kind, umae_src).map_err(Error::command_line)?;
    let lib = name.replace('-', "_");
    let place = place(&dir, umae_src);
    if let Place::Member { .. } = place {
        // The workspace's own .cargo/config.toml applies.
        files.retain(|(rel, _)| rel != ".cargo/config.toml");
    }
    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::Failed(format!("cannot create {}: {e}", parent.display())))?;
        }
        std::fs::write(&path, text)
            .map_err(|e| Error::Failed(format!("cannot write {}: {e}", path.display())))?;
    }
    println!(
        "wrote the {kind} plugin `{name}` in {}:\n  {}",
        dir.display(),
        files
            .iter()
            .map(|(f, _)| f.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
    );
    match place {
        Place::Member { src } => println!(
            "it is a member of umae's workspace (plugins/*); from {src}:\n  \
             cargo test --release -p {name}\n  \
             cargo build --release -p {name}\n  \
             umae --plugin target/release/lib{lib}.so plugins --kind {kind}",
            src = src.display()
        ),
        Place::Outside { src } => {
            let there = src
                .map(|s| format!(" (move it to {}/plugins/{name})", s.display()))
                .unwrap_or_default();
            eprintln!(
                "warning: {} is outside umae's workspace{there}. A plugin must be built in the \
                 workspace umae was built in: built on its own, this crate compiles its own \
                 umae-sdk and burn (a long build), with symbols that umae refuses to load \
                 (see docs/plugins.md)",
                dir.display()
            );
        }
    }
    Ok(())
}
