//! The `vmmu` command (see the library for everything it does).

fn main() -> std::process::ExitCode {
    vmmu_cli::run_cli()
}
