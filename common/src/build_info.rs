//! Which build this is: the crate version and the git revision it was built from, embedded at
//! build time (see `common/build.rs`). Stamped on every attribution and on the worker's log
//! lines, so that `dlq attribute --by version` ties a spike of dead letters to a release.

/// `<crate version>+<git revision>`, e.g. `0.1.0+3f9a1c2b7d4e` (`unknown` outside a git
/// checkout; the commit built from, whatever uncommitted changes the tree held).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("FLEET_GIT_REVISION"));

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_names_the_crate_version_and_a_revision() {
        let (crate_version, revision) = super::VERSION.split_once('+').unwrap();
        assert_eq!(crate_version, env!("CARGO_PKG_VERSION"));
        assert!(!revision.is_empty());
    }
}
