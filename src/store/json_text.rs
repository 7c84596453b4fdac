//! Rewriting a JSON file by editing its text: only the members whose value
//! changed are touched, so every other byte (numbers as written, string
//! escapes, key order, layout) stays exactly as it was.
//!
//! The edits come from comparing the parsed document before and after a
//! [`FileFormat::patch`](super::FileFormat::patch): a changed member gets
//! its value replaced, a new one is inserted after the object's last
//! member, a dropped one is removed with its comma. Objects are compared
//! member by member, at any depth.

use std::ops::Range;

use serde_json::{Map, Value};

/// Deeper than this the scanner gives up (serde_json itself refuses
/// documents nested more than 128 levels).
const MAX_DEPTH: usize = 256;

/// `text` (a JSON object that parses to `before`) changed so that it
/// parses to `after`, touching only what differs. `None` when the text
/// cannot be scanned (the caller then serialises `after` whole).
pub(crate) fn rewrite(text: &str, before: &Map<String, Value>, after: &Map<String, Value>) -> Option<String> {
    let mut scanner = Scanner {
        bytes: text.as_bytes(),
        at: 0,
    };
    scanner.skip_ws();
    let root = scanner.object(0)?;
    scanner.skip_ws();
    if scanner.at != scanner.bytes.len() {
        return None;
    }
    let mut edits = Vec::new();
    diff_object(text, &root, before, after, &mut edits)?;
    // Apply from the end so that earlier positions stay valid. Among edits
    // at one position a removal goes before an insertion (empty range), so
    // that it never removes what was inserted.
    edits.sort_by(|a, b| {
        b.range
            .start
            .cmp(&a.range.start)
            .then(b.range.len().cmp(&a.range.len()))
    });
    let mut out = text.to_owned();
    let mut floor = usize::MAX;
    for edit in edits {
        if edit.range.end > floor {
            return None; // overlapping edits: never produce a torn document
        }
        out.replace_range(edit.range.clone(), &edit.text);
        floor = edit.range.start;
    }
    Some(out)
}

/// Replace `range` of the original text with `text`.
struct Edit {
    range: Range<usize>,
    text: String,
}

/// An object in the text: its braces and members, in order.
struct ObjectSpan {
    open: usize,
    members: Vec<Member>,
}

/// One `"key": value` member.
struct Member {
    key: String,
    /// From the key's opening quote.
    start: usize,
    /// The value's text.
    value: Range<usize>,
    /// The value, when it is an object.
    object: Option<ObjectSpan>,
}

fn diff_object(
    text: &str,
    span: &ObjectSpan,
    before: &Map<String, Value>,
    after: &Map<String, Value>,
    edits: &mut Vec<Edit>,
) -> Option<()> {
    let mut removed = vec![false; span.members.len()];
    for (i, member) in span.members.iter().enumerate() {
        match (before.get(&member.key), after.get(&member.key)) {
            (_, None) => removed[i] = true,
            (Some(old), Some(new)) if old == new => {}
            (Some(Value::Object(old)), Some(Value::Object(new))) if member.object.is_some() => {
                diff_object(text, member.object.as_ref()?, old, new, edits)?;
            }
            (_, Some(new)) => edits.push(Edit {
                range: member.value.clone(),
                text: serde_json::to_string(new).ok()?,
            }),
        }
    }
    // Runs of removed members go with the comma after them, or, at the
    // end, with the comma before them.
    let n = span.members.len();
    let mut i = 0;
    while i < n {
        if !removed[i] {
            i += 1;
            continue;
        }
        let mut j = i;
        while j + 1 < n && removed[j + 1] {
            j += 1;
        }
        let range = if j + 1 < n {
            span.members[i].start..span.members[j + 1].start
        } else if i > 0 {
            span.members[i - 1].value.end..span.members[j].value.end
        } else {
            span.members[0].start..span.members[j].value.end
        };
        edits.push(Edit {
            range,
            text: String::new(),
        });
        i = j + 1;
    }
    // New members go, in one insertion, after the last member that stays,
    // separated like the text separates its members (the whitespace before
    // a second member: the first may hug the brace).
    let mut added = Vec::new();
    for (key, value) in after {
        if !span.members.iter().any(|m| &m.key == key) {
            added.push(format!(
                "{}: {}",
                serde_json::to_string(key).ok()?,
                serde_json::to_string(value).ok()?
            ));
        }
    }
    if added.is_empty() {
        return Some(());
    }
    let separator = match span.members.get(1).or(span.members.first()) {
        Some(sample) => {
            let before_key = &text[..sample.start];
            &before_key[before_key.trim_end_matches(|c: char| c.is_ascii_whitespace()).len()..]
        }
        None => "",
    };
    let separator = if separator.is_empty() { " " } else { separator };
    let kept_last = span
        .members
        .iter()
        .zip(&removed)
        .rev()
        .find(|(_, r)| !**r)
        .map(|(m, _)| m);
    let joined = added.join(&format!(",{separator}"));
    edits.push(match kept_last {
        Some(last) => Edit {
            range: last.value.end..last.value.end,
            text: format!(",{separator}{joined}"),
        },
        None => Edit {
            range: span.open + 1..span.open + 1,
            text: joined,
        },
    });
    Some(())
}

/// A scanner over JSON text already known to parse, recording where the
/// members of every object are. Any surprise gives `None`, never a panic.
struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// A string, from its opening quote; returns its span with the quotes.
    fn string(&mut self) -> Option<Range<usize>> {
        let start = self.at;
        self.expect(b'"')?;
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(start..self.at);
                }
                b'\\' => self.at += 2,
                _ => self.at += 1,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<ObjectSpan> {
        if depth > MAX_DEPTH {
            return None;
        }
        let open = self.at;
        self.expect(b'{')?;
        let mut members = Vec::new();
        self.skip_ws();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(ObjectSpan { open, members });
        }
        loop {
            self.skip_ws();
            let key_span = self.string()?;
            let key: String = serde_json::from_str(std::str::from_utf8(&self.bytes[key_span.clone()]).ok()?).ok()?;
            self.skip_ws();
            self.expect(b':')?;
            self.skip_ws();
            let value_start = self.at;
            let object = self.value(depth + 1)?;
            members.push(Member {
                key,
                start: key_span.start,
                value: value_start..self.at,
                object,
            });
            self.skip_ws();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(ObjectSpan { open, members });
                }
                _ => return None,
            }
        }
    }

    /// Any value; the object's span when it is one.
    fn value(&mut self, depth: usize) -> Option<Option<ObjectSpan>> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => return self.object(depth).map(Some),
            b'"' => {
                self.string()?;
            }
            b'[' => {
                self.at += 1;
                self.skip_ws();
                if self.peek()? == b']' {
                    self.at += 1;
                } else {
                    loop {
                        self.skip_ws();
                        self.value(depth + 1)?;
                        self.skip_ws();
                        match self.peek()? {
                            b',' => self.at += 1,
                            b']' => {
                                self.at += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
            }
            _ => {
                // A number or a literal: up to the next delimiter.
                let start = self.at;
                while self
                    .peek()
                    .is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                {
                    self.at += 1;
                }
                if self.at == start {
                    return None;
                }
            }
        }
        Some(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> Map<String, Value> {
        match serde_json::from_str(text).unwrap() {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    fn check(text: &str, edit: impl FnOnce(&mut Map<String, Value>), expected: &str) {
        let before = map(text);
        let mut after = before.clone();
        edit(&mut after);
        let out = rewrite(text, &before, &after).unwrap();
        assert_eq!(out, expected);
        assert_eq!(map(&out), after, "the text parses to the edited document");
    }

    #[test]
    fn only_changed_members_are_touched() {
        let text = "{\n  \"n\": 1.10,\n  \"t\": {\"a\": \"old\", \"e\": \"caf\\u00e9\"},\n  \"x\": 1e400\n}\n";
        check(
            text,
            |m| m["t"]["a"] = "new".into(),
            "{\n  \"n\": 1.10,\n  \"t\": {\"a\": \"new\", \"e\": \"caf\\u00e9\"},\n  \"x\": 1e400\n}\n",
        );
        check(
            text,
            |m| drop(m.insert("added".into(), "v".into())),
            "{\n  \"n\": 1.10,\n  \"t\": {\"a\": \"old\", \"e\": \"caf\\u00e9\"},\n  \"x\": 1e400,\n  \"added\": \"v\"\n}\n",
        );
    }

    #[test]
    fn removals_take_their_comma() {
        let text = r#"{"a": 1, "b": 2, "c": 3}"#;
        check(text, |m| drop(m.shift_remove("a")), r#"{"b": 2, "c": 3}"#);
        check(text, |m| drop(m.shift_remove("b")), r#"{"a": 1, "c": 3}"#);
        check(text, |m| drop(m.shift_remove("c")), r#"{"a": 1, "b": 2}"#);
        check(
            text,
            |m| {
                m.shift_remove("b");
                m.shift_remove("c");
            },
            r#"{"a": 1}"#,
        );
        check(
            text,
            |m| {
                m.shift_remove("b");
                m.shift_remove("c");
                m.insert("d".into(), 4.into());
            },
            r#"{"a": 1, "d": 4}"#,
        );
        check(
            text,
            |m| {
                m.clear();
                m.insert("d".into(), 4.into());
            },
            r#"{"d": 4}"#,
        );
        check("{}", |m| drop(m.insert("d".into(), 4.into())), r#"{"d": 4}"#);
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            r#"[a-z"\\é\n]{0,6}"#.prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-d]{1,2}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Any edit of any object, compact or pretty: the rewritten text
        /// parses to exactly the edited document.
        #[test]
        fn a_rewrite_parses_to_the_edited_document(
            original in proptest::collection::vec(("[a-e]{1,2}", json_value()), 0..6),
            edits in proptest::collection::vec(("[a-g]{1,2}", proptest::option::of(json_value())), 0..6),
            nested in proptest::collection::vec(("[a-c]", proptest::option::of(json_value())), 0..3),
            pretty: bool,
        ) {
            let before: Map<String, Value> = original.into_iter().collect();
            let mut after = before.clone();
            for (key, value) in edits {
                match value {
                    Some(v) => drop(after.insert(key, v)),
                    None => drop(after.shift_remove(&key)),
                }
            }
            if let Some(Value::Object(inner)) = after.values_mut().find(|v| v.is_object()) {
                for (key, value) in nested {
                    match value {
                        Some(v) => drop(inner.insert(key, v)),
                        None => drop(inner.shift_remove(&key)),
                    }
                }
            }
            let text = if pretty {
                serde_json::to_string_pretty(&before).unwrap()
            } else {
                serde_json::to_string(&before).unwrap()
            };
            let out = rewrite(&text, &before, &after).unwrap();
            proptest::prop_assert_eq!(map(&out), after);
        }
    }

    #[test]
    fn never_panics_on_unscannable_text() {
        let before = map(r#"{"a": 1}"#);
        for text in [
            "",
            "{",
            r#"{"a" 1}"#,
            r#"{"a": 1} x"#,
            "[1]",
            r#"{"a": "unterminated"#,
            r#"{"a": "\"#,
        ] {
            let _ = rewrite(text, &before, &before);
        }
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(1000), "]".repeat(1000));
        assert!(rewrite(&deep, &before, &before).is_none());
    }
}
