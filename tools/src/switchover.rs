//! Moving the production role on an operator's word:
//!
//! - `crossmirror switchover --config FILE --to-site SITE`: planned (and
//!   failback: the same command back). The production host stops serving
//!   (drain, flush: every current copy then equals its store), hands over
//!   with its store's token, and the group's leader promotes SITE if its
//!   copy is current; the old production site stays current, and only
//!   what is written from then on is resynced to it.
//! - `crossmirror promote --config FILE --site SITE --accept-data-loss`:
//!   forced, once the production site is down and no current sync copy can
//!   take over. The new generation is a fork recorded in the history; the
//!   other sites' writes of the abandoned line are resynced away.
//!
//! Either asks any node of the group and waits until the record names SITE
//! production, then says how long it took.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use cluster_glue::config::GroupConfig;

use crate::status::request;

/// Arguments of `crossmirror switchover`.
#[derive(Args, Debug)]
pub struct SwitchoverArgs {
    /// The group config.
    #[arg(long)]
    config: PathBuf,
    /// The copy site to produce from.
    #[arg(long)]
    to_site: String,
    /// How long to wait for the switchover, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// Arguments of `crossmirror promote`.
#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The group config.
    #[arg(long)]
    config: PathBuf,
    /// The copy site to produce from.
    #[arg(long)]
    site: String,
    /// Required: the site's copy may lack acknowledged writes (an async
    /// copy, or one recorded stale), and they are given up for good; the
    /// other sites' stores are resynced from this one in full.
    #[arg(long)]
    accept_data_loss: bool,
    /// How long to wait for the promotion, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// Ask for the switchover and wait for it.
pub fn run(args: SwitchoverArgs) -> anyhow::Result<()> {
    let config = GroupConfig::load(&args.config)?;
    let path = format!("/switchover?to={}", args.to_site);
    move_role(&config, &args.to_site, &path, "switchover", Duration::from_secs(args.timeout), |record| {
        record["switchover"].is_null()
    })
}

/// Ask for the forced promotion and wait for it.
pub fn promote(args: PromoteArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.accept_data_loss,
        "a forced promotion may lose acknowledged writes; say so with --accept-data-loss \
         (a planned move without loss is `crossmirror switchover`)"
    );
    let config = GroupConfig::load(&args.config)?;
    let path = format!("/promote?site={}&accept-data-loss=yes", args.site);
    move_role(&config, &args.site, &path, "promotion", Duration::from_secs(args.timeout), |record| {
        record["promotion"].is_null()
    })
}

/// POST `path` to the first node that answers, then wait until the record
/// names `site` production; `dropped` says the request left the record
/// without that happening (a node's notice says why). The node takes the
/// request in its own time (a loaded host, a slow quorum), so "dropped" is
/// believed only once the request was seen pending in the record, or a
/// node has a new notice, or after [`UNSEEN_GRACE`].
fn move_role(
    config: &GroupConfig,
    site: &str,
    path: &str,
    what: &str,
    timeout: Duration,
    dropped: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(config.site(site).is_some(), "{site} is not a site of group {}", config.group);
    let started = Instant::now();
    let admins: Vec<SocketAddr> =
        config.voters().iter().map(|voter| SocketAddr::new(voter.address, config.ports.admin)).collect();
    let notices_before = notices(&admins);
    let mut seen_pending = false;
    let mut failures = Vec::new();
    let asked = admins.iter().find(|admin| match request(**admin, "POST", path, Duration::from_secs(2)) {
        Ok(_) => true,
        Err(error) => {
            failures.push(format!("{error:#}"));
            false
        }
    });
    let Some(asked) = asked else {
        anyhow::bail!("no node of group {} took the request: {}", config.group, failures.join("; "))
    };
    println!("{what} of site {site} asked of {asked}");
    let deadline = started + timeout;
    while Instant::now() < deadline {
        for admin in &admins {
            let Ok(status) = request(*admin, "GET", "/status", Duration::from_secs(1)) else { continue };
            let record = &status["record"];
            // Promoted to a DR image: its host rolls back before it serves;
            // done once it serves, failed if it says it cannot.
            let rolling_back = record["promoted_image"]["epoch"] == record["epoch"]
                && record["promoted_image"]["host"] == record["production"]["host"];
            if rolling_back && record["production"]["site"] == site {
                let host = record["production"]["host"].as_str().unwrap_or_default();
                if let Some(problem) = record["members"][host]["access_problem"].as_str() {
                    anyhow::bail!("site {site} was promoted to its DR image, but {host} does not serve: {problem}");
                }
                let serving = config.member(host).is_some_and(|member| {
                    request(
                        SocketAddr::new(member.address, config.ports.admin),
                        "GET",
                        "/status",
                        Duration::from_secs(1),
                    )
                    .is_ok_and(|status| status["roles"]["production"]["epoch"] == record["epoch"])
                });
                if !serving {
                    break;
                }
            }
            if record["production"]["site"] == site && record["production"]["host"].is_string() {
                println!(
                    "site {site} produces: {} serves NBD (epoch {}), {:.2} s after the request",
                    record["production"]["host"].as_str().unwrap_or("?"),
                    record["epoch"],
                    started.elapsed().as_secs_f64()
                );
                if let Some(fork) =
                    record["history"].as_array().and_then(|history| history.last()).map(|last| &last["fork"])
                {
                    if let Some(fork) = fork.as_str() {
                        println!("recorded fork: {fork}");
                    }
                }
                return Ok(());
            }
            if !dropped(record) {
                seen_pending = true;
            } else if started.elapsed() > Duration::from_secs(3) {
                let notices_now = notices(&admins);
                if seen_pending || notices_now != notices_before || started.elapsed() > UNSEEN_GRACE {
                    let why = notices_now.unwrap_or_else(|| format!("the copies: {}", record["copies"]));
                    anyhow::bail!("the {what} of site {site} did not happen: {why}");
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("no {what} of site {site} within {} s", timeout.as_secs())
}

/// The nodes' last notices (why a request was refused), if any.
/// How long a request never seen pending, with no new notice, is waited
/// for before it is taken as dropped.
const UNSEEN_GRACE: Duration = Duration::from_secs(15);

fn notices(admins: &[SocketAddr]) -> Option<String> {
    let mut seen: Vec<String> = Vec::new();
    for admin in admins {
        let Ok(status) = request(*admin, "GET", "/status", Duration::from_secs(1)) else { continue };
        if let Some(notice) = status["notice"].as_str() {
            if !seen.iter().any(|known| known == notice) {
                seen.push(notice.to_string());
            }
        }
    }
    (!seen.is_empty()).then(|| seen.join("; "))
}
