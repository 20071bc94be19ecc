//! The control plane's settings: defaults < TOML file (`--config` / `HERALD_CONFIG`) <
//! `HERALD_*` environment < flags, merged once and validated into typed values before anything
//! binds a port. Only this module reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A setting that could not be used: printed as one line, exit code 64.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(key: &str, problem: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            problem: problem.into(),
        }
    }
}

/// The raw layered settings, as strings where a unit is parsed later.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    pub listen: String,
    pub database_url: String,
    pub admin_token: Option<String>,
    pub agent_token: Option<String>,
    pub builtin_agent: bool,
    pub master_key: Option<String>,
    pub master_key_previous: Option<String>,
    pub retry_schedule: Option<String>,
    pub disable_after: String,
    pub lease_grace: String,
    pub region_fallback: String,
    pub max_payload: String,
    pub https_only: bool,
    pub retention: String,
    pub console_listen: Option<String>,
    pub shutdown_grace: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub log_format: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            database_url: "sqlite://herald.db".into(),
            admin_token: None,
            agent_token: None,
            builtin_agent: true,
            master_key: None,
            master_key_previous: None,
            retry_schedule: None,
            disable_after: "5d".into(),
            lease_grace: "30s".into(),
            region_fallback: "wait".into(),
            max_payload: "256KiB".into(),
            https_only: false,
            retention: "30d".into(),
            console_listen: None,
            shutdown_grace: "30s".into(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            metrics_listen: None,
            log_format: "text".into(),
        }
    }
}

/// Where the web console listens in the single-machine default.
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:50052";

/// What to do with a job whose region has no connected agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionFallback {
    Wait,
    Any,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated settings, passed down by value.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    pub admin_token: Option<String>,
    pub agent_token: Option<String>,
    pub builtin_agent: bool,
    pub master_key: Option<[u8; 32]>,
    /// `HERALD_MASTER_KEY_PREVIOUS`: during a rotation, the old key (opens, never seals).
    pub master_key_previous: Option<[u8; 32]>,
    pub retry_schedule: Vec<Duration>,
    pub disable_after: Duration,
    pub lease_grace: Duration,
    pub region_fallback: RegionFallback,
    pub max_payload_bytes: usize,
    pub https_only: bool,
    pub retention: Duration,
    pub console_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Whether `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces variant) is set: spans are exported.
    pub otlp: bool,
}

/// The default retry schedule of SPEC 5: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 3 h, 6 h, 12 h, 24 h.
pub fn default_retry_schedule() -> Vec<Duration> {
    [
        5,
        30,
        120,
        600,
        1800,
        3600,
        3 * 3600,
        6 * 3600,
        12 * 3600,
        24 * 3600,
    ]
    .into_iter()
    .map(Duration::from_secs)
    .collect()
}

impl Config {
    /// Merges the layers: `overrides` are the flags actually passed (serialized without `None`s).
    pub fn load(
        config_file: Option<PathBuf>,
        overrides: impl Serialize,
    ) -> Result<Self, ConfigError> {
        let env = Env::prefixed("HERALD_").ignore(&["CONFIG"]);
        let config_file = config_file.or_else(|| {
            std::env::var_os("HERALD_CONFIG")
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        });
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(path) = &config_file {
            if !path.exists() {
                return Err(ConfigError::new(
                    "HERALD_CONFIG",
                    format!("{} does not exist", path.display()),
                ));
            }
            figment = figment.merge(Toml::file(path));
        }
        let raw: RawConfig = figment
            .merge(env)
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|err| {
                let key = err
                    .path
                    .first()
                    .map(|name| format!("HERALD_{}", name.to_ascii_uppercase()))
                    .unwrap_or_else(|| "configuration".into());
                ConfigError::new(&key, err.kind.to_string())
            })?;
        let mut config = Self::from_raw(raw)?;
        config.otlp = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        Ok(config)
    }

    /// Validates raw settings into typed values.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let listen = raw.listen.parse().map_err(|_| {
            ConfigError::new(
                "HERALD_LISTEN",
                "not a socket address such as 127.0.0.1:50051",
            )
        })?;
        let database_url = raw.database_url.trim().to_owned();
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "HERALD_DATABASE_URL",
                "must start with sqlite: or postgres://",
            ));
        }
        let master_key = raw
            .master_key
            .filter(|key| !key.is_empty())
            .map(|key| parse_master_key(&key))
            .transpose()?;
        let master_key_previous = raw
            .master_key_previous
            .filter(|key| !key.is_empty())
            .map(|key| {
                parse_master_key(&key)
                    .map_err(|err| ConfigError::new("HERALD_MASTER_KEY_PREVIOUS", err.problem))
            })
            .transpose()?;
        if master_key_previous.is_some() && master_key.is_none() {
            return Err(ConfigError::new(
                "HERALD_MASTER_KEY_PREVIOUS",
                "is for a rotation: set HERALD_MASTER_KEY to the new key too",
            ));
        }
        let retry_schedule = match raw.retry_schedule.filter(|s| !s.trim().is_empty()) {
            None => default_retry_schedule(),
            Some(text) => text
                .split(',')
                .map(|part| parse_duration("HERALD_RETRY_SCHEDULE", part))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let region_fallback = match raw.region_fallback.as_str() {
            "wait" => RegionFallback::Wait,
            "any" => RegionFallback::Any,
            _ => {
                return Err(ConfigError::new(
                    "HERALD_REGION_FALLBACK",
                    "must be wait or any",
                ));
            }
        };
        let log_format = parse_log_format(&raw.log_format)?;
        // On by default only in the single-machine default (SQLite and the built-in agent); an
        // empty value turns it off.
        let single_machine = raw.database_url.trim().starts_with("sqlite:") && raw.builtin_agent;
        let console_listen = match raw.console_listen {
            None if single_machine => Some(DEFAULT_CONSOLE_LISTEN.to_owned()),
            other => other,
        };
        let console_listen = optional_addr("HERALD_CONSOLE_LISTEN", console_listen)?;
        let metrics_listen = optional_addr("HERALD_METRICS_LISTEN", raw.metrics_listen)?;
        if raw.tls_cert.is_some() != raw.tls_key.is_some() {
            return Err(ConfigError::new(
                "HERALD_TLS_CERT",
                "HERALD_TLS_CERT and HERALD_TLS_KEY must be set together",
            ));
        }
        Ok(Self {
            listen,
            database_url,
            admin_token: raw.admin_token.filter(|t| !t.is_empty()),
            agent_token: raw.agent_token.filter(|t| !t.is_empty()),
            builtin_agent: raw.builtin_agent,
            master_key,
            master_key_previous,
            retry_schedule,
            disable_after: parse_duration("HERALD_DISABLE_AFTER", &raw.disable_after)?,
            lease_grace: parse_duration("HERALD_LEASE_GRACE", &raw.lease_grace)?,
            region_fallback,
            max_payload_bytes: max_payload(&raw.max_payload)?,
            https_only: raw.https_only,
            retention: parse_retention(&raw.retention)?,
            console_listen,
            shutdown_grace: parse_duration("HERALD_SHUTDOWN_GRACE", &raw.shutdown_grace)?,
            tls_cert: raw.tls_cert,
            tls_key: raw.tls_key,
            tls_client_ca: raw.tls_client_ca,
            metrics_listen,
            log_format,
            otlp: false,
        })
    }

    /// Returns whether this is the single-machine default: SQLite with the built-in agent.
    pub fn is_single_machine(&self) -> bool {
        self.database_url.starts_with("sqlite:") && self.builtin_agent
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::from_raw(RawConfig::default()).expect("the defaults are valid")
    }
}

/// Parses `text`, `json`.
pub fn parse_log_format(value: &str) -> Result<LogFormat, ConfigError> {
    match value {
        "text" | "" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(ConfigError::new(
            "HERALD_LOG_FORMAT",
            "must be text or json",
        )),
    }
}

fn optional_addr(key: &str, value: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::new(key, "not a socket address such as 127.0.0.1:50052")),
    }
}

/// Parses a duration such as `100ms`, `30s`, `5d`.
pub fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|_| {
        ConfigError::new(
            key,
            format!("{value:?} is not a duration such as 30s, 5m or 2d"),
        )
    })
}

/// Parses `HERALD_RETENTION`: at least a day, since idempotency keys are kept 24 hours.
fn parse_retention(value: &str) -> Result<Duration, ConfigError> {
    let retention = parse_duration("HERALD_RETENTION", value)?;
    if retention < Duration::from_secs(86_400) {
        return Err(ConfigError::new(
            "HERALD_RETENTION",
            "must be at least 1d (idempotency keys are remembered 24 hours)",
        ));
    }
    Ok(retention)
}

/// Parses a size such as `256KiB`, `1MiB`, `4096`.
/// The largest `HERALD_MAX_PAYLOAD`: a job must fit the 8 MiB `Jobs` messages with room to
/// spare, and a `PublishEvents` call of many such events the API's message limit.
pub const MAX_PAYLOAD_LIMIT: usize = 16 << 20;

fn max_payload(value: &str) -> Result<usize, ConfigError> {
    let bytes = parse_size("HERALD_MAX_PAYLOAD", value)?;
    if bytes > MAX_PAYLOAD_LIMIT {
        return Err(ConfigError::new(
            "HERALD_MAX_PAYLOAD",
            format!("{value:?} is over the limit of 16MiB"),
        ));
    }
    Ok(bytes)
}

pub fn parse_size(key: &str, value: &str) -> Result<usize, ConfigError> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" | "kb" => 1024,
        "mib" | "m" | "mb" => 1024 * 1024,
        _ => {
            return Err(ConfigError::new(
                key,
                format!("{value:?} is not a size such as 256KiB"),
            ));
        }
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|n| *n > 0)
        .ok_or_else(|| ConfigError::new(key, format!("{value:?} is not a size such as 256KiB")))
}

fn parse_master_key(value: &str) -> Result<[u8; 32], ConfigError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| ConfigError::new("HERALD_MASTER_KEY", "must be base64 of 32 random bytes"))?;
    bytes
        .try_into()
        .map_err(|_| ConfigError::new("HERALD_MASTER_KEY", "must be base64 of exactly 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_spec() {
        let config = Config::default();
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.max_payload_bytes, 256 * 1024);
        assert_eq!(config.retry_schedule.len(), 10);
        assert_eq!(config.disable_after, Duration::from_secs(5 * 86400));
        assert!(config.is_single_machine());
    }

    #[test]
    fn bad_values_name_their_setting() {
        let bad = |raw: RawConfig| Config::from_raw(raw).unwrap_err().key;
        assert_eq!(
            bad(RawConfig {
                listen: "nope".into(),
                ..Default::default()
            }),
            "HERALD_LISTEN"
        );
        assert_eq!(
            bad(RawConfig {
                retry_schedule: Some("100ms,x".into()),
                ..Default::default()
            }),
            "HERALD_RETRY_SCHEDULE"
        );
        assert_eq!(
            bad(RawConfig {
                max_payload: "lots".into(),
                ..Default::default()
            }),
            "HERALD_MAX_PAYLOAD"
        );
        assert_eq!(
            bad(RawConfig {
                max_payload: "17MiB".into(),
                ..Default::default()
            }),
            "HERALD_MAX_PAYLOAD"
        );
        assert_eq!(
            bad(RawConfig {
                master_key: Some("c2hvcnQ=".into()),
                ..Default::default()
            }),
            "HERALD_MASTER_KEY"
        );
    }

    #[test]
    fn sizes_and_schedules_parse() {
        assert_eq!(parse_size("k", "256KiB").unwrap(), 262_144);
        assert_eq!(parse_size("k", "4096").unwrap(), 4096);
        let raw = RawConfig {
            retry_schedule: Some("100ms,200ms".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::from_raw(raw).unwrap().retry_schedule,
            vec![Duration::from_millis(100), Duration::from_millis(200)]
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any value of a size or duration setting: a value or an error naming the
            /// setting, never a panic.
            #[test]
            fn settings_parse_without_a_panic(value in ".{0,40}") {
                if let Err(err) = parse_size("HERALD_MAX_PAYLOAD", &value) {
                    prop_assert_eq!(err.key, "HERALD_MAX_PAYLOAD");
                }
                if let Err(err) = parse_duration("HERALD_LEASE_GRACE", &value) {
                    prop_assert_eq!(err.key, "HERALD_LEASE_GRACE");
                }
                let _ = max_payload(&value);
                let _ = parse_retention(&value);
                let _ = parse_master_key(&value);
            }

            #[test]
            fn sizes_read_back(n in 1usize..1_000_000, unit in prop_oneof![Just(""), Just("KiB"), Just("MiB")]) {
                let factor = match unit { "" => 1, "KiB" => 1024, _ => 1024 * 1024 };
                prop_assert_eq!(parse_size("k", &format!("{n}{unit}")).unwrap(), n * factor);
            }
        }
    }
}
