//! Source files and the diagnostics that point into them.

use std::ops::Range;

use codespan_reporting::diagnostic::{Diagnostic, Label};
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term::{self, termcolor::WriteColor};

/// The texts diagnostics point into: the pipeline file, and one pseudo-file per `--set`.
#[derive(Default)]
pub struct Sources {
    files: SimpleFiles<String, String>,
}

impl Sources {
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> usize {
        self.files.add(name.into(), text.into())
    }
}

/// Where a key or value came from: a file and a byte range in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub file: usize,
    pub span: Range<usize>,
}

/// Everything wrong with a pipeline file, reported at once.
pub struct ConfigError {
    sources: Sources,
    diagnostics: Vec<Diagnostic<usize>>,
}

impl ConfigError {
    pub(crate) fn new(sources: Sources, diagnostics: Vec<Diagnostic<usize>>) -> Self {
        Self {
            sources,
            diagnostics,
        }
    }

    /// A problem that has no place in any file (a missing file, an unknown profile).
    pub(crate) fn plain(message: impl Into<String>, notes: Vec<String>) -> Self {
        Self::new(
            Sources::default(),
            vec![
                Diagnostic::error()
                    .with_message(message.into())
                    .with_notes(notes),
            ],
        )
    }

    pub fn len(&self) -> usize {
        self.diagnostics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.diagnostics.is_empty()
    }

    /// Renders every diagnostic, with colours if `writer` supports them.
    pub fn emit(&self, writer: &mut dyn WriteColor) -> std::io::Result<()> {
        let config = term::Config::default();
        for diagnostic in &self.diagnostics {
            term::emit(writer, &config, &self.sources.files, diagnostic)
                .map_err(std::io::Error::other)?;
        }
        if self.diagnostics.len() > 1 {
            writeln!(
                writer,
                "error: {} problems in the pipeline",
                self.diagnostics.len()
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = termcolor::NoColor::new(Vec::new());
        self.emit(&mut out).map_err(|_| std::fmt::Error)?;
        f.write_str(String::from_utf8_lossy(&out.into_inner()).trim_end())
    }
}

impl std::fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for ConfigError {}

/// Collects diagnostics during a pass.
#[derive(Default)]
pub(crate) struct Problems {
    pub(crate) list: Vec<Diagnostic<usize>>,
}

impl Problems {
    /// An error with a caret at `at` (or no location), a label text and notes (`hint:` lines).
    pub(crate) fn error(
        &mut self,
        message: impl Into<String>,
        at: Option<&Located>,
        label: impl Into<String>,
        notes: Vec<String>,
    ) {
        let mut d = Diagnostic::error()
            .with_message(message.into())
            .with_notes(notes);
        if let Some(at) = at {
            d = d.with_labels(vec![
                Label::primary(at.file, at.span.clone()).with_message(label.into()),
            ]);
        }
        self.list.push(d);
    }

    pub(crate) fn push(&mut self, diagnostic: Diagnostic<usize>) {
        self.list.push(diagnostic);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
