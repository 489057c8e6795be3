//! The README's quick start is `examples/quick_start.rs` word for word, and it runs as pasted
//! against the test hub.

use std::time::Duration;

use hubsend_testhub::{HubConfig, TestHub};

// The example's `main`, callable here (the test harness brings its own entry point).
include!("../examples/quick_start.rs");

/// The first ```rust block of the README's `## Quick start` section.
fn readme_quick_start() -> String {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Quick start\n")
        .nth(1)
        .expect("the README has a Quick start section");
    let block = section
        .split("```rust,no_run\n")
        .nth(1)
        .expect("the Quick start has a rust block");
    block
        .split("\n```")
        .next()
        .expect("the block ends")
        .to_owned()
        + "\n"
}

#[test]
fn the_readme_quick_start_is_the_example() {
    assert_eq!(
        readme_quick_start(),
        include_str!("../examples/quick_start.rs"),
        "README.md's quick start and examples/quick_start.rs differ: copy the example into the README"
    );
}

#[test]
fn the_quick_start_runs_against_the_test_hub() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let hub = runtime.block_on(TestHub::start(HubConfig::new())).unwrap();
    // The only test in this binary that reads the environment.
    std::env::set_var("EVENTHUB_CONNECTION_STRING", hub.connection_string());
    main().expect("the quick start ran");
    let stored =
        runtime.block_on(hub.wait_for_events("telemetry", 10_001, Duration::from_secs(10)));
    assert_eq!(stored.len(), 10_001);
    assert_eq!(
        stored
            .iter()
            .filter(|e| e.partition_key.as_deref() == Some("compressor-7"))
            .count(),
        1
    );
}
