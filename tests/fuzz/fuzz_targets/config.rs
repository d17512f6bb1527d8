//! The config parser on arbitrary text: never panics, and a config it accepts has
//! routes, each with upstreams and a path prefix starting with `/`; a refusal names at
//! least one problem.
#![no_main]

use keygate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            assert!(!config.routes.is_empty());
            for route in &config.routes {
                assert!(!route.upstreams.is_empty(), "{}", route.name);
                assert!(route.path_prefix.starts_with('/'), "{}", route.path_prefix);
            }
        }
        Err(problems) => assert!(!problems.0.is_empty()),
    }
});
