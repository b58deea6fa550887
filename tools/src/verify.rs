//! `crossmirror verify --admin ADDR --copy NAME [--repair]`: ask a running
//! production host to compare region checksums with one copy while the
//! volume stays in use, print the mismatching ranges, and with `--repair`
//! have them resynced. Exits 1 when mismatches were found and not repaired.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::status::request;

/// Arguments of `crossmirror verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The admin address of the production host (its `serve --admin`; a
    /// bare port means 127.0.0.1:PORT).
    #[arg(long, value_parser = crate::admin::parse_admin_address)]
    admin: SocketAddr,
    /// The copy to compare.
    #[arg(long)]
    copy: String,
    /// Resync the regions that differ.
    #[arg(long)]
    repair: bool,
    /// Print the JSON report.
    #[arg(long)]
    json: bool,
}

/// Run the verify; `Ok(false)` when mismatches remain unrepaired.
pub fn run(args: VerifyArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        !args.copy.is_empty() && args.copy.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "copy name {:?}: use letters, digits, '-' or '_'",
        args.copy
    );
    let path = format!("/verify?copy={}&repair={}", args.copy, u8::from(args.repair));
    let report = request(args.admin, "POST", &path, Duration::from_secs(24 * 3600))?;
    let mismatches = report["mismatches"].as_array().cloned().unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "copy {}: compared {} bytes, {} mismatching range(s){}",
            args.copy,
            report["bytes_compared"].as_u64().unwrap_or(0),
            mismatches.len(),
            if report["repaired"] == true { "; resync started (see `crossmirror status`)" } else { "" }
        );
        for range in &mismatches {
            let offset = range["offset"].as_u64().unwrap_or(0);
            let length = range["length"].as_u64().unwrap_or(0);
            println!("  mismatch at bytes {offset}..{} ({length} bytes)", offset + length);
        }
    }
    Ok(mismatches.is_empty() || report["repaired"] == true)
}
