//! Files a start may create, removed again when the start fails: a failed
//! start leaves no half-made volume (or metadata) behind for the next one to
//! trip over with an error that points back to the first.

use std::path::PathBuf;

/// The paths that did not exist when the start began; armed until
/// [`StartFiles::started`].
pub struct StartFiles {
    absent: Vec<PathBuf>,
    armed: bool,
}

impl StartFiles {
    /// Note which of `paths` do not exist yet: only those are ever removed.
    pub fn note(paths: &[PathBuf]) -> StartFiles {
        let absent = paths.iter().filter(|path| std::fs::symlink_metadata(path).is_err()).cloned().collect();
        StartFiles { absent, armed: true }
    }

    /// The start succeeded: keep what it created.
    pub fn started(mut self) {
        self.armed = false;
    }
}

impl Drop for StartFiles {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for path in &self.absent {
            if std::fs::symlink_metadata(path).is_ok() {
                match std::fs::remove_file(path) {
                    Ok(()) => tracing::info!("removed {}, created by this failed start", path.display()),
                    Err(error) => tracing::warn!(
                        "could not remove {}, created by this failed start: {error}; remove it before the next start",
                        path.display()
                    ),
                }
            }
        }
    }
}
