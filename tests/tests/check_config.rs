//! `--check-config` on both programs, run as an operator would run it: the
//! shipped files and good overrides pass and print the merged settings with
//! every secret masked; a bad file, a bad environment variable and a missing
//! key file fail with a non-zero exit and a message naming the setting.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use switchboard_tests::process::{binary, target_dir};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = target_dir().join("check-config");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `program --check-config args…` with only `env` from the
/// SWITCHBOARD_ family set (the test runner's own are removed).
fn check(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary(program));
    cmd.arg("--check-config").args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SWITCHBOARD_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run the program");
    let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    eprintln!("{program} {args:?} → {:?}\nstdout:\n{}\nstderr:\n{}", out.status, show(&out.stdout), show(&out.stderr));
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_balancer_prints_valid_settings_with_secrets_masked() {
    let shipped = repo_file("config/balancer.toml");
    let out = check(
        "switchboard-balancer",
        &["--config", shipped.to_str().unwrap(), "--admin-token", "adm1n-t0ken-value"],
        &[
            ("SWITCHBOARD_COOKIE_SECRET", "c00kie-secret-0123456789"),
            ("SWITCHBOARD_REDIS", "redis://:r3dis-pw@db.internal:6379/2"),
            ("SWITCHBOARD_HEALTH_INTERVAL_MS", "750"),
        ],
    );
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    // Flags and environment win over the file; the result is the merged view.
    assert!(stdout.contains("health_interval_ms = 750"), "{stdout}");
    assert!(stdout.contains(r#"redis = "redis://:****@db.internal:6379/2""#), "{stdout}");
    assert!(stdout.contains(r#"admin_token = "<set, masked>""#), "{stdout}");
    for secret in ["adm1n-t0ken-value", "c00kie-secret-0123456789", "r3dis-pw"] {
        assert!(!stdout.contains(secret) && !text(&out.stderr).contains(secret), "{secret} leaked");
    }
}

#[test]
fn the_balancer_refuses_bad_settings_with_a_clear_message() {
    let typo = scratch("typo.toml", "listen = \"0.0.0.0:8888\"\nhealth_intervall_ms = 5\n");
    let out = check("switchboard-balancer", &["--config", typo.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("typo.toml") && err.contains("health_intervall_ms"), "{err}");

    let out = check("switchboard-balancer", &[], &[("SWITCHBOARD_HEALTH_FALL", "0")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("health_fall"), "{}", text(&out.stderr));

    // Valid as settings, but the certificate they name does not exist.
    let out = check(
        "switchboard-balancer",
        &["--tls-listen", "127.0.0.1:8443", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/cert.pem"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "nothing is printed as valid");
}

#[test]
fn the_node_prints_valid_settings_with_secrets_masked() {
    let shipped = repo_file("config/node.toml");
    let secret = "n0de-auth-secret-0123456789abcdef-0123";
    let out = check(
        "switchboard-node",
        &["--config", shipped.to_str().unwrap(), "--auth", "required", "--name", "Node Lisbon"],
        &[("SWITCHBOARD_AUTH_SECRET", secret), ("SWITCHBOARD_REDIS", "redis://chat:pw0rd@redis:6379")],
    );
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.contains(r#"auth = "required""#) && stdout.contains(r#"name = "Node Lisbon""#), "{stdout}");
    assert!(stdout.contains(r#"auth_secret = "<set, masked>""#), "{stdout}");
    assert!(stdout.contains("redis://chat:****@redis:6379"), "{stdout}");
    assert!(!stdout.contains(secret) && !stdout.contains("pw0rd"), "{stdout}");

    // A Redis Cluster URL: its password masked too; one naming a database
    // (a cluster has one) refused with the reason.
    for program in ["switchboard-node", "switchboard-balancer"] {
        let cluster = "redis+cluster://:c1uster-pw@r1:7000,r2:7001,r3:7002";
        let out = check(program, &[], &[("SWITCHBOARD_REDIS", cluster)]);
        assert!(out.status.success(), "{program}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("redis+cluster://:****@r1:7000,r2:7001,r3:7002"), "{program}: {stdout}");
        assert!(!stdout.contains("c1uster-pw") && !text(&out.stderr).contains("c1uster-pw"), "{program}");
        let out = check(program, &[], &[("SWITCHBOARD_REDIS", "redis+cluster://:c1uster-pw@r1:7000/2")]);
        assert_eq!(out.status.code(), Some(2), "{program}");
        let err = text(&out.stderr);
        assert!(err.contains("cluster") && !err.contains("c1uster-pw"), "{program}: {err}");
    }
}

#[test]
fn the_node_refuses_bad_settings_with_a_clear_message() {
    let bad = scratch("node-bad.toml", "heartbeat_secs = 30\nttl_secs = 10\n");
    let out = check("switchboard-node", &["--config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("ttl_secs"), "{}", text(&out.stderr));

    let out = check("switchboard-node", &["--auth", "required", "--auth-secret-file", "/nonexistent/secret"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/secret"), "{}", text(&out.stderr));

    let out = check("switchboard-node", &[], &[("SWITCHBOARD_AUTH_SECRET", "short")]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("32 bytes") && !err.contains("short\n"), "{err}");
    assert!(out.stdout.is_empty());
}
