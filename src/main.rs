#![forbid(unsafe_code)]

/// jemalloc rather than glibc's malloc: with its background thread (started by the daemon) it
/// hands memory freed after a burst back to the system within seconds, where glibc keeps the
/// high-water mark resident for good.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    behest_agent::cli::main()
}
