fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "rustc unknown".into());
    println!("cargo:rustc-env=UMAE_RUSTC={version}");
    println!("cargo:rerun-if-env-changed=RUSTC");
    println!("cargo:rerun-if-changed=build.rs");

    // With the `tch` feature this library holds torch-sys's C wrapper around libtorch. rustc
    // exports only Rust symbols from a dylib, but generic burn-tch code instantiated in the
    // crates that link this library calls those C functions by name, so they must be exported
    // too. A second version script adds them; lld gives its named patterns precedence over
    // rustc's `local: *`. (The zstd C library is built with hidden symbols, which no script can
    // export: burn-store, its user, is linked into this library for that reason.)
    if std::env::var_os("CARGO_FEATURE_TCH").is_some() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let script = out.join("export-c.map");
        let patterns = [
            "at_*",
            "atc_*",
            "atg_*",
            "ati_*",
            "atm_*",
            "ato_*",
            "ats_*",
            "get_and_reset_last_er*",
        ];
        let body: String = patterns.iter().map(|p| format!("    {p};\n")).collect();
        std::fs::write(&script, format!("{{\n  global:\n{body}}};\n"))
            .expect("write the version script");
        println!(
            "cargo:rustc-link-arg=-Wl,--version-script={}",
            script.display()
        );
    }
}
