//! The first pass: TOML text to a merged table with the source location of every key and
//! value, so later passes can point at the culprit.

use std::collections::HashMap;

use toml::de::{DeTable, DeValue};
use toml::{Spanned, Table, Value};

use super::diagnostics::{Located, Problems, Sources};
use crate::schema::join;

/// A command-line override, `dotted.key=value` (`--set stages.train.epochs=2`).
///
/// The value is read as TOML (`2`, `1e-3`, `[1, 2]`, `"text"`); anything that does not
/// parse as TOML is taken as a bare string.
#[derive(Clone, Debug)]
pub struct Override(pub String);

/// A pipeline document after the profile and overrides are merged in.
#[derive(Default)]
pub struct Document {
    pub root: Table,
    spans: Spans,
}

#[derive(Default)]
struct Spans {
    keys: HashMap<String, Located>,
    values: HashMap<String, Located>,
}

impl Document {
    /// Where the key at `path` (dotted: `stages.train.epochs`) was written.
    pub fn key_at(&self, path: &str) -> Option<&Located> {
        self.spans.keys.get(path).or_else(|| self.value_at(path))
    }

    /// Where the value at `path` was written; for a value set by a default, where its
    /// closest written parent was.
    pub fn value_at(&self, path: &str) -> Option<&Located> {
        let mut p = path;
        loop {
            if let Some(l) = self.spans.values.get(p) {
                return Some(l);
            }
            p = &p[..p.rfind('.')?];
        }
    }

    /// Parses `text` (read from `name`), then merges `[profiles.<profile>]` and each
    /// override over it. Problems go to `problems`; `None` when the text is not TOML.
    pub(crate) fn load(
        name: &str,
        text: &str,
        profile: Option<&str>,
        overrides: &[Override],
        sources: &mut Sources,
        problems: &mut Problems,
    ) -> Option<Document> {
        let file = sources.add(name, text);
        let (table, errors) = DeTable::parse_recoverable(text);
        if !errors.is_empty() {
            let mut after_duplicate_table = false;
            for e in errors {
                let span = e.span();
                let message = e.message().trim();
                let line = span
                    .as_ref()
                    .map_or("", |s| text[..s.start].rsplit('\n').next().unwrap_or(""));
                if message == "duplicate key" {
                    if line.trim_start().starts_with('[') {
                        after_duplicate_table = true;
                        let at = span.map(|span| Located { file, span });
                        problems.error(
                            "duplicate table: this id is already defined",
                            at.as_ref(),
                            "defined again here",
                            vec![],
                        );
                        continue;
                    }
                    if after_duplicate_table {
                        continue; // the keys of a duplicated table repeat the same problem
                    }
                }
                after_duplicate_table = false;
                let at = span.map(|span| Located { file, span });
                problems.error(
                    format!("invalid TOML: {message}"),
                    at.as_ref(),
                    "here",
                    vec![],
                );
            }
            return None;
        }
        let mut doc = Document::default();
        let mut profiles = None;
        for (key, value) in table.get_ref() {
            if key.get_ref() == "profiles" {
                profiles = Some((key, value));
                continue;
            }
            absorb(&mut doc.root, &mut doc.spans, "", key, value, file);
        }
        if let Some(wanted) = profile {
            let available: Vec<&Spanned<std::borrow::Cow<str>>> =
                match profiles.map(|(_, v)| v.get_ref()) {
                    Some(DeValue::Table(t)) => t.keys().collect(),
                    _ => vec![],
                };
            let chosen = profiles
                .and_then(|(_, v)| v.get_ref().as_table())
                .and_then(|t| t.get(wanted));
            match chosen.map(|v| v.get_ref()) {
                Some(DeValue::Table(t)) => {
                    doc.merge(t, file, &format!("profile `{wanted}`"), problems);
                }
                Some(_) => {
                    let at = chosen.map(|v| Located {
                        file,
                        span: v.span(),
                    });
                    problems.error(
                        format!("profile `{wanted}` is not a table"),
                        at.as_ref(),
                        "expected a table",
                        vec![],
                    );
                }
                None => {
                    let names: Vec<String> = available
                        .iter()
                        .map(|k| format!("`{}`", k.get_ref()))
                        .collect();
                    let hint = if names.is_empty() {
                        format!("hint: `{name}` defines no `[profiles.<name>]` table")
                    } else {
                        format!("hint: available profiles: {}", names.join(", "))
                    };
                    problems.error(
                        format!("unknown profile `{wanted}` in `{name}`"),
                        None,
                        "",
                        vec![hint],
                    );
                }
            }
        }
        for Override(expr) in overrides {
            doc.apply_override(expr, sources, problems);
        }
        Some(doc)
    }

    fn apply_override(&mut self, expr: &str, sources: &mut Sources, problems: &mut Problems) {
        let Some((key, value)) = expr.split_once('=') else {
            problems.error(
                format!("invalid override `{expr}`"),
                None,
                "",
                vec![
                    "hint: write `--set dotted.key=value`, e.g. `--set stages.train.epochs=2`"
                        .into(),
                ],
            );
            return;
        };
        let (key, value) = (key.trim(), value.trim());
        let as_toml = format!("{key} = {value}");
        let text = if DeTable::parse(&as_toml).is_ok() {
            as_toml
        } else {
            format!("{key} = {}", Value::String(value.to_string()))
        };
        let file = sources.add("--set", text.clone());
        match DeTable::parse(&text) {
            Ok(table) => self.merge(table.get_ref(), file, "`--set`", problems),
            Err(e) => {
                let at = e.span().map(|span| Located { file, span });
                problems.error(
                    format!("invalid override `{expr}`: {}", e.message().trim()),
                    at.as_ref(),
                    "here",
                    vec![],
                );
            }
        }
    }

    /// Merges an override table (a profile or a `--set`) over the document. It may only
    /// touch `[pipeline]` and stages that exist: a typo must not create a new stage.
    fn merge(&mut self, table: &DeTable, file: usize, what: &str, problems: &mut Problems) {
        for (key, value) in table {
            let at = Located {
                file,
                span: key.span(),
            };
            match (key.get_ref().as_ref(), value.get_ref()) {
                ("pipeline", DeValue::Table(_)) => {}
                ("stages", DeValue::Table(stages)) => {
                    let known: Vec<&str> = match self.root.get("stages") {
                        Some(Value::Table(t)) => t.keys().map(String::as_str).collect(),
                        _ => vec![],
                    };
                    let mut ok = true;
                    for id in stages.keys() {
                        if !known.contains(&id.get_ref().as_ref()) {
                            ok = false;
                            let at = Located {
                                file,
                                span: id.span(),
                            };
                            problems.error(
                                format!("{what} overrides unknown stage `{}`", id.get_ref()),
                                Some(&at),
                                "no stage with this id",
                                vec![stage_hint(id.get_ref(), &known)],
                            );
                        }
                    }
                    if !ok {
                        continue;
                    }
                }
                (other, _) => {
                    problems.error(
                        format!("{what} may override only `pipeline` and `stages`, not `{other}`"),
                        Some(&at),
                        "not overridable",
                        vec![],
                    );
                    continue;
                }
            }
            absorb(&mut self.root, &mut self.spans, "", key, value, file);
        }
    }
}

pub(crate) fn stage_hint(id: &str, known: &[&str]) -> String {
    match crate::schema::closest(id, known.iter().copied()) {
        Some(c) => format!("hint: did you mean `{c}`?"),
        None if known.is_empty() => "hint: the pipeline defines no stages".into(),
        None => format!(
            "hint: stages are {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Inserts `key = value` into `into`, merging tables recursively, and records spans.
fn absorb(
    into: &mut Table,
    spans: &mut Spans,
    prefix: &str,
    key: &Spanned<std::borrow::Cow<str>>,
    value: &Spanned<DeValue>,
    file: usize,
) {
    let path = join(prefix, key.get_ref());
    spans.keys.insert(
        path.clone(),
        Located {
            file,
            span: key.span(),
        },
    );
    if let (Some(Value::Table(existing)), DeValue::Table(table)) =
        (into.get_mut(key.get_ref().as_ref()), value.get_ref())
    {
        spans.values.insert(
            path.clone(),
            Located {
                file,
                span: value.span(),
            },
        );
        for (k, v) in table {
            absorb(existing, spans, &path, k, v, file);
        }
        return;
    }
    let converted = convert(value, &path, spans, file);
    into.insert(key.get_ref().to_string(), converted);
}

fn convert(value: &Spanned<DeValue>, path: &str, spans: &mut Spans, file: usize) -> Value {
    spans.values.insert(
        path.to_string(),
        Located {
            file,
            span: value.span(),
        },
    );
    match value.get_ref() {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => {
            // The parser accepted it, so it fits i64 unless it overflows: then keep the text
            // and let the schema report the type.
            i64::from_str_radix(i.as_str(), i.radix())
                .map_or_else(|_| Value::String(i.to_string()), Value::Integer)
        }
        DeValue::Float(f) => Value::Float(parse_float(f.as_str())),
        DeValue::Boolean(b) => Value::Boolean(*b),
        DeValue::Datetime(d) => Value::Datetime(*d),
        DeValue::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| convert(item, &join(path, &i.to_string()), spans, file))
                .collect(),
        ),
        DeValue::Table(table) => {
            let mut t = Table::new();
            for (k, v) in table {
                absorb(&mut t, spans, path, k, v, file);
            }
            Value::Table(t)
        }
    }
}

fn parse_float(s: &str) -> f64 {
    let s = s.replace('_', "");
    match s.trim_start_matches('+') {
        "inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        "nan" | "-nan" => f64::NAN,
        other => other.parse().unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, profile: Option<&str>, sets: &[&str]) -> (Option<Document>, Problems) {
        let mut sources = Sources::default();
        let mut problems = Problems::default();
        let sets: Vec<Override> = sets.iter().map(|s| Override(s.to_string())).collect();
        let doc = Document::load("p.toml", text, profile, &sets, &mut sources, &mut problems);
        (doc, problems)
    }

    const BASE: &str = "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"command\"\nn = 1\nm = { deep = 2 }\n\
                        [profiles.small.stages.a]\nn = 5\nm.other = 3\n";

    #[test]
    fn profile_merges_deeply_and_keeps_spans() {
        let (doc, problems) = load(BASE, Some("small"), &[]);
        assert!(problems.is_empty());
        let doc = doc.unwrap();
        let a = doc.root["stages"]["a"].as_table().unwrap();
        assert_eq!(a["n"].as_integer(), Some(5));
        assert_eq!(a["m"]["deep"].as_integer(), Some(2));
        assert_eq!(a["m"]["other"].as_integer(), Some(3));
        let at = doc.value_at("stages.a.n").unwrap();
        assert_eq!(&BASE[at.span.clone()], "5");
        assert!(!doc.root.contains_key("profiles"));
    }

    #[test]
    fn overrides_parse_toml_or_fall_back_to_strings() {
        let (doc, problems) = load(
            BASE,
            None,
            &[
                "stages.a.n=7",
                "stages.a.s=hello world",
                "stages.a.l=[1, 2]",
            ],
        );
        assert!(problems.is_empty());
        let a = doc.unwrap().root["stages"]["a"].as_table().unwrap().clone();
        assert_eq!(a["n"].as_integer(), Some(7));
        assert_eq!(a["s"].as_str(), Some("hello world"));
        assert_eq!(a["l"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn overrides_of_unknown_stages_and_profiles_are_errors() {
        let (_, problems) = load(BASE, None, &["stages.b.n=7"]);
        assert_eq!(problems.list.len(), 1);
        assert!(problems.list[0].message.contains("unknown stage `b`"));
        let (_, problems) = load(BASE, Some("big"), &[]);
        assert!(problems.list[0].message.contains("unknown profile `big`"));
        assert!(problems.list[0].notes[0].contains("`small`"));
    }

    #[test]
    fn value_at_falls_back_to_the_closest_parent() {
        let (doc, _) = load(BASE, None, &[]);
        let doc = doc.unwrap();
        let at = doc.value_at("stages.a.m.missing").unwrap();
        assert_eq!(&BASE[at.span.clone()], "{ deep = 2 }");
    }
}
