//! openraft's storage test suite run against the durable log store and the
//! state machine, each case in a fresh directory.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::types::TypeConfig;

struct DurableBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for DurableBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|error| {
            StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Write, error)
        })?;
        let log = LogStore::open(dir.path()).map_err(|error| {
            StorageError::from_io_error(openraft::ErrorSubject::Logs, openraft::ErrorVerb::Read, error)
        })?;
        let state_machine = StateMachine::open(dir.path()).map_err(|error| {
            StorageError::from_io_error(openraft::ErrorSubject::StateMachine, openraft::ErrorVerb::Read, error)
        })?;
        Ok((dir, log, state_machine))
    }
}

/// The log store and state machine pass openraft's storage suite.
#[test]
fn openraft_storage_suite() {
    if let Err(error) = Suite::test_all(DurableBuilder) {
        panic!("openraft storage suite: {error}");
    }
}
