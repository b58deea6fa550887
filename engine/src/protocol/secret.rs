//! The shared secret that peers prove they know in the handshake, and the
//! loading of it from a file.
//!
//! The file must be private to its owner (no group or other permission bits),
//! non-empty and at least [`SECRET_BYTES_MIN`] bytes once one trailing newline
//! is trimmed, so `openssl rand -base64 32 > FILE; chmod 600 FILE` makes a good
//! one. The bytes are used as they are, not decoded: both peers only need the
//! same file.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::protocol::error::ReplicationError;

/// The fewest bytes a secret may have.
pub const SECRET_BYTES_MIN: usize = 16;
/// The most bytes a secret may have; a larger file is refused unread.
pub const SECRET_BYTES_MAX: usize = 4096;

/// A shared secret. Its bytes never appear in `Debug` output, and they are
/// overwritten when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    bytes: Vec<u8>,
}

impl Secret {
    /// A secret from bytes, if there are [`SECRET_BYTES_MIN`] to
    /// [`SECRET_BYTES_MAX`] of them; otherwise `None`.
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Secret> {
        (SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&bytes.len()).then_some(Secret { bytes })
    }

    /// The secret's bytes, for keying the MAC.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A key for another use of the same secret (the group layer's quorum
    /// and liveness traffic): HMAC-SHA256 of `purpose` under the secret, so
    /// the replication key itself never leaves this crate.
    pub fn derive_key(&self, purpose: &str) -> Vec<u8> {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.bytes).expect("HMAC takes a key of any length");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Secret(<{} bytes, redacted>)", self.bytes.len())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: keep the secret out of freed heap memory.
        self.bytes.fill(0);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// Load the shared secret from `path`: a regular file, private to its owner
/// (`mode & 0o077 == 0`), of [`SECRET_BYTES_MIN`] to [`SECRET_BYTES_MAX`]
/// bytes after one trailing newline (`\n` or `\r\n`) is trimmed.
pub fn load_secret(path: &Path) -> Result<Secret, ReplicationError> {
    let refuse = |message: String| ReplicationError::Secret { path: path.to_path_buf(), message };
    let io_error = |action, source| ReplicationError::SecretIo { path: path.to_path_buf(), action, source };
    let file = File::open(path).map_err(|source| io_error("open", source))?;
    // The checks look at the opened file, not the path, so a file swapped in
    // between the check and the read cannot slip through.
    let metadata = file.metadata().map_err(|source| io_error("stat", source))?;
    if !metadata.is_file() {
        return Err(refuse("is not a regular file; point --secret-file at a file".into()));
    }
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "is accessible by group or others (mode {:04o}); run `chmod 600 {}`",
            mode & 0o7777,
            path.display()
        )));
    }
    if metadata.len() > SECRET_BYTES_MAX as u64 + 2 {
        return Err(refuse(format!(
            "has {} bytes, more than the {SECRET_BYTES_MAX} a secret may have; use a shorter secret",
            metadata.len()
        )));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(SECRET_BYTES_MAX as u64 + 3).read_to_end(&mut bytes).map_err(|source| io_error("read", source))?;
    trim_trailing_newline(&mut bytes);
    if bytes.is_empty() {
        return Err(refuse(format!(
            "is empty; write at least {SECRET_BYTES_MIN} random bytes into it, e.g. `openssl rand -base64 32`"
        )));
    }
    let length = bytes.len();
    Secret::from_bytes(bytes).ok_or_else(|| {
        refuse(format!(
            "holds {length} bytes; a secret needs {SECRET_BYTES_MIN} to {SECRET_BYTES_MAX}, e.g. `openssl rand -base64 32`"
        ))
    })
}

fn trim_trailing_newline(bytes: &mut Vec<u8>) {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::error::ReplicationErrorKind;
    use std::fs;
    use std::os::unix::fs::OpenOptionsExt;

    fn write_secret(directory: &Path, contents: &[u8], mode: u32) -> std::path::PathBuf {
        let path = directory.join("secret");
        let _ = fs::remove_file(&path);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true).mode(mode);
        std::io::Write::write_all(&mut options.open(&path).unwrap(), contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A private file's contents become the secret, minus one trailing newline.
    #[test]
    fn private_file_loads_without_its_newline() {
        let directory = tempfile::tempdir().unwrap();
        let secret = load_secret(&write_secret(directory.path(), b"0123456789abcdefXYZ\n", 0o600)).unwrap();
        assert_eq!(secret.as_bytes(), b"0123456789abcdefXYZ");
        let secret = load_secret(&write_secret(directory.path(), b"0123456789abcdef\r\n", 0o400)).unwrap();
        assert_eq!(secret.as_bytes(), b"0123456789abcdef");
    }

    /// A file readable by group or others is refused with the chmod to run.
    #[test]
    fn group_or_world_access_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o620, 0o644] {
            let error = load_secret(&write_secret(directory.path(), b"0123456789abcdef", mode)).unwrap_err();
            assert_eq!(error.kind(), ReplicationErrorKind::Secret);
            assert!(error.to_string().contains("chmod 600"), "{error}");
        }
    }

    /// An empty file, a bare newline and a short secret are refused.
    #[test]
    fn empty_or_short_secrets_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        for contents in [&b""[..], b"\n", b"short secret\n"] {
            let error = load_secret(&write_secret(directory.path(), contents, 0o600)).unwrap_err();
            assert_eq!(error.kind(), ReplicationErrorKind::Secret, "{contents:?}");
        }
    }

    /// A file over the size limit is refused, and a missing file is an I/O error.
    #[test]
    fn oversized_and_missing_files_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let error = load_secret(&write_secret(directory.path(), &[b'x'; SECRET_BYTES_MAX + 10], 0o600)).unwrap_err();
        assert_eq!(error.kind(), ReplicationErrorKind::Secret);
        let error = load_secret(&directory.path().join("absent")).unwrap_err();
        assert_eq!(error.kind(), ReplicationErrorKind::Io);
    }

    /// The secret's bytes never show in debug output.
    #[test]
    fn debug_output_is_redacted() {
        let secret = Secret::from_bytes(b"do not print me!".to_vec()).unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(<16 bytes, redacted>)");
    }
}
