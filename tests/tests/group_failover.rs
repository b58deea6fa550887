//! Production host takeover inside the production site (issue 11, item 1):
//! two members of the production site share one store; the host is
//! SIGKILLed under QD1 writes; the next member takes over once the old
//! host's lease has run out, with a new epoch, and not one acknowledged
//! write is lost — neither on the production store nor on the sync copy.
//!
//! ```text
//!  a1 ─┐ east.img (shared)   ──sync──  b (west.img)      w (witness)
//!  a2 ─┘
//!  writer: python3-libnbd, 4K writes, each block's number in it; on a broken
//!  connection it tries a1's and a2's NBD addresses until one serves
//! ```
//!
//! The site failover, the partition in time, the frozen host, switchover and
//! failback, and the actions follow. Every scenario runs twice, with the
//! record on the group's own voters (`embedded::…`) and on an etcd server
//! started for the test (`etcd::…`).

use std::process::Command;
use std::time::{Duration, Instant};

use system_tests::group::{
    assert_all_present, copy_entry, member_state, nbd_uris, now, run_writer, run_writer_from, Backend, Group,
    GroupSpec, Quorum, Writes,
};
use system_tests::{require_tool, sha256};

/// Run the writer; SIGKILL `victim` after 300 acknowledged writes, and go
/// on until the URI `survivor` (an index into `uris`) has answered writes
/// for 3 s after the kill (60 s of writing at most: a loaded CI machine may
/// take several seconds to fail over, which a fixed writer time once cut
/// short). Returns the writes and the seconds from the kill to the first
/// write the survivor answered after it (an answer of the victim's still in
/// the socket at the kill does not count).
fn write_through_a_kill(group: &mut Group, uris: &[String], victim: &str, survivor: usize) -> (Writes, f64) {
    let first_by_survivor = |writes: &Writes, after: f64| {
        writes.acknowledged.iter().find(|(_, time, by)| *by == survivor && *time > after).map(|(_, time, _)| *time)
    };
    let mut killed = None;
    let writes = run_writer_from(group, uris, 0, 60, |group, writes| {
        if writes.acknowledged.len() == 300 {
            group.kill(victim);
            killed = Some(now());
        }
        let Some(killed) = killed else { return true };
        let last = writes.acknowledged.last().map_or(0.0, |(_, time, _)| *time);
        first_by_survivor(writes, killed).is_none_or(|first| last - first < 3.0)
    });
    let killed = killed.expect("the writer got to 300 writes");
    let failover = first_by_survivor(&writes, killed).unwrap_or_else(|| {
        panic!("{} answered no write after the kill (60 s of writing)\n{}", uris[survivor], group.logs_tail(40))
    });
    (writes, failover - killed)
}

/// a (east), b (west, sync) and w on `quorum`, started; returns once a
/// produces and west is current, with the record then.
fn two_sites(label: &str, lease_ms: Option<u64>, quorum: &Quorum) -> (Group, serde_json::Value) {
    let mut spec = GroupSpec::new(label)
        .production("east")
        .copy("west", "sync")
        .member("a", "east", 1, "east.img")
        .member("b", "west", 1, "west.img")
        .witness("w")
        .volume_size("256M");
    spec.lease_ms = lease_ms;
    let mut group = Group::new(label, quorum.on(spec));
    for name in ["w", "a", "b"] {
        group.start(name);
    }
    let formed = group.wait_for(Duration::from_secs(20), |record| {
        record["production"]["host"] == "a" && copy_entry(record, "west")["state"] == "current"
    });
    (group, formed)
}

fn a_failed_production_host_is_replaced_by_its_site_with_no_acknowledged_write_lost(backend: Backend) {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let Some(quorum) = Quorum::start(backend) else { return };
    let spec = GroupSpec::new("takeover")
        .production("east")
        .copy("west", "sync")
        .member("a1", "east", 1, "east.img")
        .member("a2", "east", 2, "east.img")
        .member("b", "west", 1, "west.img")
        .witness("w")
        .volume_size("256M")
        .lease_ms(1000);
    let mut group = Group::new("takeover", quorum.on(spec));
    for name in ["w", "a1", "b", "a2"] {
        group.start(name);
        std::thread::sleep(Duration::from_millis(200));
    }
    let formed = group.wait_for(Duration::from_secs(20), |record| {
        record["production"]["host"].is_string()
            && copy_entry(record, "west")["state"] == "current"
            && member_state(record, "a1") == "joined"
            && member_state(record, "a2") == "joined"
    });
    // Whichever member of east hosts is killed; the other takes over.
    let first = formed["production"]["host"].as_str().expect("host").to_string();
    let second = if first == "a1" { "a2" } else { "a1" };
    let epoch = formed["epoch"].as_u64().expect("epoch");
    let uris = nbd_uris(&group, &["a1", "a2"]);
    let (writes, failover) = write_through_a_kill(&mut group, &uris, &first, usize::from(second == "a2"));
    eprintln!(
        "failover: first write answered by {second} {failover:.2} s after {first}'s SIGKILL; {} writes, {} refused",
        writes.acknowledged.len(),
        writes.refused
    );
    let taken = group.wait_for(Duration::from_secs(10), |record| {
        record["production"]["host"] == second && copy_entry(record, "west")["state"] == "current"
    });
    assert_eq!(taken["epoch"].as_u64(), Some(epoch + 1), "the takeover raises the epoch: {taken}");
    assert_eq!(member_state(&taken, &first), "forced-leaving");
    let history = taken["history"].as_array().expect("history");
    assert_eq!(history.last().and_then(|entry| entry["production"].as_str()), Some(second));
    // (That the takeover waits out the old host's lease is the core's unit
    // test: after a SIGKILL, failure detection alone takes `failure_ms`, 1 s
    // by default.)
    group.stop_all(&[second, "b", "w"], Duration::from_secs(30));
    assert_all_present(&group.store(second), &writes.blocks());
    assert_eq!(sha256(&group.store(second)), sha256(&group.store("b")), "the copy differs from the production store");
}

fn a_lost_production_site_fails_over_to_its_current_copy_which_serves_every_acknowledged_write(backend: Backend) {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let Some(quorum) = Quorum::start(backend) else { return };
    let label = "siteover";
    let (mut group, formed) = two_sites(label, Some(1000), &quorum);
    let epoch = formed["epoch"].as_u64().expect("epoch");
    let uris = nbd_uris(&group, &["a", "b"]);
    let (writes, failover) = write_through_a_kill(&mut group, &uris, "a", 1);
    eprintln!(
        "site failover ({label}): first write answered by b {failover:.2} s after a's SIGKILL; {} writes",
        writes.acknowledged.len()
    );
    let promoted = group.wait_for(Duration::from_secs(10), |record| record["production"]["site"] == "west");
    assert_eq!(promoted["production"]["host"], "b");
    assert_eq!(promoted["epoch"].as_u64(), Some(epoch + 1));
    assert_eq!(copy_entry(&promoted, "east")["state"], "stale", "the lost site is a stale copy now: {promoted}");
    // The old production host comes back: it joins as a copy of the new
    // production and is resynced (in full: its store may hold writes b never got).
    group.start("a");
    group.wait_for(Duration::from_secs(30), |record| {
        copy_entry(record, "east")["host"] == "a" && copy_entry(record, "east")["state"] == "current"
    });
    group.stop_all(&["b", "a", "w"], Duration::from_secs(30));
    assert_all_present(&group.store("b"), &writes.blocks());
    assert_eq!(sha256(&group.store("a")), sha256(&group.store("b")), "east was not resynced from west");
}

fn a_stale_copy_is_not_promoted_when_the_production_site_is_lost_and_the_production_returns_to_serve(backend: Backend) {
    // Seed 003 figs. 7-9, the partition in time.
    if !require_tool("qemu-io") || !require_tool("nbdinfo") {
        return;
    }
    let Some(quorum) = Quorum::start(backend) else { return };
    let (mut group, _) = two_sites("intime", Some(1000), &quorum);
    group.kill("b");
    let stale = group.wait_for(Duration::from_secs(10), |record| copy_entry(record, "west")["state"] == "stale");
    let stale_seq = stale["seq"].as_u64().expect("seq");
    let uri = group.nbd_uri();
    system_tests::run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "flush", &uri]);
    group.kill("a");
    // The copy site comes back alone with the witness: a quorum, a current
    // record, and a stale copy: it must be neither promoted nor served.
    group.start("b");
    // The leader gets to the question (a forced out, its lease waited out)
    // and says why it does not promote.
    let said = |group: &Group| ["b", "w"].iter().any(|name| group.log(name).contains("no copy may be promoted"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !said(&group) && group.record()["production"]["site"] == "east" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let record = group.record();
    assert_eq!(record["production"]["site"], "east", "a stale copy was promoted: {record}");
    assert_eq!(copy_entry(&record, "west")["state"], "stale");
    assert!(record["seq"].as_u64() >= Some(stale_seq));
    assert!(said(&group), "the leader says why the copy is not promoted\n{}", group.logs_tail(30));
    let refused =
        Command::new("nbdinfo").arg(format!("nbd://{}:{}", group.ips["b"], group.ports[2])).output().expect("nbdinfo");
    assert!(!refused.status.success(), "the stale copy's host serves NBD");
    // The production returns: it serves, and the copy is resynced.
    group.start("a");
    group.wait_for(Duration::from_secs(30), |record| {
        record["production"]["host"] == "a" && copy_entry(record, "west")["state"] == "current"
    });
    group.stop_all(&["a", "b", "w"], Duration::from_secs(30));
    assert_eq!(sha256(&group.store("a")), sha256(&group.store("b")));
}

fn a_frozen_production_host_deposed_while_frozen_fences_itself_on_thaw_and_no_write_it_answers_is_lost(
    backend: Backend,
) {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let Some(quorum) = Quorum::start(backend) else { return };
    let (mut group, _) = two_sites("frozen", Some(1000), &quorum);
    let uris = nbd_uris(&group, &["a", "b"]);
    let writes = run_writer(&mut group, &uris, 14, |group, count| {
        if count == 300 {
            group.freeze("a");
            // Past a's lease, b is promoted while a sleeps.
            group.wait_for(Duration::from_secs(15), |record| record["production"]["site"] == "west");
            group.thaw("a");
        }
    });
    assert!(writes.acknowledged.len() > 300, "no write after the promotion");
    group.wait_for(Duration::from_secs(30), |record| {
        copy_entry(record, "east")["host"] == "a" && copy_entry(record, "east")["state"] == "current"
    });
    assert!(group.log("a").contains("self-fence"), "a did not fence itself:\n{}", group.logs_tail(30));
    group.stop_all(&["b", "a", "w"], Duration::from_secs(30));
    assert_all_present(&group.store("b"), &writes.blocks());
    assert_eq!(sha256(&group.store("a")), sha256(&group.store("b")));
}

fn a_switchover_and_its_failback_under_load_lose_no_write_and_end_identical(backend: Backend) {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let Some(quorum) = Quorum::start(backend) else { return };
    let (mut group, _) = two_sites("switch", None, &quorum);
    let uris = nbd_uris(&group, &["a", "b"]);
    let switch = |group: &Group, to: &str| {
        Command::new(system_tests::binary())
            .args(["switchover", "--config", group.config.to_str().expect("utf-8 path"), "--to-site", to])
            .output()
            .expect("run crossmirror switchover")
    };
    let mut outputs = Vec::new();
    let mut failback = (0.0, 0.0);
    let writes = run_writer(&mut group, &uris, 16, |group, count| {
        if count == 300 {
            outputs.push(switch(group, "west"));
        } else if count >= 1500
            && count % 100 == 0
            && outputs.len() == 1
            // The old production store is back as west's copy and caught up
            // (a switchover to a copy still catching up is refused, rightly).
            && copy_entry(&group.record(), "east")["state"] == "current"
        {
            failback.0 = now();
            outputs.push(switch(group, "east"));
            failback.1 = now();
        }
    });
    for output in &outputs {
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "switchover failed: {text}{}", String::from_utf8_lossy(&output.stderr));
        eprintln!("{}", text.trim());
    }
    assert_eq!(outputs.len(), 2, "both switchovers ran ({} writes)", writes.acknowledged.len());
    let record = group.wait_for(Duration::from_secs(30), |record| {
        record["production"]["site"] == "east" && copy_entry(record, "west")["state"] == "current"
    });
    assert_eq!(record["production"]["host"], "a");
    eprintln!(
        "{} writes acknowledged, {} refused while the role moved (the writer reconnected)",
        writes.acknowledged.len(),
        writes.refused
    );
    // No full resync either way: each new production host found the old
    // store identical as its epoch began (a clean hand-over), and resynced
    // only what it wrote before the old host came back as its copy: at
    // most the regions written from the failback's start until a few
    // seconds after it returned (the old host is its copy by then).
    let production = &group.status("a")["roles"]["production"];
    let region = production["region_bytes"].as_u64().expect("region size");
    let west = &production["copies"][0];
    let moved = west["resync_bytes_total"].as_u64().expect("resync bytes");
    let mut written_since: Vec<u64> = writes
        .acknowledged
        .iter()
        .filter(|(_, time, _)| *time >= failback.0 && *time <= failback.1 + 5.0)
        .map(|(block, _, _)| block * 4096 / region)
        .collect();
    written_since.dedup();
    let dirty_bound = written_since.len() as u64 * region;
    eprintln!(
        "failback resync moved {moved} bytes; the regions written in the failback's window: {dirty_bound} bytes \
         (of a {} byte volume)",
        production["size"]
    );
    assert!(
        moved <= dirty_bound,
        "failback moved {moved} bytes, more than the {dirty_bound} written since: {west}\n{}",
        [group.log("a"), group.log("b"), group.log("w")]
            .concat()
            .lines()
            .filter(|line| line.contains("record seq"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (host, era) in [("b", "the switchover"), ("a", "the failback")] {
        let log = group.log(host);
        assert!(log.contains("a clean hand-over"), "{host} did not take {era} as a clean hand-over:\n{log}");
    }
    assert!(
        !group.log("b").contains("full resync"),
        "the switchover resynced west's old production store in full:\n{}",
        group.log("b")
    );
    group.stop_all(&["a", "b", "w"], Duration::from_secs(30));
    assert_all_present(&group.store("a"), &writes.blocks());
    assert_eq!(sha256(&group.store("a")), sha256(&group.store("b")));
}

fn actions_run_on_role_changes_with_their_environment(backend: Backend) {
    let Some(quorum) = Quorum::start(backend) else { return };
    let scratch = system_tests::Scratch::new("actions-log");
    let log = scratch.join("events");
    let line = |member: &str| {
        format!(
            "start = \"echo {member} $CROSSMIRROR_EVENT $CROSSMIRROR_ROLE $CROSSMIRROR_SITE $CROSSMIRROR_EPOCH $CROSSMIRROR_NBD >> {}\"\n\
             stop = \"echo {member} $CROSSMIRROR_EVENT $CROSSMIRROR_ROLE >> {}\"\n\
             recovery = \"echo {member} $CROSSMIRROR_EVENT $CROSSMIRROR_ROLE $CROSSMIRROR_EPOCH >> {}\"\n\
             timeout_ms = 5000",
            log.display(),
            log.display(),
            log.display()
        )
    };
    let spec = GroupSpec::new("actions")
        .production("east")
        .copy("west", "sync")
        .member("a", "east", 1, "east.img")
        .actions(&line("a"))
        .member("b", "west", 1, "west.img")
        .actions(&line("b"))
        .witness("w")
        .lease_ms(1000);
    let mut group = Group::new("actions", quorum.on(spec));
    for name in ["w", "a", "b"] {
        group.start(name);
    }
    group.wait_for(Duration::from_secs(20), |record| copy_entry(record, "west")["state"] == "current");
    let nbd = format!("{}:{}", group.ips["a"], group.ports[2]);
    let events = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(events().contains("a start production east 1") && events().contains("b start copy west")) {
        assert!(Instant::now() < deadline, "start actions: {:?}", events());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(events().contains(&format!("a start production east 1 {nbd}")), "{}", events());
    // A failure takes the production role to b: its recovery action runs.
    group.kill("a");
    group.wait_for(Duration::from_secs(15), |record| record["production"]["host"] == "b");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !events().contains("b recovery production 2") {
        assert!(Instant::now() < deadline, "recovery action: {:?}", events());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(events().contains("b stop copy"), "the copy role's stop action ran before b produced: {}", events());
}

/// An async copy promoted by the operator with `--accept-data-loss` once the
/// production site is lost: the fork is recorded in the history, the copy
/// serves the image it had (writes it never got are lost, as promised), and
/// the old production site, back, is resynced in full from it: its store
/// ends identical, its unshipped writes discarded, never merged.
fn an_async_copy_promoted_with_accept_data_loss_records_the_fork_and_the_old_production_is_resynced_to_it(
    backend: Backend,
) {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let Some(quorum) = Quorum::start(backend) else { return };
    let spec = GroupSpec::new("forced")
        .production("east")
        .copy("west", "async")
        .member("a", "east", 1, "east.img")
        .member("b", "west", 1, "west.img")
        .witness("w")
        .volume_size("256M")
        .lease_ms(1000);
    let mut group = Group::new("forced", quorum.on(spec));
    for name in ["w", "a", "b"] {
        group.start(name);
    }
    group.wait_for(Duration::from_secs(20), |record| {
        record["production"]["host"] == "a" && copy_entry(record, "west")["state"] == "current"
    });
    let (on_east, on_west) = (nbd_uris(&group, &["a"]), nbd_uris(&group, &["b"]));
    let shipped = run_writer(&mut group, &on_east, 1, |_, _| {});
    group.wait_status("a", Duration::from_secs(10), |status| {
        status["roles"]["production"]["copies"][0]["lag_bytes"] == 0
    });
    // West's host stops taking writes; east acknowledges more it never gets.
    group.freeze("b");
    let unshipped = run_writer_from(&mut group, &on_east, 20_000, 2, |_, _| true);
    assert!(!unshipped.acknowledged.is_empty(), "east acknowledged nothing while west was frozen");
    group.kill("a");
    group.thaw("b");
    // The leader promotes nobody by itself: west is async.
    std::thread::sleep(Duration::from_secs(5));
    let waiting = group.record();
    assert_eq!(waiting["production"]["site"], "east", "an async copy was promoted without the operator: {waiting}");
    let promote = |group: &Group, extra: &[&str]| {
        Command::new(system_tests::binary())
            .args(["promote", "--config", group.config.to_str().expect("utf-8 path"), "--site", "west"])
            .args(extra)
            .output()
            .expect("run crossmirror promote")
    };
    let refused = promote(&group, &[]);
    assert!(!refused.status.success(), "promoted without --accept-data-loss");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--accept-data-loss"));
    let output = promote(&group, &["--accept-data-loss"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "promote failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("recorded fork"), "{text}");
    eprintln!("{}", text.trim());
    let promoted = group.wait_for(Duration::from_secs(20), |record| {
        record["production"]["host"] == "b" && copy_entry(record, "east")["state"] == "stale"
    });
    let fork = promoted["history"].as_array().and_then(|history| history.last()).expect("history")["fork"].clone();
    assert!(fork.as_str().is_some_and(|fork| fork.contains("forked")), "no fork in the history: {promoted}");
    let (_, table, _) = group.status_command(&[]);
    assert!(table.contains("fork (generation 2)"), "status does not show the fork:\n{table}");
    eprintln!("{table}");
    // West serves what it had; then east returns and becomes its copy.
    let after = run_writer_from(&mut group, &on_west, 45_000, 1, |_, _| true);
    group.start("a");
    group.wait_for(Duration::from_secs(60), |record| {
        record["production"]["host"] == "b" && copy_entry(record, "east")["state"] == "current"
    });
    group.stop_all(&["b", "a", "w"], Duration::from_secs(30));
    assert_all_present(&group.store("b"), &shipped.blocks());
    assert_all_present(&group.store("b"), &after.blocks());
    assert_eq!(sha256(&group.store("a")), sha256(&group.store("b")), "east kept writes of the abandoned line");
    // The writes west never got are gone from east too (discarded, not
    // merged): the forced promotion lost them, as it said it might.
    let east = std::fs::read(group.store("a")).expect("read east");
    let on_east = |block: &u64| east[(*block * 4096) as usize..(*block * 4096) as usize + 8] == block.to_le_bytes();
    let lost = unshipped.blocks().iter().filter(|block| !on_east(block)).count();
    eprintln!("{lost} of {} writes acknowledged while west was frozen were given up", unshipped.blocks().len());
    assert!(
        lost > 0,
        "the scenario lost nothing: west got every write, so no fork was exercised\n{}",
        group.logs_tail(80)
    );
}
system_tests::on_both_backends!(
    a_failed_production_host_is_replaced_by_its_site_with_no_acknowledged_write_lost,
    a_lost_production_site_fails_over_to_its_current_copy_which_serves_every_acknowledged_write,
    a_stale_copy_is_not_promoted_when_the_production_site_is_lost_and_the_production_returns_to_serve,
    a_frozen_production_host_deposed_while_frozen_fences_itself_on_thaw_and_no_write_it_answers_is_lost,
    a_switchover_and_its_failback_under_load_lose_no_write_and_end_identical,
    actions_run_on_role_changes_with_their_environment,
    an_async_copy_promoted_with_accept_data_loss_records_the_fork_and_the_old_production_is_resynced_to_it,
);
