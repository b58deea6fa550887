//! Mutual challenge–response authentication over the shared secret, as two
//! pure state machines: messages in, messages out.
//!
//! ```text
//!  production                                   copy
//!      │── Hello { nonce_p, identity } ──────────▶│ identity must be the copy's own
//!      │◀── Challenge { nonce_c, proof_c } ───────│ proof_c = MAC(copy, nonce_c, nonce_p, identity)
//!      │ checks proof_c                           │
//!      │── Response { proof_p } ─────────────────▶│ proof_p = MAC(production, nonce_p, nonce_c, identity)
//!      │◀── Accept { store } ─────────────────────│ checks proof_p; store = the copy store's token
//!   session = MAC(session label, nonce_p, nonce_c), truncated to 64 bits
//! ```
//!
//! Each MAC is HMAC-SHA256 keyed with the secret over a domain-separation
//! label, the prover's role, its own nonce, the peer's nonce and the volume
//! identity. The role defeats reflection (a copy's proof is never a valid
//! production proof), the fresh nonces defeat replay from another session,
//! and proofs are compared in constant time. Either side answers a failure
//! with [`HandshakeMessage::Refuse`] and stops. Nonces are inputs, so tests
//! are deterministic; [`random_nonce`] draws real ones for the shell.
//!
//! This authenticates the peers, not each later frame: it keeps a node with
//! the wrong secret, a cross-wired volume or a replayed capture out. An
//! attacker who can rewrite traffic on the path needs TLS or IPsec under it.
//! The shell bounds the whole handshake with a deadline.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::protocol::error::ReplicationError;
use crate::protocol::frame::{Frame, FrameHeader, FrameKind};
use crate::protocol::secret::Secret;

/// The length of a handshake nonce in bytes.
pub const NONCE_LEN: usize = 32;
/// The length of a proof (an HMAC-SHA256 tag) in bytes.
pub const PROOF_LEN: usize = 32;

/// A handshake nonce: fresh random bytes per connection and side.
pub type Nonce = [u8; NONCE_LEN];
/// A proof of knowledge of the secret.
pub type Proof = [u8; PROOF_LEN];
/// A copy store's token: random bytes drawn whenever a store's contents
/// start a new lineage (a fresh copy, or a store found replaced), carried in
/// the Accept. The production host records the token it last synced; another
/// token means "this is not the store you synced": a full resync (DESIGN.md
/// §4, invariant 9). All zeroes means unknown and never matches.
pub type StoreToken = [u8; 16];
/// The token that means "unknown".
pub const STORE_TOKEN_UNKNOWN: StoreToken = [0; 16];

const PROOF_LABEL: &[u8] = b"crossmirror replication handshake proof v1\0";
const SESSION_LABEL: &[u8] = b"crossmirror replication session id v1\0";
const HELLO_PAYLOAD_LEN: usize = NONCE_LEN + 16 + 8 + 8;
const CHALLENGE_PAYLOAD_LEN: usize = NONCE_LEN + PROOF_LEN;

type HmacSha256 = Hmac<Sha256>;

/// Fresh random bytes for a nonce, from the operating system.
pub fn random_nonce() -> Result<Nonce, ReplicationError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|error| ReplicationError::Random { message: error.to_string() })?;
    Ok(nonce)
}

/// Which side of the mirror a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// The production host: serves the volume and ships its writes.
    Production = 1,
    /// A copy host: receives and applies the writes.
    Copy = 2,
}

/// What names a volume across hosts: its identifier and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeIdentity {
    /// The volume's unique identifier (UUID bytes).
    pub uuid: [u8; 16],
    /// The volume's size in bytes.
    pub size_bytes: u64,
}

impl fmt::Display for VolumeIdentity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.uuid {
            write!(formatter, "{byte:02x}")?;
        }
        write!(formatter, " ({} bytes)", self.size_bytes)
    }
}

/// Why a peer ended the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RefuseReason {
    /// A proof did not verify: the secrets differ, or a message was forged.
    AuthFailed = 1,
    /// The volumes differ in identity or size.
    IdentityMismatch = 2,
    /// A message came out of turn or was malformed.
    Protocol = 3,
    /// The Hello's epoch is older than one this copy promised: the sender
    /// was deposed (invariant 4).
    Fenced = 4,
}

/// A handshake message; each one travels as the payload of one frame of the
/// matching [`FrameKind`], with session and sequence 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeMessage {
    /// Production → copy: opens the handshake.
    Hello {
        /// The production host's nonce.
        nonce: Nonce,
        /// The volume the production host serves.
        identity: VolumeIdentity,
        /// The fencing epoch it serves at; a copy that promised a higher one
        /// refuses it before the session slot is claimed.
        epoch: u64,
    },
    /// Copy → production: the copy's nonce and proof.
    Challenge {
        /// The copy's nonce.
        nonce: Nonce,
        /// The copy's proof over both nonces.
        proof: Proof,
    },
    /// Production → copy: the production host's proof.
    Response {
        /// The production host's proof over both nonces.
        proof: Proof,
    },
    /// Copy → production: authenticated; the session begins.
    Accept {
        /// The copy store's token.
        store: StoreToken,
    },
    /// Either way: the handshake failed.
    Refuse {
        /// Why.
        reason: RefuseReason,
    },
}

impl HandshakeMessage {
    /// The frame kind that carries this message.
    pub fn kind(&self) -> FrameKind {
        match self {
            HandshakeMessage::Hello { .. } => FrameKind::Hello,
            HandshakeMessage::Challenge { .. } => FrameKind::Challenge,
            HandshakeMessage::Response { .. } => FrameKind::Response,
            HandshakeMessage::Accept { .. } => FrameKind::Accept,
            HandshakeMessage::Refuse { .. } => FrameKind::Refuse,
        }
    }

    /// The frame header and payload that carry this message.
    pub fn to_frame(&self) -> (FrameHeader, Vec<u8>) {
        let mut payload = Vec::new();
        match self {
            HandshakeMessage::Hello { nonce, identity, epoch } => {
                payload.extend_from_slice(nonce);
                payload.extend_from_slice(&identity.uuid);
                payload.extend_from_slice(&identity.size_bytes.to_be_bytes());
                payload.extend_from_slice(&epoch.to_be_bytes());
            }
            HandshakeMessage::Challenge { nonce, proof } => {
                payload.extend_from_slice(nonce);
                payload.extend_from_slice(proof);
            }
            HandshakeMessage::Response { proof } => payload.extend_from_slice(proof),
            HandshakeMessage::Accept { store } => payload.extend_from_slice(store),
            HandshakeMessage::Refuse { reason } => payload.push(*reason as u8),
        }
        let mut header = FrameHeader::new(self.kind());
        header.payload_len = payload.len() as u32;
        (header, payload)
    }

    /// The message a received frame carries. Refuses frames that are not
    /// handshake frames, carry a session, or have a payload of the wrong size.
    pub fn from_frame(frame: &Frame) -> Result<HandshakeMessage, ReplicationError> {
        let kind = frame.header.kind;
        if !kind.is_handshake() {
            return Err(ReplicationError::protocol(format!(
                "a {kind:?} frame arrived during the handshake; data frames wait for Accept"
            )));
        }
        if frame.header.session != 0 || frame.header.sequence != 0 {
            return Err(ReplicationError::protocol(format!(
                "{kind:?} handshake frame carries session {:#x} sequence {}; both must be 0",
                frame.header.session, frame.header.sequence
            )));
        }
        let payload = &*frame.payload;
        let expected_len = match kind {
            FrameKind::Hello => HELLO_PAYLOAD_LEN,
            FrameKind::Challenge => CHALLENGE_PAYLOAD_LEN,
            FrameKind::Response => PROOF_LEN,
            FrameKind::Refuse => 1,
            FrameKind::Accept => 16,
            _ => 0,
        };
        if payload.len() != expected_len {
            return Err(ReplicationError::protocol(format!(
                "{kind:?} handshake frame carries {} bytes, expected {expected_len}",
                payload.len()
            )));
        }
        Ok(match kind {
            FrameKind::Hello => HandshakeMessage::Hello {
                nonce: array(&payload[..NONCE_LEN]),
                identity: VolumeIdentity {
                    uuid: array(&payload[NONCE_LEN..NONCE_LEN + 16]),
                    size_bytes: u64::from_be_bytes(array(&payload[NONCE_LEN + 16..NONCE_LEN + 24])),
                },
                epoch: u64::from_be_bytes(array(&payload[NONCE_LEN + 24..])),
            },
            FrameKind::Challenge => {
                HandshakeMessage::Challenge { nonce: array(&payload[..NONCE_LEN]), proof: array(&payload[NONCE_LEN..]) }
            }
            FrameKind::Response => HandshakeMessage::Response { proof: array(payload) },
            FrameKind::Accept => HandshakeMessage::Accept { store: array(payload) },
            _ => HandshakeMessage::Refuse { reason: refuse_reason(payload[0])? },
        })
    }
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes.try_into().expect("the payload length was checked")
}

fn refuse_reason(code: u8) -> Result<RefuseReason, ReplicationError> {
    match code {
        1 => Ok(RefuseReason::AuthFailed),
        2 => Ok(RefuseReason::IdentityMismatch),
        3 => Ok(RefuseReason::Protocol),
        4 => Ok(RefuseReason::Fenced),
        _ => Err(ReplicationError::protocol(format!("Refuse frame gives unknown reason {code}"))),
    }
}

/// An authenticated session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// The session identifier every data frame of this connection carries.
    pub id: u64,
    /// The volume both sides agreed on.
    pub identity: VolumeIdentity,
    /// The fencing epoch of the Hello, under both proofs: a copy promises it
    /// before it accepts the session.
    pub epoch: u64,
}

/// Where a handshake stands after a message.
#[derive(Debug)]
pub enum HandshakeOutcome {
    /// Waiting for the peer's next message.
    Continue,
    /// Both sides are authenticated; data frames may flow.
    Established(Session),
    /// The handshake failed; close the connection after sending any refusal.
    Failed(ReplicationError),
}

/// What the shell does after feeding a message to a handshake: send the
/// message, if any, then act on the outcome.
#[derive(Debug)]
pub struct HandshakeStep {
    /// The message to send to the peer.
    pub send: Option<HandshakeMessage>,
    /// Where the handshake stands.
    pub outcome: HandshakeOutcome,
}

impl HandshakeStep {
    fn reply(message: HandshakeMessage) -> HandshakeStep {
        HandshakeStep { send: Some(message), outcome: HandshakeOutcome::Continue }
    }

    fn fail(reason: Option<RefuseReason>, error: ReplicationError) -> HandshakeStep {
        HandshakeStep {
            send: reason.map(|reason| HandshakeMessage::Refuse { reason }),
            outcome: HandshakeOutcome::Failed(error),
        }
    }
}

/// The keyed MAC shared by both roles' computations.
#[derive(Clone)]
struct Keys {
    mac: HmacSha256,
}

impl Keys {
    fn new(secret: &Secret) -> Keys {
        Keys { mac: HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length") }
    }

    /// The proof covers the Hello's epoch too: a relay cannot raise a
    /// deposed host's epoch past a copy's promise.
    fn proof_mac(&self, role: Role, own: &Nonce, peer: &Nonce, offer: &(VolumeIdentity, u64)) -> HmacSha256 {
        let (identity, epoch) = offer;
        let mut mac = self.mac.clone();
        mac.update(PROOF_LABEL);
        mac.update(&[role as u8]);
        mac.update(own);
        mac.update(peer);
        mac.update(&identity.uuid);
        mac.update(&identity.size_bytes.to_be_bytes());
        mac.update(&epoch.to_be_bytes());
        mac
    }

    fn prove(&self, role: Role, own: &Nonce, peer: &Nonce, offer: &(VolumeIdentity, u64)) -> Proof {
        self.proof_mac(role, own, peer, offer).finalize().into_bytes().into()
    }

    /// Whether `proof` is the peer's valid proof; compared in constant time.
    fn verify(&self, role: Role, peer: &Nonce, own: &Nonce, offer: &(VolumeIdentity, u64), proof: &Proof) -> bool {
        self.proof_mac(role, peer, own, offer).verify_slice(proof).is_ok()
    }

    fn session_id(&self, production_nonce: &Nonce, copy_nonce: &Nonce) -> u64 {
        let mut mac = self.mac.clone();
        mac.update(SESSION_LABEL);
        mac.update(production_nonce);
        mac.update(copy_nonce);
        let tag = mac.finalize().into_bytes();
        // Session 0 marks handshake frames, so a data session never has it.
        u64::from_be_bytes(array(&tag[..8])).max(1)
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Keys(<redacted>)")
    }
}

/// The error a peer's refusal turns into on this side.
/// The error for a peer's refusal; `ours` is the volume this side offered
/// or holds, so the message says which one and of what size.
fn refused(reason: RefuseReason, ours: &VolumeIdentity) -> ReplicationError {
    match reason {
        RefuseReason::AuthFailed => ReplicationError::auth_failed(
            "the peer refused our proof: the two hosts hold different secrets; give both the same --secret-file",
        ),
        RefuseReason::IdentityMismatch => ReplicationError::Identity {
            message: format!(
                "the peer refused volume {ours}: it holds another volume, or a store of another size than {} \
                 bytes; point it at this volume's copy, or give it a store of {} bytes",
                ours.size_bytes, ours.size_bytes
            ),
        },
        RefuseReason::Protocol => {
            ReplicationError::protocol("the peer refused the handshake as out of order or malformed")
        }
        RefuseReason::Fenced => ReplicationError::protocol("the peer refused the handshake's epoch"),
    }
}

fn out_of_turn(expected: &str, message: &HandshakeMessage) -> HandshakeStep {
    HandshakeStep::fail(
        Some(RefuseReason::Protocol),
        ReplicationError::protocol(format!("expected {expected} in the handshake, got {:?}", message.kind())),
    )
}

fn reflected() -> ReplicationError {
    ReplicationError::auth_failed("the peer sent back our own nonce, which only a reflection attack does; refused")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProductionState {
    AwaitingChallenge,
    AwaitingAccept { session: u64 },
    Finished,
}

/// The production host's side of the handshake.
#[derive(Debug)]
pub struct ProductionHandshake {
    keys: Keys,
    identity: VolumeIdentity,
    epoch: u64,
    nonce: Nonce,
    state: ProductionState,
}

impl ProductionHandshake {
    /// Begin a handshake for the volume `identity` with a fresh `nonce`;
    /// returns the machine and the Hello to send.
    pub fn start(
        secret: &Secret,
        identity: VolumeIdentity,
        nonce: Nonce,
        epoch: u64,
    ) -> (ProductionHandshake, HandshakeMessage) {
        let handshake = ProductionHandshake {
            keys: Keys::new(secret),
            identity,
            epoch,
            nonce,
            state: ProductionState::AwaitingChallenge,
        };
        (handshake, HandshakeMessage::Hello { nonce, identity, epoch })
    }

    /// Feed the copy's next message.
    pub fn on_message(&mut self, message: &HandshakeMessage) -> HandshakeStep {
        let step = self.step(message);
        if !matches!(step.outcome, HandshakeOutcome::Continue) {
            self.state = ProductionState::Finished;
        }
        step
    }

    fn step(&mut self, message: &HandshakeMessage) -> HandshakeStep {
        if let HandshakeMessage::Refuse { reason: RefuseReason::Fenced } = message {
            return HandshakeStep::fail(None, ReplicationError::Deposed { epoch: self.epoch });
        }
        if let HandshakeMessage::Refuse { reason } = message {
            return HandshakeStep::fail(None, refused(*reason, &self.identity));
        }
        match (self.state, message) {
            (ProductionState::AwaitingChallenge, HandshakeMessage::Challenge { nonce, proof }) => {
                self.on_challenge(nonce, proof)
            }
            (ProductionState::AwaitingChallenge, _) => out_of_turn("Challenge", message),
            (ProductionState::AwaitingAccept { session }, HandshakeMessage::Accept { .. }) => HandshakeStep {
                send: None,
                outcome: HandshakeOutcome::Established(Session {
                    id: session,
                    identity: self.identity,
                    epoch: self.epoch,
                }),
            },
            (ProductionState::AwaitingAccept { .. }, _) => out_of_turn("Accept", message),
            (ProductionState::Finished, _) => out_of_turn("nothing (the handshake is over)", message),
        }
    }

    fn on_challenge(&mut self, copy_nonce: &Nonce, proof: &Proof) -> HandshakeStep {
        if *copy_nonce == self.nonce {
            return HandshakeStep::fail(Some(RefuseReason::AuthFailed), reflected());
        }
        if !self.keys.verify(Role::Copy, copy_nonce, &self.nonce, &(self.identity, self.epoch), proof) {
            return HandshakeStep::fail(
                Some(RefuseReason::AuthFailed),
                ReplicationError::auth_failed(format!(
                    "the copy host did not prove it knows the shared secret for volume {}; give both hosts the same --secret-file",
                    self.identity
                )),
            );
        }
        let session = self.keys.session_id(&self.nonce, copy_nonce);
        self.state = ProductionState::AwaitingAccept { session };
        HandshakeStep::reply(HandshakeMessage::Response {
            proof: self.keys.prove(Role::Production, &self.nonce, copy_nonce, &(self.identity, self.epoch)),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    AwaitingHello,
    AwaitingResponse { production_nonce: Nonce, epoch: u64 },
    Finished,
}

/// A copy host's side of the handshake.
#[derive(Debug)]
pub struct CopyHandshake {
    keys: Keys,
    identity: VolumeIdentity,
    nonce: Nonce,
    store: StoreToken,
    /// The highest epoch this copy promised: an older Hello is refused.
    epoch_promised: u64,
    state: CopyState,
}

impl CopyHandshake {
    /// Wait for a production host's Hello, for the volume `identity` this
    /// copy holds, with a fresh `nonce`.
    pub fn new(secret: &Secret, identity: VolumeIdentity, nonce: Nonce) -> CopyHandshake {
        CopyHandshake {
            keys: Keys::new(secret),
            identity,
            nonce,
            store: STORE_TOKEN_UNKNOWN,
            epoch_promised: 0,
            state: CopyState::AwaitingHello,
        }
    }

    /// Refuse a Hello of an epoch older than `epoch` (the store's promise).
    pub fn with_epoch_promised(mut self, epoch: u64) -> CopyHandshake {
        self.epoch_promised = epoch;
        self
    }

    /// The store token the Accept carries (unknown unless set).
    pub fn with_store(mut self, store: StoreToken) -> CopyHandshake {
        self.store = store;
        self
    }

    /// Feed the production host's next message.
    pub fn on_message(&mut self, message: &HandshakeMessage) -> HandshakeStep {
        let step = self.step(message);
        if !matches!(step.outcome, HandshakeOutcome::Continue) {
            self.state = CopyState::Finished;
        }
        step
    }

    fn step(&mut self, message: &HandshakeMessage) -> HandshakeStep {
        if let HandshakeMessage::Refuse { reason } = message {
            return HandshakeStep::fail(None, refused(*reason, &self.identity));
        }
        match (self.state, message) {
            (CopyState::AwaitingHello, HandshakeMessage::Hello { nonce, identity, epoch }) => {
                self.on_hello(nonce, identity, *epoch)
            }
            (CopyState::AwaitingHello, _) => out_of_turn("Hello", message),
            (CopyState::AwaitingResponse { production_nonce, epoch }, HandshakeMessage::Response { proof }) => {
                self.on_response(&production_nonce, epoch, proof)
            }
            (CopyState::AwaitingResponse { .. }, _) => out_of_turn("Response", message),
            (CopyState::Finished, _) => out_of_turn("nothing (the handshake is over)", message),
        }
    }

    fn on_hello(&mut self, production_nonce: &Nonce, identity: &VolumeIdentity, epoch: u64) -> HandshakeStep {
        if epoch < self.epoch_promised {
            return HandshakeStep::fail(
                Some(RefuseReason::Fenced),
                ReplicationError::Fenced { kind: FrameKind::Hello, received: epoch, promised: self.epoch_promised },
            );
        }
        if *identity != self.identity {
            return HandshakeStep::fail(
                Some(RefuseReason::IdentityMismatch),
                ReplicationError::Identity {
                    message: format!(
                        "the production host serves volume {identity}, this copy holds volume {}; point --volume at this volume's copy or create a new copy",
                        self.identity
                    ),
                },
            );
        }
        if *production_nonce == self.nonce {
            return HandshakeStep::fail(Some(RefuseReason::AuthFailed), reflected());
        }
        self.state = CopyState::AwaitingResponse { production_nonce: *production_nonce, epoch };
        HandshakeStep::reply(HandshakeMessage::Challenge {
            nonce: self.nonce,
            proof: self.keys.prove(Role::Copy, &self.nonce, production_nonce, &(self.identity, epoch)),
        })
    }

    fn on_response(&mut self, production_nonce: &Nonce, epoch: u64, proof: &Proof) -> HandshakeStep {
        if !self.keys.verify(Role::Production, production_nonce, &self.nonce, &(self.identity, epoch), proof) {
            return HandshakeStep::fail(
                Some(RefuseReason::AuthFailed),
                ReplicationError::auth_failed(format!(
                    "the production host did not prove it knows the shared secret for volume {}; give both hosts the same --secret-file",
                    self.identity
                )),
            );
        }
        let id = self.keys.session_id(production_nonce, &self.nonce);
        let session = Session { id, identity: self.identity, epoch };
        HandshakeStep {
            send: Some(HandshakeMessage::Accept { store: self.store }),
            outcome: HandshakeOutcome::Established(session),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::error::ReplicationErrorKind;
    use crate::protocol::frame::{encode_frame, HEADER_LEN};

    const IDENTITY: VolumeIdentity = VolumeIdentity { uuid: [0x5a; 16], size_bytes: 1 << 30 };

    fn secret(fill: u8) -> Secret {
        Secret::from_bytes(vec![fill; 32]).unwrap()
    }

    /// Carry a message over the wire: encode it as a frame and decode it back.
    fn over_the_wire(message: &HandshakeMessage) -> HandshakeMessage {
        let (header, payload) = message.to_frame();
        let bytes = encode_frame(&header, &payload);
        let header_bytes: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        let header = crate::protocol::frame::decode_header(&header_bytes).unwrap();
        crate::protocol::frame::verify_payload(&header, &header_bytes, &bytes[HEADER_LEN..]).unwrap();
        HandshakeMessage::from_frame(&Frame { header, payload: bytes[HEADER_LEN..].to_vec().into() }).unwrap()
    }

    fn established(outcome: &HandshakeOutcome) -> Session {
        match outcome {
            HandshakeOutcome::Established(session) => *session,
            other => panic!("expected an established session, got {other:?}"),
        }
    }

    fn failed_kind(outcome: &HandshakeOutcome) -> ReplicationErrorKind {
        match outcome {
            HandshakeOutcome::Failed(error) => error.kind(),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// A recorded run: every message each side sent, and both outcomes.
    struct Run {
        hello: HandshakeMessage,
        challenge: HandshakeMessage,
        response: HandshakeMessage,
        production: Session,
        copy: Session,
    }

    fn run(production_nonce: Nonce, copy_nonce: Nonce) -> Run {
        let (mut production, hello) = ProductionHandshake::start(&secret(1), IDENTITY, production_nonce, 1);
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, copy_nonce).with_store([9; 16]);
        let step = copy.on_message(&over_the_wire(&hello));
        let challenge = step.send.unwrap();
        let step = production.on_message(&over_the_wire(&challenge));
        let response = step.send.unwrap();
        let step = copy.on_message(&over_the_wire(&response));
        let accept = HandshakeMessage::Accept { store: [9; 16] };
        assert_eq!(step.send, Some(accept), "the Accept carries the copy store's token");
        let copy_session = established(&step.outcome);
        let step = production.on_message(&over_the_wire(&accept));
        assert!(step.send.is_none());
        Run { hello, challenge, response, production: established(&step.outcome), copy: copy_session }
    }

    /// Two peers with the same secret authenticate and agree on one non-zero session.
    #[test]
    fn same_secret_establishes_one_session() {
        let run = run([1; 32], [2; 32]);
        assert_eq!(run.production, run.copy);
        assert_ne!(run.production.id, 0);
        assert_eq!(run.production.identity, IDENTITY);
    }

    /// Fresh nonces give each connection its own session id.
    #[test]
    fn new_nonces_give_a_new_session() {
        assert_ne!(run([1; 32], [2; 32]).copy.id, run([1; 32], [3; 32]).copy.id);
        assert_ne!(run([1; 32], [2; 32]).copy.id, run([4; 32], [2; 32]).copy.id);
    }

    /// A copy with another secret is caught by the production host, which refuses.
    #[test]
    fn wrong_secret_on_the_copy_is_refused() {
        let (mut production, hello) = ProductionHandshake::start(&secret(1), IDENTITY, [1; 32], 1);
        let mut copy = CopyHandshake::new(&secret(2), IDENTITY, [2; 32]);
        let challenge = copy.on_message(&hello).send.unwrap();
        let step = production.on_message(&challenge);
        assert_eq!(step.send, Some(HandshakeMessage::Refuse { reason: RefuseReason::AuthFailed }));
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::AuthFailed);
        let step = copy.on_message(&step.send.unwrap());
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::AuthFailed);
    }

    /// A production host with another secret is caught by the copy, which refuses.
    #[test]
    fn wrong_secret_on_the_production_host_is_refused() {
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [2; 32]);
        copy.on_message(&HandshakeMessage::Hello { nonce: [1; 32], identity: IDENTITY, epoch: 1 });
        let forged = Keys::new(&secret(2)).prove(Role::Production, &[1; 32], &[2; 32], &(IDENTITY, 1));
        let step = copy.on_message(&HandshakeMessage::Response { proof: forged });
        assert_eq!(step.send, Some(HandshakeMessage::Refuse { reason: RefuseReason::AuthFailed }));
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::AuthFailed);
    }

    /// Reflection: the copy's own proof sent back to it as a Response is refused.
    #[test]
    fn reflected_proof_is_refused() {
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [2; 32]);
        let step = copy.on_message(&HandshakeMessage::Hello { nonce: [1; 32], identity: IDENTITY, epoch: 1 });
        let Some(HandshakeMessage::Challenge { proof, .. }) = step.send else { panic!("expected a challenge") };
        let step = copy.on_message(&HandshakeMessage::Response { proof });
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::AuthFailed);
    }

    /// Reflection: a peer that echoes our nonce as its own is refused by either side.
    #[test]
    fn reflected_nonce_is_refused() {
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [2; 32]);
        let step = copy.on_message(&HandshakeMessage::Hello { nonce: [2; 32], identity: IDENTITY, epoch: 1 });
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::AuthFailed);
        let (mut production, _) = ProductionHandshake::start(&secret(1), IDENTITY, [1; 32], 1);
        let proof = Keys::new(&secret(1)).prove(Role::Copy, &[1; 32], &[1; 32], &(IDENTITY, 1));
        let step = production.on_message(&HandshakeMessage::Challenge { nonce: [1; 32], proof });
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::AuthFailed);
    }

    /// Replay: a Response recorded in one session fails in the next, whose copy nonce is new.
    #[test]
    fn replayed_response_is_refused() {
        let recorded = run([1; 32], [2; 32]);
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [3; 32]);
        copy.on_message(&recorded.hello);
        let step = copy.on_message(&recorded.response);
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::AuthFailed);
    }

    /// Replay: a Challenge recorded in one session fails with a production host's new nonce.
    #[test]
    fn replayed_challenge_is_refused() {
        let recorded = run([1; 32], [2; 32]);
        let (mut production, _) = ProductionHandshake::start(&secret(1), IDENTITY, [9; 32], 1);
        let step = production.on_message(&recorded.challenge);
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::AuthFailed);
    }

    /// A production host serving another volume is refused before any proof is given.
    #[test]
    fn other_volume_is_refused() {
        let other = VolumeIdentity { uuid: IDENTITY.uuid, size_bytes: IDENTITY.size_bytes * 2 };
        let (mut production, hello) = ProductionHandshake::start(&secret(1), other, [1; 32], 1);
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [2; 32]);
        let step = copy.on_message(&hello);
        assert_eq!(step.send, Some(HandshakeMessage::Refuse { reason: RefuseReason::IdentityMismatch }));
        let HandshakeOutcome::Failed(error) = &step.outcome else { panic!("expected a failure") };
        assert_eq!(error.kind(), ReplicationErrorKind::Identity);
        assert!(error.to_string().contains("2147483648 bytes"), "{error}");
        let step = production.on_message(&step.send.unwrap());
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::Identity);
    }

    /// Messages out of turn, and any message after the end, are protocol errors.
    #[test]
    fn out_of_turn_messages_are_refused() {
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [2; 32]);
        let step = copy.on_message(&HandshakeMessage::Response { proof: [0; 32] });
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::Protocol);
        let step = copy.on_message(&HandshakeMessage::Hello { nonce: [1; 32], identity: IDENTITY, epoch: 1 });
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::Protocol);
        let (mut production, _) = ProductionHandshake::start(&secret(1), IDENTITY, [1; 32], 1);
        let step = production.on_message(&HandshakeMessage::Accept { store: [1; 16] });
        assert_eq!(failed_kind(&step.outcome), ReplicationErrorKind::Protocol);
    }

    /// Handshake frames with a wrong payload size, a session, an unknown
    /// refusal or a data kind are refused.
    #[test]
    fn malformed_handshake_frames_are_refused() {
        let (header, mut payload) = HandshakeMessage::Response { proof: [7; 32] }.to_frame();
        payload.pop();
        let short = Frame { header: FrameHeader { payload_len: 31, ..header }, payload: payload.into() };
        let with_session =
            Frame { header: FrameHeader { session: 5, ..FrameHeader::new(FrameKind::Accept) }, payload: vec![].into() };
        let short_accept = Frame {
            header: FrameHeader { payload_len: 0, ..FrameHeader::new(FrameKind::Accept) },
            payload: vec![].into(),
        };
        let odd_refusal = Frame {
            header: FrameHeader { payload_len: 1, ..FrameHeader::new(FrameKind::Refuse) },
            payload: vec![9].into(),
        };
        let heartbeat = Frame { header: FrameHeader::new(FrameKind::Heartbeat), payload: vec![].into() };
        for frame in [short, with_session, short_accept, odd_refusal, heartbeat] {
            assert_eq!(HandshakeMessage::from_frame(&frame).unwrap_err().kind(), ReplicationErrorKind::Protocol);
        }
    }

    /// Random nonces come from the operating system and differ.
    #[test]
    fn random_nonces_differ() {
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    }

    /// Invariant 4 at the handshake: a copy that promised epoch 5 refuses
    /// the Hello of a production host at epoch 4 before any session (the
    /// deposed host learns it was deposed), and takes one at epoch 5; the
    /// epoch is under the proofs, so a relay cannot raise it.
    #[test]
    fn a_hello_of_an_older_epoch_than_the_copy_promised_is_refused() {
        let (mut deposed, hello) = ProductionHandshake::start(&secret(1), IDENTITY, [1; 32], 4);
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [2; 32]).with_epoch_promised(5);
        let step = copy.on_message(&hello);
        assert_eq!(step.send, Some(HandshakeMessage::Refuse { reason: RefuseReason::Fenced }));
        assert!(matches!(
            &step.outcome,
            HandshakeOutcome::Failed(ReplicationError::Fenced { received: 4, promised: 5, .. })
        ));
        let step = deposed.on_message(&HandshakeMessage::Refuse { reason: RefuseReason::Fenced });
        assert!(matches!(&step.outcome, HandshakeOutcome::Failed(ReplicationError::Deposed { epoch: 4 })));

        let (mut current, hello) = ProductionHandshake::start(&secret(1), IDENTITY, [1; 32], 5);
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [2; 32]).with_epoch_promised(5);
        let challenge = copy.on_message(&hello).send.expect("a challenge");
        let response = current.on_message(&challenge).send.expect("a response");
        assert!(matches!(copy.on_message(&response).outcome, HandshakeOutcome::Established(_)));

        // A relay raising the deposed host's epoch breaks the proofs.
        let (mut deposed, hello) = ProductionHandshake::start(&secret(1), IDENTITY, [1; 32], 4);
        let HandshakeMessage::Hello { nonce, identity, .. } = hello else { panic!() };
        let mut copy = CopyHandshake::new(&secret(1), IDENTITY, [2; 32]).with_epoch_promised(5);
        let challenge =
            copy.on_message(&HandshakeMessage::Hello { nonce, identity, epoch: 5 }).send.expect("challenge");
        assert!(
            matches!(deposed.on_message(&challenge).outcome, HandshakeOutcome::Failed(_)),
            "the copy's proof is for epoch 5"
        );
    }
}
