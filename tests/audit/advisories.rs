//! Supply chain (threat E-3): every crate in Cargo.lock is checked against the RustSec advisory
//! database, offline. A vulnerability fails the build; so does an informational advisory
//! (unmaintained, unsound) unless `accepted.toml` names it with the reason it does not apply.
//!
//! The database is read from `FLEET_ADVISORY_DB`, else from `../shared/advisory-db` beside the
//! clone. scripts/test sets `FLEET_REQUIRE_ADVISORY_DB=1` when it finds one, so a missing or
//! unreadable database is then an error, not a silent pass.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustsec::report::{Report, Settings};
use rustsec::{advisory, Database, Lockfile};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn database_path() -> PathBuf {
    std::env::var_os("FLEET_ADVISORY_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/advisory-db"))
}

/// Advisory id → why it does not apply to the fleet.
fn accepted() -> BTreeMap<String, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Accepted {
        reason: String,
    }
    let table: BTreeMap<String, Accepted> = toml::from_str(include_str!("accepted.toml"))
        .expect("accepted.toml: one [RUSTSEC-…] table per advisory, each with reason = \"…\"");
    table
        .into_iter()
        .map(|(id, a)| {
            assert!(
                !a.reason.trim().is_empty(),
                "accepted.toml: {id} needs a reason"
            );
            (id, a.reason)
        })
        .collect()
}

#[test]
fn no_crate_in_the_lockfile_has_an_advisory_that_is_not_accepted_with_a_reason() {
    let path = database_path();
    let required = std::env::var("FLEET_REQUIRE_ADVISORY_DB").is_ok_and(|v| v == "1");
    if !path.join("crates").is_dir() {
        assert!(
            !required,
            "no RustSec advisory database at {} (set FLEET_ADVISORY_DB)",
            path.display()
        );
        eprintln!(
            "advisory audit skipped: no database at {} (set FLEET_ADVISORY_DB)",
            path.display()
        );
        return;
    }
    let db = Database::open(&path).expect("the advisory database loads");
    assert!(
        db.iter().count() > 100,
        "{} holds too few advisories to be the database",
        path.display()
    );
    let lockfile = Lockfile::load(workspace().join("Cargo.lock")).expect("Cargo.lock parses");
    assert!(lockfile.packages.len() > 100, "the whole lockfile is read");

    let settings = Settings {
        informational_warnings: vec![
            advisory::Informational::Unmaintained,
            advisory::Informational::Unsound,
            advisory::Informational::Notice,
        ],
        ..Settings::default()
    };
    let report = Report::generate(&db, &lockfile, &settings);
    let accepted = accepted();
    let mut findings = Vec::new();
    for v in &report.vulnerabilities.list {
        let id = v.advisory.id.to_string();
        if !accepted.contains_key(&id) {
            findings.push(format!(
                "{id} {} {}: {}",
                v.package.name, v.package.version, v.advisory.title
            ));
        }
    }
    let mut seen = Vec::new();
    for warnings in report.warnings.values() {
        for w in warnings {
            let Some(a) = &w.advisory else { continue };
            let id = a.id.to_string();
            seen.push(id.clone());
            if !accepted.contains_key(&id) {
                findings.push(format!(
                    "{id} ({:?}) {} {}: {}",
                    w.kind, w.package.name, w.package.version, a.title
                ));
            }
        }
    }
    for v in &report.vulnerabilities.list {
        seen.push(v.advisory.id.to_string());
    }
    assert!(
        findings.is_empty(),
        "advisories against crates in Cargo.lock ({} crates checked against {} advisories):\n{}",
        lockfile.packages.len(),
        db.iter().count(),
        findings.join("\n")
    );
    eprintln!(
        "advisory audit: {} crates in Cargo.lock checked against {} advisories from {}",
        lockfile.packages.len(),
        db.iter().count(),
        path.display()
    );
    let stale: Vec<&String> = accepted.keys().filter(|id| !seen.contains(id)).collect();
    assert!(
        stale.is_empty(),
        "accepted.toml names advisories that no longer match any crate; remove them: {stale:?}"
    );
}

#[test]
fn the_audit_sees_a_known_vulnerable_version() {
    let path = database_path();
    if !path.join("crates").is_dir() {
        return; // reported by the test above
    }
    let db = Database::open(&path).expect("the advisory database loads");
    // backoff 0.4.0 is unmaintained (RUSTSEC-2025-0012): the reason this project uses backon.
    let lockfile: Lockfile = r#"
version = 4

[[package]]
name = "backoff"
version = "0.4.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
"#
    .parse()
    .expect("a lockfile");
    let settings = Settings {
        informational_warnings: vec![advisory::Informational::Unmaintained],
        ..Settings::default()
    };
    let report = Report::generate(&db, &lockfile, &settings);
    let ids: Vec<String> = report
        .warnings
        .values()
        .flatten()
        .filter_map(|w| w.advisory.as_ref().map(|a| a.id.to_string()))
        .collect();
    assert!(
        ids.iter().any(|id| id == "RUSTSEC-2025-0012"),
        "backoff's advisory is found: {ids:?}"
    );
}
