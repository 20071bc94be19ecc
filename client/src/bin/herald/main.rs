//! `herald`: Herald's command-line tool. Flags are parsed here, [`cmd::run`] does the work, and
//! the outcome becomes one line on stderr and the exit code of SPEC 9 ([`error::Exit`]).

mod cmd;
mod error;
mod listen;
mod output;

use std::process::ExitCode;

use clap::{Args, CommandFactory as _, Parser, Subcommand};

/// Herald's command-line tool: manage subscriptions, publish events, follow deliveries, and
/// receive webhooks locally with `herald listen`.
#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    after_help = "Start a control plane with `scripts/start` in Herald's repository; it prints \
                  the admin token. Exit codes: 0 ok, 2 usage, 3 not found, 4 \
                  authentication or permission, 5 invalid argument or precondition, 6 control \
                  plane unavailable, 1 anything else."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// Address of the control plane's gRPC API
    #[arg(
        long,
        global = true,
        env = "HERALD_ADDR",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub addr: String,
    /// API token, admin or tenant (the control plane prints an admin token at its first start)
    #[arg(long, global = true, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The tenant to act for: required with an admin token, implied by a tenant token
    #[arg(long, global = true, value_name = "TENANT_ID")]
    pub tenant: Option<String>,
    /// Print replies as JSON: the canonical proto3 mapping with the API's field names
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only the id, token or secret that was created or asked for (for `$(…)`)
    #[arg(long, short, global = true, conflicts_with = "json")]
    pub quiet: bool,
    /// CA certificate (PEM) to verify an https:// control plane against, instead of the system roots
    #[arg(long, global = true, env = "HERALD_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) to present to the control plane (mTLS)
    #[arg(
        long,
        global = true,
        env = "HERALD_TLS_CLIENT_CERT",
        value_name = "FILE",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --tls-client-cert
    #[arg(
        long,
        global = true,
        env = "HERALD_TLS_CLIENT_KEY",
        value_name = "FILE",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<std::path::PathBuf>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage subscriptions: the endpoints a tenant's events are delivered to
    #[command(subcommand, visible_alias = "subs")]
    Subscriptions(cmd::subscriptions::Command),
    /// Publish events and look at published ones
    #[command(subcommand)]
    Events(cmd::events::Command),
    /// Follow deliveries (one event at one subscription) and their attempts; retry and replay
    #[command(subcommand)]
    Deliveries(cmd::deliveries::Command),
    /// Send a test webhook (type `test`) to a subscription, whatever its filters and switch
    Test(cmd::test::Args),
    /// Look at the delivery agents connected to the control plane (admin token)
    #[command(subcommand)]
    Agents(cmd::agents::Command),
    /// Manage tenants, the owners of subscriptions and events (admin token)
    #[command(subcommand)]
    Tenants(cmd::tenants::Command),
    /// Manage API tokens (admin token); a token's plaintext is shown only when it is created
    #[command(subcommand)]
    Tokens(cmd::tokens::Command),
    /// Print a one-time sign-in link to a tenant's web console (admin token)
    ConsoleLink(cmd::console::Args),
    /// Receive webhooks on 127.0.0.1 and print each one, checking its signature and API key
    Listen(listen::Args),
    /// Print a shell completion script (e.g. `herald completions bash > ~/.herald.bash`)
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
}

/// Parses the command line, or prints clap's error (exit 2) or help (exit 0) and exits.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            // clap counts a value taken from the environment (HERALD_ADDR, HERALD_TOKEN, …) as
            // typed, so the usage line of an error would show `--addr <URL> --token <TOKEN>` as
            // if they were required: the same arguments parsed without the environment give the
            // same error with the usage line the user needs.
            let without_env = Cli::command()
                .mut_args(|arg| arg.env(None))
                .try_get_matches();
            match without_env {
                Err(plain) if plain.kind() == err.kind() => plain.exit(),
                _ => err.exit(),
            }
        }
    }
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = parse();
    let addr = cli.global.addr.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("herald: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cmd::run(cli));
    // Open streams (watch) must not keep the process alive once the command is done.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let exit = error::Exit::classify(&err, &addr);
            if let Some(message) = &exit.message {
                eprintln!("herald: {message}");
            }
            ExitCode::from(exit.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Walks every command and flag: each has a description in `--help`.
    #[test]
    fn every_command_and_flag_has_a_description() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", command.get_name());
            if command.get_about().is_none() && path != " herald" {
                missing.push(format!("command `{}`", path.trim()));
            }
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("`{}` {}", path.trim(), arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &path, missing);
                }
            }
        }
        let mut command = Cli::command();
        command.build();
        assert!(command.get_about().is_some());
        let mut missing = Vec::new();
        walk(&command, "", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:#?}");
    }

    #[test]
    fn every_spec_command_exists() {
        let command = Cli::command();
        let spec = [
            "subscriptions create",
            "subscriptions list",
            "subscriptions get",
            "subscriptions update",
            "subscriptions delete",
            "subscriptions rotate-secret",
            "subscriptions reveal-secret",
            "subscriptions enable",
            "events publish",
            "events get",
            "events list",
            "deliveries list",
            "deliveries get",
            "deliveries retry",
            "deliveries replay",
            "deliveries watch",
            "test",
            "agents list",
            "tenants create",
            "tenants list",
            "tokens create",
            "tokens list",
            "tokens revoke",
            "listen",
            "completions",
        ];
        for path in spec {
            let mut at = &command;
            for name in path.split(' ') {
                at = at
                    .find_subcommand(name)
                    .unwrap_or_else(|| panic!("missing `herald {path}`"));
            }
        }
    }

    #[test]
    fn completions_are_generated_for_every_shell() {
        use clap::ValueEnum as _;
        for shell in clap_complete::Shell::value_variants() {
            let mut bytes = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "herald", &mut bytes);
            let script = String::from_utf8(bytes).unwrap();
            assert!(
                script.contains("reveal-secret") && script.contains("idempotency-key"),
                "{shell}"
            );
        }
    }

    #[test]
    fn spec_flags_parse() {
        let parse = |line: &str| {
            Cli::try_parse_from(line.split(' ')).unwrap_or_else(|e| panic!("{line}: {e}"))
        };
        parse("herald --addr http://h:1 --token t --tenant ten_1 --json tenants list");
        parse("herald tenants create --name acme --quiet");
        parse("herald tokens create --tenant ten_1 --name backend");
        parse("herald tokens create --admin --name ops");
        parse(
            "herald subscriptions create --name n --url http://x --event-type user.* \
             --event-type company.new --api-key k --api-key-header X-Key --region eu \
             --ordered --inactive",
        );
        parse(
            "herald events publish --type user.new --data {} --idempotency-key k \
             --entity user:42 --action new",
        );
        parse("herald deliveries list --subscription sub_1 --state dead --limit 5");
        parse("herald deliveries list --event evt_1 --state DELIVERY_STATE_FAILED");
        parse(
            "herald listen --port 9000 --secret whsec_abc --api-key k --api-key-header X-K --status 503",
        );
        parse("herald completions zsh");
        assert!(
            Cli::try_parse_from("herald deliveries list --subscription s --event e".split(' '))
                .is_err()
        );
        assert!(Cli::try_parse_from("herald --json --quiet tenants list".split(' ')).is_err());
    }
}
