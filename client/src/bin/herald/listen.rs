//! `herald listen`: a local receiver on 127.0.0.1 that prints every webhook it gets (method,
//! path, the headers that matter, the body) and whether its Standard Webhooks signature (`v1`
//! with `--secret`, `v1a` with `--public-key`) and its API key verify, and answers with a chosen status (what webhook.site is used for).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use chrono::Utc;
use herald_proto::webhook::{self, PublicKey, Secret, VerifyingKey};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::error::usage;
use crate::output::{Color, Mode, Output, Style, pretty_json, print, reformat_json};

/// Flags of `herald listen`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port on 127.0.0.1 to listen on (any path is accepted)
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Signing secret (whsec_…) to verify webhook-signature with; without it signatures are
    /// not checked
    #[arg(long, value_name = "whsec_…")]
    pub secret: Option<String>,
    /// Ed25519 public key (whpk_…) of a subscription signing with Ed25519, to verify its v1a
    /// signatures with
    #[arg(long, value_name = "whpk_…", conflicts_with = "secret")]
    pub public_key: Option<String>,
    /// API key the requests must carry; without it API keys are not checked
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// The header carrying the API key
    #[arg(long, value_name = "HEADER", default_value = "X-API-Key")]
    pub api_key_header: String,
    /// HTTP status to answer with, e.g. 503 to watch Herald retry
    #[arg(long, value_name = "CODE", default_value_t = 200,
          value_parser = clap::value_parser!(u16).range(200..=599))]
    pub status: u16,
}

/// What the handler needs.
struct Listener {
    verifier: Option<VerifyingKey>,
    api_key: Option<String>,
    api_key_header: String,
    status: StatusCode,
    out: Output,
}

/// One received webhook, as `--json` prints it (one object per line).
#[derive(Debug, Serialize)]
struct Report {
    received_at: String,
    method: String,
    path: String,
    webhook_id: Option<String>,
    webhook_timestamp: Option<String>,
    /// `null` without `--secret` or `--public-key`.
    signature_valid: Option<bool>,
    signature_error: Option<String>,
    /// `null` without `--api-key`.
    api_key_valid: Option<bool>,
    headers: BTreeMap<String, String>,
    /// The body as JSON (keys in their order) when it parses, as a string otherwise.
    body: Box<RawValue>,
    /// The status this request was answered with.
    status: u16,
}

pub async fn run(args: Args, out: Output) -> anyhow::Result<()> {
    let secret = args
        .secret
        .as_deref()
        .map(|text| {
            Secret::parse(text.trim()).map(VerifyingKey::Secret).map_err(|_| {
                usage("--secret: must be whsec_ followed by base64 (herald subscriptions reveal-secret ID --quiet prints it)")
            })
        })
        .transpose()?;
    let public_key = args
        .public_key
        .as_deref()
        .map(|text| {
            PublicKey::parse(text.trim()).map(VerifyingKey::PublicKey).map_err(|err| {
                usage(format!("--public-key: {err} (herald subscriptions reveal-secret ID --quiet prints it)"))
            })
        })
        .transpose()?;
    let verifier = secret.or(public_key);
    let status = StatusCode::from_u16(args.status)
        .map_err(|_| usage(format!("--status: {} is not an HTTP status", args.status)))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|err| {
        anyhow::anyhow!("listen: cannot listen on {addr}: {err}; pick another --port")
    })?;
    if out.mode != Mode::Quiet {
        let check = |what: &str, on: bool, flag: &str| {
            if on {
                format!("{what} verified")
            } else {
                format!("{what} not checked (no {flag})")
            }
        };
        eprintln!(
            "listening on http://{addr} (any path), answering {}; {}, {}; Ctrl-C to stop",
            status.as_u16(),
            check("signatures", verifier.is_some(), "--secret or --public-key"),
            check("API keys", args.api_key.is_some(), "--api-key"),
        );
    }
    let state = Arc::new(Listener {
        verifier,
        api_key: args.api_key,
        api_key_header: args.api_key_header,
        status,
        out,
    });
    let app = axum::Router::new().fallback(receive).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn receive(
    State(listener): State<Arc<Listener>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let now = Utc::now();
    let report = inspect(&listener, &method, &uri, &headers, &body, now.timestamp());
    let text = match listener.out.mode {
        Mode::Json => serde_json::to_string(&report).unwrap_or_default(),
        Mode::Quiet => report.webhook_id.clone().unwrap_or_else(|| "-".to_owned()),
        Mode::Human => human(
            &Style {
                now,
                ..listener.out.style.clone()
            },
            &report,
            &listener.api_key_header,
        ),
    };
    // A closed stdout must not fail the sender's request.
    let _ = print(&text);
    let body = if listener.status.is_success() {
        "ok\n"
    } else {
        "herald listen answers with --status\n"
    };
    (listener.status, body)
}

/// Checks a request's signature and API key; `now` is Unix seconds.
fn inspect(
    listener: &Listener,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Report {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (signature_valid, signature_error) = match &listener.verifier {
        None => (None, None),
        Some(key) => match webhook::verify(
            key,
            header(webhook::HEADER_ID),
            header(webhook::HEADER_TIMESTAMP),
            header(webhook::HEADER_SIGNATURE),
            body,
            now,
            webhook::DEFAULT_TOLERANCE_S,
        ) {
            Ok(()) => (Some(true), None),
            Err(err) => (Some(false), Some(err.to_string())),
        },
    };
    let api_key_valid = listener
        .api_key
        .as_ref()
        .map(|key| header(&listener.api_key_header) == Some(key.as_str()));
    let text = String::from_utf8_lossy(body);
    let body = reformat_json(&text, None)
        .or_else(|| serde_json::to_string(&text).ok())
        .and_then(|json| RawValue::from_string(json).ok())
        .unwrap_or_else(|| RawValue::NULL.to_owned());
    Report {
        received_at: chrono::DateTime::from_timestamp(now, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), ToString::to_string),
        webhook_id: header(webhook::HEADER_ID).map(str::to_owned),
        webhook_timestamp: header(webhook::HEADER_TIMESTAMP).map(str::to_owned),
        signature_valid,
        signature_error,
        api_key_valid,
        headers: headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        status: listener.status.as_u16(),
    }
}

/// Returns the block printed for people: request line, verdicts, headers that matter, body.
fn human(style: &Style, r: &Report, api_key_header: &str) -> String {
    let verdict = |what: &str, valid: Option<bool>, error: Option<&str>, flag: &str| match valid {
        Some(true) => style.paint(Some(Color::Green), &format!("✓ {what} valid")),
        Some(false) => style.paint(
            Some(Color::Red),
            &format!(
                "✗ {what} invalid{}",
                error.map(|e| format!(" ({e})")).unwrap_or_default()
            ),
        ),
        None => style.paint(
            Some(Color::Dim),
            &format!("· {what} not checked (no {flag})"),
        ),
    };
    let api_key_error = match r.api_key_valid {
        Some(false) if !r.headers.contains_key(&api_key_header.to_ascii_lowercase()) => {
            Some(format!("no {api_key_header} header"))
        }
        Some(false) => Some(format!("{api_key_header} does not match")),
        _ => None,
    };
    let time = chrono::DateTime::parse_from_rfc3339(&r.received_at)
        .map(|at| at.format("%H:%M:%S").to_string())
        .unwrap_or_default();
    let mut text = format!(
        "{} {}  {}  {}\n  {}   {}\n",
        style.paint(Some(Color::Bold), &r.method),
        style.paint(Some(Color::Bold), &r.path),
        r.webhook_id.as_deref().unwrap_or("(no webhook-id)"),
        style.paint(Some(Color::Dim), &format!("{time} → {}", r.status)),
        verdict(
            "signature",
            r.signature_valid,
            r.signature_error.as_deref(),
            "--secret"
        ),
        verdict(
            "api key",
            r.api_key_valid,
            api_key_error.as_deref(),
            "--api-key"
        ),
    );
    let api_key_header = api_key_header.to_ascii_lowercase();
    let shown = [
        webhook::HEADER_ID,
        webhook::HEADER_TIMESTAMP,
        webhook::HEADER_SIGNATURE,
        api_key_header.as_str(),
        "content-type",
        "user-agent",
        "traceparent",
    ];
    let width = shown.iter().map(|h| h.len()).max().unwrap_or(0);
    for name in shown {
        let Some(value) = r.headers.get(name) else {
            continue;
        };
        let value = if name == api_key_header {
            mask(value)
        } else if name == webhook::HEADER_TIMESTAMP {
            let ago = value
                .parse::<i64>()
                .ok()
                .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
                .map(|at| format!(" ({})", crate::output::relative(at, style.now)))
                .unwrap_or_default();
            format!("{value}{ago}")
        } else {
            value.clone()
        };
        text.push_str(&format!(
            "  {}  {value}\n",
            style.paint(Some(Color::Dim), &format!("{name:width$}"))
        ));
    }
    let body = match serde_json::from_str::<String>(r.body.get()) {
        Ok(text) => text,
        Err(_) => pretty_json(r.body.get()),
    };
    for line in body.lines() {
        text.push_str("  ");
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Shows the last 4 characters of a secret value.
fn mask(value: &str) -> String {
    let count = value.chars().count();
    if count <= 4 {
        "…".to_owned()
    } else {
        let tail: String = value.chars().skip(count - 4).collect();
        format!("…{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(secret: Option<&Secret>, api_key: Option<&str>) -> Listener {
        Listener {
            verifier: secret.cloned().map(VerifyingKey::Secret),
            api_key: api_key.map(str::to_owned),
            api_key_header: "X-API-Key".into(),
            status: StatusCode::OK,
            out: Output {
                mode: Mode::Human,
                style: Style {
                    color: false,
                    now: Utc::now(),
                },
            },
        }
    }

    use webhook::Sign as _;

    fn signed(secret: &Secret, key: &str, now: i64) -> HeaderMap {
        let body = br#"{"id":42}"#;
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "evt_1".parse().unwrap());
        headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
        headers.insert(
            "webhook-signature",
            secret.sign("evt_1", now, body).parse().unwrap(),
        );
        headers.insert("x-api-key", key.parse().unwrap());
        headers
    }

    #[test]
    fn verifies_signature_and_api_key() {
        let secret = Secret::from_bytes(b"0123456789abcdef".to_vec());
        let now = 1_700_000_000;
        let headers = signed(&secret, "sk_1234", now);
        let uri: Uri = "/hooks?x=1".parse().unwrap();
        let check =
            |l: &Listener, body: &[u8]| inspect(l, &Method::POST, &uri, &headers, body, now);

        let ok = check(&listener(Some(&secret), Some("sk_1234")), br#"{"id":42}"#);
        assert_eq!(ok.signature_valid, Some(true));
        assert_eq!(ok.api_key_valid, Some(true));
        assert_eq!(ok.webhook_id.as_deref(), Some("evt_1"));
        assert_eq!(ok.path, "/hooks?x=1");
        assert_eq!(ok.body.get(), r#"{"id":42}"#);

        let tampered = check(&listener(Some(&secret), Some("other")), br#"{"id":43}"#);
        assert_eq!(tampered.signature_valid, Some(false));
        assert_eq!(tampered.api_key_valid, Some(false));

        let unchecked = check(&listener(None, None), b"not json");
        assert_eq!(unchecked.signature_valid, None);
        assert_eq!(unchecked.api_key_valid, None);
        assert_eq!(unchecked.body.get(), r#""not json""#);
        let line: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&unchecked).unwrap()).unwrap();
        assert!(line["signature_valid"].is_null() && line["api_key_valid"].is_null());
    }

    #[test]
    fn verifies_ed25519_signatures_with_a_public_key() {
        use webhook::{PrivateKey, Sign as _};
        let key = PrivateKey::from_seed([9; 32]);
        let now = 1_700_000_000;
        let body = br#"{"id":42}"#;
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "evt_1".parse().unwrap());
        headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
        headers.insert(
            "webhook-signature",
            key.sign("evt_1", now, body).parse().unwrap(),
        );
        let mut l = listener(None, None);
        l.verifier = Some(VerifyingKey::PublicKey(key.public_key()));
        let uri: Uri = "/hooks".parse().unwrap();
        let ok = inspect(&l, &Method::POST, &uri, &headers, body, now);
        assert_eq!(ok.signature_valid, Some(true));
        let tampered = inspect(&l, &Method::POST, &uri, &headers, br#"{"id":43}"#, now);
        assert_eq!(tampered.signature_valid, Some(false));
        assert_eq!(
            tampered.signature_error.as_deref(),
            Some("webhook-signature: no signature matches")
        );
    }

    #[test]
    fn human_output_shows_verdicts_headers_and_pretty_body() {
        let secret = Secret::from_bytes(b"0123456789abcdef".to_vec());
        let now = 1_700_000_000;
        let headers = signed(&secret, "sk_live_1234", now);
        let l = listener(Some(&secret), Some("sk_live_1234"));
        let report = inspect(
            &l,
            &Method::POST,
            &"/hooks".parse().unwrap(),
            &headers,
            br#"{"id":42}"#,
            now,
        );
        let text = human(&l.out.style, &report, "X-API-Key");
        assert!(text.starts_with("POST /hooks  evt_1"), "{text}");
        assert!(
            text.contains("✓ signature valid   ✓ api key valid"),
            "{text}"
        );
        assert!(text.contains("x-api-key          …1234"), "{text}");
        assert!(!text.contains("sk_live"), "the key is masked: {text}");
        assert!(text.contains("  {\n    \"id\": 42\n  }\n"), "{text}");
    }
}
