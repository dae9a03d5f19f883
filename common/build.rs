//! Embeds the git revision the crate is built from (`FLEET_GIT_REVISION`), for
//! `fleet_common::build_info::VERSION`: every attribution and log line names the build that
//! wrote it. A build outside a git checkout (or without git) says `unknown`; the variable
//! `FLEET_GIT_REVISION` set in the environment wins (a container build without `.git`).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=FLEET_GIT_REVISION");
    let revision = std::env::var("FLEET_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=FLEET_GIT_REVISION={revision}");
}

fn git_revision() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // Rebuild when HEAD moves (a commit, a checkout), not on every file change.
    // Only files that exist: cargo re-runs a build script on every build while a file it was
    // told to watch is missing.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let watch = |path: String| {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        };
        watch(format!("{dir}/HEAD"));
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch(format!("{dir}/{head_ref}"));
        }
        watch(format!("{dir}/packed-refs"));
    }
    // The commit only: uncommitted changes are not tracked (that would rebuild on every edit).
    git(&["rev-parse", "--short=12", "HEAD"])
}
