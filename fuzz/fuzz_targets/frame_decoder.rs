//! Fuzz the replication frame decoder. Two modes, chosen by the first byte:
//!
//! - raw: arbitrary bytes, cut into chunks, pushed into a `FrameDecoder` and
//!   popped until it wants more or refuses. Nothing may panic, and a refused
//!   stream stays refused.
//! - structured: valid frames built from the input (random bytes almost never
//!   carry a valid header CRC, so this is how the fuzzer reaches the payload
//!   paths), optionally with one bit flipped, then decoded in chunks. Every
//!   frame that comes out must be exactly one that went in, in order: a
//!   damaged frame is refused, never returned altered.
#![no_main]

use engine::protocol::auth::HandshakeMessage;
use engine::protocol::copy_failure::CopyFailure;
use engine::protocol::decoder::FrameDecoder;
use engine::protocol::frame::{
    decode_header, encode_frame, verify_payload, Frame, FrameFlags, FrameHeader, FrameKind, HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let chunk_len = usize::from(mode >> 2) + 1;
    if mode & 1 == 0 {
        raw(rest, chunk_len);
    } else {
        structured(rest, chunk_len, mode & 2 != 0);
    }
});

/// Push `stream` in chunks and pop everything; returns the frames and
/// whether the decoder refused.
fn decode(stream: &[u8], chunk_len: usize) -> (Vec<Frame>, bool) {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut refused = false;
    for chunk in stream.chunks(chunk_len) {
        if decoder.push(chunk).is_err() {
            assert!(refused, "push refused a small chunk before any frame was refused");
            continue;
        }
        loop {
            match decoder.pop() {
                Ok(Some(frame)) => {
                    assert!(!refused, "a frame came out after the stream was refused");
                    assert_eq!(frame.payload.len(), frame.header.payload_len as usize);
                    if frame.header.kind.is_handshake() {
                        let _ = HandshakeMessage::from_frame(&frame);
                    }
                    if frame.header.kind == FrameKind::Error {
                        // A report from another host is decoded strictly; a
                        // refused one is an error, never a panic.
                        if let Ok(failure) = CopyFailure::from_frame(&frame) {
                            assert!(!failure.message.is_empty() && !failure.message.chars().any(char::is_control));
                        }
                    }
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(_) => {
                    refused = true;
                    break;
                }
            }
        }
    }
    (frames, refused)
}

fn raw(stream: &[u8], chunk_len: usize) {
    if let Some(header_bytes) = stream.first_chunk::<HEADER_LEN>() {
        if let Ok(header) = decode_header(header_bytes) {
            let _ = verify_payload(&header, header_bytes, &stream[HEADER_LEN..]);
        }
    }
    decode(stream, chunk_len);
}

/// Build valid frames from 8-byte recipes, each followed by its payload bytes.
fn build_frames(mut input: &[u8]) -> (Vec<Frame>, &[u8]) {
    let mut frames = Vec::new();
    while frames.len() < 8 {
        let Some((recipe, rest)) = input.split_first_chunk::<8>() else {
            break;
        };
        let kind = FrameKind::ALL[usize::from(recipe[0]) % FrameKind::ALL.len()];
        let mut header = FrameHeader::new(kind);
        header.flags = FrameFlags::from_bits(u16::from(recipe[1] & 3)).expect("known flags");
        header.session = u64::from(recipe[2]);
        header.sequence = frames.len() as u64 + 1;
        header.generation = u64::from(recipe[3]);
        header.epoch = u64::from(recipe[4]);
        let wanted = usize::from(u16::from_le_bytes([recipe[5], recipe[6]]) % 1024);
        let (payload, rest) = match kind {
            FrameKind::Write | FrameKind::ResyncData => rest.split_at((wanted + 1).min(rest.len())),
            FrameKind::Trim | FrameKind::WriteZeroes | FrameKind::ResyncZeroes | FrameKind::ChecksumRequest => {
                rest.split_at(0)
            }
            // An error report: a kind code and a message, 2 to 513 bytes.
            FrameKind::Error => rest.split_at((wanted % 512 + 2).min(rest.len())),
            _ => rest.split_at(wanted.min(rest.len())),
        };
        match kind {
            FrameKind::Write | FrameKind::ResyncData if payload.is_empty() => break,
            FrameKind::Error if payload.len() < 2 => break,
            FrameKind::Write | FrameKind::ResyncData => header.length = payload.len() as u32,
            FrameKind::Trim | FrameKind::WriteZeroes | FrameKind::ResyncZeroes | FrameKind::ChecksumRequest => {
                header.length = u32::from(recipe[7]) * 4096 + 1;
            }
            _ => {}
        }
        if header.length > 0 {
            header.offset = u64::from(recipe[7]) << 12;
        }
        header.payload_len = payload.len() as u32;
        frames.push(Frame { header, payload: payload.to_vec() });
        input = rest;
    }
    (frames, input)
}

fn structured(input: &[u8], chunk_len: usize, flip: bool) {
    let (frames, rest) = build_frames(input);
    let mut stream: Vec<u8> = frames.iter().flat_map(|frame| encode_frame(&frame.header, &frame.payload)).collect();
    if stream.is_empty() {
        return;
    }
    let flipped_bit = if flip {
        let position = rest.first_chunk::<4>().map_or(0, |bytes| u32::from_le_bytes(*bytes)) as usize;
        let bit = position % (stream.len() * 8);
        stream[bit / 8] ^= 1 << (bit % 8);
        Some(bit)
    } else {
        None
    };
    let (decoded, refused) = decode(&stream, chunk_len);
    assert!(decoded.len() <= frames.len());
    for (out, original) in decoded.iter().zip(&frames) {
        assert_eq!(out, original, "a frame came out altered (flipped bit {flipped_bit:?})");
    }
    match flipped_bit {
        None => assert!(!refused && decoded.len() == frames.len(), "an intact stream was refused or cut short"),
        Some(bit) => assert!(refused || decoded.len() < frames.len(), "flipped bit {bit} went unnoticed"),
    }
}
