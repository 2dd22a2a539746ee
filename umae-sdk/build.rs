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
    // The optional backends compiled in: a plugin must be built with the same ones.
    let backends: Vec<&str> = [("cuda", "CARGO_FEATURE_CUDA"), ("tch", "CARGO_FEATURE_TCH")]
        .into_iter()
        .filter(|(_, var)| std::env::var_os(var).is_some())
        .map(|(name, _)| name)
        .collect();
    let backends = if backends.is_empty() {
        "flex".to_string()
    } else {
        format!("flex+{}", backends.join("+"))
    };
    // The build identity: what a plugin and the `umae` launcher must have been built against.
    // `links = "umae_sdk"` hands it to the build scripts of the crates that depend on this one
    // (as DEP_UMAE_SDK_ABI).
    let abi = format!(
        "umae-api {}; burn 0.21.0 ({backends}); {version}",
        std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION")
    );
    println!("cargo:rustc-env=UMAE_ABI={abi}");
    println!("cargo:abi={abi}");
    println!("cargo:rerun-if-env-changed=RUSTC");
    println!("cargo:rerun-if-changed=build.rs");

    // With the `tch` feature this library holds torch-sys's C wrapper around libtorch and the
    // zstd C library (tch reads zip archives). rustc exports only Rust symbols from a dylib, but
    // generic burn-tch and zstd code instantiated in the crates that link this library (the
    // binary, burn-store's readers) calls those C functions by name, so they must be exported
    // too. A second version script adds them; lld gives its named patterns precedence over
    // rustc's `local: *`. zstd-sys hides its symbols unless ZSTD_SYS_NO_HIDE_SYMBOLS is set
    // (.cargo/config.toml sets it).
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
            "ZSTD_*",
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
