//! The config loader on arbitrary input: it decides what gets killed, so it must refuse garbage
//! with an error, never panic, and never accept a policy that breaks its own rules.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/config/mod.rs"]
mod config;
#[allow(dead_code)]
#[path = "../../src/routes.rs"]
mod routes;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = config::Config::parse(text, "fuzz") {
        assert!(!cfg.policies.is_empty());
        for p in &cfg.policies {
            assert!(!p.budget.is_zero(), "accepted a zero budget");
            assert!(!p.name.trim().is_empty() && p.name.len() <= 64);
            assert!(p.ports.iter().all(|r| r.first >= 1 && r.first <= r.last));
            for r in &p.routes {
                // A route's ladder never starts before its budget; an "off" route has none.
                match r.budget {
                    Some(b) => assert!(r.steps.first().is_some_and(|s| s.after >= b)),
                    None => assert!(r.steps.is_empty()),
                }
                assert!(r.pattern.path.starts_with('/') && !r.pattern.path.contains('*'));
            }
        }
    }
});
