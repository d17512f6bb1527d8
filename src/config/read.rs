//! Reading the parsed TOML field by field, leniently, so that `keygate check` can report
//! every mistake at once: a field of the wrong type is a problem at its path and keeps its
//! default, a field no one asked for is an unknown field (with the nearest known name as a
//! hint), and reading goes on. A whole-struct serde pass would stop at the first wrong type.

use toml::{Table, Value};

use super::ConfigProblem;
use super::validate::Problems;

/// One TOML table being read. Each accessor takes its field out of the table and records
/// the name as known; `finish` reports what is left as unknown.
pub(super) struct Fields<'p> {
    path: String,
    table: Table,
    known: Vec<&'static str>,
    problems: &'p mut Problems,
}

impl<'p> Fields<'p> {
    /// The file's root table.
    pub(super) fn root(table: Table, problems: &'p mut Problems) -> Self {
        Fields {
            path: String::new(),
            table,
            known: Vec::new(),
            problems,
        }
    }

    fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value of `key` if present and accepted by `convert`; a wrong type is reported
    /// as `expected <expected>, got <what it is>`.
    fn take<T>(
        &mut self,
        key: &'static str,
        expected: &str,
        convert: impl FnOnce(Value) -> Result<T, Value>,
    ) -> Option<T> {
        self.known.push(key);
        let value = self.table.remove(key)?;
        match convert(value) {
            Ok(v) => Some(v),
            Err(value) => {
                let path = self.at(key);
                self.problems.unreadable(path, mismatch(expected, &value));
                None
            }
        }
    }

    /// Whether the table has `key` at all (before it is read).
    pub(super) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    pub(super) fn string(&mut self, key: &'static str, default: String) -> String {
        self.opt_string(key).unwrap_or(default)
    }

    pub(super) fn opt_string(&mut self, key: &'static str) -> Option<String> {
        self.take(key, "a string", |v| match v {
            Value::String(s) => Ok(s),
            other => Err(other),
        })
    }

    pub(super) fn int(&mut self, key: &'static str, default: i64) -> i64 {
        self.opt_int(key).unwrap_or(default)
    }

    pub(super) fn opt_int(&mut self, key: &'static str) -> Option<i64> {
        self.take(key, "an integer", |v| match v {
            Value::Integer(n) => Ok(n),
            other => Err(other),
        })
    }

    /// An integer the table must have: its absence is a problem too.
    pub(super) fn required_int(&mut self, key: &'static str) -> Option<i64> {
        let present = self.table.contains_key(key);
        let value = self.opt_int(key);
        if !present {
            let path = self.at(key);
            self.problems
                .unreadable(path, "missing (an integer is required)");
        }
        value
    }

    pub(super) fn bool(&mut self, key: &'static str, default: bool) -> bool {
        self.take(key, "a boolean (true or false)", |v| match v {
            Value::Boolean(b) => Ok(b),
            other => Err(other),
        })
        .unwrap_or(default)
    }

    /// An array of strings. An element of another type is reported at its index and read
    /// as "" (reported no further), so the other elements keep their indices.
    pub(super) fn strings(&mut self, key: &'static str) -> Vec<String> {
        let Some(items) = self.take(key, "an array of strings", |v| match v {
            Value::Array(items) => Ok(items),
            other => Err(other),
        }) else {
            return Vec::new();
        };
        let path = self.at(key);
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => s,
                other => {
                    let at = format!("{path}[{i}]");
                    self.problems.unreadable(at, mismatch("a string", &other));
                    String::new()
                }
            })
            .collect()
    }

    /// A sub-table read by `read`, or `None` when it is absent or not a table.
    pub(super) fn table<T>(
        &mut self,
        key: &'static str,
        read: impl FnOnce(&mut Fields<'_>) -> T,
    ) -> Option<T> {
        let table = self.take(key, "a table", |v| match v {
            Value::Table(t) => Ok(t),
            other => Err(other),
        })?;
        let path = self.at(key);
        Some(Fields::nested(path, table, self.problems, read))
    }

    /// An array of tables (`[[key]]`), each read by `read`. An element that is not a table
    /// is reported and read from an empty table, so the others keep their indices.
    pub(super) fn tables<T>(
        &mut self,
        key: &'static str,
        read: impl Fn(&mut Fields<'_>) -> T,
    ) -> Vec<T> {
        let Some(items) = self.take(key, "an array of tables", |v| match v {
            Value::Array(items) => Ok(items),
            other => Err(other),
        }) else {
            return Vec::new();
        };
        let path = self.at(key);
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let at = format!("{path}[{i}]");
                let table = match item {
                    Value::Table(t) => t,
                    other => {
                        self.problems
                            .unreadable(at.clone(), mismatch("a table", &other));
                        Table::new()
                    }
                };
                Fields::nested(at, table, self.problems, &read)
            })
            .collect()
    }

    fn nested<T>(
        path: String,
        table: Table,
        problems: &mut Problems,
        read: impl FnOnce(&mut Fields<'_>) -> T,
    ) -> T {
        let mut fields = Fields {
            path,
            table,
            known: Vec::new(),
            problems,
        };
        let value = read(&mut fields);
        fields.finish();
        value
    }

    /// Reports every field left in the table, that is, every field no accessor asked for.
    pub(super) fn finish(self) {
        for key in self.table.keys() {
            let reason = crate::hint::unknown_field(key, &self.known);
            let path = self.at(key);
            self.problems.add(path, reason);
        }
    }
}

fn mismatch(expected: &str, got: &Value) -> String {
    let got = match got {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    };
    format!("expected {expected}, got {got}")
}

/// A TOML syntax error as a problem of the file, with the line and column it starts at.
pub(super) fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigProblem {
    let message = error.message().trim().replace('\n', "; ");
    let reason = match error.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("not valid TOML at line {line}, column {column}: {message}")
        }
        None => format!("not valid TOML: {message}"),
    };
    ConfigProblem {
        path: "(file)".into(),
        reason,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}
