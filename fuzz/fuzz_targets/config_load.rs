//! Config loading: any TOML text (with a chosen environment) through `config::load`. Must never
//! panic, and never show the client secret in an error or in the settings' `Debug`.
//!
//! The first byte picks the environment (a valid Auth0 baseline or none; which variable holds
//! the secret) and which test files the file keys name; the rest is the config file.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    let _ = behest_agent_fuzz::load_config(flags, &text);
});
