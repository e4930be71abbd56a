//! Stage parameter tables: typed deserialization that reports every problem with its path
//! (not just serde's first), and "did you mean" hints. The config layer and every stage
//! kind use it; it depends on nothing of kpipe's.

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use toml::Value;

/// A problem with one parameter, found while checking a stage's table.
#[derive(Debug, Clone)]
pub struct ParamIssue {
    /// Dotted path below the stage table (`epochs`, `sweep.learning-rate.2`).
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
    /// Point at the key (unknown keys) rather than the value.
    pub on_key: bool,
}

impl ParamIssue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            hint: None,
            on_key: false,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Deserializes `T` from a table, collecting every unknown key and every bad value
/// (serde stops at the first error, so the culprit is removed and the rest retried).
pub fn parse_params<T: DeserializeOwned>(value: Value) -> (Option<T>, Vec<ParamIssue>) {
    let fields = field_names::<T>();
    let mut issues = Vec::new();
    let mut value = value;
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..64 {
        let mut unknown = Vec::new();
        let result: Result<T, _> = serde_path_to_error::deserialize(
            serde_ignored::Deserializer::new(value.clone(), &mut |p: serde_ignored::Path| {
                unknown.push(ignored_path(&p));
            }),
        );
        for path in unknown {
            if issues
                .iter()
                .any(|i: &ParamIssue| i.on_key && i.path == path)
            {
                continue; // seen in an earlier attempt
            }
            let last = path.rsplit('.').next().unwrap_or(&path).to_string();
            let mut issue = ParamIssue::new(path.clone(), "unknown key");
            issue.on_key = true;
            if !path.contains('.') {
                if let Some(c) = closest(&last, fields.iter().copied()) {
                    issue.hint = Some(format!("hint: did you mean `{c}`?"));
                } else if !fields.is_empty() {
                    issue.hint = Some(format!(
                        "hint: keys are {}",
                        fields
                            .iter()
                            .map(|f| format!("`{f}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            issues.push(issue);
        }
        match result {
            Ok(t) => return (if issues.is_empty() { Some(t) } else { None }, issues),
            Err(e) => {
                let segments = error_path(e.path());
                let message = e.into_inner().message().trim().to_string();
                // A missing field that we removed ourselves is a consequence, not a problem.
                let is_ours = message.starts_with("missing field")
                    && removed.iter().any(|r| message.contains(&format!("`{r}`")));
                if !is_ours {
                    issues.push(ParamIssue::new(segments.join("."), message));
                }
                let Some(first) = segments.first().cloned() else {
                    return (None, issues);
                };
                let gone = match &mut value {
                    Value::Table(t) => t.remove(&first).is_some(),
                    _ => false,
                };
                if !gone {
                    return (None, issues);
                }
                removed.push(first);
            }
        }
    }
    (None, issues)
}

fn ignored_path(p: &serde_ignored::Path) -> String {
    use serde_ignored::Path as P;
    match p {
        P::Root => String::new(),
        P::Seq { parent, index } => join(&ignored_path(parent), &index.to_string()),
        P::Map { parent, key } => join(&ignored_path(parent), key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

fn error_path(p: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment as S;
    p.iter()
        .filter_map(|s| match s {
            S::Seq { index } => Some(index.to_string()),
            S::Map { key } => Some(key.clone()),
            S::Enum { variant } => Some(variant.clone()),
            S::Unknown => None,
        })
        .collect()
}

/// The field names of a struct, read from its `Deserialize` impl (for "did you mean").
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The closest candidate to `word`, for "did you mean" hints.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// `prefix.key`, or `key` at the top.
pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct P {
        epochs: u32,
        #[serde(default)]
        batch_size: u32,
        name: String,
    }

    #[test]
    fn parse_params_reports_every_problem() {
        let v: Value = toml::from_str("epochs = \"x\"\nbatch-sise = 3\nname = 4\n").unwrap();
        let (p, issues) = parse_params::<P>(v);
        assert!(p.is_none());
        let mut paths: Vec<_> = issues.iter().map(|i| (i.path.as_str(), i.on_key)).collect();
        paths.sort();
        assert_eq!(
            paths,
            vec![("batch-sise", true), ("epochs", false), ("name", false)]
        );
        let typo = issues.iter().find(|i| i.path == "batch-sise").unwrap();
        assert_eq!(
            typo.hint.as_deref(),
            Some("hint: did you mean `batch-size`?")
        );
    }

    #[test]
    fn parse_params_reports_missing_fields() {
        let (p, issues) = parse_params::<P>(toml::from_str("epochs = 3").unwrap());
        assert!(p.is_none());
        assert_eq!(issues.len(), 1);
        assert!(
            issues[0].message.contains("missing field `name`"),
            "{issues:?}"
        );
    }

    #[test]
    fn closest_finds_typos_and_ignores_strangers() {
        assert_eq!(closest("epocs", ["epochs", "batch-size"]), Some("epochs"));
        assert_eq!(
            closest("lerning-rate", ["learning-rate", "seed"]),
            Some("learning-rate")
        );
        assert_eq!(closest("zzz", ["epochs", "batch-size"]), None);
    }
}
