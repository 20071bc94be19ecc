//! The commands, one module per group, and what they share: the connected client, the tenant an
//! admin acts for, the printer, and parsers of flag values.

pub mod agents;
pub mod console;
pub mod deliveries;
pub mod events;
pub mod subscriptions;
pub mod tenants;
pub mod test;
pub mod tokens;

use std::io::Read as _;

use herald_client::HeraldClient;

use crate::error::usage;
use crate::output::Output;
use crate::{Cli, Command};

/// What every command needs.
pub struct Context {
    pub client: HeraldClient,
    /// `--tenant`, or empty (a tenant token's own tenant).
    pub tenant: String,
    pub out: Output,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Output::new(cli.global.json, cli.global.quiet);
    let context = || -> anyhow::Result<Context> {
        let options = herald_client::Options {
            tls: herald_client::Tls {
                ca: cli.global.tls_ca.clone(),
                client_cert: cli
                    .global
                    .tls_client_cert
                    .clone()
                    .zip(cli.global.tls_client_key.clone()),
            },
            ..herald_client::Options::default()
        };
        let client = HeraldClient::with_options(
            &cli.global.addr,
            cli.global.token.as_deref().unwrap_or_default(),
            options,
        )
        .map_err(|err| match err {
            herald_client::Error::Tls { setting, reason } => {
                usage(format!("--{}: {reason}", setting.replace('_', "-")))
            }
            herald_client::Error::Address { .. } => usage(format!("--addr: {err}")),
            herald_client::Error::Token => {
                usage("--token: not a valid header value (printable ASCII only)")
            }
        })?;
        Ok(Context {
            client,
            tenant: cli.global.tenant.clone().unwrap_or_default(),
            out: out.clone(),
        })
    };
    match cli.command {
        Command::Subscriptions(command) => subscriptions::run(&context()?, command).await,
        Command::Events(command) => events::run(&context()?, command).await,
        Command::Deliveries(command) => deliveries::run(&context()?, command).await,
        Command::Test(args) => test::run(&context()?, args).await,
        Command::Agents(command) => agents::run(&context()?, command).await,
        Command::Tenants(command) => tenants::run(&context()?, command).await,
        Command::Tokens(command) => tokens::run(&context()?, command).await,
        Command::ConsoleLink(args) => console::run(&context()?, args).await,
        Command::Listen(args) => crate::listen::run(args, out).await,
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut command = Cli::command();
            let mut bytes = Vec::new();
            clap_complete::generate(shell, &mut command, "herald", &mut bytes);
            crate::output::print(&String::from_utf8_lossy(&bytes))
        }
    }
}

/// Paging flags of list commands.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Page {
    /// At most this many items (the server's default when unset; at most 1000)
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Continue a previous listing from the token it printed
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

impl Page {
    pub fn size(&self) -> u32 {
        self.limit.unwrap_or(0)
    }

    pub fn token(&self) -> String {
        self.page_token.clone().unwrap_or_default()
    }
}

/// Reads a `--data` value: JSON text, `@FILE`, or `-` for stdin; it must be a JSON object. The
/// text is sent exactly as given (Herald never rewrites a payload).
pub fn read_payload(flag: &str, value: &str) -> anyhow::Result<String> {
    let text = if value == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|err| usage(format!("{flag}: cannot read stdin: {err}")))?;
        text
    } else if let Some(path) = value.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|err| usage(format!("{flag}: cannot read {path}: {err}")))?
    } else {
        value.to_owned()
    };
    check_payload(flag, &text)?;
    Ok(text)
}

/// Refuses text that is not a JSON object, naming the flag and the position of the error.
pub fn check_payload(flag: &str, text: &str) -> anyhow::Result<()> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(other) => Err(usage(format!(
            "{flag}: must be a JSON object, not {}",
            match other {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            }
        ))),
        Err(err) => Err(usage(format!("{flag}: not valid JSON: {err}"))),
    }
}

/// Parses a time flag: RFC 3339 (`2025-01-02T10:00:00Z`) or a duration before now (`2h`, `3d`).
pub fn parse_since(
    flag: &str,
    value: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(at.with_timezone(&chrono::Utc));
    }
    let ago = humantime::parse_duration(value).map_err(|_| {
        usage(format!(
            "{flag}: expected an RFC 3339 time (2025-01-02T10:00:00Z) or a duration such as 2h"
        ))
    })?;
    let ago =
        chrono::Duration::from_std(ago).map_err(|_| usage(format!("{flag}: too long ago")))?;
    now.checked_sub_signed(ago)
        .ok_or_else(|| usage(format!("{flag}: too long ago")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(result: anyhow::Result<()>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn payloads_must_be_json_objects() {
        check_payload("--data", r#"{"id":1}"#).unwrap();
        assert!(code(check_payload("--data", "{not json")).starts_with("--data: not valid JSON"));
        assert_eq!(
            code(check_payload("--data", "[1]")),
            "--data: must be a JSON object, not an array"
        );
    }

    #[test]
    fn payload_files_are_read_as_given() {
        let dir = std::env::temp_dir().join(format!("herald-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("payload.json");
        std::fs::write(&path, "{ \"a\" : 1 }\n").unwrap();
        let value = format!("@{}", path.display());
        assert_eq!(read_payload("--data", &value).unwrap(), "{ \"a\" : 1 }\n");
        let missing = format!("@{}", dir.join("missing.json").display());
        assert!(
            read_payload("--data", &missing)
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn since_takes_rfc3339_or_a_duration() {
        let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(
            parse_since("--since", "2h", now).unwrap().timestamp(),
            1_700_000_000 - 7200
        );
        assert_eq!(
            parse_since("--since", "2023-11-14T22:13:20Z", now).unwrap(),
            now
        );
        assert!(parse_since("--since", "yesterday-ish", now).is_err());
    }
}
