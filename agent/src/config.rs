//! The agent's configuration: the [`Config`] that [`crate::run`] takes, and the binary's loading
//! of it from defaults < TOML file (`--config` / `HERALD_CONFIG`) < `HERALD_*` environment < flags.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use ipnet::IpNet;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The control plane an agent connects to when none is configured.
pub const DEFAULT_CONTROL_PLANE: &str = "http://127.0.0.1:50051";
/// The highest capacity (jobs in flight at once) an agent may announce.
pub const MAX_CAPACITY: u32 = 65536;

/// Everything the agent needs to run; the control plane builds one for its built-in agent.
#[derive(Clone)]
pub struct Config {
    /// Control plane URLs (`http://127.0.0.1:50051`), tried in turn.
    pub control_planes: Vec<String>,
    /// Instead of `control_planes` and `token`: the control plane of this process (its
    /// built-in agent), reached without the network.
    pub in_process: Option<crate::link::InProcessLink>,
    /// The agent credential, sent as `authorization: Bearer <token>`.
    pub token: String,
    /// Shown by `ListAgents`; unique per agent.
    pub agent_id: String,
    /// Jobs of subscriptions of this region come to this agent.
    pub region: String,
    /// The most jobs run at once, 1..=65536; also the first credit grant.
    pub capacity: u32,
    /// Networks allowed even though the SSRF guard would refuse them (e.g. `127.0.0.0/8`).
    pub allow_destinations: Vec<IpNet>,
    /// A PEM file of root certificates trusted for receivers besides the platform's.
    pub extra_ca: Option<PathBuf>,
    /// `HERALD_TLS_CA`: the CA (PEM) that `https://` control planes are verified against,
    /// instead of the platform's roots.
    pub tls_ca: Option<PathBuf>,
    /// `HERALD_TLS_CLIENT_CERT` and `HERALD_TLS_CLIENT_KEY`: the agent's client certificate
    /// (mTLS), PEM.
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
    /// Announced in the hello.
    pub version: String,
    /// How often a heartbeat is sent, unless the control plane's welcome names an interval.
    pub heartbeat_interval: Duration,
    /// On shutdown, how long in-flight jobs may take to finish and be reported.
    pub shutdown_grace: Duration,
    /// Where the agent's metrics go (the control plane's registry for the built-in agent).
    pub metrics: Option<crate::telemetry::AgentMetrics>,
    /// Told `true` once a control plane has welcomed a stream and `false` when it ends: the
    /// binary's health service follows it.
    pub connected: Option<tokio::sync::watch::Sender<bool>>,
}

/// What the binary loads: the agent's configuration and how it logs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub log_format: LogFormat,
    /// `HERALD_METRICS_LISTEN`: where `/metrics` is served; unset, nothing listens.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `HERALD_HEALTH_LISTEN`: where the gRPC health service answers (`SERVING` while a stream
    /// to a control plane is open); unset, nothing listens.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Whether `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces variant) is set: spans are exported.
    pub otlp: bool,
}

/// `HERALD_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Command-line flags; `None` means not given, so a lower layer decides.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--config`: the TOML file, instead of `HERALD_CONFIG`.
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_destinations: Option<String>,
}

/// A bad setting: prints as one line naming it, `HERALD_CAPACITY: must be between 1 and 65536`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct Invalid {
    pub setting: String,
    pub message: String,
}

/// The merged layers before validation. Values stay loose (`Value`) so that an environment
/// string and a TOML integer both work, and so the errors are this module's own.
#[derive(Debug, Default, Deserialize)]
struct Raw {
    control_plane: Option<Value>,
    agent_token: Option<Value>,
    region: Option<Value>,
    capacity: Option<Value>,
    agent_id: Option<Value>,
    allow_destinations: Option<Value>,
    extra_ca: Option<Value>,
    tls_ca: Option<Value>,
    tls_client_cert: Option<Value>,
    tls_client_key: Option<Value>,
    log_format: Option<Value>,
    heartbeat_interval: Option<Value>,
    shutdown_grace: Option<Value>,
    metrics_listen: Option<Value>,
    health_listen: Option<Value>,
}

/// The settings the agent reads, as lowercase keys without the `HERALD_` prefix; every other
/// `HERALD_*` variable belongs to another process and is ignored. (README's settings table is
/// checked against this list.)
pub const KEYS: &[&str] = &[
    "control_plane",
    "agent_token",
    "region",
    "capacity",
    "agent_id",
    "allow_destinations",
    "extra_ca",
    "tls_ca",
    "tls_client_cert",
    "tls_client_key",
    "log_format",
    "heartbeat_interval",
    "shutdown_grace",
    "metrics_listen",
    "health_listen",
];
const ENV_PREFIX: &str = "HERALD_";
const DEFAULT_REGION: &str = "default";
const DEFAULT_CAPACITY: u32 = 256;
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

impl Default for Config {
    /// Returns the defaults of SPEC section 8, with a generated agent id and no token.
    fn default() -> Self {
        Self {
            control_planes: vec![DEFAULT_CONTROL_PLANE.to_owned()],
            in_process: None,
            token: String::new(),
            agent_id: default_agent_id(),
            region: DEFAULT_REGION.to_owned(),
            capacity: DEFAULT_CAPACITY,
            allow_destinations: Vec::new(),
            extra_ca: None,
            tls_ca: None,
            tls_client_cert: None,
            tls_client_key: None,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            metrics: None,
            connected: None,
        }
    }
}

impl fmt::Debug for Config {
    /// Formats the configuration without the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("control_planes", &self.control_planes)
            .field("in_process", &self.in_process)
            .field("token", &"<redacted>")
            .field("agent_id", &self.agent_id)
            .field("region", &self.region)
            .field("capacity", &self.capacity)
            .field("allow_destinations", &self.allow_destinations)
            .field("extra_ca", &self.extra_ca)
            .field("version", &self.version)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// Loads the settings from the process environment and `flags`.
pub fn load_from_process(flags: Overrides) -> Result<Settings, Invalid> {
    let env = std::env::vars_os().map(|(name, value)| {
        (
            name.to_string_lossy().into_owned(),
            value.to_string_lossy().into_owned(),
        )
    });
    load(flags, env)
}

/// Loads the settings: defaults < TOML file (`flags.config`, else `HERALD_CONFIG`) < the
/// `HERALD_*` variables of `env` < `flags`, then validates every value.
pub fn load(
    flags: Overrides,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, Invalid> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let otlp = env.iter().any(|(name, value)| {
        matches!(
            name.as_str(),
            "OTEL_EXPORTER_OTLP_ENDPOINT" | "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        ) && !value.is_empty()
    });
    let env: BTreeMap<String, String> = env
        .into_iter()
        .filter_map(|(name, value)| {
            let key = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
            Some((key, value))
        })
        .collect();
    let file = flags.config.clone().or_else(|| {
        env.get("config")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    });
    let own_env: BTreeMap<&str, &str> = env
        .iter()
        .filter(|(key, _)| KEYS.contains(&key.as_str()))
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let mut figment = Figment::new();
    if let Some(file) = &file {
        if !file.is_file() {
            return Err(invalid(
                "config",
                format!("{}: no such file", file.display()),
            ));
        }
        figment = figment.merge(Toml::file(file));
    }
    // Environment values go in as plain strings: figment's own `Env` provider would parse a
    // token such as `0123` as a number and lose its leading zero.
    let raw: Raw = figment
        .merge(Serialized::defaults(own_env))
        .merge(Serialized::defaults(&flags))
        .extract()
        .map_err(|err| invalid("config", one_line(&err.to_string())))?;
    let mut settings = raw.validate()?;
    settings.otlp = otlp;
    Ok(settings)
}

impl Raw {
    fn validate(self) -> Result<Settings, Invalid> {
        let control_planes = match list(self.control_plane, "control_plane")? {
            None => vec![DEFAULT_CONTROL_PLANE.to_owned()],
            Some(urls) if urls.is_empty() => {
                return Err(invalid(
                    "control_plane",
                    "must name at least one control plane url",
                ));
            }
            Some(urls) => urls,
        };
        for url in &control_planes {
            check_control_plane_url(url)?;
        }
        let token = scalar(self.agent_token, "agent_token")?.ok_or_else(|| {
            invalid(
                "agent_token",
                "required: the agent credential of the control plane",
            )
        })?;
        let region = scalar(self.region, "region")?.unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let capacity = match scalar(self.capacity, "capacity")? {
            None => DEFAULT_CAPACITY,
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_CAPACITY).contains(n))
                .ok_or_else(|| {
                    invalid("capacity", format!("must be between 1 and {MAX_CAPACITY}"))
                })?,
        };
        let agent_id = scalar(self.agent_id, "agent_id")?.unwrap_or_else(default_agent_id);
        let allow_destinations = list(self.allow_destinations, "allow_destinations")?
            .unwrap_or_default()
            .iter()
            .map(|text| parse_network(text))
            .collect::<Result<Vec<_>, _>>()?;
        let extra_ca = scalar(self.extra_ca, "extra_ca")?.map(PathBuf::from);
        if let Some(path) = &extra_ca {
            crate::deliver::load_extra_roots(path).map_err(|err| match err {
                crate::Error::ExtraCa { path, reason } => {
                    invalid("extra_ca", format!("{}: {reason}", path.display()))
                }
                other => invalid("extra_ca", other.to_string()),
            })?;
        }
        let tls_ca = scalar(self.tls_ca, "tls_ca")?.map(PathBuf::from);
        let tls_client_cert = scalar(self.tls_client_cert, "tls_client_cert")?.map(PathBuf::from);
        let tls_client_key = scalar(self.tls_client_key, "tls_client_key")?.map(PathBuf::from);
        if tls_client_cert.is_some() != tls_client_key.is_some() {
            return Err(invalid(
                "tls_client_cert",
                "HERALD_TLS_CLIENT_CERT and HERALD_TLS_CLIENT_KEY go together",
            ));
        }
        for (key, path) in [
            ("tls_ca", &tls_ca),
            ("tls_client_cert", &tls_client_cert),
            ("tls_client_key", &tls_client_key),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(invalid(key, format!("{}: no such file", path.display())));
            }
        }
        let metrics_listen = match scalar(self.metrics_listen, "metrics_listen")?.as_deref() {
            None | Some("") => None,
            Some(addr) => Some(addr.parse().map_err(|_| {
                invalid(
                    "metrics_listen",
                    "not a socket address such as 127.0.0.1:9091",
                )
            })?),
        };
        let health_listen = match scalar(self.health_listen, "health_listen")?.as_deref() {
            None | Some("") => None,
            Some(addr) => Some(addr.parse().map_err(|_| {
                invalid(
                    "health_listen",
                    "not a socket address such as 127.0.0.1:50053",
                )
            })?),
        };
        let log_format = match scalar(self.log_format, "log_format")?.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(_) => return Err(invalid("log_format", "must be text or json")),
        };
        let heartbeat_interval = duration(self.heartbeat_interval, "heartbeat_interval")?
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        if heartbeat_interval < Duration::from_millis(100) {
            return Err(invalid("heartbeat_interval", "must be at least 100ms"));
        }
        let shutdown_grace =
            duration(self.shutdown_grace, "shutdown_grace")?.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        Ok(Settings {
            config: Config {
                control_planes,
                token,
                agent_id,
                region,
                capacity,
                allow_destinations,
                extra_ca,
                tls_ca,
                tls_client_cert,
                tls_client_key,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                heartbeat_interval,
                shutdown_grace,
                metrics: None,
                connected: None,
                in_process: None,
            },
            log_format,
            metrics_listen,
            health_listen,
            otlp: false,
        })
    }
}

/// Returns a host name plus a random suffix, such as `worker-3-k2x9qa`.
pub fn default_agent_id() -> String {
    // Linux first; the fallback keeps the id meaningful elsewhere.
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| {
            let name = std::fs::read_to_string(path).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .unwrap_or_else(|| "agent".to_owned());
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(6)
        .map(|b| char::from(b).to_ascii_lowercase())
        .collect();
    format!("{host}-{suffix}")
}

fn invalid(key: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        setting: format!("{ENV_PREFIX}{}", key.to_ascii_uppercase()),
        message: message.into(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Returns a scalar setting as text; an empty value counts as unset.
fn scalar(value: Option<Value>, key: &str) -> Result<Option<String>, Invalid> {
    let Some(value) = value else {
        return Ok(None);
    };
    let text = text(&value).ok_or_else(|| invalid(key, "must be a single value"))?;
    let text = text.trim();
    Ok((!text.is_empty()).then(|| text.to_owned()))
}

/// Returns a list setting: a TOML array, or comma-separated text. An empty value is an empty list.
fn list(value: Option<Value>, key: &str) -> Result<Option<Vec<String>>, Invalid> {
    let Some(value) = value else {
        return Ok(None);
    };
    let items = match &value {
        Value::Array(_, items) => items
            .iter()
            .map(|item| text(item).ok_or_else(|| invalid(key, "must be a list of strings")))
            .collect::<Result<Vec<_>, _>>()?,
        other => vec![text(other).ok_or_else(|| invalid(key, "must be a comma-separated list"))?],
    };
    Ok(Some(
        items
            .iter()
            .flat_map(|item| item.split(','))
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(_, text) => Some(text.clone()),
        Value::Char(_, c) => Some(c.to_string()),
        Value::Bool(_, b) => Some(b.to_string()),
        Value::Num(..) => value
            .to_u128()
            .map(|n| n.to_string())
            .or_else(|| value.to_i128().map(|n| n.to_string()))
            .or_else(|| value.to_f64().map(|n| n.to_string())),
        Value::Dict(..) | Value::Array(..) | Value::Empty(..) => None,
    }
}

fn duration(value: Option<Value>, key: &str) -> Result<Option<Duration>, Invalid> {
    scalar(value, key)?
        .map(|text| {
            humantime::parse_duration(&text)
                .map_err(|_| invalid(key, "must be a duration such as 500ms, 10s or 1m"))
        })
        .transpose()
}

fn check_control_plane_url(url: &str) -> Result<(), Invalid> {
    let parsed = url::Url::parse(url)
        .map_err(|err| invalid("control_plane", format!("{url}: not a url ({err})")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(invalid(
            "control_plane",
            format!("{url}: must be an http:// or https:// url"),
        ));
    }
    Ok(())
}

/// Parses a CIDR (`127.0.0.0/8`) or a single address (`10.1.2.3`, as a /32 or /128).
fn parse_network(text: &str) -> Result<IpNet, Invalid> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| invalid("allow_destinations", format!("{text}: not a CIDR")))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load_env(vars: &[(&str, &str)]) -> Result<Settings, Invalid> {
        load(Overrides::default(), env(vars))
    }

    #[track_caller]
    fn error(vars: &[(&str, &str)]) -> String {
        load_env(vars).unwrap_err().to_string()
    }

    const TOKEN: (&str, &str) = ("HERALD_AGENT_TOKEN", "secret-token");

    #[test]
    fn defaults_apply_with_only_the_token() {
        let settings = load_env(&[TOKEN]).unwrap();
        let config = settings.config;
        assert_eq!(config.control_planes, vec!["http://127.0.0.1:50051"]);
        assert_eq!(config.token, "secret-token");
        assert_eq!(config.region, "default");
        assert_eq!(config.capacity, 256);
        assert!(config.allow_destinations.is_empty());
        assert!(config.extra_ca.is_none());
        assert!(!config.agent_id.is_empty());
        assert_eq!(settings.log_format, LogFormat::Text);
    }

    #[test]
    fn token_is_required_and_never_printed() {
        assert_eq!(
            error(&[]),
            "HERALD_AGENT_TOKEN: required: the agent credential of the control plane"
        );
        let config = load_env(&[TOKEN]).unwrap().config;
        assert!(!format!("{config:?}").contains("secret-token"));
    }

    #[test]
    fn environment_values_are_read_as_written() {
        let config = load_env(&[
            ("HERALD_AGENT_TOKEN", "0123"),
            ("HERALD_CONTROL_PLANE", "http://a:1, http://b:2"),
            ("HERALD_REGION", "eu-west"),
            ("HERALD_CAPACITY", "8"),
            ("HERALD_AGENT_ID", "007"),
            ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8,::1/128, 10.1.2.3"),
            ("HERALD_SHUTDOWN_GRACE", "2s"),
            ("HERALD_HEARTBEAT_INTERVAL", "250ms"),
        ])
        .unwrap()
        .config;
        assert_eq!(config.token, "0123");
        assert_eq!(config.control_planes, vec!["http://a:1", "http://b:2"]);
        assert_eq!(config.region, "eu-west");
        assert_eq!(config.capacity, 8);
        assert_eq!(config.agent_id, "007");
        assert_eq!(
            config.allow_destinations,
            vec![
                "127.0.0.0/8".parse::<IpNet>().unwrap(),
                "::1/128".parse().unwrap(),
                "10.1.2.3/32".parse().unwrap()
            ]
        );
        assert_eq!(config.shutdown_grace, Duration::from_secs(2));
        assert_eq!(config.heartbeat_interval, Duration::from_millis(250));
    }

    #[test]
    fn other_processes_settings_are_ignored() {
        let settings = load_env(&[
            TOKEN,
            ("HERALD_LISTEN", "not an address"),
            ("HERALD_DATABASE_URL", "sqlite://x.db"),
            ("HERALD_ADDR", "http://127.0.0.1:1"),
            ("HERALD_TOKEN", "{weird=1}"),
            ("HERALD_MASTER_KEY", "[1, 2"),
        ]);
        assert!(settings.is_ok());
    }

    #[test]
    fn bad_values_name_their_setting() {
        for (vars, expected) in [
            (
                vec![TOKEN, ("HERALD_CAPACITY", "0")],
                "HERALD_CAPACITY: must be between 1 and 65536",
            ),
            (
                vec![TOKEN, ("HERALD_CAPACITY", "65537")],
                "HERALD_CAPACITY: must be between 1 and 65536",
            ),
            (
                vec![TOKEN, ("HERALD_CAPACITY", "lots")],
                "HERALD_CAPACITY: must be between 1 and 65536",
            ),
            (
                vec![TOKEN, ("HERALD_ALLOW_DESTINATIONS", "10.0.0.0/33")],
                "HERALD_ALLOW_DESTINATIONS: 10.0.0.0/33: not a CIDR",
            ),
            (
                vec![TOKEN, ("HERALD_LOG_FORMAT", "xml")],
                "HERALD_LOG_FORMAT: must be text or json",
            ),
            (
                vec![TOKEN, ("HERALD_CONTROL_PLANE", "ftp://x")],
                "HERALD_CONTROL_PLANE: ftp://x: must be an http:// or https:// url",
            ),
            (
                vec![TOKEN, ("HERALD_CONTROL_PLANE", ",")],
                "HERALD_CONTROL_PLANE: must name at least one control plane url",
            ),
            (
                vec![TOKEN, ("HERALD_SHUTDOWN_GRACE", "soon")],
                "HERALD_SHUTDOWN_GRACE: must be a duration such as 500ms, 10s or 1m",
            ),
            (
                vec![TOKEN, ("HERALD_EXTRA_CA", "/nonexistent/ca.pem")],
                "HERALD_EXTRA_CA: /nonexistent/ca.pem: ",
            ),
            (
                vec![TOKEN, ("HERALD_CONFIG", "/nonexistent/agent.toml")],
                "HERALD_CONFIG: /nonexistent/agent.toml: no such file",
            ),
        ] {
            let message = error(&vars);
            assert!(message.starts_with(expected), "{message}");
            assert!(!message.contains('\n'), "{message}");
        }
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "control_plane = [\"http://file:1\", \"http://file:2\"]\n\
             agent_token = \"file-token\"\n\
             region = \"file-region\"\n\
             capacity = 16\n\
             agent_id = \"file-id\"\n\
             allow_destinations = [\"127.0.0.0/8\"]\n\
             log_format = \"json\"\n\
             listen = \"belongs to the control plane\""
        )
        .unwrap();
        let path = file.path().to_str().unwrap().to_owned();

        let from_file = load_env(&[("HERALD_CONFIG", &path)]).unwrap();
        assert_eq!(
            from_file.config.control_planes,
            vec!["http://file:1", "http://file:2"]
        );
        assert_eq!(from_file.config.token, "file-token");
        assert_eq!(from_file.config.capacity, 16);
        assert_eq!(from_file.config.agent_id, "file-id");
        assert_eq!(from_file.log_format, LogFormat::Json);

        let env_over_file = load_env(&[
            ("HERALD_CONFIG", &path),
            ("HERALD_REGION", "env-region"),
            ("HERALD_CAPACITY", "32"),
        ])
        .unwrap()
        .config;
        assert_eq!(env_over_file.region, "env-region");
        assert_eq!(env_over_file.capacity, 32);
        assert_eq!(env_over_file.token, "file-token");

        let flags = Overrides {
            config: Some(file.path().to_owned()),
            region: Some("flag-region".into()),
            capacity: Some("64".into()),
            control_plane: Some("http://flag:3".into()),
            agent_id: Some("flag-id".into()),
            allow_destinations: Some("10.0.0.0/8".into()),
        };
        let flags_over_env = load(
            flags,
            env(&[("HERALD_REGION", "env-region"), ("HERALD_CAPACITY", "32")]),
        )
        .unwrap()
        .config;
        assert_eq!(flags_over_env.region, "flag-region");
        assert_eq!(flags_over_env.capacity, 64);
        assert_eq!(flags_over_env.control_planes, vec!["http://flag:3"]);
        assert_eq!(flags_over_env.agent_id, "flag-id");
        assert_eq!(
            flags_over_env.allow_destinations,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );

        let bad_flag = Overrides {
            capacity: Some("0".into()),
            ..Overrides::default()
        };
        assert_eq!(
            load(bad_flag, env(&[TOKEN])).unwrap_err().to_string(),
            "HERALD_CAPACITY: must be between 1 and 65536"
        );
    }

    #[test]
    fn a_malformed_file_is_one_line_naming_the_config() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "capacity = = 3").unwrap();
        let path = file.path().to_str().unwrap().to_owned();
        let message = error(&[TOKEN, ("HERALD_CONFIG", &path)]);
        assert!(message.starts_with("HERALD_CONFIG: "), "{message}");
        assert!(!message.contains('\n'));
    }

    #[test]
    fn default_agent_ids_differ() {
        let (a, b) = (default_agent_id(), default_agent_id());
        assert_ne!(a, b);
        assert!(a.len() > 7);
    }
}
