//! Actions (seed 004's registration and launch): the shell commands a member
//! runs when its roles change, so that, say, a filesystem is mounted and an
//! application started after a promotion, and stopped before a hand-over.
//!
//! ```text
//!  start     the member became host of a role (the role runs)
//!  recovery  a failure took a role to this member (takeover, site failover)
//!  stop      before the member hands a role on (switchover, leave); a failing
//!            stop holds the hand-over for one lease term (the safe side)
//!  notify    the group record changed (run in the background, latest first)
//! ```
//!
//! Each runs as `sh -c COMMAND` with `CROSSMIRROR_GROUP`, `CROSSMIRROR_SITE`,
//! `CROSSMIRROR_ROLE` (production | copy | none), `CROSSMIRROR_EPOCH`,
//! `CROSSMIRROR_EVENT` and `CROSSMIRROR_NBD` (the production host's NBD
//! address) in its environment, stdin closed, its output logged line by
//! line; past its timeout it is killed and counts as failed.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Actions;

/// What an action is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionContext {
    /// The group.
    pub group: String,
    /// The member's site.
    pub site: String,
    /// `production`, `copy` or `none`.
    pub role: String,
    /// The record's epoch.
    pub epoch: u64,
    /// The production host's NBD address, if there is one.
    pub nbd: Option<String>,
}

/// The actions of one member.
#[derive(Debug, Clone)]
pub struct ActionRunner {
    actions: Actions,
    /// The next notify to run, when one is running (only the latest waits).
    notify_next: Arc<Mutex<(bool, Option<ActionContext>)>>,
}

impl ActionRunner {
    /// The runner of `actions`.
    pub fn new(actions: Actions) -> ActionRunner {
        ActionRunner { actions, notify_next: Arc::new(Mutex::new((false, None))) }
    }

    /// Run the `start` action (or `recovery`, when a failure brought the
    /// role here) and wait for it. Its failure is logged; the role runs.
    pub fn started(&self, context: &ActionContext, recovery: bool) {
        let (event, command) = if recovery {
            ("recovery", self.actions.recovery.as_ref().or(self.actions.start.as_ref()))
        } else {
            ("start", self.actions.start.as_ref())
        };
        if let Some(command) = command {
            let _ = run(command, event, context, self.actions.timeout);
        }
    }

    /// Run the `stop` action and wait for it; whether it succeeded.
    pub fn stopping(&self, context: &ActionContext) -> Result<(), String> {
        match &self.actions.stop {
            Some(command) => run(command, "stop", context, self.actions.timeout),
            None => Ok(()),
        }
    }

    /// Run the `notify` action in the background; while one runs, only the
    /// latest context waits for its turn.
    pub fn notify(&self, context: ActionContext) {
        let Some(command) = self.actions.notify.clone() else { return };
        let mut next = self.notify_next.lock().unwrap_or_else(PoisonError::into_inner);
        if next.0 {
            next.1 = Some(context);
            return;
        }
        next.0 = true;
        drop(next);
        let (queue, timeout) = (self.notify_next.clone(), self.actions.timeout);
        let spawned = std::thread::Builder::new().name("notify".into()).spawn(move || {
            let mut context = context;
            loop {
                let _ = run(&command, "notify", &context, timeout);
                let mut next = queue.lock().unwrap_or_else(PoisonError::into_inner);
                match next.1.take() {
                    Some(later) => context = later,
                    None => {
                        next.0 = false;
                        return;
                    }
                }
            }
        });
        if spawned.is_err() {
            self.notify_next.lock().unwrap_or_else(PoisonError::into_inner).0 = false;
            tracing::warn!("cannot start the notify action's thread");
        }
    }
}

/// Run `command` for `event`; Ok when it exits 0 within `timeout`.
fn run(command: &str, event: &str, context: &ActionContext, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("CROSSMIRROR_GROUP", &context.group)
        .env("CROSSMIRROR_SITE", &context.site)
        .env("CROSSMIRROR_ROLE", &context.role)
        .env("CROSSMIRROR_EPOCH", context.epoch.to_string())
        .env("CROSSMIRROR_EVENT", event)
        .env("CROSSMIRROR_NBD", context.nbd.as_deref().unwrap_or(""))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills what it started too
        // (a child left holding the output pipe would hold this thread).
        .process_group(0)
        .spawn()
        .map_err(|error| {
            tracing::error!(event, %error, "cannot run the {event} action");
            format!("cannot run the {event} action: {error}")
        })?;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let group = -(child.id() as libc::pid_t);
                // SAFETY: kill(2) on the action's own process group, which
                // `process_group(0)` made with the child's pid as its id.
                unsafe { libc::kill(group, libc::SIGKILL) };
                let _ = child.wait();
                break Err(format!("killed after {} ms", timeout.as_millis()));
            }
            Err(error) => break Err(error.to_string()),
        }
    };
    let mut output = String::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let _ = stream.take(64 << 10).read_to_string(&mut output);
    }
    for line in output.lines() {
        tracing::info!(event, "{event} action: {line}");
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(status) if status.success() => {
            tracing::info!(event, elapsed_ms, "{event} action done");
            Ok(())
        }
        Ok(status) => {
            tracing::error!(event, %status, "{event} action failed: {status}");
            Err(format!("{event} action failed: {status}"))
        }
        Err(why) => {
            tracing::error!(event, "{event} action failed: {why}");
            Err(format!("{event} action failed: {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ActionContext {
        ActionContext {
            group: "g".into(),
            site: "east".into(),
            role: "production".into(),
            epoch: 3,
            nbd: Some("127.0.0.1:10809".into()),
        }
    }

    #[test]
    fn an_action_sees_its_environment_and_a_failing_or_hanging_one_fails() {
        let directory = tempfile::tempdir().unwrap();
        let out = directory.path().join("env");
        let command = format!(
            "echo \"$CROSSMIRROR_GROUP $CROSSMIRROR_SITE $CROSSMIRROR_ROLE $CROSSMIRROR_EPOCH $CROSSMIRROR_EVENT $CROSSMIRROR_NBD\" > {}",
            out.display()
        );
        assert_eq!(run(&command, "start", &context(), Duration::from_secs(5)), Ok(()));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "g east production 3 start 127.0.0.1:10809\n");
        assert!(run("exit 3", "stop", &context(), Duration::from_secs(5)).unwrap_err().contains("failed"));
        let started = Instant::now();
        assert!(run("sleep 5", "stop", &context(), Duration::from_millis(200)).unwrap_err().contains("killed"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
