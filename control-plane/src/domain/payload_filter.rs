//! Payload filters: which events a subscription receives, by the values in them. A JSON
//! document in the style of MongoDB and Convoy: `{"amount": {"$gte": 100}, "status": "paid"}`.
//!
//! - Paths are dotted and relative to the payload's root (`customer.address.country`); the
//!   event's own fields are `$event_type`, `$entity_type`, `$entity_id` and `$action`.
//! - A plain value means equality; operators are `$eq $ne $gt $gte $lt $lte $in $nin $exists
//!   $prefix`, several in one object all apply; `$and`/`$or` take a list, `$not` a filter.
//! - Numbers compare exactly as decimals (`1` = `1.0`, no loss above 2^53); strings compare
//!   byte-wise; values of different types never match.
//! - A path that reaches an array matches if any element does; `$ne` and `$nin` on an array
//!   match if no element is equal. A missing path matches only `$exists: false`, `$ne` and
//!   `$nin`.
//!
//! The payload is not parsed as a whole: the evaluator descends only along the paths the
//! filter names, reading numbers as their text (so nothing is rounded).

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::value::RawValue;

/// The longest filter, in bytes.
pub const MAX_BYTES: usize = 8 * 1024;
/// The deepest nesting of a filter (objects and lists).
pub const MAX_DEPTH: usize = 8;

/// A subscription's filter: as written (what the API shows) and parsed (what fan-out runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFilter {
    pub text: String,
    pub filter: Arc<Filter>,
}

impl PayloadFilter {
    /// Parses a filter as sent; `None` for an empty one (no filter).
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            text: text.to_owned(),
            filter: Arc::new(parse(text)?),
        }))
    }

    pub fn matches(&self, document: &Document<'_>) -> bool {
        document
            .root()
            .is_some_and(|root| eval(&self.filter, root, &document.fields))
    }
}

/// An event as filters see it: its fields, and its payload read once (on the first filter that
/// needs it) for every subscription it is matched against.
pub struct Document<'a> {
    payload: &'a str,
    fields: EventFields<'a>,
    root: std::cell::OnceCell<Option<&'a RawValue>>,
}

impl<'a> Document<'a> {
    pub fn new(payload: &'a str, fields: EventFields<'a>) -> Self {
        Self {
            payload,
            fields,
            root: std::cell::OnceCell::new(),
        }
    }

    /// The payload's top level; `None` when it is not JSON (Herald accepts only JSON objects,
    /// so this does not happen).
    fn root(&self) -> Option<&'a RawValue> {
        *self
            .root
            .get_or_init(|| serde_json::from_str::<&RawValue>(self.payload).ok())
    }
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    /// Every condition holds at the path.
    Field {
        path: Path,
        conditions: Vec<Condition>,
    },
}

/// Where a value is: the event's own field, or a dotted path into the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    Event(EventField),
    Payload(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventField {
    EventType,
    EntityType,
    EntityId,
    Action,
}

/// A scalar a filter compares with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scalar {
    Null,
    Bool(bool),
    Number(Decimal),
    String(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Eq(Scalar),
    Ne(Scalar),
    Gt(Scalar),
    Gte(Scalar),
    Lt(Scalar),
    Lte(Scalar),
    In(Vec<Scalar>),
    Nin(Vec<Scalar>),
    Exists(bool),
    Prefix(String),
}

/// The event fields a filter may name besides its payload.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventFields<'a> {
    pub event_type: &'a str,
    pub entity_type: Option<&'a str>,
    pub entity_id: Option<&'a str>,
    pub action: Option<&'a str>,
}

// ---------------------------------------------------------------------------------------------
// Reading JSON lazily, numbers as text

/// One JSON value, its children unparsed.
enum Node<'a> {
    Null,
    Bool(bool),
    /// The number's text, exactly as written.
    Number(&'a str),
    String(String),
    Array(Vec<&'a RawValue>),
    Object(std::collections::BTreeMap<String, &'a RawValue>),
}

fn node(raw: &RawValue) -> Result<Node<'_>, serde_json::Error> {
    let text = raw.get().trim();
    Ok(match text.as_bytes().first() {
        Some(b'n') => Node::Null,
        Some(b't') => Node::Bool(true),
        Some(b'f') => Node::Bool(false),
        Some(b'"') => Node::String(serde_json::from_str(text)?),
        Some(b'[') => Node::Array(serde_json::from_str(text)?),
        Some(b'{') => Node::Object(serde_json::from_str(text)?),
        _ => Node::Number(text),
    })
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Parses and checks a filter; the error names the problem and where (`$gt needs a number or
/// string at amount`), for `payload_filter: <error>`.
pub fn parse(text: &str) -> Result<Filter, String> {
    if text.len() > MAX_BYTES {
        return Err(format!("must be at most {MAX_BYTES} bytes"));
    }
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|err| format!("is not valid JSON: {err}"))?;
    parse_filter(raw, 1)
}

fn parse_filter(raw: &RawValue, depth: usize) -> Result<Filter, String> {
    if depth > MAX_DEPTH {
        return Err(format!("must nest at most {MAX_DEPTH} levels"));
    }
    let Ok(Node::Object(object)) = node(raw) else {
        return Err("a filter must be a JSON object".into());
    };
    let mut all = Vec::new();
    for (key, value) in object {
        all.push(match key.as_str() {
            "$and" | "$or" => {
                let Ok(Node::Array(items)) = node(value) else {
                    return Err(format!("{key} needs a list of filters"));
                };
                if items.is_empty() {
                    return Err(format!("{key} needs at least one filter"));
                }
                let parts = items
                    .iter()
                    .map(|item| parse_filter(item, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                if key == "$and" {
                    Filter::And(parts)
                } else {
                    Filter::Or(parts)
                }
            }
            "$not" => Filter::Not(Box::new(parse_filter(value, depth + 1)?)),
            _ => {
                let path = parse_path(&key)?;
                let conditions = parse_conditions(value, &key, depth + 1)?;
                Filter::Field { path, conditions }
            }
        });
    }
    Ok(match all.len() {
        1 => all.remove(0),
        _ => Filter::And(all),
    })
}

fn parse_path(key: &str) -> Result<Path, String> {
    if let Some(field) = key.strip_prefix('$') {
        return match field {
            "event_type" => Ok(Path::Event(EventField::EventType)),
            "entity_type" => Ok(Path::Event(EventField::EntityType)),
            "entity_id" => Ok(Path::Event(EventField::EntityId)),
            "action" => Ok(Path::Event(EventField::Action)),
            _ => Err(format!(
                "unknown operator or event field {key} (fields: $event_type, $entity_type, \
                 $entity_id, $action; combinators: $and, $or, $not)"
            )),
        };
    }
    let segments: Vec<String> = key.split('.').map(str::to_owned).collect();
    if segments.iter().any(String::is_empty) {
        return Err(format!("path {key:?} has an empty segment"));
    }
    Ok(Path::Payload(segments))
}

fn parse_conditions(raw: &RawValue, path: &str, depth: usize) -> Result<Vec<Condition>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("must nest at most {MAX_DEPTH} levels"));
    }
    let operators = match node(raw).map_err(|err| err.to_string())? {
        Node::Object(object) if !object.is_empty() && object.keys().all(|k| k.starts_with('$')) => {
            object
        }
        Node::Object(_) => {
            return Err(format!(
                "equality to an object is not supported at {path}; name its fields with \
                 dotted paths"
            ));
        }
        Node::Array(_) => {
            return Err(format!(
                "equality to a list is not supported at {path}; use $in"
            ));
        }
        _ => return Ok(vec![Condition::Eq(scalar_of(raw, "$eq", path)?)]),
    };
    let mut conditions = Vec::new();
    for (op, operand) in operators {
        conditions.push(match op.as_str() {
            "$eq" => Condition::Eq(scalar_of(operand, &op, path)?),
            "$ne" => Condition::Ne(scalar_of(operand, &op, path)?),
            "$gt" | "$gte" | "$lt" | "$lte" => {
                let scalar = scalar_of(operand, &op, path)?;
                if !matches!(scalar, Scalar::Number(_) | Scalar::String(_)) {
                    return Err(format!("{op} needs a number or string at {path}"));
                }
                match op.as_str() {
                    "$gt" => Condition::Gt(scalar),
                    "$gte" => Condition::Gte(scalar),
                    "$lt" => Condition::Lt(scalar),
                    _ => Condition::Lte(scalar),
                }
            }
            "$in" | "$nin" => {
                let Ok(Node::Array(items)) = node(operand) else {
                    return Err(format!("{op} needs a list at {path}"));
                };
                let scalars = items
                    .iter()
                    .map(|item| scalar_of(item, &op, path))
                    .collect::<Result<Vec<_>, _>>()?;
                if op == "$in" {
                    Condition::In(scalars)
                } else {
                    Condition::Nin(scalars)
                }
            }
            "$exists" => match node(operand) {
                Ok(Node::Bool(b)) => Condition::Exists(b),
                _ => return Err(format!("$exists needs true or false at {path}")),
            },
            "$prefix" => match node(operand) {
                Ok(Node::String(s)) => Condition::Prefix(s),
                _ => return Err(format!("$prefix needs a string at {path}")),
            },
            _ => {
                return Err(format!(
                    "unknown operator {op} at {path} (operators: $eq, $ne, $gt, $gte, $lt, \
                     $lte, $in, $nin, $exists, $prefix)"
                ));
            }
        });
    }
    Ok(conditions)
}

fn scalar_of(raw: &RawValue, op: &str, path: &str) -> Result<Scalar, String> {
    match node(raw).map_err(|err| err.to_string())? {
        Node::Null => Ok(Scalar::Null),
        Node::Bool(b) => Ok(Scalar::Bool(b)),
        Node::String(s) => Ok(Scalar::String(s)),
        Node::Number(text) => Decimal::parse(text)
            .map(Scalar::Number)
            .ok_or_else(|| format!("{op} has a number out of range at {path}")),
        Node::Array(_) | Node::Object(_) => Err(format!(
            "{op} needs a number, string, boolean or null at {path}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Exact decimals

/// A JSON number as sign × 0.digits × 10^exponent, digits without leading or trailing zeros
/// (zero: no digits). Compares exactly, whatever the size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    exponent: i64,
}

impl Decimal {
    /// Reads a JSON number; `None` for text that is not one (or an exponent beyond ±10^15).
    pub fn parse(text: &str) -> Option<Self> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, "0"),
        };
        let exp: i64 = exp.strip_prefix('+').unwrap_or(exp).parse().ok()?;
        if exp.abs() > 1_000_000_000_000_000 {
            return None;
        }
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
        // 0.digits × 10^(len(int) + exp)
        let mut exponent = int.len() as i64 + exp;
        let leading = digits.iter().take_while(|&&d| d == 0).count();
        digits.drain(..leading);
        exponent -= leading as i64;
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            return Some(Self {
                negative: false,
                digits,
                exponent: 0,
            });
        }
        Some(Self {
            negative,
            digits,
            exponent,
        })
    }

    fn cmp_magnitude(&self, other: &Self) -> Ordering {
        match (self.digits.is_empty(), other.digits.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => {}
        }
        self.exponent
            .cmp(&other.exponent)
            .then_with(|| self.digits.cmp(&other.digits))
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.negative, other.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.cmp_magnitude(other),
            (true, true) => other.cmp_magnitude(self),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluating

/// Collects the scalars at the end of a path (several when it crossed an array) into `out`;
/// sets `present` when it ends at an object or an array (there, but equal to no scalar).
fn lookup(payload: &RawValue, segments: &[String], out: &mut Vec<Scalar>, present: &mut bool) {
    let Ok(found) = node(payload) else {
        return;
    };
    match (found, segments.split_first()) {
        (Node::Array(items), _) => {
            if segments.is_empty() {
                *present = true;
            }
            for item in items {
                lookup(item, segments, out, present);
            }
        }
        (Node::Object(mut object), Some((first, rest))) => {
            if let Some(child) = object.remove(first) {
                lookup(child, rest, out, present);
            }
        }
        (_, Some(_)) => {}
        (Node::Null, None) => out.push(Scalar::Null),
        (Node::Bool(b), None) => out.push(Scalar::Bool(b)),
        (Node::String(s), None) => out.push(Scalar::String(s)),
        (Node::Number(text), None) => {
            if let Some(number) = Decimal::parse(text) {
                out.push(Scalar::Number(number));
            }
        }
        (Node::Object(_), None) => *present = true,
    }
}

/// Whether an event matches `filter`. A payload that is not JSON matches nothing.
pub fn matches(filter: &Filter, payload: &str, event: &EventFields<'_>) -> bool {
    serde_json::from_str::<&RawValue>(payload).is_ok_and(|root| eval(filter, root, event))
}

fn eval(filter: &Filter, root: &RawValue, event: &EventFields<'_>) -> bool {
    match filter {
        Filter::And(parts) => parts.iter().all(|f| eval(f, root, event)),
        Filter::Or(parts) => parts.iter().any(|f| eval(f, root, event)),
        Filter::Not(inner) => !eval(inner, root, event),
        Filter::Field { path, conditions } => {
            let mut values = Vec::new();
            // Present but not a scalar (an object, or an array of anything): it exists.
            let mut present_otherwise = false;
            match path {
                Path::Event(field) => {
                    let value = match field {
                        EventField::EventType => Some(event.event_type),
                        EventField::EntityType => event.entity_type,
                        EventField::EntityId => event.entity_id,
                        EventField::Action => event.action,
                    };
                    if let Some(value) = value {
                        values.push(Scalar::String(value.to_owned()));
                    }
                }
                Path::Payload(segments) => {
                    lookup(root, segments, &mut values, &mut present_otherwise);
                }
            }
            let exists = !values.is_empty() || present_otherwise;
            conditions
                .iter()
                .all(|condition| holds(condition, &values, exists))
        }
    }
}

fn holds(condition: &Condition, values: &[Scalar], exists: bool) -> bool {
    let any = |f: &dyn Fn(&Scalar) -> bool| values.iter().any(f);
    match condition {
        Condition::Exists(wanted) => exists == *wanted,
        Condition::Eq(x) => any(&|v| v == x),
        Condition::Ne(x) => !any(&|v| v == x),
        Condition::In(xs) => any(&|v| xs.contains(v)),
        Condition::Nin(xs) => !any(&|v| xs.contains(v)),
        Condition::Gt(x) => any(&|v| compare(v, x) == Some(Ordering::Greater)),
        Condition::Gte(x) => {
            any(&|v| matches!(compare(v, x), Some(Ordering::Greater | Ordering::Equal)))
        }
        Condition::Lt(x) => any(&|v| compare(v, x) == Some(Ordering::Less)),
        Condition::Lte(x) => {
            any(&|v| matches!(compare(v, x), Some(Ordering::Less | Ordering::Equal)))
        }
        Condition::Prefix(p) => {
            any(&|v| matches!(v, Scalar::String(s) if s.starts_with(p.as_str())))
        }
    }
}

/// Orders two scalars of the same kind (numbers, strings); others do not compare.
fn compare(a: &Scalar, b: &Scalar) -> Option<Ordering> {
    match (a, b) {
        (Scalar::Number(a), Scalar::Number(b)) => Some(a.cmp(b)),
        (Scalar::String(a), Scalar::String(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> EventFields<'static> {
        EventFields {
            event_type: "invoice.paid",
            entity_type: Some("invoice"),
            entity_id: Some("inv_1"),
            action: Some("paid"),
        }
    }

    const PAYLOAD: &str = r#"{
        "amount": 1500, "currency": "EUR", "paid": true, "note": null,
        "customer": {"id": "cus_9", "country": "FR", "tier": 2},
        "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}],
        "tags": ["vip", "eu"],
        "big": 9007199254740993, "tiny": 0.1000000000000000000001
    }"#;

    fn check(filter: &str) -> bool {
        let parsed = parse(filter).unwrap_or_else(|err| panic!("{filter}: {err}"));
        matches(&parsed, PAYLOAD, &event())
    }

    #[test]
    fn equality_operators_and_combinators() {
        for (filter, expected) in [
            (r#"{"currency": "EUR"}"#, true),
            (r#"{"currency": "USD"}"#, false),
            (r#"{"amount": {"$gte": 1000, "$lt": 2000}}"#, true),
            (r#"{"amount": {"$gt": 1500}}"#, false),
            (r#"{"customer.country": {"$in": ["FR", "DE"]}}"#, true),
            (r#"{"customer.country": {"$nin": ["FR"]}}"#, false),
            (r#"{"customer.id": {"$prefix": "cus_"}}"#, true),
            (r#"{"paid": true, "note": null}"#, true),
            (
                r#"{"$or": [{"currency": "USD"}, {"customer.tier": 2}]}"#,
                true,
            ),
            (
                r#"{"$and": [{"currency": "EUR"}, {"customer.tier": 3}]}"#,
                false,
            ),
            (r#"{"$not": {"currency": "USD"}}"#, true),
            (
                r#"{"$event_type": {"$prefix": "invoice."}, "$action": "paid"}"#,
                true,
            ),
            (r#"{"$entity_id": "inv_2"}"#, false),
        ] {
            assert_eq!(check(filter), expected, "{filter}");
        }
    }

    #[test]
    fn arrays_match_if_any_element_does_and_ne_if_none_does() {
        for (filter, expected) in [
            (r#"{"tags": "vip"}"#, true),
            (r#"{"tags": {"$ne": "vip"}}"#, false),
            (r#"{"tags": {"$nin": ["spam"]}}"#, true),
            (r#"{"items.sku": "B-7"}"#, true),
            (r#"{"items.qty": {"$gt": 1}}"#, true),
            (r#"{"items.qty": {"$gt": 2}}"#, false),
            (r#"{"items": {"$exists": true}}"#, true),
            (r#"{"items.colour": {"$exists": true}}"#, false),
        ] {
            assert_eq!(check(filter), expected, "{filter}");
        }
    }

    #[test]
    fn a_missing_path_matches_only_exists_false_ne_and_nin() {
        for (filter, expected) in [
            (r#"{"missing": {"$exists": false}}"#, true),
            (r#"{"missing": {"$ne": 1}}"#, true),
            (r#"{"missing": {"$nin": [1]}}"#, true),
            (r#"{"missing": null}"#, false),
            (r#"{"missing": {"$lt": 1}}"#, false),
            (r#"{"missing": {"$in": [null]}}"#, false),
            (r#"{"customer": {"$exists": true}}"#, true),
        ] {
            assert_eq!(check(filter), expected, "{filter}");
        }
    }

    #[test]
    fn numbers_compare_exactly_and_types_never_mix() {
        for (filter, expected) in [
            (r#"{"big": 9007199254740993}"#, true),
            (r#"{"big": 9007199254740992}"#, false),
            (r#"{"big": {"$gt": 9007199254740992}}"#, true),
            (r#"{"amount": 1.5e3}"#, true),
            (r#"{"amount": 1500.000}"#, true),
            (r#"{"tiny": {"$gt": 0.1}}"#, true),
            (r#"{"tiny": 0.1}"#, false),
            (r#"{"amount": "1500"}"#, false),
            (r#"{"currency": {"$gt": 1}}"#, false),
            (r#"{"paid": 1}"#, false),
            (r#"{"amount": {"$lt": 1e400}}"#, true),
            (r#"{"amount": {"$gt": -1e-400}}"#, true),
        ] {
            assert_eq!(check(filter), expected, "{filter}");
        }
    }

    #[test]
    fn bad_filters_are_refused_with_the_problem_and_where() {
        for (filter, expected) in [
            ("[1]", "a filter must be a JSON object"),
            ("{", "is not valid JSON"),
            (
                r#"{"amount": {"$gt": true}}"#,
                "$gt needs a number or string at amount",
            ),
            (
                r#"{"amount": {"$between": 1}}"#,
                "unknown operator $between at amount",
            ),
            (
                r#"{"$where": "1"}"#,
                "unknown operator or event field $where",
            ),
            (
                r#"{"tags": ["a"]}"#,
                "equality to a list is not supported at tags",
            ),
            (
                r#"{"customer": {"id": 1}}"#,
                "equality to an object is not supported at customer",
            ),
            (r#"{"a..b": 1}"#, "path \"a..b\" has an empty segment"),
            (r#"{"x": {"$in": 1}}"#, "$in needs a list at x"),
            (r#"{"$or": []}"#, "$or needs at least one filter"),
            (
                r#"{"x": {"$exists": 1}}"#,
                "$exists needs true or false at x",
            ),
        ] {
            let err = parse(filter).unwrap_err();
            assert!(err.starts_with(expected), "{filter}: {err}");
        }
        let deep = format!(
            "{}{}",
            r#"{"$not":"#.repeat(9),
            "{\"a\":1}".to_owned() + &"}".repeat(9)
        );
        assert!(parse(&deep).unwrap_err().contains("at most 8 levels"));
        let long = format!(r#"{{"a": "{}"}}"#, "x".repeat(MAX_BYTES));
        assert!(parse(&long).unwrap_err().contains("at most 8192 bytes"));
    }

    /// The written forms of one integer.
    fn spellings(n: i64) -> Vec<String> {
        vec![
            n.to_string(),
            format!("{n}.0"),
            format!("{n}.000"),
            format!("{n}e0"),
            format!("{}0e-1", n),
        ]
    }

    proptest! {
        #[test]
        fn decimals_order_like_integers(a in any::<i64>(), b in any::<i64>(), i in 0usize..5, j in 0usize..5) {
            let x = Decimal::parse(&spellings(a)[i]).unwrap();
            let y = Decimal::parse(&spellings(b)[j]).unwrap();
            prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            prop_assert_eq!(x == y, a == b);
        }

        #[test]
        fn not_inverts_and_ne_is_the_opposite_of_eq_on_scalars(v in any::<i32>(), w in any::<i32>()) {
            let payload = format!(r#"{{"v": {v}}}"#);
            let eq = parse(&format!(r#"{{"v": {w}}}"#)).unwrap();
            let ne = parse(&format!(r#"{{"v": {{"$ne": {w}}}}}"#)).unwrap();
            let not = parse(&format!(r#"{{"$not": {{"v": {w}}}}}"#)).unwrap();
            let e = matches(&eq, &payload, &event());
            prop_assert_eq!(e, v == w);
            prop_assert_eq!(matches(&ne, &payload, &event()), !e);
            prop_assert_eq!(matches(&not, &payload, &event()), !e);
        }

        #[test]
        fn any_payload_and_filter_text_never_panics(payload in ".{0,64}", filter in ".{0,64}") {
            if let Ok(parsed) = parse(&filter) {
                let _ = matches(&parsed, &payload, &event());
            }
        }
    }
}
