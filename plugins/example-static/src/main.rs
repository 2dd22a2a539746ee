//! `my-umae`: the whole umae command line plus the components of this crate.
//!
//!     cargo run --release -p umae-example-static --bin my-umae -- plugins --kind masker

fn main() -> std::process::ExitCode {
    umae_example_static::link();
    umae::cli::main()
}
