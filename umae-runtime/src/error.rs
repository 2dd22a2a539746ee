//! The runtime's error type. Its kind says whose fault an error is, so that every caller (the
//! CLI above all) maps it to one exit-code contract: 2 for bad input, 1 for a failure while
//! working, 130 for an interrupt.

use std::fmt;

/// What the user gave that is wrong: the thing to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// The recipe file or a `--set` override.
    Recipe,
    /// The dataset: a missing root, a malformed file, too few images.
    Data,
    /// A flag or argument of the command line (a device name, a node address).
    CommandLine,
    /// The run or output directory: occupied, a file, not writable, no checkpoint.
    RunDir,
    /// A plugin library or a plugin's parameters.
    Plugin,
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputKind::Recipe => "recipe",
            InputKind::Data => "data",
            InputKind::CommandLine => "command line",
            InputKind::RunDir => "run directory",
            InputKind::Plugin => "plugin",
        })
    }
}

/// An error of the runtime.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Bad input: the user must change something (named by `kind`) before trying again.
    #[error("{message}")]
    Input { kind: InputKind, message: String },
    /// Something failed while working (I/O, a diverged run, a device error).
    #[error("{0}")]
    Failed(String),
    /// Stopped by SIGINT or SIGTERM after saving its work.
    #[error("{0}")]
    Interrupted(String),
}

/// The runtime's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn input(kind: InputKind, message: impl Into<String>) -> Self {
        Error::Input {
            kind,
            message: message.into(),
        }
    }
    pub fn recipe(message: impl Into<String>) -> Self {
        Error::input(InputKind::Recipe, message)
    }
    pub fn data(message: impl Into<String>) -> Self {
        Error::input(InputKind::Data, message)
    }
    pub fn command_line(message: impl Into<String>) -> Self {
        Error::input(InputKind::CommandLine, message)
    }
    pub fn run_dir(message: impl Into<String>) -> Self {
        Error::input(InputKind::RunDir, message)
    }
    pub fn plugin(message: impl Into<String>) -> Self {
        Error::input(InputKind::Plugin, message)
    }

    /// The process exit code of the contract in README.md.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Input { .. } => 2,
            Error::Failed(_) => 1,
            Error::Interrupted(_) => 130,
        }
    }

    /// The input kind, for bad input.
    pub fn input_kind(&self) -> Option<InputKind> {
        match self {
            Error::Input { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// The same error with `context: ` before its message (its kind kept).
    pub fn context(self, context: impl fmt::Display) -> Self {
        match self {
            Error::Input { kind, message } => Error::Input {
                kind,
                message: format!("{context}: {message}"),
            },
            Error::Failed(m) => Error::Failed(format!("{context}: {m}")),
            Error::Interrupted(m) => Error::Interrupted(format!("{context}: {m}")),
        }
    }
}

/// Messages of helpers that return `String` are failures unless a caller says otherwise.
impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::Failed(message)
    }
}

impl From<umae_api::PluginError> for Error {
    fn from(e: umae_api::PluginError) -> Self {
        match e {
            umae_api::PluginError::Failed(m) => Error::Failed(m),
            other => Error::plugin(other.to_string()),
        }
    }
}

impl From<umae_api::recipe::RecipeError> for Error {
    fn from(e: umae_api::recipe::RecipeError) -> Self {
        Error::recipe(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_whose_fault_it_is() {
        for kind in [
            InputKind::Recipe,
            InputKind::Data,
            InputKind::CommandLine,
            InputKind::RunDir,
            InputKind::Plugin,
        ] {
            assert_eq!(Error::input(kind, "x").exit_code(), 2, "{kind}");
        }
        assert_eq!(Error::Failed("x".into()).exit_code(), 1);
        assert_eq!(Error::Interrupted("x".into()).exit_code(), 130);
        assert_eq!(Error::from("io".to_string()).exit_code(), 1);
    }

    #[test]
    fn context_keeps_the_kind() {
        let e = Error::data("no such folder").context("data.root /x");
        assert_eq!(e.input_kind(), Some(InputKind::Data));
        assert_eq!(e.to_string(), "data.root /x: no such folder");
    }

    #[test]
    fn a_plugin_failure_is_not_bad_input() {
        let e: Error = umae_api::PluginError::Failed("disk full".into()).into();
        assert_eq!(e.exit_code(), 1);
        let e: Error = umae_api::PluginError::Invalid("dim must be even".into()).into();
        assert_eq!(e.input_kind(), Some(InputKind::Plugin));
    }
}
