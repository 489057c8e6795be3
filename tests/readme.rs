//! The README's quick start is `examples/quick_start.rs` word for word (so it compiles as
//! pasted; `.ci/quick-start.sh` runs it against the test hub).

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
