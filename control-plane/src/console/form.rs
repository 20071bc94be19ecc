//! HTML form bodies: parsing `application/x-www-form-urlencoded` pairs, and the webhook form
//! turned into the service layer's [`NewSubscription`] or [`SubscriptionPatch`]. Validation is
//! the service layer's; this module only reads what the browser sent (a number field that is
//! not a number is the one check it makes itself, since the service takes integers).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::domain::model::{CustomHeader, SignatureScheme, Subscription};
use crate::domain::validate::Invalid;
use crate::service::subscriptions::{NewSubscription, SubscriptionPatch};

/// The pairs of a submitted form, in order (a name may repeat, as checkboxes do).
#[derive(Debug, Default, Clone)]
pub struct FormData(Vec<(String, String)>);

impl FormData {
    pub fn parse(body: &[u8]) -> Self {
        Self(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// Returns the first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Returns the first value of `name`, or `""`.
    pub fn text(&self, name: &str) -> &str {
        self.get(name).unwrap_or_default()
    }

    /// Returns every value of `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Returns whether a checkbox was ticked.
    pub fn checked(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// The webhook form as submitted or as prefilled from a subscription, with errors by field.
#[derive(Debug, Default, Clone, Serialize)]
pub struct WebhookForm {
    pub name: String,
    pub url: String,
    pub active: bool,
    /// The ticked event types, in the order shown.
    pub event_types: Vec<String>,
    /// Free entry: more event types or filters, separated by commas, spaces or new lines.
    pub more_event_types: String,
    pub api_key: String,
    /// On edit: remove the current API key.
    pub clear_api_key: bool,
    pub api_key_header: String,
    pub region: String,
    pub ordered: bool,
    pub timeout_ms: String,
    pub max_attempts: String,
    pub max_concurrency: String,
    pub rate_limit_per_s: String,
    /// A JSON filter on the payload; empty: none.
    pub payload_filter: String,
    /// The custom header rows, blank ones included (they are ignored).
    pub headers: Vec<HeaderRow>,
    /// `hmac` or `ed25519`; chosen on create (a change is a rotation, on the webhook page).
    pub signature_scheme: String,
    /// Field name -> the problem, shown next to the field.
    pub errors: BTreeMap<String, String>,
}

/// One custom header row of the form.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HeaderRow {
    pub name: String,
    /// Empty for a stored secret header: it keeps its value unless a new one is typed.
    pub value: String,
    pub secret: bool,
    /// The last 4 characters of a stored secret value, for the placeholder.
    pub hint: String,
}

impl HeaderRow {
    fn is_blank(&self) -> bool {
        self.name.trim().is_empty() && self.value.is_empty()
    }
}

/// How many blank header rows a form offers beyond the filled ones.
const BLANK_HEADER_ROWS: usize = 2;

/// Appends blank rows, up to the limit of the API.
fn with_blank_rows(mut rows: Vec<HeaderRow>) -> Vec<HeaderRow> {
    rows.retain(|row| !row.is_blank());
    let blanks = BLANK_HEADER_ROWS
        .min(crate::domain::validate::MAX_CUSTOM_HEADERS.saturating_sub(rows.len()));
    rows.extend(std::iter::repeat_with(HeaderRow::default).take(blanks));
    rows
}

fn scheme_name(scheme: SignatureScheme) -> &'static str {
    match scheme {
        SignatureScheme::HmacSha256 => "hmac",
        SignatureScheme::Ed25519 => "ed25519",
    }
}

/// Reads the scheme picker (`hmac`, `ed25519`).
pub fn parse_scheme(text: &str) -> Result<SignatureScheme, Invalid> {
    match text {
        "" | "hmac" => Ok(SignatureScheme::HmacSha256),
        "ed25519" => Ok(SignatureScheme::Ed25519),
        other => Err(Invalid::new(
            "signature_scheme",
            format!("must be hmac or ed25519, not {other:?}"),
        )),
    }
}

/// Splits free-entry event types on commas and white space.
fn split_types(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
}

fn number(field: &'static str, text: &str) -> Result<u32, Invalid> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    text.parse()
        .map_err(|_| Invalid::new(field, "must be a whole number (empty for the default)"))
}

impl WebhookForm {
    /// A blank form for a new webhook.
    pub fn blank() -> Self {
        Self {
            active: true,
            headers: with_blank_rows(Vec::new()),
            signature_scheme: scheme_name(SignatureScheme::HmacSha256).to_owned(),
            ..Self::default()
        }
    }

    pub fn from_subscription(s: &Subscription) -> Self {
        Self {
            name: s.name.clone(),
            url: s.url.clone(),
            active: s.active,
            event_types: s.event_types.clone(),
            more_event_types: String::new(),
            api_key: String::new(),
            clear_api_key: false,
            api_key_header: s.api_key_header.clone(),
            region: s.region.clone().unwrap_or_default(),
            ordered: s.ordered,
            timeout_ms: s.timeout.as_millis().to_string(),
            max_attempts: s.max_attempts.to_string(),
            max_concurrency: s.max_concurrency.to_string(),
            rate_limit_per_s: s.rate_limit_per_s.to_string(),
            payload_filter: s
                .payload_filter
                .as_ref()
                .map(|f| f.text.clone())
                .unwrap_or_default(),
            headers: with_blank_rows(
                s.headers
                    .iter()
                    .map(|h| HeaderRow {
                        name: h.name.clone(),
                        value: if h.secret {
                            String::new()
                        } else {
                            h.value.clone()
                        },
                        secret: h.secret,
                        hint: if h.secret {
                            crate::domain::model::api_key_hint(&h.value)
                        } else {
                            String::new()
                        },
                    })
                    .collect(),
            ),
            signature_scheme: scheme_name(s.signature_scheme()).to_owned(),
            errors: BTreeMap::new(),
        }
    }

    pub fn from_form(form: &FormData) -> Self {
        Self {
            name: form.text("name").to_owned(),
            url: form.text("url").trim().to_owned(),
            active: form.checked("active"),
            event_types: form
                .all("event_type")
                .into_iter()
                .map(str::to_owned)
                .collect(),
            more_event_types: form.text("more_event_types").to_owned(),
            api_key: form.text("api_key").to_owned(),
            clear_api_key: form.checked("clear_api_key"),
            api_key_header: form.text("api_key_header").trim().to_owned(),
            region: form.text("region").trim().to_owned(),
            ordered: form.checked("ordered"),
            timeout_ms: form.text("timeout_ms").to_owned(),
            max_attempts: form.text("max_attempts").to_owned(),
            max_concurrency: form.text("max_concurrency").to_owned(),
            rate_limit_per_s: form.text("rate_limit_per_s").to_owned(),
            payload_filter: form.text("payload_filter").trim().to_owned(),
            // Rows are numbered from 0 without gaps, as the template writes them; blank ones
            // are offered again after the filled ones.
            headers: with_blank_rows(
                (0..=crate::domain::validate::MAX_CUSTOM_HEADERS + BLANK_HEADER_ROWS)
                    .map_while(|i| {
                        let name = form.get(&format!("header_name_{i}"))?;
                        Some(HeaderRow {
                            name: name.trim().to_owned(),
                            value: form.text(&format!("header_value_{i}")).to_owned(),
                            secret: form.checked(&format!("header_secret_{i}")),
                            hint: form.text(&format!("header_hint_{i}")).to_owned(),
                        })
                    })
                    .collect(),
            ),
            signature_scheme: form.text("signature_scheme").to_owned(),
            errors: BTreeMap::new(),
        }
    }

    /// Every selected event type: the ticked ones, then the free entries, without repeats.
    pub fn all_event_types(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let typed = split_types(&self.more_event_types).map(str::to_owned);
        for value in self.event_types.iter().cloned().chain(typed) {
            if !out.contains(&value) {
                out.push(value);
            }
        }
        out
    }

    /// The filled header rows as the API takes them; a row with a value and no name is refused.
    fn custom_headers(&self) -> Result<Vec<CustomHeader>, Invalid> {
        let mut headers = Vec::new();
        for (i, row) in self.headers.iter().enumerate() {
            if row.is_blank() {
                continue;
            }
            if row.name.is_empty() {
                return Err(Invalid::new(
                    "headers",
                    format!("row {}: a value needs a header name", i + 1),
                ));
            }
            headers.push(CustomHeader {
                name: row.name.clone(),
                value: row.value.clone(),
                secret: row.secret,
            });
        }
        Ok(headers)
    }

    /// Records a problem to show next to its field.
    pub fn set_error(&mut self, invalid: &Invalid) {
        self.errors
            .insert(invalid.field.to_owned(), invalid.problem.clone());
    }

    pub fn to_new(&self) -> Result<NewSubscription, Invalid> {
        Ok(NewSubscription {
            name: self.name.clone(),
            url: self.url.clone(),
            event_types: self.all_event_types(),
            api_key: self.api_key.clone(),
            api_key_header: self.api_key_header.clone(),
            region: self.region.clone(),
            active: Some(self.active),
            timeout_ms: number("timeout_ms", &self.timeout_ms)?,
            max_attempts: number("max_attempts", &self.max_attempts)?,
            max_concurrency: number("max_concurrency", &self.max_concurrency)?,
            rate_limit_per_s: number("rate_limit_per_s", &self.rate_limit_per_s)?,
            payload_filter: self.payload_filter.clone(),
            headers: self.custom_headers()?,
            signature_scheme: Some(parse_scheme(&self.signature_scheme)?),
            ordered: self.ordered,
        })
    }

    /// Every field is sent; the API key only when a new one was typed or removal was asked for.
    pub fn to_patch(&self) -> Result<SubscriptionPatch, Invalid> {
        let api_key = if self.clear_api_key {
            Some(String::new())
        } else {
            (!self.api_key.is_empty()).then(|| self.api_key.clone())
        };
        Ok(SubscriptionPatch {
            name: Some(self.name.clone()),
            url: Some(self.url.clone()),
            event_types: Some(self.all_event_types()),
            active: Some(self.active),
            api_key,
            api_key_header: Some(self.api_key_header.clone()),
            region: Some(self.region.clone()),
            timeout_ms: Some(number("timeout_ms", &self.timeout_ms)?),
            max_attempts: Some(number("max_attempts", &self.max_attempts)?),
            max_concurrency: Some(number("max_concurrency", &self.max_concurrency)?),
            rate_limit_per_s: Some(number("rate_limit_per_s", &self.rate_limit_per_s)?),
            payload_filter: Some(self.payload_filter.clone()),
            headers: Some(self.custom_headers()?),
            // A change of scheme is a rotation (the webhook page's signing card).
            signature_scheme: None,
            ordered: Some(self.ordered),
        })
    }
}

/// One choice of the event-type picker.
#[derive(Debug, Serialize)]
pub struct TypeChoice {
    pub value: String,
    /// How many events of this type the tenant published (0 for a filter not published yet).
    pub count: u64,
    pub checked: bool,
}

/// The picker's choices: the types the tenant published, plus the form's selection that is not
/// among them (filters such as `user.*`), each ticked when selected.
pub fn type_choices(published: &[(String, u64)], selected: &[String]) -> Vec<TypeChoice> {
    let mut choices: Vec<TypeChoice> = published
        .iter()
        .map(|(value, count)| TypeChoice {
            value: value.clone(),
            count: *count,
            checked: selected.contains(value),
        })
        .collect();
    for value in selected {
        if !published.iter().any(|(v, _)| v == value) {
            choices.push(TypeChoice {
                value: value.clone(),
                count: 0,
                checked: true,
            });
        }
    }
    choices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_fields_and_checkboxes_are_read() {
        let form = FormData::parse(
            b"name=CRM&event_type=user.new&event_type=user.delete&active=on&url=+http%3A%2F%2Fx%2F+",
        );
        assert_eq!(form.get("name"), Some("CRM"));
        assert_eq!(form.all("event_type"), vec!["user.new", "user.delete"]);
        assert!(form.checked("active"));
        assert!(!form.checked("ordered"));
        let webhook = WebhookForm::from_form(&form);
        assert_eq!(webhook.url, "http://x/");
    }

    #[test]
    fn free_entry_adds_types_without_repeats() {
        let form = FormData::parse(
            b"event_type=user.new&more_event_types=company.*%2C+user.new%0D%0Aattendee_accepted",
        );
        let webhook = WebhookForm::from_form(&form);
        assert_eq!(
            webhook.all_event_types(),
            vec!["user.new", "company.*", "attendee_accepted"]
        );
    }

    #[test]
    fn numbers_must_be_numbers_and_empty_means_default() {
        let mut webhook = WebhookForm::blank();
        webhook.max_attempts = "three".into();
        let err = webhook.to_new().expect_err("not a number");
        assert_eq!(err.field, "max_attempts");
        webhook.max_attempts = " ".into();
        assert_eq!(webhook.to_new().expect("valid").max_attempts, 0);
    }

    #[test]
    fn an_empty_api_key_on_edit_leaves_it_unchanged() {
        let mut webhook = WebhookForm::blank();
        assert_eq!(webhook.to_patch().expect("valid").api_key, None);
        webhook.api_key = "sk_new".into();
        assert_eq!(
            webhook.to_patch().expect("valid").api_key.as_deref(),
            Some("sk_new")
        );
        webhook.clear_api_key = true;
        assert_eq!(
            webhook.to_patch().expect("valid").api_key.as_deref(),
            Some("")
        );
    }

    #[test]
    fn picker_shows_published_types_and_the_selected_filters() {
        let published = vec![("user.new".to_owned(), 3), ("company.update".to_owned(), 1)];
        let selected = vec!["user.new".to_owned(), "billing.*".to_owned()];
        let choices = type_choices(&published, &selected);
        let seen: Vec<(&str, bool)> = choices
            .iter()
            .map(|c| (c.value.as_str(), c.checked))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("user.new", true),
                ("company.update", false),
                ("billing.*", true)
            ]
        );
    }
}
