//! `crossmirror status --admin ADDR [--json]`: fetch `GET /status` from a
//! running `serve` and print it, as a table for people or as the JSON for
//! scripts.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// Arguments of `crossmirror status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The admin address of a production or copy host (its `--admin`; a
    /// bare port means 127.0.0.1:PORT), or of a group node.
    #[arg(long, value_parser = crate::admin::parse_admin_address, required_unless_present = "config")]
    admin: Option<SocketAddr>,
    /// A group config: the first member or witness that answers shows the
    /// group.
    #[arg(long, conflicts_with = "admin")]
    config: Option<std::path::PathBuf>,
    /// Print the JSON document as the endpoint returns it.
    #[arg(long)]
    json: bool,
}

/// Fetch and print the status.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status = match (&args.config, args.admin) {
        (Some(path), _) => fetch_group(path)?,
        (None, Some(admin)) => fetch(admin)?,
        (None, None) => anyhow::bail!("give --admin ADDR or --config FILE"),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print!("{}", table(&status));
    Ok(())
}

/// `GET /status` from `admin`.
pub fn fetch(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    request(admin, "GET", "/status", Duration::from_secs(10))
}

/// Send `method path` to the admin endpoint and parse its JSON answer; an
/// error status turns into an error with the endpoint's message.
pub fn request(admin: SocketAddr, method: &str, path: &str, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let url = format!("http://{admin}{path}");
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    let response = match agent.request(method, &url).call() {
        Ok(response) => response,
        Err(ureq::Error::Status(code, response)) => {
            let body = response.into_string().unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|value| value["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            anyhow::bail!("{url}: {code}: {message}");
        }
        Err(error) => {
            return Err(error).with_context(|| {
                format!("cannot reach the admin endpoint {url}; is `crossmirror serve --admin {admin}` running?")
            })
        }
    };
    let body = response.into_string().context("reading the answer")?;
    serde_json::from_str(&body).with_context(|| format!("{url} answered something that is not JSON"))
}

/// The status as a table, one row per copy; a syncing copy gets a progress
/// bar, and a copy with a `last_error` a line saying it. The copy's dirty
/// bytes are split in two: TO RESYNC, what it may lack and a resync will
/// send, and CLEARING, what it has been sent whose bits wait for the next
/// bitmap clear (not a divergence). A copy host's status is a few lines
/// about itself.
pub fn table(status: &serde_json::Value) -> String {
    if status.get("group").is_some() {
        return group_lines(status);
    }
    if status["role"] == "copy" {
        return copy_host_lines(status);
    }
    let mut out = format!(
        "volume {} ({} bytes)\n",
        status["volume"].as_str().unwrap_or("?"),
        status["size"].as_u64().unwrap_or(0)
    );
    if status["local_store"]["state"] == "failed" {
        out.push_str(&format!(
            "LOCAL STORE FAILED: {}; every request gets EIO and the copies may hold acknowledged writes this store \
             lacks: fail over to a current copy\n",
            status["local_store"]["error"].as_str().unwrap_or("?")
        ));
    }
    let copies = status["copies"].as_array().cloned().unwrap_or_default();
    if copies.is_empty() {
        out.push_str("no copies configured\n");
        return out;
    }
    out.push_str(&format!(
        "{:<12} {:<21} {:<6} {:<13} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
        "COPY", "ADDRESS", "MODE", "STATE", "TO RESYNC", "CLEARING", "LAG", "SHIPPED", "REJECTED"
    ));
    for copy in &copies {
        let number = |field: &str| copy[field].as_u64().unwrap_or(0);
        let text = |field: &str| copy[field].as_str().unwrap_or("?").to_string();
        out.push_str(&format!(
            "{:<12} {:<21} {:<6} {:<13} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
            text("name"),
            text("address"),
            text("mode"),
            text("state"),
            human(number("resync_pending_bytes")),
            human(number("clearing_bytes")),
            human(number("lag_bytes")),
            human(number("bytes_shipped")),
            number("frames_rejected"),
        ));
        if text("state") == "syncing" {
            let (done, total) = (number("resync_bytes_done"), number("resync_bytes_total"));
            out.push_str(&format!("             resync {} {} of {}\n", bar(done, total), human(done), human(total)));
        }
        let compression = &copy["compression"];
        if compression["setting"].as_str().is_some_and(|setting| setting != "none") {
            out.push_str(&format!(
                "             compress {}{}: {} in, {} sent (ratio {:.2}), {:.2} s CPU\n",
                compression["setting"].as_str().unwrap_or("?"),
                if compression["active"] == true { "" } else { " (the copy host does not decompress: off)" },
                human(compression["bytes_in"].as_u64().unwrap_or(0)),
                human(compression["bytes_out"].as_u64().unwrap_or(0)),
                compression["ratio"].as_f64().unwrap_or(1.0),
                compression["cpu_seconds"].as_f64().unwrap_or(0.0),
            ));
        }
        let rpo = &copy["rpo"];
        let rpo_bytes = rpo["bytes"].as_u64().unwrap_or(0);
        if rpo_bytes > 0 || rpo["exact"] == false {
            let age =
                rpo["seconds"].as_f64().map_or_else(|| "since this host started".to_string(), |s| format!("{s:.1} s"));
            out.push_str(&match rpo["exact"].as_bool() {
                Some(true) => format!(
                    "             rpo: {} of answered writes not on it yet, the oldest {age} old\n",
                    human(rpo_bytes)
                ),
                _ => format!(
                    "             rpo: up to {} (what it may lack), not following every write for {age}\n",
                    human(rpo_bytes)
                ),
            });
        }
        if let Some(error) = copy["last_error"].as_str() {
            out.push_str(&format!("             last error: {error}\n"));
        }
    }
    let log = &status["activity_log"];
    if let (Some(extent), Some(capacity)) = (log["extent_bytes"].as_u64(), log["capacity"].as_u64()) {
        let number = |field: &str| log[field].as_u64().unwrap_or(0);
        // The log never lists more of the volume than there is.
        let bound = (extent * capacity).min(status["size"].as_u64().unwrap_or(u64::MAX));
        out.push_str(&format!(
            "activity log: {} of {capacity} extents of {} logged or waiting (a crash resyncs at most {} more than \
             the bitmap holds); {} transactions, {} of them after a bitmap sync\n",
            number("extents"),
            human(extent),
            human(bound),
            number("transactions"),
            number("bitmap_syncs"),
        ));
    }
    out
}

fn copy_host_lines(status: &serde_json::Value) -> String {
    let text = |field: &str| match &status[field] {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    format!(
        "copy host, volume {} ({} bytes)\nmirrors {}  store {}  generation {}  epoch {}\n\
         production {}  frames accepted {}  rejected {} (old epoch {})  written {}\n",
        text("volume"),
        text("size"),
        text("mirrors"),
        text("store_state"),
        text("generation"),
        text("epoch_promised"),
        text("production"),
        text("frames_accepted"),
        text("frames_rejected"),
        text("old_epoch_refused"),
        human(status["write_bytes_accepted"].as_u64().unwrap_or(0)),
    )
}

fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let fraction = if total == 0 { 1.0 } else { (done.min(total) as f64) / (total as f64) };
    let filled = (fraction * WIDTH as f64).round() as u64;
    format!("[{}{}] {:>3.0}%", "#".repeat(filled as usize), "-".repeat((WIDTH - filled) as usize), fraction * 100.0)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `GET /status` from the first node of the group at `path` that answers.
fn fetch_group(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let config = cluster_glue::config::GroupConfig::load(path)?;
    let mut errors = Vec::new();
    for voter in config.voters() {
        let admin = SocketAddr::new(voter.address, config.ports.admin);
        match request(admin, "GET", "/status", Duration::from_secs(2)) {
            Ok(status) => return Ok(status),
            Err(error) => errors.push(format!("{}: {error:#}", voter.name)),
        }
    }
    anyhow::bail!("no node of group {} answered:\n  {}", config.group, errors.join("\n  "))
}

/// A group node's status for people: quorum, members, the record.
fn group_lines(status: &serde_json::Value) -> String {
    let text = |value: &serde_json::Value| value.as_str().map_or_else(|| value.to_string(), str::to_string);
    let quorum = &status["quorum"];
    let voters = quorum["voters"].as_array().cloned().unwrap_or_default();
    let reachable = voters.iter().filter(|voter| voter["reachable"] == true).count();
    let mut out = format!(
        "group {} (answered by {}, {})\nquorum: leader {}, term {}, {} of {} voters reachable from {}\n",
        text(&status["group"]),
        text(&status["node"]),
        text(&status["phase"]),
        text(&quorum["leader"]),
        quorum["term"],
        reachable,
        voters.len(),
        text(&status["node"]),
    );
    out.push_str(&format!("{:<12} {:<10} {:<15} {:<16} {}\n", "MEMBER", "SITE", "STATE", "ROLE", "NOTE"));
    for member in status["members"].as_array().cloned().unwrap_or_default() {
        let note = match (&member["access_problem"], &member["live"]) {
            (serde_json::Value::String(problem), _) => format!("no access: {problem}"),
            (_, serde_json::Value::Bool(false)) => "not heard from".to_string(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:<12} {:<10} {:<15} {:<16} {}\n",
            text(&member["name"]),
            member["site"].as_str().unwrap_or("-"),
            text(&member["state"]),
            text(&member["role"]),
            note
        ));
    }
    let record = &status["record"];
    if record.is_null() {
        out.push_str("record: not read yet\n");
        return out;
    }
    out.push_str(&format!(
        "record: seq {}, epoch {}, generation {}; production site {} hosted by {}\n",
        record["seq"],
        record["epoch"],
        record["generation"],
        text(&record["production"]["site"]),
        record["production"]["host"].as_str().unwrap_or("nobody"),
    ));
    for copy in record["copies"].as_array().cloned().unwrap_or_default() {
        let mut reason = match copy["state"].as_str() {
            Some("stale") => format!(" ({})", text(&copy["reason"])),
            _ => String::new(),
        };
        // What a forced promotion of a copy caught mid-resync would roll
        // back to (the member entry its host publishes).
        let image = copy["host"].as_str().map(|host| &record["members"][host]["dr_image"]);
        match image.and_then(|image| image["state"].as_str()) {
            Some("kept") if copy["state"] != "current" => {
                let image = image.expect("a state was read from it");
                reason.push_str(&format!(
                    "; DR image kept (generation {}, taken at {} Unix ms)",
                    image["generation"], image["taken_at_ms"]
                ));
            }
            Some("lost") => reason.push_str("; DR image lost"),
            _ => {}
        }
        out.push_str(&format!(
            "  copy {} ({}) hosted by {}: {}{}\n",
            text(&copy["site"]),
            text(&copy["mode"]),
            copy["host"].as_str().unwrap_or("nobody"),
            text(&copy["state"]),
            reason
        ));
    }
    let last = record["history"].as_array().and_then(|history| history.last()).cloned().unwrap_or_default();
    if let Some(fork) = last["fork"].as_str() {
        out.push_str(&format!("  fork (generation {}): {fork}\n", last["generation"]));
    }
    if let Some(to) = record["switchover"].as_str() {
        out.push_str(&format!("  switchover to {to} under way\n"));
    }
    if let Some(site) = record["promotion"].as_str() {
        out.push_str(&format!("  forced promotion of {site} asked for: waiting for the failed host's lease\n"));
    }
    if let Some(notice) = status["notice"].as_str() {
        out.push_str(&format!("notice: {notice}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The activity log's line: what it holds, its bound, its transactions.
    #[test]
    fn the_activity_log_gets_a_line_with_its_bound() {
        let status = serde_json::json!({
            "volume": "/srv/vol", "size": 1u64 << 40,
            "activity_log": {"extent_bytes": 4u64 << 20, "capacity": 1024, "extents": 300, "direct": true,
                             "transactions": 5452, "bitmap_syncs": 90, "overlapped": 3542},
            "copies": [
                {"name": "east", "address": "127.0.0.2:7789", "mode": "sync", "state": "up_to_date",
                 "dirty_bytes": 0, "lag_bytes": 0, "bytes_shipped": 10, "frames_rejected": 0}
            ]
        });
        let lines = table(&status);
        assert!(
            lines.contains(
                "activity log: 300 of 1024 extents of 4.0 MiB logged or waiting (a crash resyncs at most 4.0 GiB more"
            ),
            "{lines}"
        );
        // A volume smaller than the log's reach: the bound is the volume.
        let mut small = status.clone();
        small["size"] = serde_json::json!(1u64 << 30);
        assert!(table(&small).contains("at most 1.0 GiB more"), "{}", table(&small));
        assert!(lines.contains("5452 transactions, 90 of them after a bitmap sync"), "{lines}");
        let without = serde_json::json!({"volume": "/srv/vol", "size": 1, "activity_log": null,
            "copies": [{"name": "east", "state": "up_to_date"}]});
        assert!(!table(&without).contains("activity log"));
    }

    #[test]
    fn a_syncing_copy_gets_a_progress_bar() {
        let status = serde_json::json!({
            "volume": "/srv/vol", "size": 1073741824u64,
            "copies": [
                {"name": "east", "address": "127.0.0.2:7789", "mode": "sync", "state": "syncing",
                 "dirty_bytes": 1048576, "lag_bytes": 0, "bytes_shipped": 3 << 20, "frames_rejected": 0,
                 "resync_bytes_done": 512 << 10, "resync_bytes_total": 1 << 20, "last_error": null},
                {"name": "west", "address": "127.0.0.3:7789", "mode": "async", "state": "up_to_date",
                 "dirty_bytes": 0, "lag_bytes": 4096, "bytes_shipped": 10, "frames_rejected": 2}
            ]
        });
        let table = table(&status);
        assert!(table.contains("east         127.0.0.2:7789        sync   syncing"), "{table}");
        assert!(table.contains("[###############---------------]  50% 512.0 KiB of 1.0 MiB"), "{table}");
        assert!(table.contains("west") && table.contains("up_to_date") && table.contains("4.0 KiB"), "{table}");
        assert_eq!(table.matches("resync").count(), 1, "{table}");
        assert!(!table.contains("last error"), "{table}");
    }

    /// A stale copy shows why (its last error), and dirty bytes are split
    /// into what is to resync and what waits for the next bitmap clear.
    #[test]
    fn a_stale_copy_shows_its_last_error_and_dirty_bytes_are_split() {
        let status = serde_json::json!({
            "volume": "/srv/vol", "size": 1073741824u64,
            "copies": [
                {"name": "east", "address": "127.0.0.2:7789", "mode": "sync", "state": "stale",
                 "dirty_bytes": 3 << 20, "resync_pending_bytes": 2 << 20, "clearing_bytes": 1 << 20,
                 "lag_bytes": 0, "bytes_shipped": 0, "frames_rejected": 0,
                 "last_error": "the copy host reported no space: no space left on the copy host"}
            ]
        });
        let table = table(&status);
        assert!(table.contains("TO RESYNC   CLEARING"), "{table}");
        assert!(table.contains("stale            2.0 MiB    1.0 MiB"), "{table}");
        assert!(table.contains("             last error: the copy host reported no space"), "{table}");
        let behind = serde_json::json!({
            "volume": "/srv/vol", "size": 1073741824u64,
            "copies": [
                {"name": "dr", "address": "127.0.0.2:7789", "mode": "async", "state": "behind",
                 "dirty_bytes": 3 << 20, "rpo": {"bytes": 3 << 20, "seconds": 12.5, "exact": false}},
                {"name": "near", "address": "127.0.0.3:7789", "mode": "async", "state": "up_to_date",
                 "dirty_bytes": 0, "rpo": {"bytes": 8192, "seconds": 0.04, "exact": true}}
            ]
        });
        let shown = super::table(&behind);
        assert!(
            shown.contains("rpo: up to 3.0 MiB (what it may lack), not following every write for 12.5 s"),
            "{shown}"
        );
        assert!(shown.contains("rpo: 8.0 KiB of answered writes not on it yet, the oldest 0.0 s old"), "{shown}");
    }

    /// A copy caught mid-resync shows the DR image its host keeps (what a
    /// forced promotion would roll back to); a current copy does not.
    #[test]
    fn a_syncing_group_copy_shows_its_dr_image() {
        let status = serde_json::json!({
            "group": "g", "node": "a", "phase": "joined", "quorum": {"voters": []}, "members": [],
            "record": {
                "seq": 3, "epoch": 1, "generation": 1, "production": {"site": "east", "host": "a"},
                "copies": [
                    {"site": "west", "mode": "async", "host": "b", "state": "syncing"},
                    {"site": "north", "mode": "sync", "host": "c", "state": "current"}
                ],
                "members": {
                    "b": {"dr_image": {"state": "kept", "generation": 4, "taken_at_ms": 1764000000000u64}},
                    "c": {"dr_image": {"state": "kept", "generation": 4, "taken_at_ms": 1764000000000u64}}
                }
            }
        });
        let lines = group_lines(&status);
        assert!(
            lines.contains(
                "copy west (async) hosted by b: syncing; DR image kept (generation 4, taken at 1764000000000 Unix ms)"
            ),
            "{lines}"
        );
        assert!(lines.contains("copy north (sync) hosted by c: current\n"), "{lines}");
    }
}
