//! Configuration plumbing shared by both programs. Each program owns its
//! settings struct (with serde defaults); this module reads the optional TOML
//! file into it and reports unknown keys and type errors with the file name, so
//! a typo in `config/node.toml` fails loudly at start instead of being ignored.
//! Precedence (highest first): command-line flag, `SWITCHBOARD_…` environment
//! variable (both handled by clap), file, built-in default.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How logs are written: human-readable lines, or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the `tracing` subscriber; `RUST_LOG` filters (default `info`).
/// Text logs are coloured only on a terminal: a file or a container's log
/// gets no escape sequences at all. (Text a client chose is logged with
/// Debug formatting, `?field`, which escapes it.)
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Copies every `Some` field of a parsed command line over the settings
/// loaded from defaults and the config file: `overlay!(cfg, cli, a, b, …)`.
#[macro_export]
macro_rules! overlay {
    ($cfg:ident, $cli:ident, $($field:ident),* $(,)?) => {
        $( if let Some(v) = $cli.$field { $cfg.$field = v; } )*
    };
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Reads `path` as TOML into `T`; with no path, returns `T::default()`.
pub fn load_file<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source: Box::new(source) })
}

/// Fails with a readable message unless `value` is positive.
pub fn require_positive(name: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid { name, reason: "must be greater than zero".into() });
    }
    Ok(())
}

/// A URL with the password of its user part replaced by `****`
/// (`redis://:secret@host` → `redis://:****@host`); anything else unchanged.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_string() };
    let user = &rest[..at];
    let masked = match user.split_once(':') {
        Some((name, pass)) if !pass.is_empty() => format!("{name}:****"),
        Some(_) => user.to_string(),
        // `redis://secret@host`: a lone user part is taken as the password by some clients.
        None if !user.is_empty() => "****".to_string(),
        None => String::new(),
    };
    format!("{scheme}://{masked}{}", &rest[at..])
}

/// The settings a program would run with, as TOML, for `--check-config`:
/// every key in `secrets` that is set reads `"<set, masked>"`, and passwords
/// in every key in `urls` are masked, so the output can be pasted into an
/// issue or a chat.
pub fn masked_toml<T: Serialize>(settings: &T, secrets: &[&str], urls: &[&str]) -> Result<String, String> {
    let mut table = match toml::Value::try_from(settings).map_err(|e| e.to_string())? {
        toml::Value::Table(t) => t,
        _ => return Err("settings are not a table".into()),
    };
    for key in secrets {
        if let Some(toml::Value::String(s)) = table.get_mut(*key) {
            if !s.is_empty() {
                *s = "<set, masked>".into();
            }
        }
    }
    for key in urls {
        if let Some(toml::Value::String(s)) = table.get_mut(*key) {
            *s = mask_url_password(s);
        }
    }
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// Ends a `--check-config` run of `program`: the masked settings on stdout
/// and exit 0, or the error on stderr and exit 2.
pub fn finish_check(program: &str, report: Result<String, String>) -> std::process::ExitCode {
    match report {
        Ok(text) => {
            println!("# {program}: the settings are valid (defaults < file < environment < flags)\n{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{program}: configuration error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Checks that the three places a setting is written agree with the
/// settings struct's `Default`: the shipped TOML file names every setting
/// and gives its default (`shipped` is that file parsed into the struct), and
/// every flag's `--help` line says `[default: …]` with the same value (an
/// empty string may be described in words). Returns every disagreement.
pub fn defaults_disagree<T: Serialize>(defaults: &T, shipped_text: &str, shipped: &T, help: &str) -> Vec<String> {
    let table = |v: &T| toml::Value::try_from(v).ok().and_then(|v| v.as_table().cloned()).unwrap_or_default();
    let (want, got) = (table(defaults), table(shipped));
    let raw: toml::Table = toml::from_str(shipped_text).unwrap_or_default();
    let mut problems = Vec::new();
    for (key, value) in &want {
        if !raw.contains_key(key) {
            problems.push(format!("{key}: missing from the shipped file"));
        } else if got.get(key) != Some(value) {
            problems.push(format!("{key}: shipped file says {:?}, default is {value}", got.get(key)));
        }
        let flag = format!("--{} ", key.replace('_', "-"));
        let Some(at) = help.find(&flag) else {
            problems.push(format!("{key}: no {flag}in --help"));
            continue;
        };
        // The flag's line and its description, up to the next flag's line.
        let mut lines = help[at..].lines();
        let first = lines.next().unwrap_or_default();
        let rest: Vec<&str> = lines.take_while(|l| !l.trim_start().starts_with('-')).collect();
        let entry = format!("{first}\n{}", rest.join("\n"));
        let said = entry.split_once("[default: ").and_then(|(_, rest)| rest.split_once(']')).map(|(d, _)| d);
        let agrees = match (said, value) {
            (None, _) => false,
            (Some(d), toml::Value::Integer(i)) => d.parse::<f64>().ok() == Some(*i as f64),
            (Some(d), toml::Value::Float(f)) => d.parse::<f64>().ok() == Some(*f),
            (Some(d), toml::Value::Boolean(b)) => d == b.to_string(),
            (Some(d), toml::Value::String(s)) if s.is_empty() => matches!(d, "empty" | "none"),
            (Some(d), toml::Value::String(s)) => d == s,
            (Some(_), _) => true,
        };
        if !agrees {
            problems.push(format!("{key}: --help says {said:?}, default is {value}"));
        }
    }
    for key in raw.keys().filter(|k| !want.contains_key(*k)) {
        problems.push(format!("{key}: in the shipped file but not a setting with a default"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        port: u16,
        name: String,
    }

    #[test]
    fn missing_path_gives_defaults() {
        let s: Sample = load_file(None).unwrap();
        assert_eq!(s, Sample::default());
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("sb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "port = 1\nprot = 2\n").unwrap();
        let err = load_file::<Sample>(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("prot"), "{err}");
        std::fs::write(&file, "port = \"x\"\n").unwrap();
        assert!(load_file::<Sample>(Some(&file)).is_err());
        std::fs::write(&file, "port = 7\n").unwrap();
        assert_eq!(load_file::<Sample>(Some(&file)).unwrap().port, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(mask_url_password("redis://:s3cret@db:6379/0"), "redis://:****@db:6379/0");
        assert_eq!(mask_url_password("redis://app:s3cret@db"), "redis://app:****@db");
        assert_eq!(mask_url_password("redis://s3cret@db"), "redis://****@db");
        assert_eq!(
            mask_url_password("redis+sentinel://:pw@a:26379,b:26379/mymaster"),
            "redis+sentinel://:****@a:26379,b:26379/mymaster"
        );
        assert_eq!(mask_url_password("redis+cluster://:pw@a:7000,b:7001"), "redis+cluster://:****@a:7000,b:7001");
        assert_eq!(
            mask_url_password("redis://db:6379/@x"),
            "redis://db:6379/@x",
            "an @ in the path is not a user part"
        );
        assert_eq!(mask_url_password("not a url"), "not a url");
    }

    #[test]
    fn secrets_are_masked_and_empty_ones_left_empty() {
        #[derive(Serialize)]
        struct S {
            token: String,
            empty: String,
            redis: String,
            port: u16,
        }
        let s = S { token: "t0ps3cret".into(), empty: String::new(), redis: "redis://:pw@h".into(), port: 1 };
        let out = masked_toml(&s, &["token", "empty"], &["redis"]).unwrap();
        assert!(!out.contains("t0ps3cret") && !out.contains("pw@"), "{out}");
        assert!(
            out.contains("token = \"<set, masked>\"") && out.contains("empty = \"\"") && out.contains("port = 1"),
            "{out}"
        );
    }

    #[test]
    fn zero_is_rejected_where_positive_required() {
        assert!(require_positive("x", 0).is_err());
        assert!(require_positive("x", 1).is_ok());
    }
}
