//! Property tests for the replication frame codec, the streaming decoder and
//! the sequence check: round trips, detection of every single-bit error, no
//! panic on arbitrary bytes, and chunking that changes nothing.

use engine::protocol::copy_failure::{CopyFailure, CopyFailureKind};
use engine::protocol::decoder::FrameDecoder;
use engine::protocol::frame::{
    decode_header, encode_frame, encode_header, verify_payload, Frame, FrameFlags, FrameHeader, FrameKind,
    ERROR_PAYLOAD_MAX, HEADER_LEN,
};
use engine::protocol::sequence::SequenceCheck;
use engine::protocol::ReplicationErrorKind;
use proptest::prelude::*;

/// A frame whose header has the shape its kind requires, with its payload.
fn valid_frame() -> impl Strategy<Value = (FrameHeader, Vec<u8>)> {
    let fields = (
        proptest::sample::select(FrameKind::ALL.to_vec()),
        0u16..4,
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    );
    (fields, any::<u64>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..2048)).prop_map(
        |((kind, flags, session, sequence, generation, epoch), offset, length, bytes)| {
            let mut header = FrameHeader {
                kind,
                flags: FrameFlags::from_bits(flags).unwrap(),
                session,
                sequence,
                generation,
                epoch,
                offset: 0,
                length: 0,
                payload_len: 0,
            };
            let payload = match kind {
                FrameKind::Write | FrameKind::ResyncData => {
                    let mut payload = bytes;
                    payload.push(0xa5);
                    header.length = payload.len() as u32;
                    header.offset = offset.min(u64::MAX - u64::from(header.length));
                    payload
                }
                FrameKind::Trim | FrameKind::WriteZeroes | FrameKind::ResyncZeroes | FrameKind::ChecksumRequest => {
                    header.length = length.max(1);
                    header.offset = offset.min(u64::MAX - u64::from(header.length));
                    Vec::new()
                }
                FrameKind::WriteAck | FrameKind::FlushAck | FrameKind::ChecksumReply => {
                    header.length = length;
                    header.offset = offset.min(u64::MAX - u64::from(length));
                    bytes
                }
                FrameKind::Error => {
                    // A kind code and a message: 2 to ERROR_PAYLOAD_MAX bytes.
                    let mut payload = bytes;
                    payload.resize(payload.len().clamp(2, ERROR_PAYLOAD_MAX as usize), b'm');
                    payload
                }
                _ => bytes,
            };
            header.payload_len = payload.len() as u32;
            (header, payload)
        },
    )
}

/// Decode a whole frame from bytes: header, then payload check.
fn decode_whole(bytes: &[u8]) -> Result<Frame, ReplicationErrorKind> {
    let header_bytes: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
    let header = decode_header(&header_bytes).map_err(|error| error.kind())?;
    let payload = &bytes[HEADER_LEN..];
    verify_payload(&header, &header_bytes, payload).map_err(|error| error.kind())?;
    Ok(Frame { header, payload: payload.to_vec().into() })
}

proptest! {
    /// Any valid header and payload survive encode then decode unchanged.
    #[test]
    fn encode_then_decode_round_trips((header, payload) in valid_frame()) {
        let bytes = encode_frame(&header, &payload);
        prop_assert_eq!(&bytes[..HEADER_LEN], &encode_header(&header, &payload)[..]);
        let frame = decode_whole(&bytes).unwrap();
        prop_assert_eq!(frame.header, header);
        prop_assert_eq!(&*frame.payload, &payload[..]);
    }

    /// Any single flipped bit, in the header or the payload, is refused by
    /// the codec and by the streaming decoder; outside magic and version it
    /// is reported as corruption.
    #[test]
    fn any_single_bit_flip_is_detected((header, payload) in valid_frame(), bit in any::<prop::sample::Index>()) {
        let mut bytes = encode_frame(&header, &payload);
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let error = decode_whole(&bytes).unwrap_err();
        if bit / 8 >= 5 {
            prop_assert_eq!(error, ReplicationErrorKind::Corrupt, "bit {}", bit);
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes).unwrap();
        prop_assert!(decoder.pop().is_err(), "the decoder accepted a damaged frame (bit {})", bit);
    }

    /// A stream of frames cut at arbitrary points decodes to the same frames in order.
    #[test]
    fn chunking_does_not_change_the_frames(
        frames in proptest::collection::vec(valid_frame(), 1..6),
        cuts in proptest::collection::vec(1usize..300, 0..40),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(|(header, payload)| encode_frame(header, payload)).collect();
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        let mut rest = stream.as_slice();
        let mut cuts = cuts.into_iter().cycle();
        while !rest.is_empty() {
            let take = cuts.next().unwrap_or(rest.len()).min(rest.len());
            decoder.push(&rest[..take]).unwrap();
            rest = &rest[take..];
            while let Some(frame) = decoder.pop().unwrap() {
                decoded.push((frame.header, frame.payload.into_vec()));
            }
        }
        prop_assert_eq!(decoded, frames);
        prop_assert_eq!(decoder.buffered_bytes(), 0);
    }

    /// Arbitrary bytes pushed in arbitrary chunks never make the decoder
    /// panic, and once it refuses it keeps refusing.
    #[test]
    fn random_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
        let mut decoder = FrameDecoder::new();
        let mut refused = false;
        for chunk in chunks {
            if decoder.push(&chunk).is_err() {
                prop_assert!(refused);
                continue;
            }
            loop {
                match decoder.pop() {
                    Ok(Some(_)) => prop_assert!(!refused),
                    Ok(None) => break,
                    Err(_) => {
                        refused = true;
                        break;
                    }
                }
            }
        }
    }

    /// An Error frame's report is decoded strictly: a known kind and a
    /// printable UTF-8 message round-trip, anything else is refused, and
    /// nothing panics; a payload outside 2..=ERROR_PAYLOAD_MAX bytes is
    /// refused from the header alone.
    #[test]
    fn error_reports_decode_strictly(code in any::<u8>(), message in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut payload = vec![code];
        payload.extend_from_slice(&message);
        let mut header = FrameHeader::new(FrameKind::Error);
        header.payload_len = payload.len() as u32;
        let decoded = decode_whole(&encode_frame(&header, &payload));
        let well_sized = (2..=ERROR_PAYLOAD_MAX as usize).contains(&payload.len());
        prop_assert_eq!(decoded.is_ok(), well_sized);
        if let Ok(frame) = decoded {
            let report = CopyFailure::from_frame(&frame);
            let valid = CopyFailureKind::from_code(code).is_some()
                && std::str::from_utf8(&message).is_ok_and(|text| !text.chars().any(char::is_control));
            prop_assert_eq!(report.is_ok(), valid, "{:?}", report);
            if let Ok(report) = report {
                prop_assert_eq!(report.message.as_bytes(), &message[..]);
                let (again, again_payload) = report.to_frame(0);
                prop_assert_eq!((again.kind, again_payload), (FrameKind::Error, payload));
            }
        }
    }

    /// Random bytes after a valid magic and version are refused unless their header CRC holds.
    #[test]
    fn forged_headers_are_refused(rest in proptest::collection::vec(any::<u8>(), HEADER_LEN - 5)) {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[..4].copy_from_slice(&0x434d_5246u32.to_be_bytes());
        bytes[4] = engine::protocol::frame::VERSION;
        bytes[5..].copy_from_slice(&rest);
        prop_assert!(decode_header(&bytes).is_err());
    }

    /// The sequence check accepts exactly the frames a simple model accepts:
    /// this session, the next number, no older generation or epoch.
    #[test]
    fn sequence_check_matches_its_model(
        frames in proptest::collection::vec((0u8..8, 0u8..8, 0u8..6, 0u8..6), 0..80),
    ) {
        let session = 7;
        let mut check = SequenceCheck::new(session, 10, 10);
        let (mut expected, mut generation, mut epoch) = (1u64, 10u64, 10u64);
        // Mostly-valid frames, so that runs of acceptances are exercised too.
        let nudge = |value: u64, roll: u8| match roll {
            0 => value - 1,
            1 => value + 1,
            _ => value,
        };
        for (session_roll, sequence_roll, generation_roll, epoch_roll) in frames {
            let mut header = FrameHeader::new(FrameKind::Heartbeat);
            header.session = if session_roll == 0 { session + 1 } else { session };
            header.sequence = match sequence_roll {
                0 => expected.saturating_sub(1),
                1 => expected + 1,
                2 => 0,
                _ => expected,
            };
            header.generation = nudge(generation, generation_roll);
            header.epoch = nudge(epoch, epoch_roll);
            let accepted = header.session == session
                && header.sequence == expected
                && header.generation >= generation
                && header.epoch >= epoch;
            prop_assert_eq!(check.check(&header).is_ok(), accepted, "{:?}", header);
            if accepted {
                expected += 1;
                generation = header.generation;
                epoch = header.epoch;
            }
            prop_assert_eq!(check.sequence_expected(), expected);
        }
    }
}
