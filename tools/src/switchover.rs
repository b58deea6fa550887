//! `crossmirror switchover --config FILE --to-site SITE`: a planned move of
//! the production role to a copy site (and back: failback is the same
//! command). Asks any node of the group; the production host stops serving
//! (drain, flush: every sync copy then has every acknowledged write), hands
//! over, and the group's leader promotes SITE if its copy is current. The
//! command waits until the record names SITE production, and says how long
//! it took.

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

/// Ask for the switchover and wait for it.
pub fn run(args: SwitchoverArgs) -> anyhow::Result<()> {
    let config = GroupConfig::load(&args.config)?;
    anyhow::ensure!(config.site(&args.to_site).is_some(), "{} is not a site of group {}", args.to_site, config.group);
    let started = Instant::now();
    let admins: Vec<SocketAddr> =
        config.voters().iter().map(|voter| SocketAddr::new(voter.address, config.ports.admin)).collect();
    let asked = admins.iter().find_map(|admin| {
        request(*admin, "POST", &format!("/switchover?to={}", args.to_site), Duration::from_secs(2))
            .ok()
            .map(|_| *admin)
    });
    let Some(asked) = asked else { anyhow::bail!("no node of group {} answered", config.group) };
    println!("switchover to site {} asked of {asked}", args.to_site);
    let deadline = started + Duration::from_secs(args.timeout);
    while Instant::now() < deadline {
        for admin in &admins {
            let Ok(status) = request(*admin, "GET", "/status", Duration::from_secs(1)) else { continue };
            let record = &status["record"];
            if record["production"]["site"] == args.to_site.as_str() && record["production"]["host"].is_string() {
                println!(
                    "site {} produces: {} serves NBD (epoch {}), {:.2} s after the request",
                    args.to_site,
                    record["production"]["host"].as_str().unwrap_or("?"),
                    record["epoch"],
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if record["switchover"].is_null() && started.elapsed() > Duration::from_secs(3) {
                // Dropped (the copy was not current): the node logs why.
                let copies = record["copies"].to_string();
                anyhow::bail!("the switchover to {} did not happen; the copies: {copies}", args.to_site);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("no switchover to {} within {} s", args.to_site, args.timeout)
}
