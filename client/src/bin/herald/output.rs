//! How replies are printed: aligned tables and detail views for people (relative times, colour
//! only on a terminal), the canonical proto3 JSON mapping for `--json`, and bare ids for
//! `--quiet`.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use herald_client::v1 as pb;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// What the user asked to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Human,
    Json,
    Quiet,
}

/// The printer of one command.
#[derive(Debug, Clone)]
pub struct Output {
    pub mode: Mode,
    pub style: Style,
}

impl Output {
    /// Colour when stdout is a terminal and `NO_COLOR` is unset (<https://no-color.org>).
    pub fn new(json: bool, quiet: bool) -> Self {
        let mode = if json {
            Mode::Json
        } else if quiet {
            Mode::Quiet
        } else {
            Mode::Human
        };
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self {
            mode,
            style: Style {
                color,
                now: Utc::now(),
            },
        }
    }

    /// Prints a reply in the chosen mode: `quiet` gives the bare id (or nothing when empty),
    /// `human` the view for people.
    pub fn reply<M: Named>(
        &self,
        message: &M,
        quiet: impl FnOnce(&M) -> String,
        human: impl FnOnce(&Style, &M) -> String,
    ) -> anyhow::Result<()> {
        match self.mode {
            Mode::Json => print(&to_json(message, true)?),
            Mode::Quiet => {
                let text = quiet(message);
                if text.is_empty() {
                    Ok(())
                } else {
                    print(&text)
                }
            }
            Mode::Human => print(&human(&self.style, message)),
        }
    }
}

/// Writes `text` and a newline to stdout; a closed stdout is an `io::Error` (BrokenPipe), not a
/// panic.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// A protobuf message whose full name is known, so it can be transcoded to JSON.
pub trait Named: prost::Message {
    const NAME: &'static str;
}

macro_rules! named {
    ($($t:ident),* $(,)?) => {
        $(impl Named for pb::$t {
            const NAME: &'static str = concat!("herald.v1.", stringify!($t));
        })*
    };
}

named!(
    Tenant,
    ListTenantsResponse,
    CreateTokenResponse,
    ListTokensResponse,
    RevokeTokenResponse,
    ListAgentsResponse,
    CreateAgentCredentialResponse,
    ListAgentCredentialsResponse,
    RevokeAgentCredentialResponse,
    CreateConsoleSessionResponse,
    Subscription,
    ListSubscriptionsResponse,
    DeleteSubscriptionResponse,
    ListEventTypesResponse,
    PublishEventResponse,
    Event,
    ListEventsResponse,
    Delivery,
    ListDeliveriesResponse,
    ReplayDeliveriesResponse,
    SendTestEventResponse,
    AttemptRecorded,
);

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(herald_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set is compiled into herald-proto")
});

/// Returns the canonical proto3 JSON of `message` with the `.proto` field names (`event_id`,
/// `signing_secret`), enums by name (`DELIVERY_STATE_DEAD`), timestamps in RFC 3339, 64-bit
/// integers as strings, and fields at their default value included (unset messages are not).
pub fn to_json<M: Named>(message: &M, pretty: bool) -> anyhow::Result<String> {
    let descriptor = POOL
        .get_message_by_name(M::NAME)
        .ok_or_else(|| anyhow::anyhow!("{} is not in the descriptor set", M::NAME))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    let mut bytes = Vec::new();
    if pretty {
        let mut serializer = serde_json::Serializer::pretty(&mut bytes);
        dynamic.serialize_with_options(&mut serializer, &options)?;
    } else {
        let mut serializer = serde_json::Serializer::new(&mut bytes);
        dynamic.serialize_with_options(&mut serializer, &options)?;
    }
    Ok(String::from_utf8(bytes)?)
}

/// Colours and the clock of one invocation.
#[derive(Debug, Clone)]
pub struct Style {
    pub color: bool,
    pub now: DateTime<Utc>,
}

/// An ANSI colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    Green,
    Yellow,
    Red,
    Cyan,
    Dim,
    Bold,
}

impl Color {
    fn code(self) -> &'static str {
        match self {
            Color::Green => "32",
            Color::Yellow => "33",
            Color::Red => "31",
            Color::Cyan => "36",
            Color::Dim => "2",
            Color::Bold => "1",
        }
    }
}

impl Style {
    /// Returns `text` in `color` when colour is on.
    pub fn paint(&self, color: Option<Color>, text: &str) -> String {
        match color {
            Some(color) if self.color => format!("\x1b[{}m{text}\x1b[0m", color.code()),
            _ => text.to_owned(),
        }
    }

    /// Returns a time relative to now: `12s ago`, `in 3m`, `-` when unset.
    pub fn ago(&self, at: Option<&prost_types::Timestamp>) -> String {
        at.and_then(herald_proto::from_timestamp)
            .map_or_else(|| "-".to_owned(), |at| relative(at, self.now))
    }

    /// Returns a relative time followed by the exact one: `3m ago (2025-01-02 10:00:00 UTC)`.
    pub fn when(&self, at: Option<&prost_types::Timestamp>) -> String {
        match at.and_then(herald_proto::from_timestamp) {
            Some(at) => format!(
                "{} ({})",
                relative(at, self.now),
                at.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            None => "-".to_owned(),
        }
    }

    /// Returns a delivery state at a glance: `✓ succeeded` in green, `✗ dead` in red, …
    pub fn state(&self, state: i32) -> String {
        let (text, color) = state_cell(state);
        self.paint(color, &text)
    }
}

/// Returns the glyph, name and colour of a delivery state.
pub fn state_cell(state: i32) -> (String, Option<Color>) {
    use pb::DeliveryState as S;
    let state = S::try_from(state).unwrap_or(S::Unspecified);
    let (glyph, color) = match state {
        S::Succeeded => ("✓", Some(Color::Green)),
        S::Failed => ("↻", Some(Color::Yellow)),
        S::Dead => ("✗", Some(Color::Red)),
        S::Pending => ("…", Some(Color::Cyan)),
        S::InFlight => ("→", Some(Color::Cyan)),
        S::Unspecified => ("?", None),
    };
    (
        format!("{glyph} {}", herald_proto::delivery_state_name(state)),
        color,
    )
}

/// Returns an attempt's outcome: `200` (green for 2xx), `503` (yellow), or the error class in
/// red (`timeout`, `connect: …`).
pub fn outcome_cell(status_code: u32, error: i32, message: &str) -> (String, Option<Color>) {
    use pb::AttemptError as E;
    let error = E::try_from(error).unwrap_or(E::Unspecified);
    if status_code > 0 {
        let color = if (200..300).contains(&status_code) {
            Color::Green
        } else {
            Color::Yellow
        };
        let text = if error == E::LeaseExpired {
            format!("{status_code} (lease expired)")
        } else {
            status_code.to_string()
        };
        return (text, Some(color));
    }
    match error {
        E::Unspecified | E::None => ("-".to_owned(), None),
        other => {
            let class = other
                .as_str_name()
                .trim_start_matches("ATTEMPT_ERROR_")
                .to_ascii_lowercase();
            // The agent's message often starts with the class already (`connect: …`).
            let text = if message.is_empty() {
                class
            } else if message.to_ascii_lowercase().starts_with(&class) {
                message.to_owned()
            } else {
                format!("{class}: {message}")
            };
            (text, Some(Color::Red))
        }
    }
}

/// Returns `at` relative to `now` in one unit: `now`, `12s ago`, `5m ago`, `3h ago`, `2d ago`,
/// `in 30s`.
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let delta = now.signed_duration_since(at).num_seconds();
    let (future, secs) = (delta < 0, delta.unsigned_abs());
    let amount = match secs {
        0 => return "now".to_owned(),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// An aligned table; cells are padded by their visible width, and coloured after padding.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<(String, Option<Color>)>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row of plain cells.
    pub fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        self.rows
            .push(cells.into_iter().map(|cell| (cell, None)).collect());
    }

    /// Adds a row of cells with their colours.
    pub fn styled_row(&mut self, cells: Vec<(String, Option<Color>)>) {
        self.rows.push(cells);
    }

    /// Renders the table; the last column is not padded.
    pub fn render(&self, style: &Style) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, (text, _)) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(text.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: Vec<(String, Option<Color>)>| {
            let last = cells.len().saturating_sub(1);
            let mut text = String::new();
            for (i, (cell, color)) in cells.into_iter().enumerate() {
                let pad = if i == last {
                    0
                } else {
                    widths[i].saturating_sub(cell.chars().count()) + 2
                };
                text.push_str(&style.paint(color, &cell));
                text.push_str(&" ".repeat(pad));
            }
            let _ = writeln!(out, "{}", text.trim_end());
        };
        line(
            &mut out,
            self.headers
                .iter()
                .map(|h| (h.to_string(), Some(Color::Bold)))
                .collect(),
        );
        for row in &self.rows {
            line(&mut out, row.clone());
        }
        out
    }
}

/// Renders `label  value` lines with the labels aligned.
pub fn details(style: &Style, fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in fields {
        let padded = format!("{label:width$}");
        let _ = writeln!(out, "{}  {value}", style.paint(Some(Color::Dim), &padded));
    }
    out
}

/// Returns the hint printed under a list that has more pages.
pub fn more(style: &Style, next_page_token: &str) -> String {
    if next_page_token.is_empty() {
        String::new()
    } else {
        style.paint(
            Some(Color::Dim),
            &format!("more: add --page-token {next_page_token}\n"),
        )
    }
}

/// Returns ids one per line (what `--quiet` prints for a list).
pub fn ids<'a>(ids: impl Iterator<Item = &'a String>) -> String {
    ids.map(String::as_str).collect::<Vec<_>>().join("\n")
}

/// Returns the payload pretty-printed when it is JSON (keys in their order), as given otherwise.
pub fn pretty_json(text: &str) -> String {
    reformat_json(text, Some(2)).unwrap_or_else(|| text.to_owned())
}

/// Re-indents JSON text keeping its key order and every token as written: `indent` spaces per
/// level, or one line when `None`. Returns `None` when `text` is not JSON.
pub fn reformat_json(text: &str, indent: Option<usize>) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let mut out = String::with_capacity(text.len());
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.next_if(|c| c.is_whitespace()).is_some() {}
                if let Some(close) = chars.next_if(|c| matches!(c, '}' | ']')) {
                    out.push(close); // `{}` and `[]` stay on their line
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => {
                out.push(c);
                if indent.is_some() {
                    out.push(' ');
                }
            }
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn json_is_reindented_in_its_own_key_order() {
        let text = r#"{"z":1, "a" :{"s":"x, \\\"{y}\"","e":[],"o":{ }},"l":[1,2.50]}"#;
        assert_eq!(
            reformat_json(text, None).unwrap(),
            r#"{"z":1,"a":{"s":"x, \\\"{y}\"","e":[],"o":{}},"l":[1,2.50]}"#
        );
        assert_eq!(
            reformat_json(r#"{"b":1,"a":[true,{}]}"#, Some(2)).unwrap(),
            "{\n  \"b\": 1,\n  \"a\": [\n    true,\n    {}\n  ]\n}"
        );
        assert_eq!(reformat_json("{oops", Some(2)), None);
        assert_eq!(pretty_json("not json"), "not json");
    }

    #[test]
    fn relative_times_use_one_unit() {
        let now = at(0);
        let check = |secs: i64, expected: &str| assert_eq!(relative(at(secs), now), expected);
        check(0, "now");
        check(-12, "12s ago");
        check(-300, "5m ago");
        check(-3 * 3600 - 5, "3h ago");
        check(-2 * 86_400, "2d ago");
        check(30, "in 30s");
    }

    #[test]
    fn tables_align_by_visible_width_and_colour_after_padding() {
        let style = Style {
            color: false,
            now: at(0),
        };
        let mut table = Table::new(&["ID", "STATE", "CODE"]);
        table.styled_row(vec![
            ("dlv_1".into(), None),
            state_cell(pb::DeliveryState::Succeeded as i32),
            ("200".into(), None),
        ]);
        table.row(["dlv_22".into(), "x".into(), "503".into()]);
        assert_eq!(
            table.render(&style),
            "ID      STATE        CODE\ndlv_1   ✓ succeeded  200\ndlv_22  x            503\n"
        );
        let coloured = Style {
            color: true,
            now: at(0),
        };
        let text = table.render(&coloured);
        assert!(text.contains("\x1b[32m✓ succeeded\x1b[0m  200"), "{text:?}");
    }

    #[test]
    fn outcomes_show_status_or_error_class() {
        let e = |code, error: pb::AttemptError, msg| outcome_cell(code, error as i32, msg).0;
        assert_eq!(e(200, pb::AttemptError::None, ""), "200");
        assert_eq!(
            e(0, pb::AttemptError::Connect, "refused"),
            "connect: refused"
        );
        assert_eq!(
            e(0, pb::AttemptError::Connect, "connect: refused"),
            "connect: refused"
        );
        assert_eq!(
            e(0, pb::AttemptError::DestinationRefused, ""),
            "destination_refused"
        );
    }

    #[test]
    fn json_uses_proto_names_enum_names_and_rfc3339() {
        let delivery = pb::Delivery {
            id: "dlv_1".into(),
            event_id: "evt_1".into(),
            state: pb::DeliveryState::Dead as i32,
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&delivery, true).unwrap()).unwrap();
        assert_eq!(json["id"], "dlv_1");
        assert_eq!(json["event_id"], "evt_1");
        assert_eq!(json["state"], "DELIVERY_STATE_DEAD");
        assert_eq!(json["created_at"], "2023-11-14T22:13:20Z");
        assert_eq!(json["attempt_count"], 0);
        assert_eq!(json["attempts"], serde_json::json!([]));
        assert!(
            json.get("next_attempt_at").is_none(),
            "unset times are omitted"
        );

        let types = pb::ListEventTypesResponse {
            event_types: vec![pb::EventTypeCount {
                event_type: "user.new".into(),
                count: 3,
            }],
            next_page_token: String::new(),
        };
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&types, false).unwrap()).unwrap();
        assert_eq!(json["event_types"][0]["count"], "3", "uint64 is a string");
    }

    #[test]
    fn every_named_message_is_in_the_descriptor_set() {
        fn check<M: Named + Default>() {
            to_json(&M::default(), false).unwrap();
        }
        check::<pb::Tenant>();
        check::<pb::ListTenantsResponse>();
        check::<pb::CreateTokenResponse>();
        check::<pb::ListTokensResponse>();
        check::<pb::RevokeTokenResponse>();
        check::<pb::CreateConsoleSessionResponse>();
        check::<pb::ListAgentsResponse>();
        check::<pb::Subscription>();
        check::<pb::ListSubscriptionsResponse>();
        check::<pb::DeleteSubscriptionResponse>();
        check::<pb::ListEventTypesResponse>();
        check::<pb::PublishEventResponse>();
        check::<pb::Event>();
        check::<pb::ListEventsResponse>();
        check::<pb::Delivery>();
        check::<pb::ListDeliveriesResponse>();
        check::<pb::ReplayDeliveriesResponse>();
        check::<pb::SendTestEventResponse>();
        check::<pb::AttemptRecorded>();
    }
}
