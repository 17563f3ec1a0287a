//! The integration tests: one binary, a module per area, shared helpers in `util` and the proxy
//! test rig in `rig`.

mod ci;
mod ci_github;
mod ci_gitlab;
mod cli;
mod config;
mod dev;
mod doctor;
mod egress;
mod faults;
mod fleet;
mod forwarding;
mod interop;
mod keys;
mod limits;
mod node;
mod outage;
mod profiles;
mod props;
mod proxy;
mod redis_server;
mod rig;
mod service;
mod smuggling;
mod token;
mod trust;
mod upstream;
mod usage;
mod util;
