//! The password file of a `kill_query` account: read at load (validation) and again at each
//! action (`mysql.rs`), so a rotated password needs no reload.

use std::{io, path::Path};

/// Why a password file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error(transparent)]
    Read(#[from] io::Error),
    #[error("is not UTF-8")]
    NotUtf8,
    #[error("is empty")]
    Empty,
}

/// The password in `path`: its text without one trailing line end.
pub fn read_password(path: &Path) -> Result<String, PasswordError> {
    let bytes = std::fs::read(path)?;
    let text = String::from_utf8(bytes).map_err(|_| PasswordError::NotUtf8)?;
    let p = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if p.is_empty() {
        return Err(PasswordError::Empty);
    }
    Ok(p.to_string())
}
