//! The deployment files beyond Compose, checked offline: the Kubernetes
//! manifests under deploy/kubernetes/ against the Kubernetes 1.37 schemas
//! (kubernetes-validate, installed by scripts/test.sh, in strict mode), and
//! the Kubernetes, Swarm and Compose files for what the cluster depends on:
//! a stop grace period above the node's drain, readiness on `/health`,
//! liveness that survives a drain, two balancers sharing a cookie secret,
//! one-at-a-time rolling updates (tests/python/check_deploy.py).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use switchboard_tests::py_env_python;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn validate(python: &Path, files: &[PathBuf]) -> (bool, String) {
    let tool = python.with_file_name("kubernetes-validate");
    let out = Command::new(&tool)
        .arg("--strict")
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", tool.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn kubernetes_manifests_match_the_schemas_and_every_file_keeps_the_drain() {
    let Some(python) = py_env_python() else { return };
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "manifests in {}", dir.display());
    let (ok, text) = validate(&python, &files);
    assert!(ok, "kubernetes-validate refused the manifests:\n{text}");
    assert!(text.matches("passed").count() >= 6, "every resource was checked:\n{text}");

    // The validator does refuse a bad manifest (so its pass means something).
    let bad = std::env::temp_dir().join(format!("sb-bad-manifest-{}.yaml", std::process::id()));
    std::fs::write(&bad, "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: three}\n")
        .expect("write");
    let (bad_ok, bad_text) = validate(&python, std::slice::from_ref(&bad));
    let _ = std::fs::remove_file(&bad);
    assert!(!bad_ok, "a Deployment with replicas: three passed:\n{bad_text}");

    let script = repo().join("tests/python/check_deploy.py");
    let out = Command::new(&python).arg(&script).arg(repo()).output().expect("run check_deploy.py");
    let checks: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(checks.len() >= 14, "checks ran: {checks:#?}\n{}", String::from_utf8_lossy(&out.stderr));
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
