//! Why a copy host gave up a connection, as it tells the production host in
//! an Error frame before closing: a kind code the production side branches
//! on, and a short message for its log and status.
//!
//! ```text
//!  payload: kind (1 byte) │ message (UTF-8, 1 to MESSAGE_BYTES_MAX bytes, no control characters)
//! ```
//!
//! Without it a full store on the copy looked like a dropped link: the
//! production host reconnected at once, resent the resync and failed again,
//! many times a second, and its status said only `syncing` (issue 8, item 8).
//! The message comes from another host, so it is decoded strictly: an unknown
//! kind, bytes that are not UTF-8 or a control character (which could forge
//! log lines) refuse the frame.

use std::io;

use crate::protocol::error::ReplicationError;
use crate::protocol::frame::{Frame, FrameHeader, FrameKind};

/// The longest message an Error frame carries, in bytes.
pub const MESSAGE_BYTES_MAX: usize = 512;

/// What kind of failure the copy host reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CopyFailureKind {
    /// Its store's filesystem or device is out of space (ENOSPC, EDQUOT).
    NoSpace = 1,
    /// Another I/O error on its store.
    StoreIo = 2,
    /// Its metadata (the promised epoch, the store state) could not be stored.
    Metadata = 3,
}

impl CopyFailureKind {
    /// The kind with this wire code, if there is one.
    pub fn from_code(code: u8) -> Option<CopyFailureKind> {
        [CopyFailureKind::NoSpace, CopyFailureKind::StoreIo, CopyFailureKind::Metadata]
            .into_iter()
            .find(|kind| *kind as u8 == code)
    }

    /// The kind's name in logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyFailureKind::NoSpace => "no space",
            CopyFailureKind::StoreIo => "store I/O error",
            CopyFailureKind::Metadata => "metadata error",
        }
    }
}

/// A failure report: the payload of an Error frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFailure {
    /// What kind of failure.
    pub kind: CopyFailureKind,
    /// What happened, to what, and what to do; at most [`MESSAGE_BYTES_MAX`]
    /// bytes, no control characters.
    pub message: String,
}

impl CopyFailure {
    /// A report of `kind`; the message is cut to [`MESSAGE_BYTES_MAX`] bytes
    /// (on a character boundary) and control characters become spaces.
    pub fn new(kind: CopyFailureKind, message: &str) -> CopyFailure {
        let mut message: String =
            message.chars().map(|character| if character.is_control() { ' ' } else { character }).collect();
        if message.is_empty() {
            message = kind.as_str().to_string();
        }
        let mut end = message.len().min(MESSAGE_BYTES_MAX);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        CopyFailure { kind, message }
    }

    /// The report for an I/O error `error` while doing `what` (e.g. "apply a
    /// write to volume /srv/copy.img"): out of space when the error (or one
    /// it wraps) is ENOSPC or EDQUOT, `otherwise` else.
    pub fn from_error(
        error: &(dyn std::error::Error + 'static),
        what: &str,
        otherwise: CopyFailureKind,
    ) -> CopyFailure {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        let mut no_space = false;
        while let Some(current) = cause {
            if let Some(io_error) = current.downcast_ref::<io::Error>() {
                no_space |= matches!(io_error.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
            }
            cause = current.source();
        }
        if no_space {
            let message = format!(
                "no space left on the copy host: cannot {what}: {error}; free space on the copy's filesystem \
                 (or grow it); the production host retries with backoff and resumes the resync"
            );
            return CopyFailure::new(CopyFailureKind::NoSpace, &message);
        }
        CopyFailure::new(otherwise, &format!("cannot {what}: {error}; see the copy host's log"))
    }

    /// The Error frame of `session` carrying this report.
    pub fn to_frame(&self, session: u64) -> (FrameHeader, Vec<u8>) {
        let mut payload = Vec::with_capacity(1 + self.message.len());
        payload.push(self.kind as u8);
        payload.extend_from_slice(self.message.as_bytes());
        let mut header = FrameHeader::new(FrameKind::Error);
        header.session = session;
        header.payload_len = payload.len() as u32;
        (header, payload)
    }

    /// The report an Error frame carries; refuses any other frame, an
    /// unknown kind, an empty or oversized message, bytes that are not
    /// UTF-8 and control characters.
    pub fn from_frame(frame: &Frame) -> Result<CopyFailure, ReplicationError> {
        if frame.header.kind != FrameKind::Error {
            return Err(ReplicationError::protocol(format!("{:?} frame is not an error report", frame.header.kind)));
        }
        let Some((&code, message)) = frame.payload.split_first() else {
            return Err(ReplicationError::protocol("Error frame carries no kind code; refused"));
        };
        let kind = CopyFailureKind::from_code(code)
            .ok_or_else(|| ReplicationError::protocol(format!("Error frame gives unknown kind {code}; refused")))?;
        if message.is_empty() || message.len() > MESSAGE_BYTES_MAX {
            return Err(ReplicationError::protocol(format!(
                "Error frame message of {} bytes; it must be 1 to {MESSAGE_BYTES_MAX} bytes; refused",
                message.len()
            )));
        }
        let message = std::str::from_utf8(message)
            .map_err(|_| ReplicationError::protocol("Error frame message is not UTF-8; refused"))?;
        if message.chars().any(char::is_control) {
            return Err(ReplicationError::protocol("Error frame message holds control characters; refused"));
        }
        Ok(CopyFailure { kind, message: message.to_string() })
    }
}

impl std::fmt::Display for CopyFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}: {}", self.kind.as_str(), self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{decode_header, encode_frame, verify_payload, HEADER_LEN};

    fn through_the_wire(header: FrameHeader, payload: &[u8]) -> Result<CopyFailure, ReplicationError> {
        let bytes = encode_frame(&header, payload);
        let header_bytes: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        let header = decode_header(&header_bytes)?;
        verify_payload(&header, &header_bytes, &bytes[HEADER_LEN..])?;
        CopyFailure::from_frame(&Frame { header, payload: bytes[HEADER_LEN..].to_vec().into() })
    }

    /// A report survives the wire unchanged.
    #[test]
    fn a_report_round_trips() {
        let failure = CopyFailure::new(CopyFailureKind::NoSpace, "no space left on /srv/copy.img — free some");
        let (header, payload) = failure.to_frame(0x5e55);
        assert_eq!(through_the_wire(header, &payload).unwrap(), failure);
    }

    /// ENOSPC, even wrapped in another error, is reported as no space.
    #[test]
    fn enospc_is_no_space() {
        let wrapped = crate::error::EngineError::Io {
            action: "apply a write",
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let failure = CopyFailure::from_error(&wrapped, "apply a write to volume /x", CopyFailureKind::StoreIo);
        assert_eq!(failure.kind, CopyFailureKind::NoSpace);
        assert!(failure.message.contains("no space") && failure.message.contains("/x"), "{}", failure.message);
        let other = io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(CopyFailure::from_error(&other, "apply", CopyFailureKind::StoreIo).kind, CopyFailureKind::StoreIo);
    }

    /// Long messages are cut on a character boundary; control characters go.
    #[test]
    fn messages_are_bounded_and_printable() {
        let failure = CopyFailure::new(CopyFailureKind::StoreIo, &"é\n".repeat(400));
        assert!(failure.message.len() <= MESSAGE_BYTES_MAX);
        assert!(!failure.message.chars().any(char::is_control));
        let (header, payload) = failure.to_frame(1);
        through_the_wire(header, &payload).unwrap();
    }

    /// Unknown kinds, bad UTF-8, control characters, empty and oversized
    /// messages are refused.
    #[test]
    fn bad_reports_are_refused() {
        let header = |len: usize| {
            let mut header = FrameHeader::new(FrameKind::Error);
            header.payload_len = len as u32;
            header
        };
        let mut oversized = vec![1u8];
        oversized.extend(std::iter::repeat_n(b'a', MESSAGE_BYTES_MAX + 1));
        for payload in [vec![9u8, b'x'], vec![1, 0xff, 0xfe], vec![1, b'a', b'\n'], vec![1], oversized] {
            assert!(through_the_wire(header(payload.len()), &payload).is_err(), "{payload:?} was accepted");
        }
    }
}
