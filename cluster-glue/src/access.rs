//! A joining member's access to its site's store (seed 001: J works out
//! which resources it can access, and so its subgroups): the path opens, its
//! size is the group's, and the store is this group's or new. A store is
//! marked as this group's by `<volume>.cmgroup` beside its other metadata
//! once a member of the group has access to it; a store marked for another
//! group is refused, and nothing is written to it.
//!
//! ```text
//!  crossmirror-group 1
//!  group alpha
//! ```

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use engine::metadata::{replace_file_durably, MetadataFiles};

const HEADER: &str = "crossmirror-group 1";

/// The group marker of the store at `volume` (beside its `.cmmeta`).
pub fn marker_path(volume: &Path) -> PathBuf {
    let files = MetadataFiles::locate(volume, is_block_device(volume), None);
    files.metadata.with_extension("cmgroup")
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|metadata| metadata.file_type().is_block_device())
}

/// Check `volume` for group `group` of `size` bytes; create a missing
/// regular file (sparse) when its directory exists. On success the store is
/// marked as the group's. The error says what is wrong and what to do.
pub fn check(volume: &Path, size: u64, group: &str) -> Result<(), String> {
    let marker = marker_path(volume);
    match read_marker(&marker) {
        Ok(Some(owner)) if owner != group => {
            return Err(format!(
                "store {} belongs to group {owner:?} ({}), not {group:?}: name another store, or remove the marker if the store is really free",
                volume.display(),
                marker.display()
            ))
        }
        Ok(_) => {}
        Err(error) => return Err(format!("cannot read {}: {error}", marker.display())),
    }
    let file = match OpenOptions::new().read(true).write(true).open(volume) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let created =
                OpenOptions::new().read(true).write(true).create_new(true).open(volume).map_err(|error| {
                    format!("store {} does not exist and cannot be created: {error}", volume.display())
                })?;
            created
                .set_len(size)
                .map_err(|error| format!("cannot size the new store {}: {error}", volume.display()))?;
            tracing::info!(volume = %volume.display(), size, "created the store {} ({size} bytes, sparse)", volume.display());
            created
        }
        Err(error) => return Err(format!("cannot open store {}: {error}", volume.display())),
    };
    let actual = if is_block_device(volume) {
        engine::volume::block_device_size(&file)
            .map_err(|error| format!("cannot size {}: {error}", volume.display()))?
    } else {
        file.metadata().map_err(|error| format!("cannot stat {}: {error}", volume.display()))?.len()
    };
    if actual != size {
        return Err(format!(
            "store {} holds {actual} bytes; the group's volume_size is {size}: use a store of that size",
            volume.display()
        ));
    }
    replace_file_durably(&marker, format!("{HEADER}\ngroup {group}\n").as_bytes()).map_err(|(action, error)| {
        format!("cannot mark the store as group {group:?}'s ({}: {action}: {error})", marker.display())
    })?;
    Ok(())
}

/// The group a marker names, or `None` when there is no marker.
fn read_marker(path: &Path) -> io::Result<Option<String>> {
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(file) => file.take(4096).read_to_string(&mut text)?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut lines = text.lines();
    match (lines.next(), lines.next().and_then(|line| line.strip_prefix("group "))) {
        (Some(HEADER), Some(group)) => Ok(Some(group.to_string())),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "not a crossmirror group marker")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_created_sized_and_marked_and_another_groups_store_is_refused_untouched() {
        let directory = tempfile::tempdir().unwrap();
        let volume = directory.path().join("store.img");
        check(&volume, 1 << 20, "alpha").unwrap();
        assert_eq!(std::fs::metadata(&volume).unwrap().len(), 1 << 20);
        assert_eq!(read_marker(&marker_path(&volume)).unwrap().as_deref(), Some("alpha"));
        check(&volume, 1 << 20, "alpha").unwrap();
        let before = std::fs::read(marker_path(&volume)).unwrap();
        let error = check(&volume, 1 << 20, "beta").unwrap_err();
        assert!(error.contains("belongs to group \"alpha\""), "{error}");
        assert_eq!(std::fs::read(marker_path(&volume)).unwrap(), before);
        let error = check(&volume, 2 << 20, "alpha").unwrap_err();
        assert!(error.contains("holds 1048576 bytes"), "{error}");
        let error = check(&directory.path().join("missing/store.img"), 1 << 20, "alpha").unwrap_err();
        assert!(error.contains("cannot be created"), "{error}");
    }
}
