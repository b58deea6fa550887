//! The WAN rig of `system_tests::wan` for scripts (`benches/wan.py`): makes
//! a rig, says where it is, starts delay proxies on request, and removes
//! everything when its standard input ends (the script exits or dies).
//!
//! ```text
//! wan-rig RATE_MBIT RTT_MS
//!   → {"namespace": "...", "production_ip": "10.231.0.1", "copy_ip": "10.231.0.2"}
//! proxy IP:PORT        (a proxy to IP:PORT inside the namespace)
//!   → {"proxy": "10.231.0.1:40123"}
//! bytes                (bytes every proxy forwarded: to the copy side, back)
//!   → {"to_copy": N, "to_production": N}
//! (end of input: processes in the namespace killed, proxies stopped, rig removed)
//! ```

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::time::Duration;

use system_tests::wan::{self, DelayProxy, Wan};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: wan-rig RATE_MBIT RTT_MS (then commands on standard input: proxy IP:PORT, bytes)";
    let [_, rate, round_trip] = args.as_slice() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let (Ok(rate_mbit), Ok(round_trip_ms)) = (rate.parse::<u64>(), round_trip.parse::<u64>()) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    if !wan::available() {
        eprintln!("wan-rig needs root, ip and tc (iproute2)");
        std::process::exit(1);
    }
    let rig = Wan::new(rate_mbit * 1_000_000, Duration::from_millis(round_trip_ms));
    let mut out = std::io::stdout().lock();
    let say = |out: &mut std::io::StdoutLock<'_>, value: serde_json::Value| {
        writeln!(out, "{value}").and_then(|()| out.flush()).is_ok()
    };
    let hello = serde_json::json!({
        "namespace": rig.namespace,
        "production_ip": rig.production_ip.to_string(),
        "copy_ip": rig.copy_ip.to_string(),
    });
    if !say(&mut out, hello) {
        return;
    }
    let mut proxies: Vec<DelayProxy> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let reply = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["proxy", target] => match target.parse::<SocketAddr>() {
                Ok(target) => {
                    let proxy = rig.proxy(target);
                    let reply = serde_json::json!({"proxy": proxy.address.to_string()});
                    proxies.push(proxy);
                    reply
                }
                Err(error) => serde_json::json!({"error": format!("{target}: {error}")}),
            },
            ["bytes"] => {
                let (to_copy, to_production) = proxies
                    .iter()
                    .map(DelayProxy::bytes_forwarded)
                    .fold((0, 0), |(copy, production), (to_copy, to_production)| {
                        (copy + to_copy, production + to_production)
                    });
                serde_json::json!({"to_copy": to_copy, "to_production": to_production})
            }
            _ => serde_json::json!({"error": format!("unknown command {line:?}")}),
        };
        if !say(&mut out, reply) {
            break;
        }
    }
    // The proxies stop, then the rig goes (its drop kills whatever still
    // runs in the namespace).
    drop(proxies);
    drop(rig);
}
