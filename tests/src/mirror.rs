//! A production host and its copy hosts as real processes, for the
//! mirroring tests: a production host (`serve --mirror`) on 127.0.0.1 and
//! copy hosts on 127.0.0.2, 127.0.0.3, …, each with its own store, admin
//! endpoint and log; fio through NBD; byte comparison of every store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{binary, free_port, free_port_on, require_tool, run, sha256, wait_until, write_secret, Process, Scratch};

/// Every store's size.
pub const SIZE: &str = "64M";

/// A copy host: its store, its address, its process.
pub struct Copy {
    /// The name production knows it by.
    pub name: String,
    /// Its store.
    pub volume: PathBuf,
    /// Its replication address.
    pub address: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
    /// The copy host opens its store with O_DIRECT (writes through its ring).
    pub direct: bool,
    /// The network namespace it runs in (a WAN rig's), if not this one.
    pub namespace: Option<String>,
    /// The running copy host, if any.
    pub process: Option<Process>,
}

/// A production host and its copies.
pub struct Mirror {
    /// Where every file of the test lives.
    pub scratch: Scratch,
    /// The secret file both sides share.
    pub secret: PathBuf,
    /// The production volume.
    pub volume: PathBuf,
    /// The production admin address.
    pub admin: SocketAddr,
    /// The running production host, if any.
    pub production: Option<Process>,
    /// The production host's arguments (without --listen).
    pub production_args: Vec<String>,
    /// The copies, in configuration order.
    pub copies: Vec<Copy>,
    /// The volume's size, as `--size` takes it.
    pub size: String,
}

impl Mirror {
    /// Start `copies` (name, ip, options such as "mode=async"; the option
    /// "direct" starts that copy host with --direct) and a production host
    /// mirroring to them.
    pub fn start(label: &str, copies: &[(&str, &str, &str)], extra: &[&str]) -> Mirror {
        Mirror::start_with(label, copies, extra, |_, _| {})
    }

    /// Like [`Mirror::start`], with `prepare` called on the production
    /// volume's path and the copies' store paths before anything starts.
    pub fn start_with(
        label: &str,
        copies: &[(&str, &str, &str)],
        extra: &[&str],
        prepare: impl FnOnce(&std::path::Path, &[PathBuf]),
    ) -> Mirror {
        Mirror::start_sized(label, SIZE, copies, extra, prepare)
    }

    /// Like [`Mirror::start_with`], for a volume of `size` (e.g. "1G").
    pub fn start_sized(
        label: &str,
        size: &str,
        copies: &[(&str, &str, &str)],
        extra: &[&str],
        prepare: impl FnOnce(&std::path::Path, &[PathBuf]),
    ) -> Mirror {
        let mut mirror = Mirror::unstarted(label, size);
        let stores: Vec<PathBuf> =
            copies.iter().map(|(name, _, _)| mirror.scratch.join(&format!("copy-{name}.img"))).collect();
        prepare(&mirror.volume, &stores);
        let mut mirrors = Vec::new();
        for (name, ip, options) in copies {
            let address = mirror.add_copy(name, ip, options.split(',').any(|option| option == "direct"));
            let mut spec = format!("{name}={address}");
            for option in options.split(',').filter(|option| !option.is_empty() && *option != "direct") {
                spec.push(',');
                spec.push_str(option);
            }
            mirrors.push(spec);
        }
        mirror.start_production_for(mirrors, extra);
        mirror
    }

    /// A mirror with its scratch directory, secret and addresses, and no
    /// copy or process yet.
    pub fn unstarted(label: &str, size: &str) -> Mirror {
        let scratch = Scratch::new(label);
        let secret = write_secret(&scratch, "secret", 7);
        let volume = scratch.join("production.img");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Mirror {
            secret,
            volume,
            admin,
            production: None,
            production_args: Vec::new(),
            copies: Vec::new(),
            size: size.to_string(),
            scratch,
        }
    }

    /// Start the production host mirroring to `mirrors` (`--mirror`
    /// values), with `extra` arguments.
    pub fn start_production_for(&mut self, mirrors: Vec<String>, extra: &[&str]) {
        let mut args: Vec<String> = vec![
            "--volume".into(),
            self.volume.display().to_string(),
            "--size".into(),
            self.size.clone(),
            "--secret-file".into(),
            self.secret.display().to_string(),
            "--admin".into(),
            self.admin.to_string(),
        ];
        for spec in mirrors {
            args.push("--mirror".into());
            args.push(spec);
        }
        args.extend(extra.iter().map(|arg| arg.to_string()));
        self.production_args = args;
        self.start_production();
    }

    /// Start a copy host named `name` on `ip` (its store `copy-<name>.img`
    /// in the scratch directory, free ports) and add it to the copies; the
    /// address it listens on.
    pub fn add_copy(&mut self, name: &str, ip: &str, direct: bool) -> SocketAddr {
        let address: SocketAddr = format!("{ip}:{}", free_port_on(ip)).parse().unwrap();
        self.add_copy_at(name, address, direct);
        address
    }

    /// [`Mirror::add_copy`] listening on `address` (one the production
    /// host may already be configured for).
    pub fn add_copy_at(&mut self, name: &str, address: SocketAddr, direct: bool) {
        let ip = address.ip().to_string();
        let volume = self.scratch.join(&format!("copy-{name}.img"));
        let admin: SocketAddr = format!("{ip}:{}", free_port_on(&ip)).parse().unwrap();
        let mut copy = Copy { name: name.to_string(), volume, address, admin, direct, namespace: None, process: None };
        self.start_copy(&mut copy);
        self.copies.push(copy);
    }

    /// Start (or restart) `copy`'s host.
    pub fn start_copy(&self, copy: &mut Copy) {
        self.try_start_copy(copy).unwrap_or_else(|log| panic!("{log}"));
    }

    /// Start (or restart) `copy`'s host; when it refuses to start, its log.
    pub fn try_start_copy(&self, copy: &mut Copy) -> Result<(), String> {
        let volume = copy.volume.display().to_string();
        let listen = copy.address.to_string();
        let secret = self.secret.display().to_string();
        let admin = copy.admin.to_string();
        let mut args = vec![
            "copy-host",
            "--volume",
            &volume,
            "--size",
            &self.size,
            "--listen",
            &listen,
            "--secret-file",
            &secret,
            "--admin",
            &admin,
        ];
        if copy.direct {
            args.push("--direct");
        }
        copy.process = Some(Process::try_start_in(&self.scratch, copy.namespace.as_deref(), &args, copy.address)?);
        Ok(())
    }

    /// Start (or restart) the production host.
    pub fn start_production(&mut self) {
        self.try_start_production().unwrap_or_else(|log| panic!("{log}"));
    }

    /// Start (or restart) the production host; when it refuses to start, its log.
    pub fn try_start_production(&mut self) -> Result<(), String> {
        let mut args: Vec<&str> = vec!["serve"];
        args.extend(self.production_args.iter().map(String::as_str));
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen = address.to_string();
        args.push("--listen");
        args.push(&listen);
        self.production = Some(Process::try_start(&self.scratch, &args, address)?);
        Ok(())
    }

    /// The NBD URI of the production host.
    pub fn uri(&self) -> String {
        self.production.as_ref().expect("production running").uri()
    }

    /// The status document, via `crossmirror status --json`.
    pub fn status(&self) -> serde_json::Value {
        let admin = self.admin.to_string();
        let text = run(binary().to_str().unwrap(), &["status", "--admin", &admin, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("status is not JSON ({error}):\n{text}"))
    }

    /// A copy host's own status document.
    pub fn copy_host_status(&self, name: &str) -> serde_json::Value {
        let copy = self.copies.iter().find(|copy| copy.name == name).expect("a copy of that name");
        let admin = copy.admin.to_string();
        let text = run(binary().to_str().unwrap(), &["status", "--admin", &admin, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("status is not JSON ({error}):\n{text}"))
    }

    /// A copy's entry in the production host's status.
    pub fn copy_status(&self, name: &str) -> serde_json::Value {
        let status = self.status();
        let copies = status["copies"].as_array().expect("copies").clone();
        copies.into_iter().find(|copy| copy["name"] == name).unwrap_or_else(|| panic!("no copy {name}: {status}"))
    }

    /// Wait until every copy is up to date with nothing in flight.
    pub fn wait_up_to_date(&self, timeout: Duration) {
        let settled = wait_until(timeout, || {
            let status = self.status();
            status["copies"]
                .as_array()
                .expect("copies")
                .iter()
                .all(|copy| copy["state"] == "up_to_date" && copy["lag_bytes"] == 0 && copy["dirty_bytes"] == 0)
        });
        assert!(settled, "copies did not become up to date:\n{:#}\n{}", self.status(), self.logs());
    }

    /// Every log so far, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Some(production) = &self.production {
            out.push_str(&format!("--- production log:\n{}\n", production.log()));
        }
        for copy in &self.copies {
            if let Some(process) = &copy.process {
                out.push_str(&format!("--- copy {} log:\n{}\n", copy.name, process.log()));
            }
        }
        out
    }

    /// Stop the production host, then every copy, with SIGTERM, and assert
    /// each exits cleanly; the logs from before the stop.
    pub fn stop_cleanly(&mut self) -> String {
        let logs = self.logs();
        let status = self.production.as_mut().expect("production running").stop_with(libc::SIGTERM);
        assert!(status.success(), "production exited with {status}:\n{logs}");
        for copy in &mut self.copies {
            let status = copy.process.as_mut().expect("copy running").stop_with(libc::SIGTERM);
            assert!(status.success(), "copy {} exited with {status}:\n{logs}", copy.name);
        }
        logs
    }

    /// Stop everything cleanly, then assert every store equals the production volume.
    pub fn stop_and_compare(mut self) {
        self.stop_and_compare_in_place();
    }

    /// [`Mirror::stop_and_compare`], keeping the stores for more checks.
    pub fn stop_and_compare_in_place(&mut self) {
        let logs = self.stop_cleanly();
        let expected = sha256(&self.volume);
        for copy in &self.copies {
            if sha256(&copy.volume) != expected {
                let (production, store) = (self.volume.display(), copy.volume.display());
                let script = format!("cmp -l {production} {store} | head -5; cmp -l {production} {store} | wc -l");
                let differences = crate::run_output("sh", &["-c", &script]);
                panic!(
                    "copy {} differs from the production volume (cmp -l: offset+1, production byte, copy byte; \
                     then the count):\n{}\n{logs}",
                    copy.name,
                    String::from_utf8_lossy(&differences.stdout)
                );
            }
        }
    }
}

/// fio through NBD with crc32c verification, ending with a flush.
pub fn fio(uri: &str, seconds: u32, extra: &[&str]) -> Child {
    let uri = format!("--uri={uri}");
    let runtime = format!("--runtime={seconds}");
    let mut args = vec![
        "--name=mirror",
        "--ioengine=nbd",
        uri.as_str(),
        "--size=48M",
        "--iodepth=16",
        "--numjobs=1",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--end_fsync=1",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--randrepeat=0",
    ];
    if seconds > 0 {
        args.push("--time_based");
        args.push(runtime.as_str());
        args.push("--do_verify=0");
    }
    args.extend_from_slice(extra);
    Command::new("fio").args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start fio")
}

/// Wait for fio; assert it succeeded without errors; its output.
pub fn fio_finish(child: Child) -> String {
    let output = child.wait_with_output().expect("wait for fio");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && text.contains("err= 0"), "fio failed:\n{text}");
    text
}

/// Whether fio and sha256sum are here (under CI their absence fails).
pub fn tools() -> bool {
    require_tool("fio") && require_tool("sha256sum")
}
