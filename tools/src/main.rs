//! The `crossmirror` command: wires the engine and the NBD frontend into a
//! process, with configuration from the command line and logs via tracing.

mod address;
mod admin;
mod copy_host;
mod http;
mod node;
mod rollback;
mod serve;
mod start_files;
mod status;
mod switchover;
mod verify;

use clap::{Parser, Subcommand};

/// crossmirror: a block volume served over NBD, written locally through
/// io_uring.
#[derive(Parser)]
#[command(name = "crossmirror", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one volume over NBD.
    Serve(serve::ServeArgs),
    /// Hold a copy of a production volume: receive its writes and apply them.
    CopyHost(copy_host::CopyHostArgs),
    /// Run a member of a mirrored group (the group config names the roles).
    Node(node::NodeArgs),
    /// Move a group's production role to a copy site, planned (failback: the same, back).
    Switchover(switchover::SwitchoverArgs),
    /// Promote a copy site that may lack acknowledged writes, once the production site is down (forced; records a fork).
    Promote(switchover::PromoteArgs),
    /// Print a production host's mirror status (from its admin endpoint).
    Status(status::StatusArgs),
    /// Bring a copy store caught mid-resync back to the consistent image it held when the resync began.
    Rollback(rollback::RollbackArgs),
    /// Compare a copy with the production volume while it is in use (online verify).
    Verify(verify::VerifyArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=off")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::CopyHost(args) => copy_host::run(args),
        Command::Node(args) => node::run(args),
        Command::Status(args) => status::run(args),
        Command::Switchover(args) => switchover::run(args),
        Command::Promote(args) => switchover::promote(args),
        Command::Rollback(args) => rollback::run(args),
        Command::Verify(args) => match verify::run(args) {
            Ok(true) => Ok(()),
            // Mismatches found and not repaired: like cmp, exit 1.
            Ok(false) => std::process::exit(1),
            Err(error) => Err(error),
        },
    };
    if let Err(error) = result {
        eprintln!("crossmirror: error: {}", describe(&error));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each said once: an error whose
/// message already includes its source (`create: No such file or
/// directory`) is not followed by that source again.
fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let source = std::io::Error::from(std::io::ErrorKind::NotFound);
        let error = anyhow::Error::new(source)
            .context(format!("create: {}", std::io::Error::from(std::io::ErrorKind::NotFound)));
        let error = error.context("volume /x/y");
        assert_eq!(describe(&error), "volume /x/y: create: entity not found");
    }
}
