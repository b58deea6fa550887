//! `crossmirror rollback --volume V`: bring a copy store caught in the
//! middle of a resync pass back to the consistent image it held when the
//! pass began (its undo journal, `engine::dr_image`), for a DR test or a
//! manual failover to a copy whose production host was lost mid-resync.
//! The store must not be in use (stop its copy host first). Everything
//! written to it since that image is given up; the store gets a new store
//! token, so a production host resyncs it in full if it ever becomes a copy
//! again.

use std::path::PathBuf;

use clap::Args;
use engine::metadata::MetadataFiles;

/// Arguments of `crossmirror rollback`.
#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The copy store (regular file or block device).
    #[arg(long)]
    volume: PathBuf,
    /// Directory of the store's metadata, as its copy host was given.
    #[arg(long)]
    metadata_dir: Option<PathBuf>,
}

/// Roll the store back, and say to what.
pub fn run(args: RollbackArgs) -> anyhow::Result<()> {
    let file = std::fs::File::open(&args.volume)
        .map_err(|error| anyhow::anyhow!("cannot open {}: {error}", args.volume.display()))?;
    let metadata = file.metadata()?;
    let block_device = std::os::unix::fs::FileTypeExt::is_block_device(&metadata.file_type());
    let size = if block_device { engine::volume::block_device_size(&file)? } else { metadata.len() };
    drop(file);
    let files = MetadataFiles::locate(&args.volume, block_device, args.metadata_dir.as_deref());
    match engine::dr_image::restore_image(&args.volume, &files, size, None)? {
        Some(rolled) => {
            let taken = rolled.image.taken_at_ms as f64 / 1000.0;
            println!(
                "{}: rolled back to the consistent image of generation {} held when its resync began \
                 (Unix time {taken:.3}); {} bytes in {} journal entries written back{}. Every write since is given up.",
                args.volume.display(),
                rolled.image.generation,
                rolled.bytes,
                rolled.entries,
                if rolled.torn_tail {
                    "; the journal's last entries did not check out and were cut off as a torn append (a crash leaves their \
                     blocks not yet overwritten; damage within 4 MiB of the journal's end would look the same)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        None => {
            println!("{}: holds a consistent image already; nothing to roll back", args.volume.display());
            Ok(())
        }
    }
}
