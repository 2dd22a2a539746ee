// The `umae` binary links the standard library and `libumae_sdk.so` dynamically (see
// .cargo/config.toml); record where they are so that it runs without LD_LIBRARY_PATH.
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
}
