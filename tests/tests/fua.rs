//! FUA reaches the disk, seen by the kernel: the production host's ring and
//! both copy-host write paths (the `--direct` ring, the buffered pwritev2)
//! must turn FUA into RWF_DSYNC. A process kill keeps the page cache, so no
//! kill test can tell; a power cut can, and what a power cut keeps is what
//! the device was told to make durable. The volume here is a loop device,
//! and the kernel counts every flush request the device receives (field 16
//! of `/sys/block/loopN/stat`): a write with RWF_DSYNC to a block device
//! becomes a FUA write, which the loop driver (write cache on, no native
//! FUA) receives as a flush; a write without it sends none. Each test writes
//! once to warm up, then once without FUA (no flush may follow: this proves
//! nothing else flushes the device meanwhile) and once with FUA (a flush
//! must have reached the device before the answer).
//!
//! The production host runs with no copy, so no fsync of its own (the
//! clearing rule's) can flush the device. The copy host is driven by this
//! test as its production host (the real handshake through
//! `engine::replicator::connect::CopyConnection`), so no periodic Flush
//! frame is sent either.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use engine::protocol::auth::VolumeIdentity;
use engine::protocol::frame::FrameHeader;
use engine::protocol::{load_secret, FrameDecoder, FrameFlags, FrameKind};
use engine::replicator::connect::CopyConnection;
use system_tests::{free_port, require_root, require_tool, write_secret, LoopDevice, Process, Scratch};

const DEVICE_BYTES: u64 = 64 << 20;
const BLOCK: usize = 4096;

/// A loop device over a scratch file, detached on drop. (A copy host on it
/// keeps its metadata in a --metadata-dir inside the scratch directory.)
struct Device {
    device: LoopDevice,
    scratch: Scratch,
}

impl Device {
    fn new(label: &str) -> Device {
        let scratch = Scratch::new(label);
        let backing = scratch.join("backing.img");
        std::fs::File::create(&backing).unwrap().set_len(DEVICE_BYTES).unwrap();
        let device = LoopDevice::attach(&backing, false);
        Device { device, scratch }
    }

    fn path(&self) -> &str {
        &self.device.path
    }

    /// Flush requests the device has completed so far.
    fn flushes(&self) -> u64 {
        flushes(&self.device.path)
    }
}

/// Field 16 of /sys/block/<name>/stat: flush requests completed.
fn flushes(device: &str) -> u64 {
    let name = Path::new(device).file_name().unwrap().to_str().unwrap();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    let fields: Vec<u64> = stat.split_whitespace().map(|field| field.parse().unwrap()).collect();
    assert!(fields.len() >= 17, "this kernel does not count flushes in /sys/block/{name}/stat: {stat}");
    fields[15]
}

fn tools() -> bool {
    require_root() && require_tool("losetup") && require_tool("/usr/bin/python3")
}

/// The production host serves `device`; a libnbd client writes once plainly
/// and once with FUA, reading the device's flush count around each; the
/// three counts.
fn production_flushes(label: &str, direct: bool) -> (u64, u64, u64) {
    let device = Device::new(label);
    let mut args = vec!["--volume", device.path()];
    if direct {
        args.push("--direct");
    }
    let production = Process::serve(&device.scratch, &args);
    let script = format!(
        "import nbd\n\
         def flushes():\n    return int(open('/sys/block/{name}/stat').read().split()[15])\n\
         h = nbd.NBD()\nh.connect_uri({uri:?})\n\
         h.pwrite(b'\\x33' * {BLOCK}, {BLOCK} * 4)\n\
         before = flushes()\n\
         h.pwrite(b'\\x11' * {BLOCK}, 0)\n\
         plain = flushes()\n\
         h.pwrite(b'\\x22' * {BLOCK}, {BLOCK} * 2, nbd.CMD_FLAG_FUA)\n\
         fua = flushes()\n\
         print(before, plain, fua)\n\
         h.shutdown()\n",
        name = Path::new(device.path()).file_name().unwrap().to_str().unwrap(),
        uri = production.uri(),
    );
    let output = system_tests::run_output("/usr/bin/python3", &["-c", &script]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the client failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        production.log()
    );
    let counts: Vec<u64> = text.split_whitespace().map(|count| count.parse().unwrap()).collect();
    (counts[0], counts[1], counts[2])
}

/// Proves an NBD write with FUA on a buffered volume is durable before its
/// reply: the production ring sets RWF_DSYNC, so the device gets a flush.
#[test]
fn production_fua_write_flushes_the_device() {
    if !tools() {
        return;
    }
    let (before, plain, fua) = production_flushes("fua-production", false);
    assert_eq!(plain, before, "a plain write must not flush: something else flushes this device");
    assert!(
        fua > plain,
        "the FUA write was answered without any flush reaching the device (flushes {plain} -> {fua}): \
         RWF_DSYNC is not set on the production ring"
    );
}

/// Proves the same on an O_DIRECT volume (`serve --direct`): a direct write
/// bypasses the page cache but not the device's write cache.
#[test]
fn production_fua_write_flushes_the_device_with_direct() {
    if !tools() {
        return;
    }
    let (before, plain, fua) = production_flushes("fua-production-direct", true);
    assert_eq!(plain, before, "a plain O_DIRECT write must not flush: something else flushes this device");
    assert!(
        fua > plain,
        "the FUA write was answered without any flush reaching the device (flushes {plain} -> {fua}): \
         RWF_DSYNC is not set on the production ring"
    );
}

/// This test as a copy host's production host: one Write frame at a time,
/// each waited for until acknowledged.
struct Feeder {
    connection: CopyConnection,
    decoder: FrameDecoder,
}

impl Feeder {
    fn connect(address: SocketAddr, secret: &Path) -> Feeder {
        let secret = load_secret(secret).unwrap();
        let identity = VolumeIdentity { uuid: *b"fua test volume!", size_bytes: DEVICE_BYTES };
        let connection =
            CopyConnection::connect(address, &secret, identity, Duration::from_secs(10), Duration::from_secs(10))
                .unwrap_or_else(|error| panic!("cannot connect to the copy host: {error}"));
        connection.stream().set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Feeder { connection, decoder: FrameDecoder::new() }
    }

    /// Send one Write frame and wait for its acknowledgement.
    fn write(&mut self, offset: u64, fill: u8, flags: FrameFlags) {
        let mut header: FrameHeader = self.connection.header(FrameKind::Write, flags, 1, 1);
        header.offset = offset;
        header.length = BLOCK as u32;
        header.payload_len = BLOCK as u32;
        self.connection.send(&header, &[fill; BLOCK]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(frame) = self.decoder.pop().unwrap() {
                assert_eq!(frame.header.kind, FrameKind::WriteAck, "the copy answered {frame:?}");
                assert_eq!(frame.header.sequence, header.sequence);
                return;
            }
            assert!(Instant::now() < deadline, "no acknowledgement for the write at {offset}");
            match self.connection.stream().read(&mut buffer) {
                Ok(0) => panic!("the copy host closed the connection"),
                Ok(received) => self.decoder.push(&buffer[..received]).unwrap(),
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(error) => panic!("reading the acknowledgement: {error}"),
            }
        }
    }
}

/// The copy host stores on `device`; a plain and a FUA Write frame; the
/// device's flush count before, after the plain one's ack, after the FUA
/// one's ack.
fn copy_host_flushes(label: &str, direct: bool) -> (u64, u64, u64) {
    let device = Device::new(label);
    let secret = write_secret(&device.scratch, "secret", 5);
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = address.to_string();
    let secret_path = secret.display().to_string();
    let metadata_dir = device.scratch.join("metadata").display().to_string();
    let mut args = vec![
        "copy-host",
        "--volume",
        device.path(),
        "--listen",
        &listen,
        "--secret-file",
        &secret_path,
        "--metadata-dir",
        &metadata_dir,
    ];
    if direct {
        args.push("--direct");
    }
    let copy = Process::start(&device.scratch, &args, address);
    let mut feeder = Feeder::connect(address, &secret);
    // The first frame may make the copy persist its promises (epoch,
    // generation); measure from the second on.
    feeder.write(4 * BLOCK as u64, 0x33, FrameFlags::NONE);
    let before = device.flushes();
    feeder.write(0, 0x11, FrameFlags::NONE);
    let plain = device.flushes();
    feeder.write(2 * BLOCK as u64, 0x22, FrameFlags::FUA);
    let fua = device.flushes();
    drop(feeder);
    drop(copy);
    (before, plain, fua)
}

/// Proves a copy host with `--direct` makes a FUA write durable before its
/// ack: the applier's ring sets RWF_DSYNC, so the device gets a flush.
#[test]
fn direct_copy_host_fua_write_flushes_the_device() {
    if !tools() {
        return;
    }
    let (before, plain, fua) = copy_host_flushes("fua-copy-direct", true);
    assert_eq!(plain, before, "a plain write must not flush: something else flushes this device");
    assert!(
        fua > plain,
        "the FUA write was acknowledged without any flush reaching the device (flushes {plain} -> {fua}): \
         RWF_DSYNC is not set on the --direct copy host's ring"
    );
}

/// Proves the same for a buffered copy host, whose writes are pwritev2 calls.
#[test]
fn buffered_copy_host_fua_write_flushes_the_device() {
    if !tools() {
        return;
    }
    let (before, plain, fua) = copy_host_flushes("fua-copy-buffered", false);
    assert_eq!(plain, before, "a plain write must not flush: something else flushes this device");
    assert!(
        fua > plain,
        "the FUA write was acknowledged without any flush reaching the device (flushes {plain} -> {fua}): \
         RWF_DSYNC is not set on the buffered copy host's pwritev2"
    );
}
