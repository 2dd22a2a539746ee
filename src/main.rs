fn main() -> std::process::ExitCode {
    umae::cli::main()
}
