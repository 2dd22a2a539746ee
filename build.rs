// The `umae` binary links the standard library dynamically (see .cargo/config.toml), and
// libumae.so and binaries built on it link `libumae_sdk.so`; record where they are so that
// they run without LD_LIBRARY_PATH.
fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").unwrap_or_default();
    let sysroot = std::process::Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let std_dir = format!("{sysroot}/lib/rustlib/{target}/lib");
    println!(
        "cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:$ORIGIN/deps:$ORIGIN/..:$ORIGIN/../lib:{std_dir}"
    );
    println!("cargo:rerun-if-env-changed=RUSTC");
    // libumae.so holds the zstd C library (burn-store reads zip archives with it). rustc exports
    // only Rust symbols from a dylib, but generic zip/zstd code instantiated in what links
    // libumae.so (tests, a binary built on umae) calls zstd's C functions by name, so they are
    // exported too; .cargo/config.toml gives them default visibility (as umae-sdk/build.rs does
    // for its `tch` build). Matches nothing in executables.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = out.join("export-zstd.map");
    std::fs::write(&script, "{\n  global:\n    ZSTD_*;\n};\n").expect("write the version script");
    println!(
        "cargo:rustc-link-arg=-Wl,--version-script={}",
        script.display()
    );
    // The SDK's build identity (umae-sdk/build.rs, through its `links` key), which the launcher
    // checks at start-up. Only the umae package depends on umae-sdk directly.
    if let Ok(abi) = std::env::var("DEP_UMAE_SDK_ABI") {
        println!("cargo:rustc-env=UMAE_SDK_ABI={abi}");
    }
}
