//! The integration tests: one binary, a module per area, shared helpers in `util`.

mod cli;
mod config;
mod interop;
mod node;
mod proxy;
mod token;
mod util;
