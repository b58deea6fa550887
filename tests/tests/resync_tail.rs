//! Resync reaches the very end of the volume: real processes (a production
//! host and a copy host), a volume whose size is not a multiple of the
//! bitmap's region size, its last block written while the copy is away, and
//! the stores compared byte for byte after the copy is resynced.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use system_tests::{binary, free_port, require_tool, run, wait_until, write_secret, Process, Scratch};

/// 16 MiB and 12 KiB: the last 256 KiB region is a 12 KiB stub.
const SIZE_BYTES: u64 = (16 << 20) + (12 << 10);
const BLOCK: u64 = 4096;
const PATTERN: u8 = 0xd7;

struct Hosts {
    scratch: Scratch,
    secret: PathBuf,
    production_volume: PathBuf,
    copy_volume: PathBuf,
    copy_address: SocketAddr,
    admin: SocketAddr,
    production: Option<Process>,
    copy: Option<Process>,
}

impl Hosts {
    fn start(label: &str) -> Hosts {
        let scratch = Scratch::new(label);
        let secret = write_secret(&scratch, "secret", 11);
        let mut hosts = Hosts {
            production_volume: scratch.join("production.img"),
            copy_volume: scratch.join("copy.img"),
            copy_address: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            admin: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            secret,
            production: None,
            copy: None,
            scratch,
        };
        hosts.start_copy();
        let size = SIZE_BYTES.to_string();
        let volume = hosts.production_volume.display().to_string();
        let secret = hosts.secret.display().to_string();
        let admin = hosts.admin.to_string();
        let mirror = format!("east={}", hosts.copy_address);
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen = address.to_string();
        let args = [
            "serve",
            "--volume",
            &volume,
            "--size",
            &size,
            "--secret-file",
            &secret,
            "--admin",
            &admin,
            "--mirror",
            &mirror,
            "--listen",
            &listen,
        ];
        hosts.production = Some(Process::start(&hosts.scratch, &args, address));
        hosts
    }

    fn start_copy(&mut self) {
        let size = SIZE_BYTES.to_string();
        let volume = self.copy_volume.display().to_string();
        let secret = self.secret.display().to_string();
        let listen = self.copy_address.to_string();
        let args = ["copy-host", "--volume", &volume, "--size", &size, "--listen", &listen, "--secret-file", &secret];
        self.copy = Some(Process::start(&self.scratch, &args, self.copy_address));
    }

    fn copy_status(&self) -> serde_json::Value {
        let admin = self.admin.to_string();
        let text = run(binary().to_str().unwrap(), &["status", "--admin", &admin, "--json"]);
        let status: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|error| panic!("status is not JSON ({error}):\n{text}"));
        status["copies"][0].clone()
    }

    fn wait_for(&self, what: &str, condition: impl Fn(&serde_json::Value) -> bool) {
        let held = wait_until(Duration::from_secs(60), || condition(&self.copy_status()));
        assert!(held, "the copy never got {what}: {}\n{}", self.copy_status(), self.logs());
    }

    fn logs(&self) -> String {
        let production = self.production.as_ref().map(Process::log).unwrap_or_default();
        let copy = self.copy.as_ref().map(Process::log).unwrap_or_default();
        format!("--- production log:\n{production}\n--- copy log:\n{copy}")
    }
}

/// Proves resync covers the last byte of the volume: the last block of a
/// volume whose size is not a multiple of the region size is written while
/// the copy is away; after the resync both stores are identical, the last
/// block included. Fails if resync stops one byte short of the end.
#[test]
fn the_last_block_written_while_the_copy_was_away_reaches_it() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut hosts = Hosts::start("resync-tail");
    hosts.wait_for("up to date", |copy| copy["state"] == "up_to_date");
    hosts.copy.as_mut().unwrap().stop_with(libc::SIGKILL);
    hosts.wait_for("stale", |copy| copy["state"] == "stale");

    let uri = hosts.production.as_ref().unwrap().uri();
    let command = format!("write -P {PATTERN:#04x} {} {BLOCK}", SIZE_BYTES - BLOCK);
    run("qemu-io", &["-f", "raw", "-c", &command, &uri]);
    let production = std::fs::read(&hosts.production_volume).unwrap();
    assert_eq!(production.len() as u64, SIZE_BYTES);
    assert!(production[(SIZE_BYTES - BLOCK) as usize..].iter().all(|byte| *byte == PATTERN), "the write landed");

    hosts.start_copy();
    hosts.wait_for("up to date after the resync", |copy| {
        copy["state"] == "up_to_date" && copy["dirty_bytes"] == 0 && copy["lag_bytes"] == 0
    });
    let logs = hosts.logs();
    for process in [hosts.production.as_mut(), hosts.copy.as_mut()].into_iter().flatten() {
        let status = process.stop_with(libc::SIGTERM);
        assert!(status.success(), "a host exited with {status}:\n{logs}");
    }
    let production = std::fs::read(&hosts.production_volume).unwrap();
    let copy = std::fs::read(&hosts.copy_volume).unwrap();
    assert_eq!(copy.len(), production.len(), "the stores differ in size");
    let differing: Vec<usize> = (0..copy.len()).filter(|index| copy[*index] != production[*index]).collect();
    assert!(
        differing.is_empty(),
        "the copy differs from the production volume in {} bytes, the first at {} and the last at {} \
         (the volume ends at {SIZE_BYTES}): the resync did not reach the end of the volume\n{logs}",
        differing.len(),
        differing[0],
        differing[differing.len() - 1]
    );
}
