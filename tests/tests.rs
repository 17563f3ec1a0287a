//! The integration tests: one binary, a module per area, shared helpers in `util`.

mod cli;
mod config;
mod doctor;
mod faults;
mod interop;
mod node;
mod proxy;
mod service;
mod token;
mod util;
