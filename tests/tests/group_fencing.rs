//! Fencing and failover under faults (issue 11's tests): the production host
//! cut from the quorum but not from its copies, two copy sites that could
//! both be promoted, two switchover requests at once, and the production
//! host SIGKILLed under fio load ten times in a row. Every scenario runs with
//! the record on the group's own voters (`embedded::…`) and on an etcd
//! server started for the test (`etcd::…`; the cut then also drops the cut
//! host's connections to etcd).
//!
//! Old-epoch traffic, as it really happens: with three sites, the deposed
//! production host's replication link to the third site's copy is taken
//! over by the new production host's session (a newer session supersedes an
//! older one), so the deposed host dials again, with its old epoch; the copy
//! has promised the new epoch and refuses its Hello, and counts it
//! (`old_epoch_refused` in the copy's status).
//!
//! ```text
//!  a (east, production) ──sync── b (west)      w (witness)
//!                       └─sync── c (north)     (three-site tests)
//!  writer: python3-libnbd, QD1 4K writes, block i holds i; logs each
//!          acknowledged write with its time and the host that answered
//!  faults: iptables DROP (removed on drop, also on panic), SIGKILL
//! ```
//!
//! The tests run one at a time: their timing checks are about the product,
//! not about two groups fighting for two CPUs.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use system_tests::group::{
    assert_all_present, copy_entry, fresh_gid, http_json, iptables_available, log_time, nbd_uris, now, run_writer_from,
    serial, Backend, Cut, Group, GroupSpec, Quorum,
};
use system_tests::{require_tool, sha256};

/// a (east, production), b (west, sync), c (north, sync) and w on
/// `quorum`, started; returns once a produces and both copies are current,
/// with the record then.
fn three_sites(label: &str, quorum: &Quorum, edit: impl FnOnce(GroupSpec) -> GroupSpec) -> (Group, Value, u32) {
    let spec = GroupSpec::new(label)
        .production("east")
        .copy("west", "sync")
        .copy("north", "sync")
        .member("a", "east", 1, "east.img")
        .member("b", "west", 1, "west.img")
        .member("c", "north", 1, "north.img")
        .witness("w")
        .volume_size("64M");
    let mut group = Group::new(label, quorum.on(edit(spec)));
    let gid = fresh_gid();
    group.start_with_gid("a", gid);
    for name in ["b", "c", "w"] {
        group.start(name);
    }
    let formed = group.wait_for(Duration::from_secs(30), |record| {
        record["production"]["host"] == "a"
            && copy_entry(record, "west")["state"] == "current"
            && copy_entry(record, "north")["state"] == "current"
    });
    (group, formed, gid)
}

/// The epoch of a record.
fn epoch(record: &Value) -> u64 {
    record["epoch"].as_u64().expect("the record has an epoch")
}

/// The record's history entries.
fn history(record: &Value) -> Vec<Value> {
    record["history"].as_array().cloned().unwrap_or_default()
}

/// Every `record seq N: …` line any node logged whose reasons contain
/// `what`: (time, line).
fn record_lines(group: &Group, what: &str) -> Vec<(f64, String)> {
    let mut lines: Vec<(f64, String)> = group
        .spec
        .names()
        .iter()
        .flat_map(|name| {
            group
                .log(name)
                .lines()
                .filter(|line| line.contains("record seq ") && line.contains(what))
                .filter_map(|line| Some((log_time(line)?, line.to_string())))
                .collect::<Vec<_>>()
        })
        .collect();
    lines.sort_by(|one, other| one.0.total_cmp(&other.0));
    lines
}

/// Node `name`'s copy role's status (`Value::Null` when it hosts none).
fn copy_role(group: &Group, name: &str) -> Value {
    group.try_status(name).map(|status| status["roles"]["copy"].clone()).unwrap_or(Value::Null)
}

/// A python3-libnbd child that keeps one connection to each of the URIs
/// (argv[1]) and every 20 ms writes block argv[2] through each one that
/// takes it, printing `ok <uri index> <unix time>`: who answers writes when.
const PROBER: &str = r#"
import nbd, sys, time
uris = sys.argv[1].split(","); offset = int(sys.argv[2]) * 4096
handles = [None] * len(uris)
while True:
    for k, uri in enumerate(uris):
        try:
            if handles[k] is None:
                h = nbd.NBD(); h.connect_uri(uri); handles[k] = h
            handles[k].pwrite(b"\x77" * 4096, offset)
            print("ok", k, time.time(), flush=True)
        except Exception:
            handles[k] = None
    time.sleep(0.02)
"#;

/// A child process (the prober, fio) whose output lines are kept as they
/// come; killed on drop.
struct Load {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Load {
    fn start(command: &mut Command) -> Load {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start the load");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                kept.lock().unwrap_or_else(PoisonError::into_inner).push(line);
            }
        });
        Load { child, lines }
    }

    /// The prober of `uris`, writing block `block`.
    fn prober(uris: &[String], block: u64) -> Load {
        Load::start(Command::new("/usr/bin/python3").args(["-c", PROBER, &uris.join(","), &block.to_string()]))
    }

    /// fio through its NBD engine on `uri`: 4K random writes, 8 in flight,
    /// on the volume's bytes [32M, 64M) (the writer's blocks stay below).
    fn fio(uri: &str) -> Load {
        Load::start(Command::new("fio").args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--offset=32M",
            "--size=32M",
            "--time_based",
            "--runtime=120",
            "--randrepeat=0",
        ]))
    }

    /// The prober's answers: (uri index, time).
    fn answers(&self) -> Vec<(usize, f64)> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .iter()
            .filter_map(|line| match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["ok", uri, time] => Some((uri.parse().ok()?, time.parse().ok()?)),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// When each of `hosts` (names of the URIs' order) first and last answered
/// the prober.
fn answered(prober: &Load, hosts: &[&str]) -> Vec<(String, f64, f64)> {
    let answers = prober.answers();
    hosts
        .iter()
        .enumerate()
        .filter_map(|(index, host)| {
            let times: Vec<f64> = answers.iter().filter(|(uri, _)| *uri == index).map(|(_, time)| *time).collect();
            Some((host.to_string(), *times.first()?, *times.last()?))
        })
        .collect()
}

/// Cut a from its quorum, not from its copies: the quorum port (raft and
/// liveness, TCP and UDP) and, on etcd, a's connections to the etcd
/// server. Replication and NBD (other ports) pass.
fn cut_from_the_quorum(group: &Group, quorum: &Quorum, gid: u32) -> Vec<Cut> {
    let mut cuts = vec![Cut::port(&group.ips["a"], gid, group.ports[0])];
    if let Some(port) = quorum.etcd_port() {
        let rule = format!("OUTPUT -m owner --gid-owner {gid} -p tcp --dport {port}");
        cuts.push(Cut::new(&[rule.split_whitespace().map(str::to_string).collect()]));
    }
    cuts
}

/// Invariant 4 with the quorum gone but the copies reachable: the cut
/// production host stops answering writes within its lease, the copy site
/// is promoted only after that (last write a answered < promotion < first
/// write b answered; epoch + 1 in the record and its history), the deposed
/// host's replication to the third site's copy is refused there and counted
/// as old-epoch traffic, and once the cut heals a rejoins as a copy and
/// every store holds every acknowledged write.
///
/// The lease (3 s) is longer than failure detection (2 s), so a takeover
/// that did not wait out the lease would promote b while a still answers.
fn a_production_host_cut_from_its_quorum_but_not_its_copies_is_fenced_before_its_copy_serves(backend: Backend) {
    if !iptables_available() || !require_tool("/usr/bin/python3") {
        return;
    }
    let _serial = serial();
    let started = Instant::now();
    let Some(quorum) = Quorum::start(backend) else { return };
    const LEASE_S: f64 = 3.0;
    let (mut group, formed, gid) =
        three_sites("cutoff", &quorum, |spec| spec.lease_ms((LEASE_S * 1000.0) as u64).on_quorum_loss("io-error"));
    let before = epoch(&formed);
    let entries = history(&formed).len();
    assert_eq!(copy_role(&group, "c")["old_epoch_refused"], 0, "old-epoch traffic before any failover");

    // The writer goes wherever a write is answered: a, then (once promoted) b.
    let uris = nbd_uris(&group, &["a", "b", "c"]);
    let mut cuts = Vec::new();
    let mut cut_at = 0.0;
    let writes = run_writer_from(&mut group, &uris, 0, 60, |group, writes| {
        if cuts.is_empty() && writes.acknowledged.len() >= 200 {
            cuts = cut_from_the_quorum(group, &quorum, gid);
            cut_at = now();
        }
        writes.acknowledged.iter().filter(|(_, _, uri)| *uri == 1).count() < 100
    });
    assert!(!cuts.is_empty(), "the writer never got to 200 writes\n{}", group.logs_tail(30));

    let promoted = group.wait_for(Duration::from_secs(10), |record| record["production"]["host"] == "b");
    assert_eq!(epoch(&promoted), before + 1, "one promotion, one epoch: {promoted}");
    let added = &history(&promoted)[entries..];
    assert!(
        added.len() == 1 && added[0]["production"] == "b" && added[0]["epoch"].as_u64() == Some(before + 1),
        "the history records the promotion of b at epoch {}: {added:?}",
        before + 1
    );
    let promotions = record_lines(&group, "promoted over east");
    assert_eq!(promotions.len(), 1, "one promotion record: {promotions:?}");
    let promotion = promotions[0].0;
    let (_, a_last) = writes.answered_by(0).expect("a answered writes before the cut");
    let (b_first, _) = writes.answered_by(1).expect("b answered writes after its promotion");
    assert!(writes.answered_by(2).is_none(), "c, a copy, answered a write");
    eprintln!(
        "{backend:?}: cut at {cut_at:.3}; a's last write answered +{:.3} s; b promoted +{:.3} s; b's first write \
         answered +{:.3} s",
        a_last - cut_at,
        promotion - cut_at,
        b_first - cut_at
    );
    // The gate passes a request only while the lease (asked for before the
    // cut) runs; its mirror round trip may end a moment later.
    assert!(
        a_last < cut_at + LEASE_S + 0.5,
        "a answered a write {:.3} s after it was cut from its quorum, past its {LEASE_S} s lease",
        a_last - cut_at
    );
    // The takeover waits until a's lease has certainly run out: a's last
    // renewal was asked before the cut, the leader saw a forced out at
    // least 2 s (failure detection) after that, and waits the lease plus a
    // 500 ms margin from then; so b is promoted well after a's last answer
    // (here 2.5 s), and serves after its promotion.
    assert!(
        a_last + 0.5 < promotion && promotion < b_first,
        "a's last answer ({a_last:.3}), b's promotion ({promotion:.3}) and b's first answer ({b_first:.3}) are out of \
         order: a served until its copy site was promoted, or after\n{}",
        group.logs_tail(30)
    );

    // a is still cut and still thinks it produces: its link to c, whose
    // session b took over, dials again with the old epoch, and is refused.
    let counted = system_tests::wait_until(Duration::from_secs(20), || {
        copy_role(&group, "c")["old_epoch_refused"].as_u64() >= Some(1)
    });
    let role = copy_role(&group, "c");
    assert!(counted, "c counted no old-epoch traffic from a: {role}\n{}", group.logs_tail(30));
    assert_eq!(role["epoch_promised"].as_u64(), Some(before + 1), "c promised b's epoch: {role}");
    let refusal = format!("carries epoch {before}, but epoch {} was already promised", before + 1);
    let from_a = group.log("c").lines().any(|line| line.contains(&refusal) && line.contains(&group.ips["a"]));
    assert!(from_a, "c did not log refusing a's epoch {before} ({refusal:?}):\n{}", group.log("c"));
    // c counts the refusal before its Error frame reaches a: a's log line
    // may come a moment later.
    let told = system_tests::wait_until(Duration::from_secs(10), || {
        group.log("a").contains(&format!("refused epoch {before}"))
    });
    assert!(told, "a did not learn it was deposed:\n{}", group.logs_tail(30));
    // Told so by c, a fences itself at once, still cut off from the quorum
    // (it has not read the record that deposed it).
    let fenced = system_tests::wait_until(Duration::from_secs(10), || group.log("a").contains("self-fence: deposed:"));
    assert!(fenced, "a did not fence itself on c's refusal:\n{}", group.logs_tail(30));
    eprintln!("{backend:?}: c refused {} old-epoch Hellos or frames from a", role["old_epoch_refused"]);

    // Healed: a learns it was forced out, fences, and rejoins as a copy.
    drop(cuts);
    group.wait_for(Duration::from_secs(60), |record| {
        copy_entry(record, "east")["host"] == "a" && copy_entry(record, "east")["state"] == "current"
    });
    let settled = group.record();
    assert_eq!(epoch(&settled), before + 1, "another production change after the heal: {settled}");
    assert!(group.log("a").contains("self-fence"), "a did not fence itself:\n{}", group.logs_tail(30));
    group.stop_all(&["b", "a", "c", "w"], Duration::from_secs(30));
    assert_all_present(&group.store("b"), &writes.blocks());
    let production = sha256(&group.store("b"));
    for name in ["a", "c"] {
        assert_eq!(sha256(&group.store(name)), production, "{name}'s store differs from the production store");
    }
    eprintln!("{backend:?}: took {:.1} s", started.elapsed().as_secs_f64());
}

/// Two current sync copy sites when the production site dies, both
/// eligible: exactly one is promoted (one promotion record, epoch + 1 once,
/// one history entry), only its host ever answers writes after the kill
/// (never two NBD servers at once), and the other stays a copy that takes
/// the new production's epoch and is current again with the same data.
/// (The decision has one maker — the raft leader; on etcd, the first voter
/// in config order a node hears — and is a compare-and-set; the truly
/// concurrent race is the switchover test's.)
fn two_current_copy_sites_race_for_promotion_and_exactly_one_wins(backend: Backend) {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let _serial = serial();
    let started = Instant::now();
    let Some(quorum) = Quorum::start(backend) else { return };
    let (mut group, formed, _) = three_sites("race", &quorum, |spec| spec.lease_ms(1000));
    let before = epoch(&formed);
    let entries = history(&formed).len();
    let uris = nbd_uris(&group, &["a", "b", "c"]);
    // The prober writes the last block of the volume through every host.
    let prober = Load::prober(&uris, (64 << 20) / 4096 - 1);
    let probing =
        system_tests::wait_until(Duration::from_secs(10), || prober.answers().iter().any(|(uri, _)| *uri == 0));
    assert!(probing, "the prober got no answer from a");
    let mut killed_at = None;
    let writes = run_writer_from(&mut group, &uris, 0, 60, |group, writes| match killed_at {
        None if writes.acknowledged.len() >= 200 => {
            group.kill("a");
            killed_at = Some(now());
            true
        }
        None => true,
        Some(killed) => writes.acknowledged.iter().filter(|(_, time, _)| *time > killed).count() < 100,
    });
    let killed = killed_at.expect("the writer got to 200 writes");
    let promoted = group.wait_for(Duration::from_secs(10), |record| record["production"]["site"] != "east");
    let winner = promoted["production"]["host"].as_str().expect("a production host").to_string();
    let (loser, loser_site) = if winner == "b" { ("c", "north") } else { ("b", "west") };
    // Long enough for a second promotion to show, if there were one.
    std::thread::sleep(Duration::from_secs(2));
    let record = group.wait_for(Duration::from_secs(30), |record| {
        copy_entry(record, loser_site)["host"] == loser && copy_entry(record, loser_site)["state"] == "current"
    });
    check_prober(&prober, &winner, killed, &group);
    assert_eq!(epoch(&record), before + 1, "more than one promotion: {record}");
    let added = &history(&record)[entries..];
    assert!(
        added.len() == 1 && added[0]["production"] == winner.as_str(),
        "the history records one promotion: {added:?}"
    );
    let promotions = record_lines(&group, "promoted over east");
    assert_eq!(promotions.len(), 1, "exactly one promotion record: {promotions:?}");
    assert_eq!(copy_entry(&record, "east")["state"], "stale", "the lost site is a stale copy: {record}");
    let role = copy_role(&group, loser);
    assert_eq!(role["epoch_promised"].as_u64(), Some(before + 1), "{loser} took the new production's epoch: {role}");
    let by_loser = writes.answered_by(if loser == "b" { 1 } else { 2 });
    assert!(by_loser.is_none(), "{loser}, not promoted, answered writes: {by_loser:?}");
    eprintln!(
        "{backend:?}: {winner} promoted ({}), first write answered {:.2} s after a's SIGKILL",
        promotions[0].1.split("record seq ").nth(1).unwrap_or(""),
        writes.first_after(killed).unwrap_or(f64::NAN),
    );
    group.stop_all(&[&winner, loser, "w"], Duration::from_secs(30));
    assert_all_present(&group.store(&winner), &writes.blocks());
    assert_eq!(sha256(&group.store(loser)), sha256(&group.store(&winner)), "{loser} was not resynced");
    eprintln!("{backend:?}: took {:.1} s", started.elapsed().as_secs_f64());
}

/// The prober saw a answer until the kill, then only `winner`: never two
/// hosts in overlapping stretches.
fn check_prober(prober: &Load, winner: &str, killed: f64, group: &Group) {
    let answered = answered(prober, &["a", "b", "c"]);
    let hosts: Vec<&str> = answered.iter().map(|(host, _, _)| host.as_str()).collect();
    assert_eq!(hosts, ["a", winner], "hosts that answered the prober: {answered:?}\n{}", group.logs_tail(20));
    let (a_last, winner_first) = (answered[0].2, answered[1].1);
    assert!(
        winner_first > a_last,
        "a answered until {a_last:.3} (killed at {killed:.3}), {winner} from {winner_first:.3}: {answered:?}"
    );
}

/// Two operators ask two nodes at the same moment for switchovers to two
/// different copy sites: the requests race on the record's compare-and-set,
/// exactly one switchover happens (epoch + 1 once, one history entry), and
/// the other request is refused (as under way, or as made before the role
/// moved), never carried out after the first.
fn two_switchover_requests_to_different_sites_at_once_move_the_role_once(backend: Backend) {
    let _serial = serial();
    let started = Instant::now();
    let Some(quorum) = Quorum::start(backend) else { return };
    let (group, formed, _) = three_sites("twoswitch", &quorum, |spec| spec);
    let before = epoch(&formed);
    let entries = history(&formed).len();
    let barrier = Arc::new(Barrier::new(2));
    let asks: Vec<_> = [("b", "west"), ("c", "north")]
        .into_iter()
        .map(|(node, site)| {
            let (admin, barrier) = (group.admin(node), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                http_json(admin, "POST", &format!("/switchover?to={site}"), Duration::from_secs(5))
            })
        })
        .collect();
    for ask in asks {
        let answer = ask.join().expect("the request thread");
        assert!(answer.is_ok(), "a switchover request was not taken: {answer:?}");
    }
    let switched = group.wait_for(Duration::from_secs(20), |record| {
        record["production"]["site"] != "east" && record["production"]["host"].is_string()
    });
    let site = switched["production"]["site"].as_str().expect("a site").to_string();
    let (loser, loser_site) = if site == "west" { ("c", "north") } else { ("b", "west") };
    let record = group.wait_for(Duration::from_secs(30), |record| {
        copy_entry(record, "east")["state"] == "current" && copy_entry(record, loser_site)["state"] == "current"
    });
    assert_eq!(epoch(&record), before + 1, "more than one switchover: {record}");
    assert!(record["switchover"].is_null(), "a switchover is still pending: {record}");
    let added = &history(&record)[entries..];
    assert_eq!(added.len(), 1, "one history entry: {added:?}");
    let switchovers = record_lines(&group, "planned switchover");
    assert_eq!(switchovers.len(), 1, "exactly one switchover record: {switchovers:?}");
    // Refused as under way (it met the winner's request in the record) or
    // as moved (it met the record after the winner's switchover).
    let under_way = format!("a switchover to {site} is under way already");
    let moved = format!("switchover to {loser_site} refused: the production role moved");
    // The loser says so when it next decides on a record: after its own
    // compare-and-set failed, or when it reads the winner's record. The
    // wait above can end before that (the record names the copies current
    // as soon as the winner serves).
    let refused_at = Instant::now();
    let said = system_tests::wait_until(Duration::from_secs(10), || {
        let log = group.log(loser);
        log.contains(&under_way) || log.contains(&moved)
    });
    assert!(said, "{loser}, whose request lost, did not say {under_way:?} or {moved:?}:\n{}", group.logs_tail(20));
    let log = group.log(loser);
    let how = if log.contains(&under_way) { "under way" } else { "role moved" };
    eprintln!(
        "{backend:?}: site {site} won, {loser}'s request was refused ({how}, said {:.2} s after the record \
         settled); took {:.1} s",
        refused_at.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Rounds of the SIGKILL loop.
const KILL_ROUNDS: usize = 10;

/// Invariant 1 ten times over: the production host SIGKILLed under fio
/// load and a QD1 writer that logs every acknowledged write; the copy site
/// takes over each time and its store holds every write acknowledged so
/// far; the killed host rejoins as a copy, is resynced, and is killed in
/// turn in the next round (the direction alternates).
fn the_production_host_sigkilled_under_fio_load_ten_times_loses_no_acknowledged_write(backend: Backend) {
    if !require_tool("/usr/bin/python3") || !require_tool("fio") {
        return;
    }
    let _serial = serial();
    let started = Instant::now();
    let Some(quorum) = Quorum::start(backend) else { return };
    let spec = GroupSpec::new("killloop")
        .production("east")
        .copy("west", "sync")
        .member("a", "east", 1, "east.img")
        .member("b", "west", 1, "west.img")
        .witness("w")
        .volume_size("64M")
        .lease_ms(1000);
    let mut group = Group::new("killloop", quorum.on(spec));
    for name in ["w", "a", "b"] {
        group.start(name);
    }
    let formed = group.wait_for(Duration::from_secs(30), |record| {
        record["production"]["host"] == "a" && copy_entry(record, "west")["state"] == "current"
    });
    let mut expected_epoch = epoch(&formed);
    let uris = nbd_uris(&group, &["a", "b"]);
    let site_of = |name: &str| if name == "a" { "east" } else { "west" };
    let (mut producing, mut copying) = ("a", "b");
    let mut acknowledged: Vec<u64> = Vec::new();
    let mut failovers = Vec::new();
    let mut fio_before = fio_digest(&group.store("a"));
    for round in 1..=KILL_ROUNDS {
        let mut fio = Some(Load::fio(&uris[if producing == "a" { 0 } else { 1 }]));
        // fio under way (it connects and lays out its job first).
        std::thread::sleep(Duration::from_millis(1500));
        let mut killed_at = None;
        let first = acknowledged.iter().max().map_or(0, |block| block + 1);
        let writes = run_writer_from(&mut group, &uris, first, 60, |group, writes| match killed_at {
            None if writes.acknowledged.len() >= 200 => {
                // fio spins on a dead connection: it goes first.
                drop(fio.take());
                group.kill(producing);
                killed_at = Some(now());
                true
            }
            None => true,
            Some(killed) => writes.acknowledged.iter().filter(|(_, time, _)| *time > killed).count() < 50,
        });
        let killed = killed_at.unwrap_or_else(|| panic!("round {round}: the writer never got to 200 writes"));
        let failover = writes.first_after(killed).expect("a write answered after the kill");
        failovers.push(failover);
        let by_copy = if copying == "a" { 0 } else { 1 };
        // (A write a moment before the kill may be printed a moment after.)
        assert!(
            writes.acknowledged.iter().all(|(_, time, uri)| *time < killed + 0.25 || *uri == by_copy),
            "round {round}: a write after the kill was answered by another host than {copying}"
        );
        expected_epoch += 1;
        let record = group.wait_for(Duration::from_secs(10), |record| record["production"]["host"] == copying);
        assert_eq!(epoch(&record), expected_epoch, "round {round}: one promotion per kill: {record}");
        acknowledged.extend(writes.blocks());
        // The new production's store, while it serves: every write
        // acknowledged so far, by either host, in any round.
        assert_all_present(&group.store(copying), &acknowledged);
        // fio's part of the store changed this round (each run draws other
        // offsets and data): its writes went through the mirror too.
        let loaded = fio_digest(&group.store(copying));
        assert_ne!(loaded, fio_before, "round {round}: fio's writes are not on the store: it was no load");
        fio_before = loaded;
        // The killed host comes back as a copy and is resynced.
        group.start(producing);
        group.wait_for(Duration::from_secs(60), |record| {
            let entry = copy_entry(record, site_of(producing));
            entry["host"] == producing && entry["state"] == "current"
        });
        eprintln!(
            "{backend:?} round {round}: {producing} killed, {copying} answered {:.2} s later; {} writes, {} refused; \
             {:.1} s so far",
            failover,
            writes.acknowledged.len(),
            writes.refused,
            started.elapsed().as_secs_f64()
        );
        std::mem::swap(&mut producing, &mut copying);
    }
    failovers.sort_by(f64::total_cmp);
    eprintln!(
        "{backend:?}: {KILL_ROUNDS} failovers, first write after the kill: median {:.2} s, max {:.2} s; {} writes \
         acknowledged",
        failovers[KILL_ROUNDS / 2],
        failovers[KILL_ROUNDS - 1],
        acknowledged.len(),
    );
    group.stop_all(&[producing, copying, "w"], Duration::from_secs(30));
    assert_all_present(&group.store(producing), &acknowledged);
    assert_eq!(sha256(&group.store(copying)), sha256(&group.store(producing)), "the stores differ at the end");
    eprintln!("{backend:?}: took {:.1} s", started.elapsed().as_secs_f64());
}

/// A digest of fio's part of `store` ([32M, 64M)).
fn fio_digest(store: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(store).expect("read the store");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes[32 << 20..64 << 20].hash(&mut hasher);
    hasher.finish()
}

system_tests::on_both_backends!(
    a_production_host_cut_from_its_quorum_but_not_its_copies_is_fenced_before_its_copy_serves,
    two_current_copy_sites_race_for_promotion_and_exactly_one_wins,
    two_switchover_requests_to_different_sites_at_once_move_the_role_once,
    the_production_host_sigkilled_under_fio_load_ten_times_loses_no_acknowledged_write,
);
