//! A streaming frame decoder: push bytes as they arrive from a socket, in
//! chunks of any size, and pop whole, CRC-verified frames.
//!
//! The decoder holds at most [`FrameDecoder::BUFFERED_BYTES_MAX`] bytes, and a
//! header that announces a payload over the limit is refused before the
//! decoder waits for (or allocates) that payload. After the first refused
//! frame the stream has lost its framing or its integrity, so the decoder
//! refuses everything after it: the caller drops the connection.

use crate::protocol::error::ReplicationError;
use crate::protocol::frame::{decode_header, verify_payload, Frame, FrameHeader, FRAME_BYTES_MAX, HEADER_LEN};

/// Turns a byte stream into frames. Pure: it never touches a socket.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Received bytes; those before `start` are already consumed.
    buffer: Vec<u8>,
    /// Where the next frame starts in `buffer`.
    start: usize,
    /// The header of the next frame, once it has been decoded.
    pending: Option<(FrameHeader, [u8; HEADER_LEN])>,
    /// Set by the first refused frame; the stream is unusable after it.
    failed: bool,
}

impl FrameDecoder {
    /// The most bytes the decoder buffers: two of the largest frames, so a
    /// caller that pops every complete frame after each push never hits it.
    pub const BUFFERED_BYTES_MAX: usize = 2 * FRAME_BYTES_MAX;

    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// The bytes received and not yet returned in a frame.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// How many more bytes must arrive before [`FrameDecoder::pop`] can
    /// return the next frame (a lower bound while the header is incomplete).
    pub fn bytes_wanted(&self) -> usize {
        let needed = match &self.pending {
            Some((header, _)) => HEADER_LEN + header.payload_len as usize,
            None => HEADER_LEN,
        };
        needed.saturating_sub(self.buffered_bytes())
    }

    /// Append received bytes. Refused when the decoder has already refused a
    /// frame, or when the bytes would take it over its buffer limit (pop the
    /// complete frames first).
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.refuse_if_failed()?;
        let buffered = self.buffered_bytes() + bytes.len();
        if buffered > Self::BUFFERED_BYTES_MAX {
            return Err(ReplicationError::TooLarge {
                what: "frame decoder buffer",
                bytes: buffered as u64,
                limit: Self::BUFFERED_BYTES_MAX as u64,
            });
        }
        // Drop consumed bytes once they are at least half the buffer, so the
        // copying stays linear in the bytes received.
        if self.start > 0 && self.start * 2 >= self.buffer.len() {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete frame, `None` when more bytes are needed, or the
    /// error that refused the frame (after which the decoder refuses all).
    pub fn pop(&mut self) -> Result<Option<Frame>, ReplicationError> {
        self.refuse_if_failed()?;
        let result = self.pop_unchecked();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn pop_unchecked(&mut self) -> Result<Option<Frame>, ReplicationError> {
        let (header, header_bytes) = match self.pending {
            Some(pending) => pending,
            None => {
                let Some(header_bytes) = self.buffer[self.start..].first_chunk::<HEADER_LEN>().copied() else {
                    return Ok(None);
                };
                let pending = (decode_header(&header_bytes)?, header_bytes);
                self.pending = Some(pending);
                pending
            }
        };
        let frame_end = self.start + HEADER_LEN + header.payload_len as usize;
        if self.buffer.len() < frame_end {
            return Ok(None);
        }
        let payload = &self.buffer[self.start + HEADER_LEN..frame_end];
        verify_payload(&header, &header_bytes, payload)?;
        let frame = Frame { header, payload: payload.to_vec().into() };
        self.pending = None;
        self.start = frame_end;
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }

    fn refuse_if_failed(&self) -> Result<(), ReplicationError> {
        if self.failed {
            return Err(ReplicationError::protocol(
                "the frame decoder already refused a frame on this connection; drop the connection and reconnect",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::error::ReplicationErrorKind;
    use crate::protocol::frame::{encode_frame, FrameKind};

    fn write_frame(sequence: u64, payload: &[u8]) -> Vec<u8> {
        let mut header = FrameHeader::new(FrameKind::Write);
        header.sequence = sequence;
        header.offset = sequence * 4096;
        header.length = payload.len() as u32;
        header.payload_len = payload.len() as u32;
        encode_frame(&header, payload)
    }

    /// Frames fed one byte at a time come out whole and in order.
    #[test]
    fn byte_at_a_time_yields_every_frame() {
        let stream: Vec<u8> = (1..=3).flat_map(|sequence| write_frame(sequence, &[sequence as u8; 100])).collect();
        let mut decoder = FrameDecoder::new();
        let mut sequences = Vec::new();
        for byte in stream {
            decoder.push(&[byte]).unwrap();
            while let Some(frame) = decoder.pop().unwrap() {
                assert_eq!(&*frame.payload, &vec![frame.header.sequence as u8; 100][..]);
                sequences.push(frame.header.sequence);
            }
        }
        assert_eq!(sequences, [1, 2, 3]);
        assert_eq!(decoder.buffered_bytes(), 0);
    }

    /// bytes_wanted counts down to zero exactly when a frame is complete.
    #[test]
    fn bytes_wanted_tracks_the_frame_in_progress() {
        let frame = write_frame(1, &[9; 10]);
        let mut decoder = FrameDecoder::new();
        assert_eq!(decoder.bytes_wanted(), HEADER_LEN);
        decoder.push(&frame[..HEADER_LEN]).unwrap();
        assert!(decoder.pop().unwrap().is_none());
        assert_eq!(decoder.bytes_wanted(), 10);
        decoder.push(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(decoder.bytes_wanted(), 0);
        assert!(decoder.pop().unwrap().is_some());
    }

    /// A corrupt frame is refused, and so is everything after it.
    #[test]
    fn corrupt_frame_poisons_the_stream() {
        let mut stream = write_frame(1, &[1; 64]);
        stream[HEADER_LEN + 5] ^= 0x40;
        stream.extend(write_frame(2, &[2; 64]));
        let mut decoder = FrameDecoder::new();
        decoder.push(&stream).unwrap();
        assert_eq!(decoder.pop().unwrap_err().kind(), ReplicationErrorKind::Corrupt);
        assert_eq!(decoder.pop().unwrap_err().kind(), ReplicationErrorKind::Protocol);
        assert!(decoder.push(&[0]).is_err());
    }

    /// Pushing past the buffer limit is refused without buffering anything.
    #[test]
    fn buffer_limit_is_enforced() {
        let mut decoder = FrameDecoder::new();
        let chunk = vec![0u8; FrameDecoder::BUFFERED_BYTES_MAX + 1];
        assert_eq!(decoder.push(&chunk).unwrap_err().kind(), ReplicationErrorKind::TooLarge);
        assert_eq!(decoder.buffered_bytes(), 0);
    }
}
