fn main() -> std::process::ExitCode {
    behest_agent::cli::main()
}
