//! Fuzz the NBD parsers: request headers and their validation, option
//! payloads, and the handshake's answer to any option. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_frontend::handshake::{answer, ExportInfo, Negotiated};
use nbd_frontend::request::{parse_header, validate, Limits};
use nbd_frontend::{option, protocol};

fuzz_target!(|data: &[u8]| {
    if data.len() >= protocol::REQUEST_HEADER_LEN {
        let bytes: &[u8; protocol::REQUEST_HEADER_LEN] = data[..protocol::REQUEST_HEADER_LEN].try_into().unwrap();
        if let Some(header) = parse_header(bytes) {
            let flags = data.get(28).copied().unwrap_or(0);
            let limits = Limits {
                size: u64::from_le_bytes(data.get(0..8).unwrap().try_into().unwrap()) | 1,
                read_only: flags & 1 != 0,
                structured: flags & 2 != 0,
                block_status: flags & 4 != 0,
            };
            let _ = validate(&header, &limits);
        }
    }
    let _ = option::parse_info(data);
    let _ = option::parse_meta_context(data);
    let _ = option::parse_export_name(data);
    if let Some((&first, rest)) = data.split_first() {
        let export = ExportInfo { name: "vol".into(), description: String::new(), size: 1 << 30, transmission_flags: 1 };
        let mut negotiated = Negotiated { structured: first & 0x80 != 0, base_allocation: None };
        let _ = answer(u32::from(first & 0x0f), rest, &export, &mut negotiated);
    }
});
