//! Command-line mistakes get one clear line that names the object and the
//! fix, and a failed start leaves nothing behind: a volume in a missing
//! directory, an address already in use (`--listen`, `--admin`), and the
//! same address forms accepted by every option that takes one.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use system_tests::{binary, free_port, run_output, wait_until, write_secret, Process, Scratch};

/// Run the binary with `args` and return its output; it must fail.
fn fails(args: &[&str]) -> String {
    let output: Output = run_output(binary().to_str().unwrap(), args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "crossmirror {args:?} succeeded:\n{stderr}");
    stderr
}

/// The error line (the last line of stderr, after any log lines).
fn error_line(stderr: &str) -> &str {
    let line = stderr.lines().rfind(|line| line.starts_with("crossmirror: error:")).unwrap_or_default();
    assert!(!line.is_empty(), "no error line in:\n{stderr}");
    line
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

/// A volume in a directory that does not exist: the error names the
/// directory and says it is missing, once, without the OS error twice.
#[test]
fn a_volume_in_a_missing_directory_names_the_directory() {
    let scratch = Scratch::new("cli-missing-directory");
    let directory = scratch.join("no/such/directory");
    let volume = text(&directory.join("volume.img"));
    let listen = format!("127.0.0.1:{}", free_port());
    let stderr = fails(&["serve", "--volume", &volume, "--size", "1M", "--listen", &listen]);
    let line = error_line(&stderr);
    assert!(line.contains(&format!("directory {} does not exist", directory.display())), "{line}");
    assert!(!line.contains("os error"), "the OS error is said in words already: {line}");
    assert!(!directory.exists());
}

/// `--listen` or `--admin` on an address in use: one line naming the
/// address and the option; the volume this start created is removed, so
/// the next start (with another size) is not refused over it.
#[test]
fn an_address_in_use_names_the_address_and_the_option_and_leaves_nothing() {
    let scratch = Scratch::new("cli-address-in-use");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_address = busy.local_addr().unwrap().to_string();
    let volume = scratch.join("volume.img");
    let volume_text = text(&volume);
    let secret = text(&write_secret(&scratch, "secret", 3));
    let free = format!("127.0.0.1:{}", free_port());
    let attempts: [(&str, Vec<&str>); 4] = [
        ("--listen", vec!["serve", "--volume", &volume_text, "--size", "1M", "--listen", &busy_address]),
        (
            "--admin",
            vec!["serve", "--volume", &volume_text, "--size", "1M", "--listen", &free, "--admin", &busy_address],
        ),
        (
            "--listen",
            vec![
                "copy-host",
                "--volume",
                &volume_text,
                "--size",
                "1M",
                "--secret-file",
                &secret,
                "--listen",
                &busy_address,
            ],
        ),
        (
            "--admin",
            vec![
                "copy-host",
                "--volume",
                &volume_text,
                "--size",
                "1M",
                "--secret-file",
                &secret,
                "--listen",
                &free,
                "--admin",
                &busy_address,
            ],
        ),
    ];
    for (flag, args) in attempts {
        let stderr = fails(&args);
        let line = error_line(&stderr);
        assert!(line.contains(&busy_address) && line.contains(flag), "{args:?}: {line}");
        assert!(line.contains("already in use"), "{args:?}: {line}");
        assert_eq!(line.matches("in use").count(), 1, "said twice: {line}");
        assert!(!volume.exists(), "{args:?} left {} behind:\n{stderr}", volume.display());
        let metadata: Vec<_> =
            std::fs::read_dir(scratch.join("")).unwrap().flatten().map(|entry| entry.file_name()).collect();
        assert_eq!(metadata.len(), 1, "{args:?} left files behind: {metadata:?}");
    }
    // The next start, with another size, is not tripped by a leftover.
    let mut server = Process::start(
        &scratch,
        &["serve", "--volume", &volume_text, "--size", "2M", "--listen", &free],
        free.parse().unwrap(),
    );
    assert!(server.stop_with(libc::SIGTERM).success(), "{}", server.log());
    drop(busy);
}

/// Options checked before anything is created: a start refused over its
/// mirror configuration or its secret file creates no volume.
#[test]
fn a_refused_configuration_creates_nothing() {
    let scratch = Scratch::new("cli-refused-configuration");
    let volume = scratch.join("volume.img");
    let volume_text = text(&volume);
    let missing_secret = text(&scratch.join("no-secret"));
    let port = format!("127.0.0.1:{}", free_port());
    let refusals: [Vec<&str>; 4] = [
        vec!["serve", "--volume", &volume_text, "--size", "1M", "--listen", &port, "--mirror", "a=127.0.0.2:7789"],
        vec![
            "serve",
            "--volume",
            &volume_text,
            "--size",
            "1M",
            "--listen",
            &port,
            "--mirror",
            "a=127.0.0.2:7789",
            "--secret-file",
            &missing_secret,
        ],
        vec!["serve", "--volume", &volume_text, "--size", "1000", "--direct", "--listen", &port],
        vec![
            "copy-host",
            "--volume",
            &volume_text,
            "--size",
            "1M",
            "--listen",
            &port,
            "--secret-file",
            &missing_secret,
        ],
    ];
    for args in refusals {
        let stderr = fails(&args);
        assert!(!volume.exists(), "{args:?} created {}:\n{stderr}", volume.display());
    }
}

fn connected(admin: &str) -> bool {
    let output = run_output(binary().to_str().unwrap(), &["status", "--admin", admin, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    !status["production"].is_null()
}

/// A bare port, HOST:PORT with a host name, and [IPV6]:PORT are accepted by
/// `serve --listen`, `copy-host --listen`, `--admin` on serve, copy-host and
/// status, and `--mirror NAME=HOST:PORT`: a production host reaches its copy
/// through them all.
#[test]
fn every_address_option_takes_the_same_forms() {
    let scratch = Scratch::new("cli-address-forms");
    let secret = text(&write_secret(&scratch, "secret", 4));
    let copy_port = free_port();
    let copy_admin_port = free_port();
    let ipv6 = TcpListener::bind("[::1]:0").is_ok();
    let copy_admin = if ipv6 { format!("[::1]:{copy_admin_port}") } else { format!("localhost:{copy_admin_port}") };
    let (store, copy_listen) = (text(&scratch.join("copy.img")), format!("localhost:{copy_port}"));
    let copy_args = [
        "copy-host",
        "--volume",
        &store,
        "--size",
        "1M",
        "--listen",
        &copy_listen,
        "--secret-file",
        &secret,
        "--admin",
        &copy_admin,
    ];
    let _copy = Process::start(&scratch, &copy_args, format!("127.0.0.1:{copy_port}").parse().unwrap());

    let port = free_port();
    let admin_port = free_port();
    let (volume, listen, admin) =
        (text(&scratch.join("volume.img")), port.to_string(), format!("localhost:{admin_port}"));
    let mirror = format!("copy=localhost:{copy_port}");
    let serve_args = [
        "serve",
        "--volume",
        &volume,
        "--size",
        "1M",
        "--listen",
        &listen,
        "--admin",
        &admin,
        "--mirror",
        &mirror,
        "--secret-file",
        &secret,
    ];
    let _production = Process::start(&scratch, &serve_args, format!("127.0.0.1:{port}").parse().unwrap());
    assert!(TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], admin_port)), Duration::from_secs(5)).is_ok());
    assert!(wait_until(Duration::from_secs(10), || connected(&copy_admin)), "the copy never saw the production host");
    for form in [admin_port.to_string(), format!("localhost:{admin_port}"), format!("127.0.0.1:{admin_port}")] {
        let output = run_output(binary().to_str().unwrap(), &["status", "--admin", &form, "--json"]);
        assert!(output.status.success(), "status --admin {form}: {}", String::from_utf8_lossy(&output.stderr));
    }
}
