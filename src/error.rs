//! Errors. Library code returns `Result`; only `main` exits. A user's mistake (bad flag, missing file,
//! bad checkpoint) is `Error::User` and exits with code 2 and one line. A shape mismatch inside the
//! engine is a bug and asserts with the op's name instead.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// Something the user gave us is wrong: one line naming the thing and what was expected.
    User(String),
    /// An I/O failure on a named path.
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A CUDA library or driver call failed.
    Cuda(String),
    /// The GPU ran out of memory (the message says what was asked and, where known, what is free).
    OutOfMemory(String),
    /// A loss, gradient or weight became NaN or infinite (the message names the first).
    NonFinite(String),
    /// Any other failure, with the chain of contexts that led to it.
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn user(msg: impl Into<String>) -> Error {
        Error::User(msg.into())
    }
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
    /// The process exit code for this error: 2 for the user's mistakes, 3 for values that
    /// became NaN or infinite, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::User(_) | Error::Io { .. } => 2,
            Error::NonFinite(_) => 3,
            _ => 1,
        }
    }
    fn with_context(self, what: &str) -> Error {
        match self {
            Error::User(m) => Error::User(format!("{what}: {m}")),
            Error::Io { path, source } => Error::Io {
                path: format!("{what}: {path}"),
                source,
            },
            Error::Cuda(m) => Error::Cuda(format!("{what}: {m}")),
            Error::OutOfMemory(m) => Error::OutOfMemory(format!("{what}: {m}")),
            Error::NonFinite(m) => Error::NonFinite(format!("{what}: {m}")),
            Error::Other(m) => Error::Other(format!("{what}: {m}")),
        }
    }

    /// The same error again, for one kept to be returned more than once (a graph's sticky error):
    /// an I/O error's source is kept as its text.
    pub fn again(&self) -> Error {
        match self {
            Error::User(m) => Error::User(m.clone()),
            Error::Io { path, source } => Error::Other(format!("{path}: {source}")),
            Error::Cuda(m) => Error::Cuda(m.clone()),
            Error::OutOfMemory(m) => Error::OutOfMemory(m.clone()),
            Error::NonFinite(m) => Error::NonFinite(m.clone()),
            Error::Other(m) => Error::Other(m.clone()),
        }
    }
}

/// `s` on one line: surrounding whitespace dropped and control characters written as escapes (a
/// newline in a key or a file name quoted back from the input, a library's trailing newline).
pub fn one_line(s: &str) -> String {
    let s = s.trim();
    if !s.contains(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A user's mistake is one line whatever the input quoted in it holds.
            Error::User(m) => f.write_str(&one_line(m)),
            Error::Io { path, source } => f.write_str(&one_line(&format!("{path}: {source}"))),
            Error::Cuda(m) => write!(f, "CUDA: {m}"),
            Error::OutOfMemory(m) => write!(f, "out of GPU memory: {m}"),
            Error::NonFinite(m) => write!(f, "{m}"),
            Error::Other(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {}

/// `.ctx("what")` adds context to any error on its way up.
pub trait Context<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| e.with_context(what))
    }
}

impl<T, E: fmt::Debug> Context<T> for std::result::Result<T, E>
where
    E: NotOurError,
{
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::Other(format!("{what}: {e:?}")))
    }
}

/// Foreign error types that `.ctx` converts (cudarc's errors, safetensors', ...).
pub trait NotOurError {}
impl NotOurError for cudarc::driver::DriverError {}
impl NotOurError for safetensors::SafeTensorError {}
impl NotOurError for std::fmt::Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_chains_and_exit_codes() {
        let e: Result<()> = Err(Error::user("--lr must be positive, got -1"));
        let e = e.ctx("pretrain").unwrap_err();
        assert_eq!(e.to_string(), "pretrain: --lr must be positive, got -1");
        assert_eq!(e.exit_code(), 2);
        let o: Result<()> = Err(Error::Other("boom".into()));
        assert_eq!(o.ctx("step").unwrap_err().exit_code(), 1);
    }

    /// Found by fuzzing (fuzz/seeds/manifest/bad-newline-key.json, config/bad-newline-key.toml): a
    /// key holding a newline was quoted back by serde in the "unknown field" error, which then took
    /// two lines. A user error is one line whatever it quotes.
    #[test]
    fn user_errors_quoting_the_input_stay_on_one_line() {
        let e = crate::run::parse_manifest("{\"config\":{\"\\n\"", "checkpoint.json".as_ref())
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("checkpoint.json: not a lewel checkpoint manifest (unknown field `\\n`")
                && !m.contains('\n'),
            "{m}"
        );
        let e = crate::run::PretrainConfig::given_from_toml_str(
            "\"batch\\nsize\" = 3\n",
            "c.toml".as_ref(),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("c.toml line 1: unknown field `batch\\nsize`") && !m.contains('\n'),
            "{m}"
        );
        assert_eq!(Error::user(" a\tb\r\n").to_string(), "a\\tb");
        let e = Error::io("x\ny", std::io::Error::other("gone"));
        assert_eq!(e.to_string(), "x\\ny: gone");
    }
}
