//! A forced promotion of a DR copy caught in the middle of a resync (issue
//! 13, item 2, in a group): the copy is promoted only to the last consistent
//! image its host keeps (the undo journal), with `--accept-data-loss`; the
//! record states that image's generation, time and age; the promoted host
//! rolls its store back to it before it serves anything, and the old
//! production site, back, is resynced in full from it.
//!
//! ```text
//!  a (east, production) ──async──▶ b (west, DR copy)        w (witness)
//!  1. writes 1..      shipped (lag 0)           ─▶ b's consistent image
//!  2. b SIGKILLed; writes 10000.. and 16 MiB at 96 MiB on east (b missed them)
//!  3. b back: resync at resync_rate_max 4M/s ─▶ b syncing, DR image kept
//!  4. writes 20000.. while b syncs; a SIGKILLed mid-pass
//!  5. crossmirror promote --site west --accept-data-loss
//!  6. through NBD on b: exactly the blocks of 1. (every write acknowledged
//!     before the pass began), nothing of 2. or 4.
//!  7. writes 22000.. on b; a back ─▶ east resynced in full ─▶ identical
//! ```
//!
//! Run on the group's own voters (`embedded::…`) and on an etcd server
//! started for the test (`etcd::…`).

use std::process::Command;
use std::time::Duration;

use system_tests::group::{
    assert_all_present, copy_entry, nbd_uris, run_writer_from, serial, Backend, Group, GroupSpec, Quorum, Writes,
};
use system_tests::{nbdsh_script, require_tool, sha256, wait_until};

/// Where the bulk write missed by b goes, and how much (under a quarter of
/// the volume: the DR image's journal keeps at most that).
const BULK_AT: u64 = 96 << 20;
const BULK_BYTES: u64 = 16 << 20;

/// Through NBD at `uri`: every 4 KiB block that is not all zeroes, as
/// `block` when it holds its own number (the writer's pattern) or as
/// `foreign block` otherwise.
fn nonzero_blocks(uri: &str, size: u64) -> (Vec<u64>, Vec<u64>) {
    let script = format!(
        r#"
import nbd
h = nbd.NBD(); h.connect_uri({uri:?})
size = {size}; step = 4 << 20; zero = bytes(4096)
out = []
for at in range(0, size, step):
    data = h.pread(step, at)
    for off in range(0, step, 4096):
        block = data[off:off + 4096]
        if block == zero:
            continue
        index = (at + off) // 4096
        mine = index.to_bytes(8, "little") * 512
        out.append(("%d" if block == mine else "foreign %d") % index)
print(" ".join(out))
"#
    );
    let (mut own, mut foreign) = (Vec::new(), Vec::new());
    let text = nbdsh_script(&script);
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "foreign" {
            foreign.push(words.next().and_then(|index| index.parse().ok()).expect("a block number"));
        } else {
            own.push(word.parse().expect("a block number"));
        }
    }
    (own, foreign)
}

fn promote(group: &Group, extra: &[&str]) -> std::process::Output {
    Command::new(system_tests::binary())
        .args(["promote", "--config", group.config.to_str().expect("utf-8 path"), "--site", "west"])
        .args(extra)
        .output()
        .expect("run crossmirror promote")
}

/// Steps 1-4: a group whose DR copy b is syncing with a DR image kept
/// (published in its member entry) and whose production host a was
/// SIGKILLed mid-pass. The group is declared first: its nodes are killed
/// before the quorum's etcd.
struct Lost {
    group: Group,
    _quorum: Quorum,
    /// The writes of the image b keeps, of 2., of 4.
    image: Writes,
    missed: Writes,
    during: Writes,
    /// b's `dr_image` status.
    dr_image: serde_json::Value,
    /// One scenario at a time: the pass must still run when a is killed.
    _serial: std::sync::MutexGuard<'static, ()>,
}

fn a_syncing_dr_copy_and_its_production_host_lost(backend: Backend, label: &str) -> Option<Lost> {
    if !require_tool("/usr/bin/python3") {
        return None;
    }
    let serial = serial();
    let quorum = Quorum::start(backend)?;
    let spec = GroupSpec::new(label)
        .production("east")
        .copy("west", "async")
        .member("a", "east", 1, "east.img")
        .member("b", "west", 1, "west.img")
        .witness("w")
        .volume_size("128M")
        .resync_rate_max("4M")
        .lease_ms(1000);
    let mut group = Group::new(label, quorum.on(spec));
    for name in ["w", "a", "b"] {
        group.start(name);
    }
    group.wait_for(Duration::from_secs(90), |record| {
        record["production"]["host"] == "a" && copy_entry(record, "west")["state"] == "current"
    });
    let on_east = nbd_uris(&group, &["a"]);

    // 1. The image b will keep: every write shipped.
    // (Block 0 would hold zeroes: the writes start at block 1. Each phase
    // writes blocks of its own.)
    let image = run_writer_from(&mut group, &on_east, 1, 10, |_, writes| writes.acknowledged.len() < 2_000);
    assert!(!image.acknowledged.is_empty());
    group.wait_status("a", Duration::from_secs(20), |status| {
        status["roles"]["production"]["copies"][0]["lag_bytes"] == 0
    });
    // 2. b goes away; east takes writes it misses.
    group.kill("b");
    group.wait_for(Duration::from_secs(20), |record| copy_entry(record, "west")["state"] == "stale");
    let missed = run_writer_from(&mut group, &on_east, 10_000, 10, |_, writes| writes.acknowledged.len() < 1_000);
    nbdsh_script(&format!(
        "import nbd\nh = nbd.NBD(); h.connect_uri({:?})\nfor at in range({BULK_AT}, {}, 1 << 20):\n    h.pwrite(b'\\xab' * (1 << 20), at)\nh.flush()\n",
        on_east[0],
        BULK_AT + BULK_BYTES
    ));
    // 3. b back: its resync, held to 4 MiB/s, keeps a DR image meanwhile,
    // which b publishes in its member entry.
    group.start("b");
    let syncing = group.wait_status("b", Duration::from_secs(30), |status| {
        status["roles"]["copy"]["store_state"] == "syncing" && status["roles"]["copy"]["dr_image"]["state"] == "kept"
    });
    let dr_image = syncing["roles"]["copy"]["dr_image"].clone();
    let published = group.wait_for(Duration::from_secs(10), |record| {
        record["members"]["b"]["dr_image"]["state"] == "kept" && record["members"]["b"]["store_consistent"] == false
    });
    assert_eq!(published["members"]["b"]["dr_image"]["taken_at_ms"], dr_image["taken_at_ms"], "{published}");
    assert_eq!(published["members"]["b"]["dr_image"]["generation"], dr_image["generation"], "{published}");
    // The node that answers `status` shows the record as it last read it
    // (on etcd, a watch behind the read above): a few seconds to see it.
    let line = format!(
        "hosted by b: syncing; DR image kept (generation {}, taken at {} Unix ms)",
        dr_image["generation"], dr_image["taken_at_ms"]
    );
    let mut table = String::new();
    let shown = wait_until(Duration::from_secs(10), || {
        table = group.status_command(&[]).1;
        table.contains(&line)
    });
    assert!(shown, "crossmirror status does not show the DR image:\n{table}");
    // 4. Writes while b syncs; a is SIGKILLed in the middle of the pass.
    let during = run_writer_from(&mut group, &on_east, 20_000, 10, |group, writes| {
        if writes.acknowledged.len() == 100 {
            group.kill("a");
            return false;
        }
        true
    });
    assert!(during.acknowledged.len() >= 100);
    let copy = group.status("b");
    assert_eq!(
        copy["roles"]["copy"]["store_state"], "syncing",
        "the pass ended before a was killed: the scenario does not exercise a syncing copy\n{copy}"
    );
    // The leader promotes nobody by itself.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(group.record()["production"]["site"], "east", "a syncing copy was promoted without the operator");
    Some(Lost { group, _quorum: quorum, image, missed, during, dr_image, _serial: serial })
}

fn a_syncing_dr_copy_is_promoted_to_its_last_consistent_image_and_the_old_production_resynced_from_it(
    backend: Backend,
) {
    let Some(Lost { mut group, _quorum, image, missed, during, dr_image, _serial }) =
        a_syncing_dr_copy_and_its_production_host_lost(backend, "drpromote")
    else {
        return;
    };
    let on_west = nbd_uris(&group, &["b"]);
    // The operator forces the promotion.
    let refused = promote(&group, &[]);
    assert!(!refused.status.success(), "promoted without --accept-data-loss");
    let promoted_at = system_tests::group::now();
    let output = promote(&group, &["--accept-data-loss"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "promote failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    eprintln!("{}", text.trim());
    let promoted = group.wait_for(Duration::from_secs(30), |record| {
        record["production"]["host"] == "b" && copy_entry(record, "east")["state"] == "stale"
    });
    // The record states the image it was promoted to, and its age.
    let taken_at_ms = dr_image["taken_at_ms"].as_u64().expect("taken_at_ms");
    let generation = dr_image["generation"].as_u64().expect("generation");
    assert_eq!(promoted["promoted_image"]["taken_at_ms"], taken_at_ms, "{promoted}");
    assert_eq!(promoted["promoted_image"]["generation"], generation, "{promoted}");
    assert_eq!(promoted["promoted_image"]["host"], "b", "{promoted}");
    let fork = promoted["history"].as_array().and_then(|history| history.last()).expect("history")["fork"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        fork.contains(&format!("rolled back to its DR image of generation {generation} taken at {taken_at_ms}")),
        "{fork}"
    );
    let age: f64 = fork
        .split(", age ")
        .nth(1)
        .and_then(|rest| rest.split(" s").next())
        .and_then(|age| age.parse().ok())
        .unwrap_or_else(|| panic!("no age in the fork: {fork}"));
    let expected_age = promoted_at - taken_at_ms as f64 / 1000.0;
    assert!((age - expected_age).abs() < 5.0, "stated age {age} s, the image is {expected_age:.1} s old: {fork}");
    assert!(text.contains("DR image"), "promote does not say what it rolled back to: {text}");
    // b serves: through NBD, exactly the blocks written before the pass
    // began, none written after (missed, bulk, during), nothing else.
    let b = group.wait_status("b", Duration::from_secs(30), |status| !status["roles"]["production"].is_null());
    eprintln!("b serves: {}", b["roles"]["production"]["nbd"]);
    let rolled = group.log("b");
    let rolled = rolled
        .lines()
        .find(|line| line.contains("rolled the store back to its DR image"))
        .unwrap_or_else(|| panic!("b served without saying it rolled back\n{}", group.logs_tail(40)));
    eprintln!("{rolled}");
    let entries: u64 = rolled
        .rsplit("entries=")
        .next()
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no entry count in {rolled:?}"));
    assert!(entries > 0, "the pass had overwritten nothing: the rollback was not exercised");
    let (own, foreign) = nonzero_blocks(&on_west[0], 128 << 20);
    assert!(foreign.is_empty(), "blocks that are no write of the image: {:?}", &foreign[..foreign.len().min(20)]);
    let mut expected = image.blocks();
    expected.sort_unstable();
    assert_eq!(
        own.len(),
        expected.len(),
        "the promoted store is not the DR image: {} of its blocks are written, the image has {} ({} missed and {} \
         during the pass)",
        own.len(),
        expected.len(),
        missed.acknowledged.len(),
        during.acknowledged.len()
    );
    assert_eq!(own, expected, "the promoted store is not the DR image");
    eprintln!(
        "promoted to the DR image of generation {generation}, {age:.1} s old: {} writes kept, {} missed by b and {} \
         written during its resync given up (and {} MiB written in bulk)",
        expected.len(),
        missed.acknowledged.len(),
        during.acknowledged.len(),
        BULK_BYTES >> 20
    );
    // 7. b takes writes; a comes back and is resynced in full from b.
    let after = run_writer_from(&mut group, &on_west, 22_000, 10, |_, writes| writes.acknowledged.len() < 1_000);
    group.start("a");
    group.wait_for(Duration::from_secs(120), |record| {
        record["production"]["host"] == "b" && copy_entry(record, "east")["state"] == "current"
    });
    group.stop_all(&["b", "a", "w"], Duration::from_secs(30));
    assert_all_present(&group.store("b"), &after.blocks());
    assert_eq!(sha256(&group.store("a")), sha256(&group.store("b")), "east kept writes of the abandoned line");
}

/// The promoted host cannot roll back (its journal's header damaged after
/// the image was published): it does not serve, and its member entry says
/// why; its store and journal are left as they were.
fn a_promoted_host_that_cannot_roll_back_to_the_dr_image_serves_nothing_and_says_why(backend: Backend) {
    let Some(Lost { group, _quorum, .. }) = a_syncing_dr_copy_and_its_production_host_lost(backend, "drfail") else {
        return;
    };
    let store = group.store("b");
    let mut journal = store.clone().into_os_string();
    journal.push(".cmmeta.cmundo");
    let journal = std::path::PathBuf::from(journal);
    let mut bytes = std::fs::read(&journal).expect("b keeps an undo journal");
    bytes[20] ^= 0xff;
    std::fs::write(&journal, &bytes).expect("damage the journal's header");
    let output = promote(&group, &["--accept-data-loss"]);
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{said}");
    assert!(!output.status.success(), "promote says it worked: {said}");
    assert!(said.contains("was promoted to its DR image, but b does not serve: cannot roll the store back"), "{said}");
    let refused = group.wait_for(Duration::from_secs(30), |record| {
        record["members"]["b"]["access_problem"]
            .as_str()
            .is_some_and(|problem| problem.contains("cannot roll the store back to its DR image"))
    });
    eprintln!("b's entry: {}", refused["members"]["b"]);
    assert!(
        refused["members"]["b"]["access_problem"].as_str().is_some_and(|problem| problem.contains("damaged header")),
        "{refused}"
    );
    // For a while: b never serves, and nothing answers NBD at its address.
    let on_west = nbd_uris(&group, &["b"]);
    for _ in 0..10 {
        let status = group.status("b");
        assert!(status["roles"]["production"].is_null(), "b serves a store it could not roll back: {status}");
        let probe = format!(
            "import nbd\ntry:\n    h = nbd.NBD(); h.connect_uri({:?}); print('served')\nexcept Exception:\n    print('refused')\n",
            on_west[0]
        );
        assert_eq!(nbdsh_script(&probe).trim(), "refused", "b answers NBD");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(std::fs::read(&journal).expect("the journal is kept"), bytes, "the journal was changed");
    let metadata = std::process::Command::new(system_tests::binary())
        .args(["rollback", "--volume", store.to_str().expect("utf-8 path")])
        .output()
        .expect("run crossmirror rollback");
    assert!(!metadata.status.success(), "a damaged journal was applied by hand");
}

system_tests::on_both_backends!(
    a_syncing_dr_copy_is_promoted_to_its_last_consistent_image_and_the_old_production_resynced_from_it,
    a_promoted_host_that_cannot_roll_back_to_the_dr_image_serves_nothing_and_says_why,
);
