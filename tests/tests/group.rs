//! Whole-system tests of the group layer: real `crossmirror node` processes
//! on loopback addresses (see `system_tests::group`), formation in every
//! start order, two copy sites, a site whose two members share one store,
//! and the refusals that must leave every store untouched.

use std::time::{Duration, Instant};

use serde_json::Value;
use system_tests::group::{copy_entry, member_state, Group, GroupSpec};
use system_tests::wait_until;

/// How long a group gets to form.
const FORM: Duration = Duration::from_secs(20);

/// production site "east" with member a, copy site "west" (sync) with
/// member b, witness w.
fn three_hosts(group: &str) -> GroupSpec {
    GroupSpec::new(group)
        .production("east")
        .copy("west", "sync")
        .member("a", "east", 1, "east.img")
        .member("b", "west", 1, "west.img")
        .witness("w")
}

/// Whether every one of `names` is `joined` in `record`.
fn all_joined(record: &Value, names: &[&str]) -> bool {
    names.iter().all(|name| member_state(record, name) == "joined")
}

#[test]
fn a_group_forms_in_every_start_order() {
    let orders = [["a", "b", "w"], ["a", "w", "b"], ["b", "a", "w"], ["b", "w", "a"], ["w", "a", "b"], ["w", "b", "a"]];
    for order in orders {
        let started = Instant::now();
        let mut group = Group::new(&format!("form-{}", order.concat()), three_hosts("form"));
        for name in order {
            group.start(name);
            std::thread::sleep(Duration::from_millis(300));
        }
        let record = group.wait_for(FORM, |record| {
            all_joined(record, &["a", "b", "w"])
                && record["production"]["host"] == "a"
                && copy_entry(record, "west")["host"] == "b"
                && copy_entry(record, "west")["state"] == "current"
        });
        assert_eq!(record["production"]["site"], "east", "order {order:?}: {record}");
        let mut last = String::new();
        let printed = wait_until(Duration::from_secs(10), || {
            let (ok, stdout, stderr) = group.status_command(&[]);
            last = format!("{stdout}{stderr}");
            ok && ["a", "b", "w"].iter().all(|name| {
                stdout.lines().any(|line| line.split_whitespace().next() == Some(name) && line.contains(" joined "))
            })
        });
        assert!(printed, "order {order:?}: status --config does not show every member joined:\n{last}");
        let (ok, stdout, stderr) = group.status_command(&["--json"]);
        assert!(ok, "order {order:?}: status --json failed: {stderr}");
        let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status --json: {e}:\n{stdout}"));
        assert_eq!(json["group"], "form", "{json}");
        eprintln!("order {order:?}: formed in {:?}", started.elapsed());
    }
}

/// SIGTERM `names` at once (copies first) and wait up to 20 s; the nodes
/// that did not exit with success, and how.
fn stop_group(group: &mut Group, names: &[&str]) -> Vec<String> {
    group
        .stop_all(names, Duration::from_secs(20))
        .into_iter()
        .filter(|(_, status)| !status.is_some_and(|status| status.success()))
        .map(|(name, status)| match status {
            Some(status) => format!("{name} exited with {status}"),
            None => format!("{name} still ran 20 s after SIGTERM (killed)"),
        })
        .collect()
}

/// The sha256 of `path`.
fn sha(path: &std::path::Path) -> String {
    system_tests::sha256(path)
}

#[test]
fn two_copy_sites_end_byte_identical_after_fio() {
    if !(system_tests::require_tool("fio") && system_tests::require_tool("sha256sum")) {
        return;
    }
    let spec = GroupSpec::new("twocopies")
        .production("east")
        .copy("west", "sync")
        .copy("north", "async")
        .member("a", "east", 1, "east.img")
        .member("b", "west", 1, "west.img")
        .member("c", "north", 1, "north.img")
        .witness("w");
    let mut group = Group::new("twocopies", spec);
    for name in ["a", "b", "c", "w"] {
        group.start(name);
    }
    group.wait_for(FORM, |record| {
        all_joined(record, &["a", "b", "c", "w"])
            && record["production"]["host"] == "a"
            && copy_entry(record, "west")["state"] == "current"
            && copy_entry(record, "north")["state"] == "current"
    });
    let uri = format!("--uri={}", group.nbd_uri());
    let output = std::process::Command::new("fio")
        .args([
            "--name=group",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--iodepth=8",
            "--runtime=4",
            "--verify=crc32c",
            "--do_verify=1",
            "--end_fsync=1",
            // No verify state file left in the working directory.
            "--verify_state_save=0",
        ])
        .output()
        .expect("run fio");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && text.contains("err= 0"), "fio failed:\n{text}\n{}", group.logs_tail(30));
    group.wait_for(Duration::from_secs(30), |record| {
        copy_entry(record, "west")["state"] == "current" && copy_entry(record, "north")["state"] == "current"
    });
    // The production host first, as a planned stop goes: SIGTERMed together
    // with every peer, it has been seen to outlive the 20 s (its links'
    // stale records wait for a quorum that is going away; issue 12's
    // sixteenth-session note), which this test is not about.
    let mut failed = stop_group(&mut group, &["a"]);
    failed.extend(stop_group(&mut group, &["c", "b", "w"]));
    let east = sha(&group.store("a"));
    assert_eq!(sha(&group.store("b")), east, "the sync copy differs from production");
    assert_eq!(sha(&group.store("c")), east, "the async copy differs from production");
    assert!(failed.is_empty(), "graceful stop: {failed:?}\n{}", group.logs_tail(15));
}

/// Write `data` at `offset` through the group's NBD server and flush.
fn nbd_write(group: &Group, offset: u64, data: &[u8]) {
    let file = group.scratch.join(&format!("data-{offset}"));
    std::fs::write(&file, data).expect("write the data file");
    system_tests::nbdsh_script(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nh.pwrite(open({file:?}, 'rb').read(), {offset})\nh.flush()\nh.shutdown()\n",
        group.nbd_uri()
    ));
}

#[test]
fn a_standby_of_a_shared_store_takes_over_with_a_bitmap_resync() {
    if !system_tests::require_tool("sha256sum") {
        return;
    }
    const SIZE: u64 = 64 << 20;
    let spec = GroupSpec::new("shared")
        .production("east")
        .copy("west", "sync")
        .member("a", "east", 1, "east.img")
        .member("b1", "west", 1, "west.img")
        .member("b2", "west", 2, "west.img")
        .member("b3", "west", 3, "west.img")
        .witness("w");
    let mut group = Group::new("shared", spec);
    // b1 joins first, then b3, then b2: a host keeps its site while it can,
    // and when b1 fails the next host must follow backup_order (b2), not
    // the order of joining (b3).
    for name in ["a", "b1", "w"] {
        group.start(name);
    }
    group.wait_for(FORM, |record| member_state(record, "b1") == "joined");
    group.start("b3");
    group.wait_for(FORM, |record| member_state(record, "b3") == "joined");
    group.start("b2");
    group.wait_for(FORM, |record| {
        all_joined(record, &["a", "b1", "b2", "b3", "w"])
            && copy_entry(record, "west")["host"] == "b1"
            && copy_entry(record, "west")["state"] == "current"
    });
    let status = group.status("b2");
    let b2 = status["members"].as_array().and_then(|members| members.iter().find(|member| member["name"] == "b2"));
    assert_eq!(b2.map(|member| &member["role"]), Some(&Value::from("standby")), "{status}");
    nbd_write(&group, 0, &system_tests::random_bytes(1 << 20, 1));
    group.wait_for(Duration::from_secs(10), |record| copy_entry(record, "west")["state"] == "current");
    // The initial full sync's bits clear once the copy flushed and this
    // host synced (at most every 5 s): only then does the bitmap say how
    // little differs.
    let cleared = system_tests::wait_until(Duration::from_secs(30), || {
        let production = group.status("a");
        production["roles"]["production"]["copies"][0]["dirty_bytes"].as_u64().is_some_and(|dirty| dirty < SIZE / 8)
    });
    assert!(cleared, "the initial sync's bits never cleared: {}", group.status("a"));

    group.kill("b1");
    let killed = Instant::now();
    nbd_write(&group, 32 << 20, &system_tests::random_bytes(64 << 10, 2));
    let record = group.wait_for(Duration::from_secs(15), |record| {
        copy_entry(record, "west")["host"] == "b2"
            && member_state(record, "b1") == "forced-leaving"
            && copy_entry(record, "west")["state"] == "current"
    });
    eprintln!("b2 took over in {:?}: {record}", killed.elapsed());
    let production = group.status("a");
    let copy = &production["roles"]["production"]["copies"][0];
    let total = copy["resync_bytes_total"].as_u64().unwrap_or_else(|| panic!("no resync_bytes_total: {production}"));
    assert!(total > 0, "no resync after the takeover, though a write happened while no copy was connected: {copy}");
    assert!(total < SIZE / 4, "a full resync ({total} bytes) where a bitmap resync would do: {copy}");
    let failed = stop_group(&mut group, &["b3", "b2", "w", "a"]);
    assert_eq!(sha(&group.store("b2")), sha(&group.store("a")), "the shared copy store differs from production");
    assert!(failed.is_empty(), "graceful stop: {failed:?}\n{}", group.logs_tail(15));
}

/// The files in `dir` whose names start with `prefix`, with their sha256.
fn files_like(dir: &std::path::Path, prefix: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("read the directory")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(prefix))
        .map(|name| {
            let digest = sha(&dir.join(&name));
            (name, digest)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_node_with_another_config_is_refused_and_writes_nothing() {
    let spec = three_hosts("digest").member("c", "west", 2, "c.img");
    let mut group = Group::new("digest", spec);
    for name in ["a", "b", "w"] {
        group.start(name);
    }
    let before = group.wait_for(FORM, |record| all_joined(record, &["a", "b", "w"]));
    let other = group.write_config("other.toml", |spec| {
        spec.sites[1].lag_bytes_max = Some("32M".into());
    });
    let (status, log) = group.run_to_exit("c", &other, Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("node c with another config did not exit:\n{log}"));
    assert!(!status.success(), "node c with another config exited with success:\n{log}");
    assert!(
        log.lines().any(|line| line.trim_start().starts_with("- ") && line.contains("lag_bytes_max"))
            && log.lines().any(|line| line.trim_start().starts_with("+ ") && line.contains("lag_bytes_max")),
        "no diff line naming lag_bytes_max:\n{log}"
    );
    assert_eq!(files_like(group.scratch.join("").as_path(), "c.img"), vec![], "node c touched its store");
    assert!(!group.state_dir("c").exists(), "node c created its state dir");
    let after = group.record();
    assert_eq!(after["members"]["c"], before["members"]["c"], "the record changed for c: {after}");
}

#[test]
fn a_store_of_another_group_is_refused_untouched() {
    let mut alpha = Group::new("alpha", three_hosts("alpha"));
    for name in ["a", "b", "w"] {
        alpha.start(name);
    }
    alpha.wait_for(FORM, |record| {
        all_joined(record, &["a", "b", "w"]) && copy_entry(record, "west")["state"] == "current"
    });
    stop_group(&mut alpha, &["b", "w", "a"]);
    let store = alpha.store("b");
    let dir = store.parent().expect("a directory").to_path_buf();
    let before = files_like(&dir, "west.img");
    assert!(before.iter().any(|(name, _)| name.ends_with(".cmgroup")), "alpha did not mark its store: {before:?}");

    let spec = GroupSpec::new("beta")
        .production("east")
        .copy("west", "sync")
        .member("a", "east", 1, "east.img")
        .member("b", "west", 1, store.to_str().expect("utf-8 path"))
        .witness("w");
    let mut beta = Group::new("beta", spec);
    for name in ["a", "b", "w"] {
        beta.start(name);
    }
    let record = beta.wait_for(FORM, |record| all_joined(record, &["a", "b", "w"]));
    let entry = &record["members"]["b"];
    assert_eq!(entry["access"], false, "b was given access to alpha's store: {record}");
    assert!(entry["access_problem"].as_str().unwrap_or("").contains("alpha"), "access_problem: {record}");
    assert!(copy_entry(&record, "west")["host"].is_null(), "b hosts alpha's store: {record}");
    let status = beta.status("a");
    let b = status["members"].as_array().and_then(|members| members.iter().find(|member| member["name"] == "b"));
    assert!(b.is_some_and(|b| b["access_problem"].as_str().unwrap_or("").contains("alpha")), "status: {status}");
    stop_group(&mut beta, &["b", "w", "a"]);
    assert_eq!(files_like(&dir, "west.img"), before, "alpha's store or its metadata changed");
    let marker = before.iter().find(|(name, _)| name.ends_with(".cmgroup")).expect("marker").0.clone();
    let text = std::fs::read_to_string(dir.join(marker)).expect("read the marker");
    assert!(text.contains("group alpha"), "the marker no longer names alpha: {text}");
}

#[test]
fn an_unknown_name_is_refused_at_once_listing_the_members() {
    let group = Group::new("noname", three_hosts("noname"));
    let list = |group: &Group| {
        let mut names: Vec<String> = std::fs::read_dir(group.scratch.join(""))
            .expect("read scratch")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with("node-"))
            .collect();
        names.sort();
        names
    };
    let before = list(&group);
    let started = Instant::now();
    let config = group.config.clone();
    let (status, log) = group.run_to_exit("nosuch", &config, Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("--name nosuch did not exit:\n{log}"));
    assert!(!status.success(), "--name nosuch exited with success:\n{log}");
    assert!(started.elapsed() < Duration::from_secs(3), "--name nosuch took {:?} to exit", started.elapsed());
    assert!(
        log.contains("nosuch") && log.contains("a, b") && log.contains("w"),
        "the message does not list the members:\n{log}"
    );
    assert_eq!(list(&group), before, "--name nosuch created files");
}
