//! What can be wrong with one endpoint's settings: shared by the config's checks, the
//! URL and TLS setup, and the client.

/// What is wrong with one remote_write endpoint's settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    /// A value that cannot work: the message names the option and what to write instead.
    #[error("{0}")]
    Invalid(String),
    /// A file the endpoint needs cannot be read.
    #[error("{option}: cannot read {}: {source}", path.display())]
    Unreadable {
        option: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A [`SettingError::Invalid`] with `message`.
pub(crate) fn invalid(message: String) -> SettingError {
    SettingError::Invalid(message)
}
