//! Advice that travels with an error as data, beside its message: what the user can do
//! about it. The command line prints it after the message and its causes
//! (`hint: ...`); nothing below the command line formats it into text.

/// An error that can say what to do about it.
pub trait Hint {
    /// The advice, without a `hint:` prefix.
    fn hint(&self) -> Option<String>;
}

/// An error that is a message and, maybe, advice: for failures with no type of their own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct Message {
    pub text: String,
    pub hint: Option<String>,
}

impl Message {
    pub fn new(text: impl Into<String>) -> Message {
        Message {
            text: text.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Message {
        self.hint = Some(hint.into());
        self
    }
}

impl Hint for Message {
    fn hint(&self) -> Option<String> {
        self.hint.clone()
    }
}

impl From<String> for Message {
    fn from(text: String) -> Message {
        Message::new(text)
    }
}

impl From<&str> for Message {
    fn from(text: &str) -> Message {
        Message::new(text)
    }
}
