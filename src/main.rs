//! The `umae` executable: a launcher that links neither the SDK nor the program.
//!
//! The program is `libumae.so` and it links `libumae_sdk.so` (burn, umae-api and the plugin
//! registry, shared with dynamic plugins). Rust symbols carry a hash of how their crate was
//! compiled, so an SDK rebuilt with other features or another toolchain (for example by
//! `cargo build -p PLUGIN --features umae-sdk/cuda`) no longer has the symbols the program
//! needs; a binary that linked it directly would die in the dynamic loader before `main`.
//! The launcher loads the SDK alone first (it depends only on the standard library), compares
//! its build identity with the one this launcher was built with, then loads the program with
//! every symbol resolved at once, and turns any failure into an error that says which file,
//! which build it expects and how to rebuild, with exit code 2.

use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use libloading::os::unix::{Library, Symbol, RTLD_GLOBAL, RTLD_NOW};

/// The SDK this launcher was built with (umae-sdk/build.rs, through build.rs).
const EXPECTED_SDK: &str = env!("UMAE_SDK_ABI");
const PROGRAM: &str = "libumae.so";
const SDK: &str = "libumae_sdk.so";

fn main() -> ExitCode {
    match start() {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(message) => {
            eprintln!("error: umae cannot start: {message}");
            ExitCode::from(2)
        }
    }
}

/// The command that rebuilds this launcher with the program and the SDK that go with it.
fn rebuild() -> String {
    let features: Vec<&str> = [
        ("cuda", cfg!(feature = "cuda")),
        ("tch", cfg!(feature = "tch")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    if features.is_empty() {
        "cargo build --release".into()
    } else {
        format!("cargo build --release --features {}", features.join(","))
    }
}

/// The folder that holds the program: beside the executable (target/release) or in ../lib
/// (an install by scripts/install.sh).
fn program_dir(exe: &Path) -> Result<PathBuf, String> {
    let bin = exe.parent().unwrap_or(Path::new("."));
    let candidates = [bin.to_path_buf(), bin.join("../lib")];
    candidates
        .iter()
        .find(|dir| dir.join(PROGRAM).is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "{PROGRAM} is neither in {} nor in {}: the umae executable is only a launcher \
                 and needs the program and {SDK} beside it. Build them with `{}` and run \
                 target/release/umae, or install all three with scripts/install.sh PREFIX \
                 (`cargo install` copies the executable alone)",
                candidates[0].display(),
                candidates[1].display(),
                rebuild()
            )
        })
}

fn start() -> Result<c_int, String> {
    let exe = std::env::current_exe().map_err(|e| format!("where is this executable? {e}"))?;
    let dir = program_dir(&exe)?;
    let (program, sdk) = (dir.join(PROGRAM), dir.join(SDK));
    let stale = |what: String| {
        format!(
            "{what}\n  {SDK} was rebuilt by another build after umae (a plugin built alone or \
             with other features, or another toolchain). Rebuild umae: `{}` (see \
             docs/plugins.md, \"How sharing works, and the compatibility rules\")",
            rebuild()
        )
    };

    // SAFETY: the SDK's initialisers are those of the standard library and burn's statics,
    // which run whichever program loads it; it is kept loaded until the process exits.
    let sdk_lib = unsafe { Library::open(Some(&sdk), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("{}: {e}", sdk.display()))?;
    // SAFETY: `umae_sdk_abi` has this C signature in every SDK that exports it.
    let found = unsafe { sdk_lib.get::<extern "C" fn() -> *const c_char>(b"umae_sdk_abi\0") }
        // SAFETY: it returns a pointer to a NUL-terminated string in the SDK's static data.
        .map(|abi| {
            unsafe { CStr::from_ptr(abi()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_else(|_| "an older umae-sdk, without a build identity".into());
    if found != EXPECTED_SDK {
        return Err(stale(format!(
            "{} is not the SDK this umae was built with\n  expected: {EXPECTED_SDK}\n  found:    \
             {found}",
            sdk.display()
        )));
    }
    std::mem::forget(sdk_lib);

    // RTLD_NOW: a symbol that the program needs and the SDK lacks is an error here, not later.
    // SAFETY: the program is built with this launcher; its initialisers register the built-in
    // plugins. It stays loaded until the process exits.
    let program_lib = unsafe { Library::open(Some(&program), RTLD_NOW) }.map_err(|e| {
        stale(format!(
            "{} does not match the {SDK} beside it, although both say `{found}`: {e}",
            program.display()
        ))
    })?;
    // SAFETY: `umae_main` is defined in src/lib.rs with this signature.
    let entry: Symbol<extern "C" fn() -> c_int> = unsafe { program_lib.get(b"umae_main\0") }
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let code = entry();
    std::mem::forget(program_lib);
    Ok(code)
}
