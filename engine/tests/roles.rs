//! Roles as library services (issue 9, item 2): the copy role
//! ([`engine::copy_role::CopyRole`]) and the production role's mirroring
//! ([`engine::mirror_service::MirrorService`]) started and stopped 20 times
//! in one process leak nothing, and each stop frees the listening port and
//! the stores' locks at once, as a node that changes role at runtime needs.
//!
//! Real components throughout: a real copy role on a scratch volume, a real
//! replicator shipping to it over loopback TCP (initial sync, writes, acks),
//! a raw authenticated `CopyConnection` left open while the role stops, and
//! the mirroring service backing off from a copy host that is not there.
//! The process's open descriptors (`/proc/self/fd`), threads
//! (`/proc/self/task`) and resident memory (`VmRSS`) after each round are
//! compared with those after a first warm-up round.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::copy_role::{CopyListen, CopyRole, CopyRoleConfig};
use engine::metadata::{load_metadata, MetadataFiles};
use engine::mirror_service::{MirrorService, MirrorServiceConfig};
use engine::protocol::Secret;
use engine::replicator::connect::CopyConnection;
use engine::replicator::{Change, Completions, CopyConfig, CopyState, MirrorMode, Shipped};
use engine::{Volume, VolumeOptions};

const VOLUME_BYTES: u64 = 4 << 20;
const REGION_BYTES: u64 = 64 << 10;
const WRITES_PER_ROUND: u64 = 8;
const ROUNDS: usize = 20;
/// Resident memory may grow this much over the rounds (allocator caches,
/// lazily mapped pages): a leak of a volume's worth per round exceeds it.
const RSS_GROWTH_KIB_MAX: u64 = 16 << 10;
const WAIT_MAX: Duration = Duration::from_secs(20);

fn secret() -> Secret {
    Secret::from_bytes(b"roles leak test secret, 32 bytes".to_vec()).expect("32 bytes make a secret")
}

/// What the process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holdings {
    descriptors: usize,
    threads: usize,
    rss_kib: u64,
}

fn holdings() -> Holdings {
    let count = |directory: &str| std::fs::read_dir(directory).expect(directory).count();
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    // The read_dir of /proc/self/fd holds one descriptor itself while it counts.
    Holdings { descriptors: count("/proc/self/fd") - 1, threads: count("/proc/self/task"), rss_kib }
}

/// The holdings once they are back to `baseline` (a joined thread leaves
/// /proc/self/task a moment after its join returns), or as they are after
/// a second.
fn settled(baseline: Holdings) -> Holdings {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let now = holdings();
        let back = now.descriptors <= baseline.descriptors && now.threads <= baseline.threads;
        if back || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether another open of `path` can take its exclusive lock now.
fn lock_is_free(path: &Path) -> bool {
    let file = File::options().read(true).write(true).open(path).expect("open to test the lock");
    // SAFETY: flock only reads the descriptor number; `file` keeps it open
    // for the call (and the lock taken goes with it when it closes).
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

struct Scratch {
    _directory: tempfile::TempDir,
    production: PathBuf,
    copy: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let directory = tempfile::tempdir_in("/var/tmp").expect("a scratch directory");
        let production = directory.path().join("production.img");
        let copy = directory.path().join("copy.img");
        Scratch { production, copy, _directory: directory }
    }

    fn copy_role(&self, listen: CopyListen) -> CopyRole {
        let config = CopyRoleConfig {
            volume: VolumeOptions {
                path: self.copy.clone(),
                size: Some(VOLUME_BYTES),
                direct: false,
                read_only: false,
            },
            metadata_dir: None,
            listen,
            secret: secret(),
            dr_image_max: None,
        };
        CopyRole::start(config).expect("the copy role starts")
    }

    fn production_volume(&self) -> Arc<Volume> {
        let options =
            VolumeOptions { path: self.production.clone(), size: Some(VOLUME_BYTES), direct: false, read_only: false };
        Arc::new(Volume::open(&options).expect("the production volume opens"))
    }

    fn mirror_service(&self, volume: &Arc<Volume>, copy: SocketAddr, epoch: u64) -> MirrorService {
        let config = MirrorServiceConfig {
            volume: volume.clone(),
            files: MetadataFiles::beside(&self.production),
            copies: vec![CopyConfig {
                name: "east".to_string(),
                address: Some(copy),
                mode: MirrorMode::Sync,
                lag_bytes_max: 64 << 20,
                lag_ms_max: 0,
                compress: engine::protocol::Compression::None,
            }],
            secret: secret(),
            epoch,
            region_bytes: Some(REGION_BYTES),
            activity_log_bytes: engine::activity_log::ACTIVITY_LOG_BYTES_DEFAULT,
            resync_rate_max: 0,
            resync_checksums: false,
            assume_clean: false,
            new_store: false,
            local_sync_interval: Duration::from_millis(10),
            source_address: None,
            bitmap_trust: engine::replicator::BitmapTrust::Always,
            state_store: None,
            generation: None,
        };
        MirrorService::start(config).expect("mirroring starts")
    }
}

/// The mirroring service ships to the copy role: the copy is synced, then
/// takes sync writes, each answered only after the copy acknowledged it.
/// Each round mirrors at a higher fencing epoch, which the copy promises.
fn mirror_to_the_copy_role(scratch: &Scratch, copy: &CopyRole, round: usize) {
    let volume = scratch.production_volume();
    let epoch = round as u64 + 1;
    let service = scratch.mirror_service(&volume, copy.status().listen, epoch);
    wait_until("the copy to be up to date", || service.status().copies[0].state == CopyState::UpToDate);
    let replicator = service.replicator();
    let completions = Completions::new().expect("an eventfd");
    let file = File::options().write(true).open(&scratch.production).expect("the production store");
    let accepted_before = copy.status().write_bytes_accepted;
    let mut answers = Vec::new();
    for index in 0..WRITES_PER_ROUND {
        let offset = index * REGION_BYTES;
        let data = vec![(round as u8).wrapping_add(index as u8); REGION_BYTES as usize];
        replicator.begin_write(offset, REGION_BYTES).expect("the bitmap marks");
        file.write_all_at(&data, offset).expect("the local write");
        // A sync write is answered once its copy acknowledged it: later,
        // or at once when the ack beat the shipping call back.
        match replicator.ship(Change::Write { offset, data: &data, fua: false }, &completions, index) {
            Shipped::Done(result) => answers.push((index, result)),
            Shipped::Pending => {}
        }
    }
    let mut later = Vec::new();
    wait_until("every write's answer", || {
        completions.take(&mut later);
        answers.len() + later.len() == WRITES_PER_ROUND as usize
    });
    answers.extend(later);
    assert!(answers.iter().all(|(_, result)| *result == 0), "every write succeeds: {answers:?}");
    assert!(copy.status().write_bytes_accepted >= accepted_before + WRITES_PER_ROUND * REGION_BYTES);
    assert_eq!(copy.status().epoch_promised, epoch, "the copy promised the epoch the service was started with");
    drop(replicator);
    service.stop();
}

/// An authenticated production connection is open when the role stops: the
/// stop ends its session and joins its threads.
fn hold_a_session_open_across_stop(scratch: &Scratch, copy: CopyRole) {
    let files = MetadataFiles::beside(&scratch.production);
    let identity = load_metadata(&files.metadata).unwrap().and_then(|metadata| metadata.identity).unwrap();
    // At the epoch the copy promised last (an older one is refused).
    let epoch = copy.status().epoch_promised;
    let connection = CopyConnection::connect_from(
        copy.status().listen,
        None,
        epoch,
        &secret(),
        identity,
        Duration::from_secs(5),
        WAIT_MAX,
    )
    .expect("the copy role authenticates the production host");
    wait_until("the session to be established", || copy.status().production.is_some());
    copy.stop().expect("the copy role stops with a session open");
    drop(connection);
}

/// The mirroring service with no copy host to reach: its link backs off
/// until the stop.
fn mirror_to_nobody(scratch: &Scratch, copy: SocketAddr) {
    let volume = scratch.production_volume();
    let service = scratch.mirror_service(&volume, copy, 1);
    wait_until("the link to fail to connect", || service.status().copies[0].last_error.is_some());
    service.stop();
}

/// Each stop releases the port and the locks at once.
fn assert_released(scratch: &Scratch, copy: SocketAddr) {
    drop(TcpListener::bind(copy).expect("the copy role's port is free right after stop"));
    assert!(lock_is_free(&scratch.copy), "the copy store's lock is free right after stop");
    let bitmap = MetadataFiles::beside(&scratch.production).bitmap;
    assert!(lock_is_free(&bitmap), "the bitmap's lock is free right after stop");
}

/// Proves: starting and stopping each role 20 times in one process leaks no
/// descriptor, no thread and no memory, and frees the port and the locks.
#[test]
fn starting_and_stopping_each_role_repeatedly_leaks_nothing() {
    let scratch = Scratch::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let copy_address = listener.local_addr().unwrap();
    let copy = scratch.copy_role(CopyListen::Listener(listener));
    // The warm-up round: lazily made process state (the allocator's arenas,
    // thread-local buffers) exists before the baseline is taken.
    mirror_to_the_copy_role(&scratch, &copy, 0);
    copy.stop().unwrap();
    let baseline = settled(holdings());
    assert_released(&scratch, copy_address);
    let mut peak = baseline;
    for round in 1..=ROUNDS {
        match round % 3 {
            0 => mirror_to_nobody(&scratch, copy_address),
            1 => {
                let copy = scratch.copy_role(CopyListen::Address(copy_address));
                mirror_to_the_copy_role(&scratch, &copy, round);
                copy.stop().unwrap();
            }
            _ => hold_a_session_open_across_stop(&scratch, scratch.copy_role(CopyListen::Address(copy_address))),
        }
        let now = settled(baseline);
        eprintln!("round {round}: {now:?} (baseline {baseline:?})");
        assert!(
            now.descriptors <= baseline.descriptors,
            "round {round} leaked descriptors: {now:?}, baseline {baseline:?}"
        );
        assert!(now.threads <= baseline.threads, "round {round} leaked threads: {now:?}, baseline {baseline:?}");
        assert_released(&scratch, copy_address);
        peak.rss_kib = peak.rss_kib.max(now.rss_kib);
    }
    assert!(
        peak.rss_kib <= baseline.rss_kib + RSS_GROWTH_KIB_MAX,
        "resident memory grew from {} KiB to {} KiB over {ROUNDS} rounds",
        baseline.rss_kib,
        peak.rss_kib
    );
}
