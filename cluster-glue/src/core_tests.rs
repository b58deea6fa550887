//! The core driven by exact event sequences: each test says which commands
//! come out, in order.

use super::*;
use crate::record::{CopyRecordState, DrImage, DrImageState, GroupRecord, MemberEntry, MemberState, PromotedImage};

const DIGEST: &str = "d1";

fn topology(me: &str) -> Topology {
    let member = |name: &str, site: &str, order: u32, last: u8| MemberInfo {
        name: name.to_string(),
        site: site.to_string(),
        backup_order: order,
        address: IpAddr::from([127, 0, 0, last]),
    };
    Topology {
        me: me.to_string(),
        production_site: "east".to_string(),
        copy_sites: vec![CopySite { name: "west".to_string(), mode: "sync".to_string(), identical: false }],
        members: vec![member("a", "east", 1, 1), member("b1", "west", 1, 2), member("b2", "west", 2, 4)],
        witnesses: vec!["w".to_string()],
        config_digest: DIGEST.to_string(),
        mirror_port: 7401,
        lease_ms: 2000,
    }
}

fn west() -> Vec<CopySite> {
    vec![CopySite { name: "west".to_string(), mode: "sync".to_string(), identical: false }]
}

fn entry(state: MemberState, incarnation: u64, access: bool) -> MemberEntry {
    MemberEntry { state, incarnation, access, access_problem: None, store_consistent: None, dr_image: None }
}

fn empty_record() -> GroupRecord {
    GroupRecord::new(DIGEST, "east", &[("west".to_string(), "sync".to_string())])
}

/// The record after `change`, with seq + 1.
fn next(record: &GroupRecord, change: impl FnOnce(&mut GroupRecord)) -> GroupRecord {
    let mut next = record.clone();
    change(&mut next);
    next.seq = record.seq + 1;
    next
}

fn write(before: &GroupRecord, after: &GroupRecord, why: &str) -> Command {
    Command::Write { expected: before.seq, record: after.clone(), why: why.to_string() }
}

fn live(names: &[&str], settled: bool) -> Event {
    Event::Liveness { live: names.iter().map(|name| name.to_string()).collect(), settled }
}

/// A node that has joined with access, in a record where `others` are
/// joined too; returns the core and the record it holds.
fn joined_node(me: &str, leader: bool, others: &[&str]) -> (Core, GroupRecord) {
    let mut core = Core::new(topology(me));
    let mut record = empty_record();
    for other in others {
        record.members.insert(other.to_string(), entry(MemberState::Joined, 1, *other != "w"));
    }
    record.seq = 5;
    core.step(Event::Leader(leader));
    core.step(live(&[&["a", "b1", "b2", "w"][..], others].concat(), false));
    let commands = core.step(Event::Record(Some(record.clone())));
    let Some(Command::Write { record: joining, .. }) = commands.last().cloned() else { panic!("{commands:?}") };
    core.step(Event::Written(joining.clone()));
    let commands = core.step(Event::Access(Ok(())));
    let Some(Command::Write { record: joined, .. }) = commands.last().cloned() else { panic!("{commands:?}") };
    (core, joined)
}

#[test]
fn the_first_member_creates_the_record_and_joins() {
    let mut core = Core::new(topology("a"));
    let commands = core.step(Event::Record(None));
    let mut created = empty_record();
    created.members.insert("a".to_string(), entry(MemberState::Joining, 1, false));
    created.seq = 1;
    assert_eq!(
        commands,
        vec![
            Command::CheckAccess,
            Command::Write { expected: 0, record: created.clone(), why: "a joining (incarnation 1)".into() }
        ]
    );
    assert_eq!(core.step(Event::Written(created.clone())), vec![]);
    let joined = next(&created, |record| {
        record.members.insert("a".into(), entry(MemberState::Joined, 1, true)).map(drop).unwrap_or(())
    });
    assert_eq!(core.step(Event::Access(Ok(()))), vec![write(&created, &joined, "a joined with access to its store")]);
    // Not the leader: nobody names it host, so it runs nothing.
    assert_eq!(core.step(Event::Written(joined)), vec![]);
}

#[test]
fn the_leader_joins_and_makes_itself_production_host_in_one_write_then_serves_with_no_copy_host() {
    let (mut core, joined) = joined_node("a", true, &[]);
    assert_eq!(joined.production.host.as_deref(), Some("a"));
    assert_eq!((joined.epoch, joined.generation), (1, 1));
    assert_eq!(joined.history.len(), 1);
    assert_eq!(
        core.step(Event::Written(joined)),
        vec![
            Command::StartProduction { epoch: 1, generation: 1, copies: west(), roll_back_to: None },
            Command::SetCopyHost { site: "west".into(), address: None }
        ]
    );
}

#[test]
fn a_copy_host_that_joins_is_picked_up_and_the_production_host_connects_to_it() {
    let (mut core, hosted) = joined_node("a", true, &[]);
    core.step(Event::Written(hosted.clone()));
    // b1 joins (the record read after its write).
    let with_b1 = next(&hosted, |record| {
        record.members.insert("b1".into(), entry(MemberState::Joined, 1, true));
    });
    let picked = next(&with_b1, |record| record.copies[0].host = Some("b1".into()));
    assert_eq!(
        core.step(Event::Record(Some(with_b1.clone()))),
        vec![write(&with_b1, &picked, "copy site west hosted by b1")]
    );
    assert_eq!(
        core.step(Event::Written(picked.clone())),
        vec![Command::SetCopyHost { site: "west".into(), address: Some("127.0.0.2:7401".parse().unwrap()) }]
    );
    // On b1, the same record starts the copy role.
    let (mut b1, _) = joined_node("b1", false, &["a"]);
    let mine = next(&picked, |record| {
        record.members.insert("b1".into(), entry(MemberState::Joined, 1, true));
    });
    assert_eq!(b1.step(Event::Written(mine)), vec![Command::StartCopy]);
}

#[test]
fn a_silent_copy_host_is_forced_out_and_the_next_in_backup_order_takes_its_store() {
    let (mut core, hosted) = joined_node("a", true, &["b1", "b2"]);
    assert_eq!(hosted.copies[0].host.as_deref(), Some("b1"));
    let commands = core.step(Event::Written(hosted.clone()));
    assert_eq!(commands[0], Command::StartProduction { epoch: 1, generation: 1, copies: west(), roll_back_to: None });
    // Not settled yet: silence is not failure.
    assert_eq!(core.step(live(&["a", "b2", "w"], false)), vec![]);
    let moved = next(&hosted, |record| {
        record.members.get_mut("b1").unwrap().state = MemberState::ForcedLeaving;
        record.copies[0].host = Some("b2".into());
    });
    assert_eq!(
        core.step(live(&["a", "b2", "w"], true)),
        vec![write(&hosted, &moved, "b1 forced out: not heard from; copy site west hosted by b2")]
    );
    assert_eq!(
        core.step(Event::Written(moved)),
        vec![Command::SetCopyHost { site: "west".into(), address: Some("127.0.0.4:7401".parse().unwrap()) }]
    );
}

#[test]
fn a_member_that_learns_it_was_forced_out_fences_itself_then_joins_again() {
    let (mut b1, joined) = joined_node("b1", false, &["a"]);
    let hosting = next(&joined, |record| record.copies[0].host = Some("b1".into()));
    assert_eq!(b1.step(Event::Written(hosting.clone())), vec![Command::StartCopy]);
    let forced = next(&hosting, |record| {
        record.members.get_mut("b1").unwrap().state = MemberState::ForcedLeaving;
        record.copies[0].host = None;
    });
    let rejoining = next(&forced, |record| {
        record.members.insert("b1".into(), entry(MemberState::Joining, 2, false));
    });
    assert_eq!(
        b1.step(Event::Record(Some(forced.clone()))),
        vec![
            Command::Fence { why: "the group forced this member out".into() },
            Command::CheckAccess,
            write(&forced, &rejoining, "b1 joining (incarnation 2)"),
        ]
    );
}

#[test]
fn a_member_with_another_config_exits_before_writing_anything() {
    let mut core = Core::new(topology("b1"));
    let mut record = empty_record();
    record.config_digest = "other".into();
    let commands = core.step(Event::Record(Some(record)));
    assert!(
        matches!(&commands[..], [Command::Exit { error: Some(error) }] if error.contains("differs")),
        "{commands:?}"
    );
    assert_eq!(core.step(Event::Access(Ok(()))), vec![]);
}

#[test]
fn a_second_node_with_the_same_name_is_refused() {
    let mut core = Core::new(topology("b1"));
    let record = empty_record();
    let commands = core.step(Event::Record(Some(record.clone())));
    let Some(Command::Write { record: joining, .. }) = commands.last().cloned() else { panic!() };
    core.step(Event::Written(joining.clone()));
    // Another process named b1 started meanwhile.
    let other = next(&joining, |record| {
        record.members.insert("b1".into(), entry(MemberState::Joining, 2, false));
    });
    let commands = core.step(Event::Record(Some(other)));
    assert!(
        matches!(&commands[..], [Command::Exit { error: Some(error) }] if error.contains("another node")),
        "{commands:?}"
    );
}

#[test]
fn a_production_host_that_leaves_hands_over_top_down_and_the_next_member_takes_it_with_a_new_epoch() {
    let (mut core, hosted) = joined_node("a", true, &["b1"]);
    core.step(Event::Written(hosted.clone()));
    let leaving = next(&hosted, |record| record.members.get_mut("a").unwrap().state = MemberState::Leaving);
    assert_eq!(core.step(Event::Leave), vec![Command::StopRoles, write(&hosted, &leaving, "a leaving")]);
    assert_eq!(core.step(Event::Written(leaving.clone())), vec![]);
    let left = next(&leaving, |record| {
        record.members.get_mut("a").unwrap().state = MemberState::Inactive;
        record.production.host = None;
    });
    assert_eq!(
        core.step(Event::RolesStopped),
        vec![Command::Exit { error: None }, write(&leaving, &left, "a left; its roles are handed on")]
    );
    // Any later event is ignored.
    assert_eq!(core.step(Event::Written(left.clone())), vec![]);
    // Another production member, leading, takes the site with a new epoch
    // and a new generation.
    let mut topology = topology("a2");
    topology.members.push(MemberInfo {
        name: "a2".into(),
        site: "east".into(),
        backup_order: 2,
        address: IpAddr::from([127, 0, 0, 5]),
    });
    let mut a2 = Core::new(topology);
    a2.step(Event::Leader(true));
    a2.step(live(&["a2", "b1", "w"], false));
    let Some(Command::Write { record: joining, .. }) = a2.step(Event::Record(Some(left))).pop() else { panic!() };
    a2.step(Event::Written(joining));
    let Some(Command::Write { record: taken, why, .. }) = a2.step(Event::Access(Ok(()))).pop() else { panic!() };
    assert_eq!(why, "a2 joined with access to its store; a2 hosts the production site (epoch 2)");
    assert_eq!((taken.epoch, taken.generation, taken.production.host.as_deref()), (2, 2, Some("a2")));
    assert_eq!(
        taken.history.last().map(|entry| (entry.generation, entry.epoch, entry.production.as_str())),
        Some((2, 2, "a2"))
    );
}

#[test]
fn a_stale_copy_state_written_by_the_replicator_is_kept_by_the_core() {
    let (mut core, hosted) = joined_node("a", true, &["b1"]);
    core.step(Event::Written(hosted.clone()));
    let stale = next(&hosted, |record| {
        record.copies[0].state = CopyRecordState::Stale { since: 9, reason: "connection lost".into() };
    });
    // Nothing to decide: the core never touches a copy's state.
    assert_eq!(core.step(Event::Record(Some(stale.clone()))), vec![]);
    assert_eq!(core.record(), Some(&stale));
}

#[test]
fn a_failed_production_host_is_replaced_only_after_its_lease_has_run_out_with_a_new_epoch_and_generation() {
    // a2 leads; a (production host) goes silent.
    let mut topology = topology("a2");
    topology.members.push(MemberInfo {
        name: "a2".into(),
        site: "east".into(),
        backup_order: 2,
        address: IpAddr::from([127, 0, 0, 5]),
    });
    let mut a2 = Core::new(topology);
    let mut record = empty_record();
    record.members.insert("a".into(), entry(MemberState::Joined, 1, true));
    record.members.insert("b1".into(), entry(MemberState::Joined, 1, true));
    record.production.host = Some("a".into());
    record.copies[0].host = Some("b1".into());
    record.epoch = 1;
    record.push_history("a");
    record.seq = 5;
    a2.step(Event::Leader(true));
    a2.step(Event::Tick { now_ms: 1_000 });
    a2.step(live(&["a", "a2", "b1", "w"], false));
    let Some(Command::Write { record: joining, .. }) = a2.step(Event::Record(Some(record))).pop() else { panic!() };
    a2.step(Event::Written(joining));
    let Some(Command::Write { record: joined, .. }) = a2.step(Event::Access(Ok(()))).pop() else { panic!() };
    assert_eq!(joined.production.host.as_deref(), Some("a"), "a live production host is not replaced");
    assert_eq!(a2.step(Event::Written(joined.clone())), vec![]);
    // a is silent: forced out, but not replaced yet.
    let Some(Command::Write { record: forced, why, .. }) = a2.step(live(&["a2", "b1", "w"], true)).pop() else {
        panic!()
    };
    assert_eq!(why, "a forced out: not heard from");
    assert_eq!(forced.production.host.as_deref(), Some("a"));
    assert_eq!(a2.step(Event::Written(forced.clone())), vec![]);
    // Its lease (2000 ms) plus the margin have not passed yet.
    assert_eq!(a2.step(Event::Tick { now_ms: 1_000 + 2_000 + LEASE_MARGIN_MS - 1 }), vec![]);
    let taken = next(&forced, |record| {
        record.production.host = Some("a2".into());
        record.epoch = 2;
        record.generation = 2;
        record.push_history("a2");
    });
    assert_eq!(
        a2.step(Event::Tick { now_ms: 1_000 + 2_000 + LEASE_MARGIN_MS }),
        vec![write(
            &forced,
            &taken,
            "a failed and its lease ran out: a2 takes over the production site (epoch 2, generation 2)"
        )]
    );
    assert_eq!(
        a2.step(Event::Written(taken)),
        vec![
            Command::StartProduction { epoch: 2, generation: 2, copies: west(), roll_back_to: None },
            Command::SetCopyHost { site: "west".into(), address: Some("127.0.0.2:7401".parse().unwrap()) }
        ]
    );
}

/// A record where a hosts east, b1 hosts west (in `west_state`), a is
/// forced out; b1's core, leading, has seen it so at time 1000.
fn production_site_lost(west_state: CopyRecordState) -> (Core, GroupRecord) {
    production_site_lost_with(west_state, "sync")
}

/// The same, with west's copy in `mode`.
fn production_site_lost_with(west_state: CopyRecordState, mode: &str) -> (Core, GroupRecord) {
    let (mut b1, joined) = joined_node("b1", true, &["a"]);
    assert_eq!(joined.production.host.as_deref(), Some("a"));
    assert_eq!(b1.step(Event::Written(joined.clone())), vec![Command::StartCopy]);
    let mut record = next(&joined, |record| {
        record.copies[0].state = west_state;
        record.copies[0].mode = mode.to_string();
        record.copies[0].store = "ab".repeat(16);
        record.members.get_mut("a").unwrap().state = MemberState::ForcedLeaving;
    });
    record.seq = 20;
    b1.step(Event::Tick { now_ms: 1_000 });
    let commands = b1.step(Event::Record(Some(record.clone())));
    assert!(!commands.iter().any(|command| matches!(command, Command::Write { .. })), "{commands:?}");
    assert_eq!(b1.step(live(&["b1", "w"], true)), vec![]);
    (b1, record)
}

#[test]
fn a_current_copy_is_promoted_when_the_production_site_is_lost_after_the_lease_and_its_host_serves() {
    let (mut b1, lost) = production_site_lost(CopyRecordState::Current);
    assert_eq!(b1.step(Event::Tick { now_ms: 1_000 + 2_000 + LEASE_MARGIN_MS - 1 }), vec![]);
    let promoted = next(&lost, |record| {
        record.production = crate::record::Production { site: "west".into(), host: Some("b1".into()) };
        record.epoch = 2;
        record.generation = 2;
        record.push_history("b1");
        record.copies[0] = crate::record::CopyEntry {
            site: "east".into(),
            host: None,
            mode: "sync".into(),
            state: CopyRecordState::Stale {
                since: 0,
                reason:
                    "site west took over the production role (the production site failed): resynced in full from it"
                        .into(),
            },
            generation: 2,
            slot: 0,
            store: "0".repeat(32),
            identical_epoch: None,
        };
    });
    assert_eq!(
        b1.step(Event::Tick { now_ms: 1_000 + 2_000 + LEASE_MARGIN_MS }),
        vec![write(
            &lost,
            &promoted,
            "the production site failed: copy site west (current) promoted over east, b1 serves (epoch 2, generation 2)"
        )]
    );
    assert_eq!(
        b1.step(Event::Written(promoted)),
        vec![
            Command::StopCopy,
            Command::StartProduction {
                epoch: 2,
                generation: 2,
                copies: vec![CopySite { name: "east".into(), mode: "sync".into(), identical: false }],
                roll_back_to: None,
            },
            Command::SetCopyHost { site: "east".into(), address: None },
        ]
    );
}

#[test]
fn a_stale_or_syncing_copy_is_never_promoted_and_the_leader_says_why_once() {
    for state in [CopyRecordState::Stale { since: 7, reason: "connection lost".into() }, CopyRecordState::Syncing] {
        let (mut b1, _) = production_site_lost(state.clone());
        let commands = b1.step(Event::Tick { now_ms: 10_000 });
        let [Command::Notice { message }] = &commands[..] else { panic!("{commands:?}") };
        assert!(message.contains("no copy may be promoted"), "{message}");
        assert!(
            message.contains(if state == CopyRecordState::Syncing { "syncing" } else { "stale since 7" }),
            "{message}"
        );
        assert_eq!(b1.step(Event::Tick { now_ms: 20_000 }), vec![], "said once");
    }
}

#[test]
fn an_async_copy_is_not_promoted_by_itself_and_the_leader_says_how_to_force_it() {
    let (mut b1, _) = production_site_lost_with(CopyRecordState::Current, "async");
    let commands = b1.step(Event::Tick { now_ms: 10_000 });
    let [Command::Notice { message }] = &commands[..] else { panic!("{commands:?}") };
    assert!(message.contains("west is an async copy and may lack acknowledged writes"), "{message}");
    assert!(message.contains("crossmirror promote --site west --accept-data-loss"), "{message}");
}

#[test]
fn a_forced_promotion_waits_out_the_lease_then_records_a_fork_and_every_other_site_is_resynced_in_full() {
    let (mut b1, lost) = production_site_lost_with(CopyRecordState::Current, "async");
    let asked = next(&lost, |record| record.promotion = Some("west".into()));
    assert_eq!(
        b1.step(Event::Promote { site: "west".into() }),
        vec![write(&lost, &asked, "forced promotion of site west asked for (--accept-data-loss)")]
    );
    assert_eq!(b1.step(Event::Written(asked.clone())), vec![]);
    // a's lease (2000 ms) plus the margin have not run out: it waits.
    assert_eq!(b1.step(Event::Tick { now_ms: 1_000 + 2_000 + LEASE_MARGIN_MS - 1 }), vec![]);
    let fork = "forced promotion of west over east (generation 1 forked): the acknowledged writes not yet shipped \
                to this async copy given up; the other sites are resynced in full from west";
    let promoted = next(&asked, |record| {
        record.promotion = None;
        record.production = crate::record::Production { site: "west".into(), host: Some("b1".into()) };
        record.epoch = 2;
        record.generation = 2;
        record.push_history("b1");
        record.history.last_mut().unwrap().fork = Some(fork.into());
        record.copies[0] = crate::record::CopyEntry {
            site: "east".into(),
            host: None,
            mode: "async".into(),
            state: CopyRecordState::Stale {
                since: 0,
                reason: "generation 1 was forked by the forced promotion of west: resynced in full".into(),
            },
            generation: 2,
            slot: 0,
            store: "0".repeat(32),
            identical_epoch: None,
        };
    });
    assert_eq!(
        b1.step(Event::Tick { now_ms: 1_000 + 2_000 + LEASE_MARGIN_MS }),
        vec![write(
            &asked,
            &promoted,
            "forced promotion (--accept-data-loss): copy site west (current) promoted over east, b1 serves (epoch 2, generation 2)"
        )]
    );
    let commands = b1.step(Event::Written(promoted));
    assert_eq!(commands[0], Command::StopCopy);
    assert!(matches!(commands[1], Command::StartProduction { epoch: 2, generation: 2, .. }), "{commands:?}");
    assert_eq!(commands.last(), Some(&Command::Notice { message: fork.into() }));
}

#[test]
fn a_forced_promotion_is_refused_while_the_production_host_serves_for_a_syncing_copy_and_one_never_synced() {
    let (mut b1, joined) = joined_node("b1", true, &["a"]);
    assert_eq!(b1.step(Event::Written(joined.clone())), vec![Command::StartCopy]);
    let commands = b1.step(Event::Promote { site: "west".into() });
    let [Command::Notice { message }] = &commands[..] else { panic!("{commands:?}") };
    assert!(message.starts_with("forced promotion of west refused: the production site east still has a"), "{message}");
    // A syncing copy (no consistent image known to the group) and a copy
    // never synced (no store token) are refused, after the lease.
    let stale = CopyRecordState::Stale { since: 3, reason: "connection lost".into() };
    for (state, token, mid_pass, why) in [
        (CopyRecordState::Syncing, "ab".repeat(16), None, "its copy is syncing"),
        (CopyRecordState::Current, "0".repeat(32), None, "its store was never synced"),
        (stale, "ab".repeat(16), Some(false), "its host says its store is in the middle of a resync"),
    ] {
        let (mut b1, lost) = production_site_lost_with(state, "async");
        // b1 hosts west: what its copy role says goes in its entry.
        let pending = match b1.step(Event::CopyStore { consistent: mid_pass, dr_image: None }).pop() {
            Some(Command::Write { record, .. }) => Some(record),
            _ => None,
        };
        let mut record = pending.clone().unwrap_or_else(|| lost.clone());
        record.copies[0].store = token;
        record.seq += 1;
        match pending {
            Some(_) => b1.step(Event::Written(record)),
            None => b1.step(Event::Record(Some(record))),
        };
        let Some(Command::Write { record: asked, .. }) = b1.step(Event::Promote { site: "west".into() }).pop() else {
            panic!("the request is recorded")
        };
        b1.step(Event::Written(asked));
        let commands = b1.step(Event::Tick { now_ms: 10_000 });
        let [Command::Write { record: dropped, why: said, .. }] = &commands[..] else { panic!("{commands:?}") };
        assert!(said.contains(&format!("forced promotion of west refused: {why}")), "{said}");
        assert_eq!((dropped.epoch, dropped.promotion.as_deref()), (1, None), "nothing promoted");
    }
}

#[test]
fn a_clean_switchover_hands_the_store_over_and_the_new_production_host_resyncs_only_new_writes() {
    let (mut a, joined) = joined_node("a", true, &["b1", "w"]);
    assert_eq!(joined.copies[0].host.as_deref(), Some("b1"));
    let commands = a.step(Event::Written(joined.clone()));
    assert!(matches!(commands[0], Command::StartProduction { epoch: 1, .. }), "{commands:?}");
    let token = "ab".repeat(16);
    assert_eq!(a.step(Event::Serving { store: token.clone() }), vec![]);
    let current = next(&joined, |record| record.copies[0].state = CopyRecordState::Current);
    a.step(Event::Record(Some(current.clone())));
    let commands = a.step(Event::Switchover { to: "west".into(), asked_at: None });
    let [Command::StopProduction, Command::Write { .. }] = &commands[..] else { panic!("{commands:?}") };
    // The write conflicts (the copy's state was recorded meanwhile): the
    // retry still hands the stopped store over.
    assert_eq!(a.step(Event::Conflict), vec![]);
    let commands = a.step(Event::Record(Some(next(&current, |_| {}))));
    let [Command::Write { record: moved, .. }] = &commands[..] else { panic!("{commands:?}") };
    assert_eq!(moved.production, crate::record::Production { site: "west".into(), host: Some("b1".into()) });
    assert_eq!((moved.epoch, moved.generation), (2, 2));
    assert_eq!(moved.handover, None, "consumed by the promotion");
    assert_eq!(moved.switchover, None);
    let east = moved.copy("east").unwrap();
    assert_eq!(east.state, CopyRecordState::Current, "the stopped store equals the current copy");
    assert_eq!(east.store, token);
    assert_eq!(east.identical_epoch, Some(2));
    // b1 reads it: it serves, and knows east's store needs only new writes.
    let (mut b1, b1_joined) = joined_node("b1", false, &["a", "w"]);
    b1.step(Event::Written(b1_joined));
    // It takes the claim out of the record first: it holds for this start
    // only.
    let commands = b1.step(Event::Record(Some(moved.clone())));
    let claimed = next(moved, |record| record.copies[0].identical_epoch = None);
    assert_eq!(
        commands,
        vec![write(moved, &claimed, "b1 starts epoch 2 with east identical to its store (a clean hand-over)")]
    );
    let commands = b1.step(Event::Written(claimed.clone()));
    assert!(
        commands.contains(&Command::StartProduction {
            epoch: 2,
            generation: 2,
            copies: vec![CopySite { name: "east".into(), mode: "sync".into(), identical: true }],
            roll_back_to: None,
        }),
        "{commands:?}"
    );

    // A hand-over of another epoch is no proof: a full resync.
    let (mut a2, joined2) = joined_node("a", true, &["b1", "w"]);
    a2.step(Event::Written(joined2.clone()));
    let unproven = next(&joined2, |record| {
        record.copies[0].state = CopyRecordState::Current;
        record.switchover = Some("west".into());
        record.production.host = None;
        record.handover = Some(crate::record::Handover { site: "east".into(), store: token.clone(), epoch: 0 });
    });
    let commands = a2.step(Event::Record(Some(unproven)));
    let Some(Command::Write { record: moved, .. }) =
        commands.iter().find(|command| matches!(command, Command::Write { .. }))
    else {
        panic!("{commands:?}")
    };
    let east = moved.copy("east").unwrap();
    assert!(matches!(east.state, CopyRecordState::Stale { .. }), "{east:?}");
    assert_eq!((east.store.as_str(), east.identical_epoch), ("0".repeat(32).as_str(), None));
}

/// b1 (of copy site west) joined, reading a record where west's copy is
/// current: a node that may ask for a switchover to west.
fn b1_with_west_current() -> (Core, GroupRecord) {
    let (mut b1, joined) = joined_node("b1", false, &["a", "w"]);
    assert_eq!(b1.step(Event::Written(joined.clone())), vec![]);
    let current = next(&joined, |record| record.copies[0].state = CopyRecordState::Current);
    assert_eq!(b1.step(Event::Record(Some(current.clone()))), vec![]);
    (b1, current)
}

/// `record` after the production role moved once (another switchover was
/// carried out): the next epoch and generation.
fn role_moved(record: &GroupRecord) -> GroupRecord {
    next(record, |record| {
        record.epoch += 1;
        record.generation += 1;
        record.push_history("a");
    })
}

/// Two switchover requests race (issue 11: exactly one wins). b1 is asked
/// for a switchover to west while the record is at epoch 1; its write loses
/// the compare-and-set, and by the time it reads the record again the
/// production role has moved (another request won and was carried out):
/// b1 refuses its request and says why, instead of moving the role a second
/// time. Had nothing moved, it would write the request again.
#[test]
fn a_switchover_asked_for_before_the_production_role_moved_is_refused_not_carried_out_after() {
    let (mut b1, current) = b1_with_west_current();
    let asked = next(&current, |record| record.switchover = Some("west".into()));
    assert_eq!(
        b1.step(Event::Switchover { to: "west".into(), asked_at: None }),
        vec![write(&current, &asked, "switchover to site west asked for")]
    );
    assert_eq!(b1.step(Event::Conflict), vec![]);
    // Unmoved: the request is written again.
    let unmoved = next(&current, |record| record.members.get_mut("w").unwrap().incarnation = 2);
    let again = next(&unmoved, |record| record.switchover = Some("west".into()));
    assert_eq!(
        b1.step(Event::Record(Some(unmoved.clone()))),
        vec![write(&unmoved, &again, "switchover to site west asked for")]
    );
    assert_eq!(b1.step(Event::Conflict), vec![]);
    // Moved meanwhile: refused, said once, nothing written.
    let moved = role_moved(&unmoved);
    let commands = b1.step(Event::Record(Some(moved)));
    let [Command::Notice { message }] = &commands[..] else { panic!("{commands:?}") };
    assert!(message.contains("switchover to west refused: the production role moved"), "{message}");
    assert_eq!(b1.step(Event::Tick { now_ms: 1 }), vec![], "said once, not asked again");
}

/// A request that waited in the node's queue while the role moved (the
/// node thread takes requests between its reads of the record): the epoch
/// the node showed when the operator asked is older than the record the
/// core holds when it takes the request, so it is refused and nothing is
/// written, as for a request whose write lost to the move.
#[test]
fn a_switchover_that_waited_in_the_queue_while_the_role_moved_is_refused() {
    let (mut b1, current) = b1_with_west_current();
    let moved = role_moved(&current);
    b1.step(Event::Record(Some(moved)));
    let commands = b1.step(Event::Switchover { to: "west".into(), asked_at: Some(current.epoch) });
    let [Command::Notice { message }] = &commands[..] else { panic!("{commands:?}") };
    assert!(message.contains("switchover to west refused: the production role moved"), "{message}");
}

/// A copy host refuses this node's epoch (another production host took
/// over, in a record this node has not read): it fences itself at once and
/// does not serve that epoch again, only a newer one the record gives it.
#[test]
fn a_production_host_told_by_a_copy_that_it_was_deposed_fences_itself_at_once() {
    let (mut a, joined) = joined_node("a", true, &["b1", "w"]);
    let commands = a.step(Event::Written(joined.clone()));
    assert!(matches!(commands[0], Command::StartProduction { epoch: 1, .. }), "{commands:?}");
    let commands = a.step(Event::Deposed { why: "west refused epoch 1".into() });
    assert_eq!(commands, vec![Command::Fence { why: "deposed: west refused epoch 1".into() }]);
    // The same record again (this node is cut off from the quorum): no restart.
    let again = a.step(Event::Record(Some(joined.clone())));
    assert!(!again.iter().any(|command| matches!(command, Command::StartProduction { .. })), "{again:?}");
    // A newer epoch naming it serves again.
    let newer = next(&joined, |record| record.epoch = 3);
    let commands = a.step(Event::Record(Some(newer)));
    assert!(
        commands.iter().any(|command| matches!(command, Command::StartProduction { epoch: 3, .. })),
        "{commands:?}"
    );
}

/// b1 hosts west's syncing copy and publishes `dr_image` (and that its
/// store is mid-pass); the production site is lost and the operator forces
/// a promotion of west. Returns what the leader b1 wrote or said.
fn force_promotion_of_a_syncing_copy(dr_image: Option<DrImage>, forked_at: Option<u64>) -> (Core, Vec<Command>) {
    let (mut b1, lost) = production_site_lost_with(CopyRecordState::Syncing, "async");
    let lost = next(&lost, |record| {
        if let Some(generation) = forked_at {
            record.generation = generation;
            record.push_history("a");
            record.history.last_mut().unwrap().fork = Some("an earlier forced promotion".into());
        }
    });
    b1.step(Event::Record(Some(lost)));
    let Some(Command::Write { record: published, why, .. }) =
        b1.step(Event::CopyStore { consistent: Some(false), dr_image }).pop()
    else {
        panic!("b1 publishes its store's state")
    };
    assert!(why.contains("b1's copy store is in the middle of a resync"), "{why}");
    assert_eq!(published.members["b1"].dr_image, dr_image);
    b1.step(Event::Written(published));
    b1.step(Event::WallClock { unix_ms: 1_764_000_042_500 });
    let Some(Command::Write { record: asked, .. }) = b1.step(Event::Promote { site: "west".into() }).pop() else {
        panic!("the request is recorded")
    };
    b1.step(Event::Written(asked));
    let commands = b1.step(Event::Tick { now_ms: 10_000 });
    (b1, commands)
}

/// A syncing copy (issue 13, item 2) is promoted by force only to the DR
/// image its host says it keeps: refused when it keeps none, lost or not
/// said, or when the image is older than a fork; with one, the fork record
/// states the image (generation, time, age = its RPO), the record names the
/// image the promoted host rolls back to, and the host is told to roll back
/// before it serves.
#[test]
fn a_syncing_copy_is_promoted_only_to_the_dr_image_its_host_keeps_and_the_fork_states_its_age() {
    let kept = DrImage { state: DrImageState::Kept, generation: 1, taken_at_ms: 1_764_000_000_000 };
    for (image, forked_at, refusal) in [
        (None, None, "its copy is syncing: no consistent image of it is known to the group (its host has not said"),
        (
            Some(DrImage { state: DrImageState::Lost, generation: 0, taken_at_ms: 0 }),
            None,
            "its host says its DR image is lost",
        ),
        (
            Some(DrImage { state: DrImageState::None, generation: 0, taken_at_ms: 0 }),
            None,
            "its host says it keeps no DR image",
        ),
        (Some(kept), Some(2), "its DR image is of generation 1, older than the fork that started generation 2"),
    ] {
        let (_, commands) = force_promotion_of_a_syncing_copy(image, forked_at);
        let [Command::Write { record: dropped, why, .. }] = &commands[..] else { panic!("{commands:?}") };
        assert!(why.contains("forced promotion of west refused: "), "{why}");
        assert!(why.contains(refusal), "{why}");
        assert_eq!(
            (dropped.production.site.as_str(), dropped.promotion.as_deref()),
            ("east", None),
            "nothing promoted"
        );
        assert_eq!(dropped.promoted_image, None);
    }

    let (mut b1, commands) = force_promotion_of_a_syncing_copy(Some(kept), None);
    let [Command::Write { record: promoted, why, .. }] = &commands[..] else { panic!("{commands:?}") };
    assert!(why.contains("copy site west (syncing) promoted over east, b1 serves (epoch 2, generation 2)"), "{why}");
    assert_eq!(promoted.production, crate::record::Production { site: "west".into(), host: Some("b1".into()) });
    let image = PromotedImage { host: "b1".into(), epoch: 2, generation: 1, taken_at_ms: 1_764_000_000_000 };
    assert_eq!(promoted.promoted_image, Some(image.clone()));
    let fork = promoted.history.last().unwrap().fork.clone().expect("a fork is recorded");
    assert!(
        fork.contains(
            "its store is rolled back to its DR image of generation 1 taken at 1764000000000 (Unix ms, the copy \
             host's clock; the image is of that moment or earlier), age 42.5 s at this promotion: that age is the \
             RPO of the image (at least)"
        ),
        "{fork}"
    );
    assert!(fork.starts_with("forced promotion of west over east (generation 1 forked)"), "{fork}");
    assert!(matches!(promoted.copies[0].state, CopyRecordState::Stale { .. }), "{:?}", promoted.copies[0]);
    assert_eq!(promoted.copies[0].store, "0".repeat(32), "east is resynced in full");
    let commands = b1.step(Event::Written(promoted.clone()));
    assert_eq!(commands[0], Command::StopCopy, "the copy role lets go of the store first");
    assert_eq!(
        commands[1],
        Command::StartProduction {
            epoch: 2,
            generation: 2,
            copies: vec![CopySite { name: "east".into(), mode: "async".into(), identical: false }],
            roll_back_to: Some(image),
        }
    );
    // The rollback fails: b1 serves nothing, records why, and does not try
    // again (a production start that fails is not retried in a loop).
    let commands = b1.step(Event::RoleFailed { why: "cannot roll the store back: damaged header".into() });
    let [Command::Write { record: failed, why, .. }] = &commands[..] else { panic!("{commands:?}") };
    assert!(why.contains("b1 cannot host its store: cannot roll the store back"), "{why}");
    assert_eq!(failed.members["b1"].access_problem.as_deref(), Some("cannot roll the store back: damaged header"));
    let commands = b1.step(Event::Written(failed.clone()));
    assert!(
        !commands.iter().any(|command| matches!(command, Command::StartProduction { .. })),
        "a failed start is tried again: {commands:?}"
    );
    assert_eq!(b1.step(Event::Tick { now_ms: 20_000 }), vec![]);
    // Another member serving the next epoch (the image was b1's) rolls
    // nothing back.
    let (mut a, joined) = joined_node("a", false, &["b1", "w"]);
    a.step(Event::Written(joined));
    let moved = next(promoted, |record| {
        record.production = crate::record::Production { site: "east".into(), host: Some("a".into()) };
        record.epoch = 3;
        record.members.insert("a".into(), entry(MemberState::Joined, 1, true));
    });
    let commands = a.step(Event::Record(Some(moved)));
    assert!(
        commands.iter().any(|command| matches!(command, Command::StartProduction { epoch: 3, roll_back_to: None, .. })),
        "{commands:?}"
    );
}

/// The leader's notice for a lost production site says how to promote a
/// syncing copy whose host keeps a DR image, and to which image.
#[test]
fn the_notice_for_a_syncing_copy_with_a_dr_image_says_how_to_promote_it() {
    let (mut b1, _) = production_site_lost_with(CopyRecordState::Syncing, "async");
    let kept = DrImage { state: DrImageState::Kept, generation: 1, taken_at_ms: 1_764_000_000_000 };
    let Some(Command::Write { record: published, .. }) =
        b1.step(Event::CopyStore { consistent: Some(false), dr_image: Some(kept) }).pop()
    else {
        panic!("b1 publishes its DR image")
    };
    b1.step(Event::Written(published));
    let commands = b1.step(Event::Tick { now_ms: 10_000 });
    let [Command::Notice { message }] = &commands[..] else { panic!("{commands:?}") };
    assert!(
        message.contains(
            "west is syncing (no consistent image; its host keeps the DR image of generation 1 taken at \
             1764000000000: to promote it to that image, losing every write since, crossmirror promote --site west \
             --accept-data-loss)"
        ),
        "{message}"
    );
}
