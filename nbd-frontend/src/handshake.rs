//! Fixed-newstyle negotiation over a blocking stream.
//!
//! Runs once per connection before transmission: greet, read the client's
//! flags, then answer options until EXPORT_NAME or GO moves the connection to
//! transmission, or ABORT or end-of-stream closes it. Unknown options get
//! `NBD_REP_ERR_UNSUP` and the loop goes on; malformed ones get
//! `NBD_REP_ERR_INVALID`.

use std::io::{self, Read, Write};

use crate::error::NbdError;
use crate::option::{self, OPTION_DATA_MAX};
use crate::protocol::*;
use crate::reply::{self, option_reply};

/// What the handshake tells clients about the one export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// Export name; the empty name also selects it (the default export).
    pub name: String,
    /// Free text shown by `nbdinfo` and `NBD_OPT_LIST`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub transmission_flags: u16,
}

impl ExportInfo {
    /// Transmission flags as sent: SEND_DF only once structured replies
    /// are negotiated (DF means nothing without them).
    pub fn flags_for(&self, negotiated: &Negotiated) -> u16 {
        let df = if negotiated.structured { TFLAG_SEND_DF } else { 0 };
        (self.transmission_flags & !TFLAG_SEND_DF) | df
    }

    fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// The state a connection carries into transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The context id of `base:allocation`, if the client selected it.
    pub base_allocation: Option<u32>,
}

/// The context id this server gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Options answered before a connection is dropped as abusive.
pub const OPTIONS_MAX: usize = 1024;

/// Negotiate on `stream`; `Ok(None)` means the client ended the handshake.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    export: &ExportInfo,
    peer: &str,
) -> Result<Option<Negotiated>, NbdError> {
    let io_error =
        |action: &'static str| move |source: io::Error| NbdError::Io { peer: peer.to_string(), action, source };
    let protocol = |message: String| NbdError::Protocol { peer: peer.to_string(), message };

    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).map_err(io_error("send greeting"))?;

    let client_flags = read_u32(stream).map_err(io_error("read client flags"))?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & FLAG_NO_ZEROES as u32 != 0;
    let mut negotiated = Negotiated { structured: false, base_allocation: None };

    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; 16];
        match stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(error) => return Err(io_error("read option")(error)),
        }
        let magic = u64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#x}")));
        }
        if length > OPTION_DATA_MAX {
            if option == OPT_EXPORT_NAME {
                return Err(protocol(format!("export name of {length} bytes")));
            }
            io::copy(&mut Read::by_ref(stream).take(length as u64), &mut io::sink())
                .map_err(io_error("skip oversize option"))?;
            let reply = option_reply(option, REP_ERR_TOO_BIG, b"option data too long");
            stream.write_all(&reply).map_err(io_error("send option reply"))?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).map_err(io_error("read option data"))?;
        match answer(option, &data, export, &mut negotiated) {
            Answer::Replies(replies) => {
                stream.write_all(&replies).map_err(io_error("send option reply"))?;
            }
            Answer::Close(replies) => {
                stream.write_all(&replies).map_err(io_error("send option reply"))?;
                return Ok(None);
            }
            Answer::Transmit(replies) => {
                stream.write_all(&replies).map_err(io_error("send option reply"))?;
                return Ok(Some(negotiated));
            }
            Answer::ExportName(Some(name)) if export.matches(&name) => {
                let mut out = export.size.to_be_bytes().to_vec();
                out.extend_from_slice(&export.flags_for(&negotiated).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&out).map_err(io_error("send export"))?;
                return Ok(Some(negotiated));
            }
            Answer::ExportName(name) => {
                return Err(protocol(format!("EXPORT_NAME for unknown export {name:?}")));
            }
        }
        stream.flush().map_err(io_error("flush"))?;
    }
    Err(protocol(format!("more than {OPTIONS_MAX} options")))
}

/// What the server does with one option.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send these bytes and keep negotiating.
    Replies(Vec<u8>),
    /// Send these bytes and close.
    Close(Vec<u8>),
    /// Send these bytes and start transmission.
    Transmit(Vec<u8>),
    /// EXPORT_NAME: transmission if the name matches, else close.
    ExportName(Option<String>),
}

/// Decide the answer to one option: the pure core of the handshake.
pub fn answer(option: u32, data: &[u8], export: &ExportInfo, negotiated: &mut Negotiated) -> Answer {
    let error = |code: u32, message: &str| Answer::Replies(option_reply(option, code, message.as_bytes()));
    match option {
        OPT_EXPORT_NAME => Answer::ExportName(option::parse_export_name(data).ok()),
        OPT_ABORT => Answer::Close(option_reply(option, REP_ACK, &[])),
        OPT_LIST if !data.is_empty() => error(REP_ERR_INVALID, "LIST takes no data"),
        OPT_LIST => {
            let mut server = (export.name.len() as u32).to_be_bytes().to_vec();
            server.extend_from_slice(export.name.as_bytes());
            server.extend_from_slice(export.description.as_bytes());
            let mut out = option_reply(option, REP_SERVER, &server);
            out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
            Answer::Replies(out)
        }
        OPT_STARTTLS => error(REP_ERR_UNSUP, "TLS is not supported by this server"),
        OPT_INFO | OPT_GO => match option::parse_info(data) {
            Err(code) => error(code, "malformed INFO/GO request"),
            Ok(request) if !export.matches(&request.name) => error(REP_ERR_UNKNOWN, "no such export"),
            Ok(request) => {
                let mut out =
                    option_reply(option, REP_INFO, &reply::info_export(export.size, export.flags_for(negotiated)));
                if request.requests.contains(&INFO_NAME) {
                    out.extend_from_slice(&option_reply(option, REP_INFO, &reply::info_text(INFO_NAME, &export.name)));
                }
                if request.requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let text = reply::info_text(INFO_DESCRIPTION, &export.description);
                    out.extend_from_slice(&option_reply(option, REP_INFO, &text));
                }
                let block_size = reply::info_block_size(1, BLOCK_SIZE_PREFERRED, PAYLOAD_MAX);
                out.extend_from_slice(&option_reply(option, REP_INFO, &block_size));
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                if option == OPT_GO {
                    Answer::Transmit(out)
                } else {
                    Answer::Replies(out)
                }
            }
        },
        OPT_STRUCTURED_REPLY if !data.is_empty() => error(REP_ERR_INVALID, "STRUCTURED_REPLY takes no data"),
        OPT_STRUCTURED_REPLY => {
            negotiated.structured = true;
            Answer::Replies(option_reply(option, REP_ACK, &[]))
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(option, data, export, negotiated),
        OPT_EXTENDED_HEADERS => error(REP_ERR_UNSUP, "extended headers are not supported"),
        _ => error(REP_ERR_UNSUP, "unknown option"),
    }
}

fn meta_context(option: u32, data: &[u8], export: &ExportInfo, negotiated: &mut Negotiated) -> Answer {
    let error = |code: u32, message: &str| Answer::Replies(option_reply(option, code, message.as_bytes()));
    let setting = option == OPT_SET_META_CONTEXT;
    if setting && !negotiated.structured {
        return error(REP_ERR_INVALID, "SET_META_CONTEXT needs structured replies first");
    }
    let request = match option::parse_meta_context(data) {
        Ok(request) => request,
        Err(code) => return error(code, "malformed meta context request"),
    };
    if !export.matches(&request.name) {
        return error(REP_ERR_UNKNOWN, "no such export");
    }
    let selected = option::matches_base_allocation(&request.queries, !setting);
    let mut out = Vec::new();
    if selected {
        let mut context = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        context.extend_from_slice(META_CONTEXT_BASE_ALLOCATION.as_bytes());
        out.extend_from_slice(&option_reply(option, REP_META_CONTEXT, &context));
    }
    if setting {
        negotiated.base_allocation = selected.then_some(BASE_ALLOCATION_ID);
    }
    out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
    Answer::Replies(out)
}

fn read_u32<S: Read>(stream: &mut S) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "vol".into(),
            description: "test".into(),
            size: 1 << 20,
            transmission_flags: TFLAG_HAS_FLAGS,
        }
    }

    fn reply_types(bytes: &[u8]) -> Vec<u32> {
        let mut types = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 20 {
            types.push(u32::from_be_bytes(rest[12..16].try_into().unwrap()));
            let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            rest = &rest[20 + len..];
        }
        types
    }

    #[test]
    fn go_for_an_unknown_export_is_err_unknown() {
        let mut state = Negotiated { structured: false, base_allocation: None };
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"nope");
        data.extend_from_slice(&0u16.to_be_bytes());
        let Answer::Replies(bytes) = answer(OPT_GO, &data, &export(), &mut state) else { panic!("expected replies") };
        assert_eq!(reply_types(&bytes), vec![REP_ERR_UNKNOWN]);
    }

    #[test]
    fn info_and_go_report_the_same_export() {
        let mut state = Negotiated { structured: false, base_allocation: None };
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&0u16.to_be_bytes());
        let Answer::Replies(info) = answer(OPT_INFO, &data, &export(), &mut state) else { panic!() };
        let Answer::Transmit(go) = answer(OPT_GO, &data, &export(), &mut state) else { panic!() };
        assert_eq!(reply_types(&info), vec![REP_INFO, REP_INFO, REP_ACK]);
        assert_eq!(info[8..12], OPT_INFO.to_be_bytes());
        assert_eq!(reply_types(&go), reply_types(&info));
        // The INFO_EXPORT payload (size and flags) is identical for INFO and GO.
        assert_eq!(info[20..32], go[20..32]);
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let mut state = Negotiated { structured: false, base_allocation: None };
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&15u32.to_be_bytes());
        data.extend_from_slice(b"base:allocation");
        let Answer::Replies(bytes) = answer(OPT_SET_META_CONTEXT, &data, &export(), &mut state) else { panic!() };
        assert_eq!(reply_types(&bytes), vec![REP_ERR_INVALID]);
        state.structured = true;
        let Answer::Replies(bytes) = answer(OPT_SET_META_CONTEXT, &data, &export(), &mut state) else { panic!() };
        assert_eq!(reply_types(&bytes), vec![REP_META_CONTEXT, REP_ACK]);
        assert_eq!(state.base_allocation, Some(BASE_ALLOCATION_ID));
    }

    #[test]
    fn unknown_options_are_unsupported_and_abort_closes() {
        let mut state = Negotiated { structured: false, base_allocation: None };
        let Answer::Replies(bytes) = answer(99, &[], &export(), &mut state) else { panic!() };
        assert_eq!(reply_types(&bytes), vec![REP_ERR_UNSUP]);
        assert!(matches!(answer(OPT_ABORT, &[], &export(), &mut state), Answer::Close(_)));
    }
}
