//! The production role's mirroring as a library service: everything between
//! an open production volume and a running [`Replicator`]. [`MirrorService::start`]
//! proves the store is the one the volume's metadata was made for (or takes
//! it as a new store), opens the write-intent bitmap (a new one with every
//! bit set), loads the mirror state and starts one link per copy, with the
//! fencing epoch the caller passes; [`MirrorService::stop`] stops the links,
//! writes the bitmap out clean and lets go of it, so the same volume can be
//! mirrored again in the same process.
//!
//! ```text
//!  tools: serve / node ─▶ Volume::open ─▶ MirrorService::start ─▶ Arc<Replicator> ─▶ nbd_frontend::Server (Export.changes)
//!                                          (metadata, bitmap, state, links)       └▶ admin endpoint (status, verify)
//!  stop:  Server stops ─▶ MirrorService::stop (links joined, bitmap closed clean) ─▶ last holder drops: flock released
//! ```
//!
//! The NBD server is a service of its own; a production role is the two
//! composed, and a node that changes role starts and stops them at runtime.
//! Nothing here installs a signal handler or keeps process-wide state.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::activity_log;
use crate::bitmap::{
    recorded_region_bytes, region_bytes_for, BitmapError, NewBits, Opened, WriteIntentBitmap, SLOTS_MAX,
};
use crate::fingerprint::{fingerprint, Fingerprint};
use crate::metadata::{adopt_store, production_start, MetadataError, MetadataFiles, ProductionStart};
use crate::protocol::auth::StoreToken;
use crate::protocol::Secret;
use crate::replicator::{
    BitmapTrust, CopyConfig, CopyStatus, LocalStateFile, MirrorStateStore, Replicator, ReplicatorConfig, StartError,
};
use crate::volume::Volume;

/// Everything the mirroring of a production volume needs.
#[derive(Debug)]
pub struct MirrorServiceConfig {
    /// The production volume, open read-write (the NBD server shares it).
    pub volume: Arc<Volume>,
    /// Where the volume's metadata, bitmap and mirror state live.
    pub files: MetadataFiles,
    /// The copies, at most [`SLOTS_MAX`].
    pub copies: Vec<CopyConfig>,
    /// The secret shared with every copy host.
    pub secret: Secret,
    /// The fencing epoch every frame carries; a copy refuses frames of an
    /// epoch older than one it promised (`serve` passes 1).
    pub epoch: u64,
    /// Bytes per bitmap bit, for a bitmap created now (an existing one must
    /// have this region size); `None`: an existing bitmap's, else
    /// [`region_bytes_for`] the volume's size.
    pub region_bytes: Option<u64>,
    /// The bound on what a crash may leave to resync beyond the bitmap's
    /// durable bits: the activity log holds this many bytes' worth of
    /// extents ([`crate::activity_log::ACTIVITY_LOG_BYTES_DEFAULT`]); 0: no activity log, every
    /// new mark syncs the bitmap before its write is issued.
    pub activity_log_bytes: u64,
    /// Resync bytes per second per copy; 0 means unlimited.
    pub resync_rate_max: u64,
    /// Resync by checksum (send only the chunks that differ).
    pub resync_checksums: bool,
    /// Skip a copy's resync when both stores provably read as zeroes.
    pub assume_clean: bool,
    /// Take a store that is not the one the metadata was made for as the
    /// volume's data: every copy is resynced from it in full.
    pub new_store: bool,
    /// At most how often the local volume is fsynced so that bits can clear.
    pub local_sync_interval: Duration,
    /// Where the mirror state lives: `None` is the `.cmcopies` file of
    /// `files`; a group node passes its quorum-backed record.
    pub state_store: Option<Arc<dyn MirrorStateStore>>,
    /// The volume generation frames carry, when the caller keeps it (a
    /// group node: its record's); `None` is the metadata's.
    pub generation: Option<u64>,
    /// The address to connect to copy hosts from (a group member's own),
    /// so that they and any packet filter see which host connects; `None`:
    /// the system picks.
    pub source_address: Option<std::net::IpAddr>,
    /// How far the bitmap is trusted for each copy (a group node, whose
    /// production role moves between hosts: by generation).
    pub bitmap_trust: BitmapTrust,
}

/// What a running mirror service shows.
#[derive(Debug, Clone)]
pub struct MirrorServiceStatus {
    /// Every copy's status, in configuration order.
    pub copies: Vec<CopyStatus>,
    /// Why the local store failed, once a flush of it has.
    pub local_failure: Option<String>,
    /// The bitmap's region size in bytes.
    pub region_bytes: u64,
    /// The fencing epoch the frames carry.
    pub epoch: u64,
}

/// Why mirroring could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorServiceError {
    /// The volume's metadata could not be read or written, or refuses the store.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The store's fingerprint could not be taken.
    #[error("cannot fingerprint the store {path}: {source}")]
    Fingerprint {
        /// The store.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The bitmap could not be opened, created or flushed (another process
    /// holding it is one of its kinds).
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// The replicator could not start.
    #[error(transparent)]
    Replicator(#[from] StartError),
    /// Another process holds the store (a copy host applying to it, or
    /// another production host serving it).
    #[error("volume {path} is in use by another process (a copy host or another production host); stop it first")]
    Locked {
        /// The store.
        path: PathBuf,
    },
    /// The store's lock could not be taken.
    #[error("cannot lock volume {path}: {source}")]
    Lock {
        /// The store.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// Mirroring of one production volume to its copies, running.
pub struct MirrorService {
    replicator: Arc<Replicator>,
    volume: Arc<Volume>,
    epoch: u64,
    store_token: StoreToken,
    bitmap_path: PathBuf,
    stopped: bool,
}

impl MirrorService {
    /// Start mirroring `config.volume` to `config.copies`. Every copy is
    /// recorded stale durably before this returns.
    pub fn start(config: MirrorServiceConfig) -> Result<MirrorService, MirrorServiceError> {
        assert!(
            config.copies.len() <= SLOTS_MAX as usize,
            "at most {SLOTS_MAX} copies; callers check the configuration"
        );
        let path = config.volume.path();
        // Before anything is read or written: no other process may hold the
        // store (a copy host applying to it would share its .cmmeta).
        match config.volume.try_lock_exclusive() {
            Ok(true) => {}
            Ok(false) => return Err(MirrorServiceError::Locked { path: path.to_path_buf() }),
            Err(source) => return Err(MirrorServiceError::Lock { path: path.to_path_buf(), source }),
        }
        let files = &config.files;
        files.create_directory()?;
        let store_fingerprint =
            fingerprint(path).map_err(|source| MirrorServiceError::Fingerprint { path: path.to_path_buf(), source })?;
        let mut start = production_start(files, config.volume.size(), &store_fingerprint, config.new_store)?;
        let bitmap = open_bitmap(&config)?;
        if start.store_replaced {
            start.store_token = take_new_store(&config, &bitmap, &store_fingerprint)?;
        }
        let epoch = config.epoch;
        let volume = config.volume.clone();
        let bitmap_path = config.files.bitmap.clone();
        let store_token = start.store_token;
        let replicator = start_replicator(config, bitmap, start)?;
        Ok(MirrorService { replicator, volume, epoch, store_token, bitmap_path, stopped: false })
    }

    /// The production store's token (its `.cmmeta`): the store a copy
    /// host offers when this store is mirrored to from elsewhere later.
    pub fn store_token(&self) -> StoreToken {
        self.store_token
    }

    /// The replicator, for the NBD export and the admin endpoint. Let go of
    /// every clone before [`MirrorService::stop`] to have the bitmap's lock
    /// released by it.
    pub fn replicator(&self) -> Arc<Replicator> {
        self.replicator.clone()
    }

    /// The volume mirrored.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Every copy's state, the local store's health, the bitmap geometry.
    pub fn status(&self) -> MirrorServiceStatus {
        MirrorServiceStatus {
            copies: self.replicator.status(),
            local_failure: self.replicator.local_failure(),
            region_bytes: self.replicator.region_bytes(),
            epoch: self.epoch,
        }
    }

    /// Stop mirroring: every link's connection closes and its thread is
    /// joined, queued changes are dropped (their copies are recorded stale
    /// already), the bitmap is written out clean. The bitmap file and its
    /// lock are released when the last holder of the replicator lets go:
    /// by this call when the NBD server holding it was stopped first and
    /// other holders keep only a `Weak` (a holder left is logged; the next
    /// start on the volume would find the bitmap busy until it lets go).
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.replicator.stop();
        let holders = Arc::strong_count(&self.replicator) - 1;
        if holders > 0 {
            tracing::info!(
                holders,
                "mirroring stopped; the bitmap {} stays locked until {holders} other holder(s) of the replicator let go",
                self.bitmap_path.display()
            );
        }
    }
}

impl Drop for MirrorService {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Open the bitmap, or create it with every bit set: a new bitmap says every
/// copy differs everywhere, so one that went missing never comes back as
/// "nothing to resync" (invariant 9). Say how it was found.
fn open_bitmap(config: &MirrorServiceConfig) -> Result<WriteIntentBitmap, BitmapError> {
    let files = &config.files;
    let volume_size = config.volume.size();
    let region_bytes = config
        .region_bytes
        .or_else(|| recorded_region_bytes(&files.bitmap))
        .unwrap_or_else(|| region_bytes_for(volume_size));
    let mut bitmap =
        WriteIntentBitmap::open_or_create_with(&files.bitmap, volume_size, region_bytes, SLOTS_MAX, NewBits::Set)?;
    let (extent_bytes, capacity) = activity_log::geometry_for(config.activity_log_bytes, volume_size, region_bytes);
    bitmap.attach_activity_log(&files.activity_log, extent_bytes, capacity)?;
    match bitmap.opened() {
        Opened::Created if !files.state.exists() => {}
        Opened::Created => tracing::warn!(
            bitmap = %files.bitmap.display(),
            "the bitmap {} was missing: every copy gets a full resync",
            files.bitmap.display()
        ),
        Opened::Damaged => tracing::error!(
            bitmap = %files.bitmap.display(),
            "the bitmap {} was damaged while stopped: every copy gets a full resync",
            files.bitmap.display()
        ),
        Opened::Clean | Opened::AfterCrash => {}
    }
    Ok(bitmap)
}

/// `--new-store`: the store is taken as the volume's data; every copy's
/// bits are set durably before the store's fingerprint is recorded (with a
/// new store token, returned).
fn take_new_store(
    config: &MirrorServiceConfig,
    bitmap: &WriteIntentBitmap,
    store_fingerprint: &Fingerprint,
) -> Result<StoreToken, MirrorServiceError> {
    let path = config.volume.path();
    tracing::warn!(
        volume = %path.display(),
        "--new-store: {} is taken as the volume's data ({}); every copy gets a full resync",
        path.display(),
        store_fingerprint.description
    );
    for slot in 0..bitmap.slots() {
        bitmap.set_all(slot);
    }
    bitmap.flush()?;
    Ok(adopt_store(&config.files, store_fingerprint)?)
}

/// Load the mirror state and start one link per copy.
fn start_replicator(
    config: MirrorServiceConfig,
    bitmap: WriteIntentBitmap,
    start: ProductionStart,
) -> Result<Arc<Replicator>, MirrorServiceError> {
    let store = match config.state_store {
        Some(store) => store,
        None => Arc::new(LocalStateFile::at(&config.files.state)),
    };
    let replicator_config = ReplicatorConfig {
        copies: config.copies.clone(),
        secret: config.secret,
        identity: start.identity,
        generation: config.generation.unwrap_or(start.generation),
        epoch: config.epoch,
        resync_rate_max: config.resync_rate_max,
        resync_checksums: config.resync_checksums,
        assume_clean: config.assume_clean,
        metadata_path: Some(config.files.metadata.clone()),
        local_sync_interval: config.local_sync_interval,
        source_address: config.source_address,
        bitmap_trust: config.bitmap_trust,
    };
    let replicator = Replicator::start(config.volume, Arc::new(bitmap), store, replicator_config)?;
    for copy in &config.copies {
        tracing::info!(copy = %copy.name, address = ?copy.address, mode = copy.mode.as_str(), "mirroring to copy {}", copy.name);
    }
    Ok(replicator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::BitmapErrorKind;
    use crate::replicator::{MirrorMode, LOCAL_SYNC_INTERVAL_DEFAULT};
    use crate::volume::VolumeOptions;

    fn config(volume: &Arc<Volume>, epoch: u64) -> MirrorServiceConfig {
        MirrorServiceConfig {
            volume: volume.clone(),
            files: MetadataFiles::beside(volume.path()),
            // Nothing listens on port 1: the link backs off until the stop.
            copies: vec![CopyConfig {
                name: "east".to_string(),
                address: Some("127.0.0.1:1".parse().unwrap()),
                mode: MirrorMode::Sync,
                lag_bytes_max: 1 << 20,
                lag_ms_max: 0,
                compress: crate::protocol::Compression::None,
            }],
            secret: Secret::from_bytes(b"mirror service unit test secret!".to_vec()).unwrap(),
            epoch,
            region_bytes: Some(64 << 10),
            activity_log_bytes: crate::activity_log::ACTIVITY_LOG_BYTES_DEFAULT,
            resync_rate_max: 0,
            resync_checksums: false,
            assume_clean: false,
            new_store: false,
            local_sync_interval: LOCAL_SYNC_INTERVAL_DEFAULT,
            source_address: None,
            state_store: None,
            generation: None,
            bitmap_trust: BitmapTrust::Always,
        }
    }

    /// A node changing role: while mirroring runs, a second start on the
    /// same volume is refused (its bitmap is busy); once stopped, the next
    /// start takes the epoch it is given.
    #[test]
    fn a_volume_is_mirrored_again_in_the_same_process_once_stopped() {
        let directory = tempfile::tempdir().unwrap();
        let options = VolumeOptions {
            path: directory.path().join("production.img"),
            size: Some(1 << 20),
            direct: false,
            read_only: false,
        };
        let volume = Arc::new(Volume::open(&options).unwrap());
        let first = MirrorService::start(config(&volume, 1)).unwrap();
        assert_eq!(first.status().epoch, 1);
        let refused = MirrorService::start(config(&volume, 1)).err().expect("the bitmap is held");
        assert!(
            matches!(&refused, MirrorServiceError::Bitmap(error) if error.kind() == BitmapErrorKind::Busy),
            "{refused:?}"
        );
        let elsewhere = Arc::new(Volume::open(&options).unwrap());
        let refused = MirrorService::start(config(&elsewhere, 1)).err().expect("the store is held");
        assert!(matches!(refused, MirrorServiceError::Locked { .. }), "{refused:?}");
        first.stop();
        let second = MirrorService::start(config(&volume, 7)).expect("the bitmap is free after stop");
        let status = second.status();
        assert_eq!(status.epoch, 7);
        assert_eq!(status.region_bytes, 64 << 10);
        assert_eq!(status.copies.len(), 1);
        assert_eq!(status.copies[0].name, "east");
        second.stop();
    }
}
