//! Metadata files that appear whole or not at all: made beside their final
//! name, filled, made durable, renamed into place, and the directory made
//! durable, so a crash never leaves a half-written file at the path.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The step of [`create_whole`] that failed, and how.
pub type Failed = (&'static str, io::Error);

/// Create `path` whole: `fill` writes the new file (a step name with its
/// error when it fails); the file is then fsynced, renamed into place and
/// its directory fsynced. On failure the temporary file is removed. Returns
/// the open file.
pub fn create_whole(path: &Path, fill: impl FnOnce(&File) -> Result<(), Failed>) -> Result<File, Failed> {
    let mut temporary_name = path.as_os_str().to_owned();
    temporary_name.push(format!(".creating-{}", std::process::id()));
    let temporary = PathBuf::from(temporary_name);
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(|source| ("create", source))?;
        fill(&file)?;
        file.sync_all().map_err(|source| ("fsync", source))?;
        fs::rename(&temporary, path).map_err(|source| ("rename into place", source))?;
        sync_directory(path).map_err(|source| ("fsync directory", source))?;
        Ok(file)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// Make the directory holding `path` durable (a file created, renamed or
/// removed in it).
pub fn sync_directory(path: &Path) -> io::Result<()> {
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(directory)?.sync_all()
}
