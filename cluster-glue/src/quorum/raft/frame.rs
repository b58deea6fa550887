//! The quorum wire frame: `u32 length | 32-byte HMAC-SHA256(secret, group
//! || body) | body`, length big-endian and counting the body only. The MAC
//! binds each frame to the group's secret and name, so a peer of another
//! group (or anyone without the secret) is refused before its body is
//! parsed. Frames are bounded; a length over the bound closes the
//! connection before any buffer is allocated for it.

use std::io;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// No frame body is larger (a snapshot chunk is 1 MiB of bytes, about 4 MiB
/// as JSON).
pub(crate) const FRAME_BYTES_MAX: usize = 16 << 20;

const MAC_BYTES: usize = 32;

/// A frame's body must arrive within this once its header has.
const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// The key and group every frame is sealed with.
#[derive(Clone)]
pub(crate) struct FrameKey {
    secret: Vec<u8>,
    group: String,
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("FrameKey").field("group", &self.group).finish_non_exhaustive()
    }
}

impl FrameKey {
    /// A key for `group`.
    pub(crate) fn new(secret: &[u8], group: &str) -> FrameKey {
        FrameKey { secret: secret.to_vec(), group: group.to_string() }
    }

    /// The group's name.
    pub(crate) fn group(&self) -> &str {
        &self.group
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; new_from_slice fails only for
        // fixed-size-key MACs.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).unwrap_or_else(|_| unreachable!());
        mac.update(self.group.as_bytes());
        mac.update(body);
        mac
    }

    /// The whole frame for `body`.
    pub(crate) fn seal(&self, body: &[u8]) -> Vec<u8> {
        assert!(body.len() <= FRAME_BYTES_MAX, "quorum frame of {} bytes is over the limit", body.len());
        let mut frame = Vec::with_capacity(4 + MAC_BYTES + body.len());
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&self.mac(body).finalize().into_bytes());
        frame.extend_from_slice(body);
        frame
    }

    /// Whether `mac` authenticates `body` (constant time).
    pub(crate) fn verify(&self, mac: &[u8], body: &[u8]) -> bool {
        self.mac(body).verify_slice(mac).is_ok()
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The length is over [`FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes is over the limit of {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    /// The body did not arrive in time.
    #[error("frame body not received within {BODY_DEADLINE:?}")]
    Slow,
    /// The MAC does not match: another secret or group, or tampering.
    #[error("bad MAC: the sender has another secret or group, or the frame was altered")]
    BadMac,
}

/// Write one frame.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, key: &FrameKey, body: &[u8]) -> io::Result<()> {
    writer.write_all(&key.seal(body)).await?;
    writer.flush().await
}

/// Read one authenticated frame's body.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, key: &FrameKey) -> Result<Vec<u8>, FrameError> {
    let mut length = [0u8; 4];
    reader.read_exact(&mut length).await?;
    let length = u32::from_be_bytes(length) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(length));
    }
    let rest = async {
        let mut mac = [0u8; MAC_BYTES];
        reader.read_exact(&mut mac).await?;
        // Grows as bytes arrive: a peer announcing a large frame and sending
        // little gets no large buffer.
        let mut body = Vec::new();
        (&mut *reader).take(length as u64).read_to_end(&mut body).await?;
        if body.len() != length {
            return Err(FrameError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-frame")));
        }
        Ok((mac, body))
    };
    let (mac, body) = tokio::time::timeout(BODY_DEADLINE, rest).await.map_err(|_| FrameError::Slow)??;
    if !key.verify(&mac, &body) {
        return Err(FrameError::BadMac);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed frame opens with the same key; another secret or group, or a
    /// flipped bit, is refused; an oversized length is refused unread.
    #[tokio::test]
    async fn frames_authenticate_and_are_bounded() {
        let key = FrameKey::new(b"secret", "group-a");
        let frame = key.seal(b"{\"hello\":1}");
        assert_eq!(read_frame(&mut &frame[..], &key).await.expect("open"), b"{\"hello\":1}");
        for other in [FrameKey::new(b"secret", "group-b"), FrameKey::new(b"other", "group-a")] {
            assert!(matches!(read_frame(&mut &frame[..], &other).await, Err(FrameError::BadMac)));
        }
        let mut altered = frame.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(matches!(read_frame(&mut &altered[..], &key).await, Err(FrameError::BadMac)));
        let huge = u32::MAX.to_be_bytes();
        assert!(matches!(read_frame(&mut &huge[..], &key).await, Err(FrameError::TooLarge(_))));
    }
}
