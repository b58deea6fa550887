//! An unauthenticated client cannot keep the real production host out of a
//! copy host, nor fill its log: while a hostile client holds many idle
//! connections to the replication port and re-opens each one the copy host
//! closes, a restarted `crossmirror serve --mirror` connects within a few
//! seconds, and the copy host's log stays small.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use system_tests::{free_port, wait_until, write_secret, CopyHost, Process, Scratch};

/// Connections the hostile client holds open: more than the copy host's
/// table of handshakes.
const HOSTILE_CONNECTIONS: usize = 48;
/// How soon the restarted production host must be connected.
const CONNECT_BOUND: Duration = Duration::from_secs(5);
/// Lines the copy host may log during the whole test (it logged tens of
/// thousands before its lines were rate-limited).
const LOG_LINES_MAX: usize = 150;

/// The copy host's `GET /status`.
fn copy_status(admin: SocketAddr) -> serde_json::Value {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).expect("connect to the admin endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /status HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|error| panic!("status {answer:?}: {error}"))
}

/// Whether the copy host has an authenticated production session.
fn production_connected(admin: SocketAddr) -> bool {
    !copy_status(admin)["production"].is_null()
}

/// Hold `HOSTILE_CONNECTIONS` idle connections to `target`, re-opening each
/// one as soon as it is closed, until `stop`; counts the connections opened.
fn hostile_client(target: SocketAddr, stop: Arc<AtomicBool>, opened: Arc<AtomicU64>) {
    let open = || {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok()?;
        stream.set_nonblocking(true).ok()?;
        opened.fetch_add(1, Ordering::Relaxed);
        Some(stream)
    };
    let mut streams: Vec<Option<TcpStream>> = (0..HOSTILE_CONNECTIONS).map(|_| open()).collect();
    let mut sink = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        for slot in &mut streams {
            let closed = match slot {
                None => true,
                Some(stream) => match stream.read(&mut sink) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(error) => error.kind() != ErrorKind::WouldBlock,
                },
            };
            if closed {
                *slot = open();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A production host restarted while a hostile client floods its copy host
/// with idle connections is connected within CONNECT_BOUND, and the copy
/// host logs fewer than LOG_LINES_MAX lines in all.
#[test]
fn idle_connections_do_not_keep_the_production_host_out() {
    let scratch = Scratch::new("replication-flood");
    let secret_path = write_secret(&scratch, "secret", 5);
    let copy_host = CopyHost::start(&scratch, "127.0.0.2", &scratch.join("copy.img"), "8M", &secret_path, &[]);
    let (copy, copy_address, copy_admin) = (copy_host.process, copy_host.address, copy_host.admin);
    let secret = secret_path.display().to_string();

    let volume = scratch.join("production.img").display().to_string();
    let mirror = format!("copy={copy_address}");
    let production_admin = format!("127.0.0.1:{}", free_port());
    let production_args = [
        "--volume",
        &volume,
        "--size",
        "8M",
        "--secret-file",
        &secret,
        "--mirror",
        &mirror,
        "--admin",
        &production_admin,
    ];
    let mut production = Process::serve(&scratch, &production_args);
    let connected = wait_until(Duration::from_secs(10), || production_connected(copy_admin));
    assert!(connected, "the production host never connected:\n{}\n{}", production.log(), copy.log());
    assert!(production.stop_with(libc::SIGTERM).success(), "{}", production.log());
    assert!(wait_until(Duration::from_secs(10), || !production_connected(copy_admin)), "{}", copy.log());

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let attacker = {
        let (stop, opened) = (stop.clone(), opened.clone());
        std::thread::spawn(move || hostile_client(copy_address, stop, opened))
    };
    std::thread::sleep(Duration::from_millis(1500));

    let restarted = Instant::now();
    let production = Process::serve(&scratch, &production_args);
    let connected = wait_until(CONNECT_BOUND, || production_connected(copy_admin));
    let took = restarted.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();
    let log = copy.log();
    let lines = log.lines().count();
    let opened = opened.load(Ordering::Relaxed);
    assert!(
        connected,
        "the restarted production host was not connected within {CONNECT_BOUND:?} while a client held \
         {HOSTILE_CONNECTIONS} idle connections ({opened} opened):\n{}\n{log}",
        production.log()
    );
    assert!(
        lines < LOG_LINES_MAX,
        "the copy host logged {lines} lines while a client opened {opened} idle connections:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("connected after {took:?}; {opened} hostile connections opened; the copy host logged {lines} lines");
}
