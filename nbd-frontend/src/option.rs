//! Handshake option payloads: pure parsers that never panic on input.
//!
//! Each parser takes the option's data (already length-checked against
//! [`OPTION_DATA_MAX`]) and returns the request or the option-reply error
//! the server answers with (usually `NBD_REP_ERR_INVALID`).

use crate::protocol::*;

/// Longest option payload read into memory; longer ones are skipped and
/// refused with `NBD_REP_ERR_TOO_BIG`.
pub const OPTION_DATA_MAX: u32 = 64 << 10;
/// Longest string the specification allows (export names, queries).
pub const STRING_MAX: usize = 4096;
/// Most info requests or meta-context queries honoured in one option.
pub const QUERIES_MAX: usize = 128;

/// An NBD_OPT_INFO or NBD_OPT_GO request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Requested export name.
    pub name: String,
    /// Requested information types.
    pub requests: Vec<u16>,
}

/// An NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub name: String,
    /// Query strings, such as `base:allocation` or `base:`.
    pub queries: Vec<String>,
}

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], u32> {
        if self.data.len() < n {
            return Err(REP_ERR_INVALID);
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, u32> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, u32> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn string(&mut self, len: usize) -> Result<String, u32> {
        if len > STRING_MAX {
            return Err(REP_ERR_INVALID);
        }
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| REP_ERR_INVALID)?;
        if text.contains('\0') {
            return Err(REP_ERR_INVALID);
        }
        Ok(text.to_string())
    }

    fn finish(&self) -> Result<(), u32> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(REP_ERR_INVALID)
        }
    }
}

/// Parse the data of INFO or GO: u32 name length, name, u16 count, u16s.
pub fn parse_info(data: &[u8]) -> Result<InfoRequest, u32> {
    let mut cursor = Cursor { data };
    let name_len = cursor.u32()? as usize;
    let name = cursor.string(name_len)?;
    let count = cursor.u16()? as usize;
    let mut requests = Vec::with_capacity(count.min(QUERIES_MAX));
    for _ in 0..count {
        let request = cursor.u16()?;
        if requests.len() < QUERIES_MAX {
            requests.push(request);
        }
    }
    cursor.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Parse the data of LIST/SET_META_CONTEXT: u32 name length, name, u32
/// query count, then each query as u32 length and string.
pub fn parse_meta_context(data: &[u8]) -> Result<MetaContextRequest, u32> {
    let mut cursor = Cursor { data };
    let name_len = cursor.u32()? as usize;
    let name = cursor.string(name_len)?;
    let count = cursor.u32()? as usize;
    if count > QUERIES_MAX {
        return Err(REP_ERR_TOO_BIG);
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = cursor.u32()? as usize;
        queries.push(cursor.string(len)?);
    }
    cursor.finish()?;
    Ok(MetaContextRequest { name, queries })
}

/// Parse the data of EXPORT_NAME: the whole payload is the name.
pub fn parse_export_name(data: &[u8]) -> Result<String, u32> {
    Cursor { data }.string(data.len())
}

/// Which of our contexts a query selects: `base:allocation` by its name or
/// by the namespace `base:`; for LIST an empty query list means all.
pub fn matches_base_allocation(queries: &[String], listing: bool) -> bool {
    if listing && queries.is_empty() {
        return true;
    }
    queries.iter().any(|query| query == META_CONTEXT_BASE_ALLOCATION || (listing && query == "base:"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_bytes(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            data.extend_from_slice(&r.to_be_bytes());
        }
        data
    }

    #[test]
    fn info_parses_and_rejects_trailing_bytes() {
        let data = info_bytes("vol", &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(parse_info(&data), Ok(InfoRequest { name: "vol".into(), requests: vec![1, 3] }));
        let mut trailing = data.clone();
        trailing.push(0);
        assert_eq!(parse_info(&trailing), Err(REP_ERR_INVALID));
        assert_eq!(parse_info(&data[..data.len() - 1]), Err(REP_ERR_INVALID));
    }

    #[test]
    fn meta_context_queries() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&5u32.to_be_bytes());
        data.extend_from_slice(b"base:");
        let request = parse_meta_context(&data).unwrap();
        assert!(matches_base_allocation(&request.queries, true));
        assert!(!matches_base_allocation(&request.queries, false));
    }

    proptest! {
        /// Arbitrary bytes never panic any option parser.
        #[test]
        fn parsers_survive_garbage(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info(&data);
            let _ = parse_meta_context(&data);
            let _ = parse_export_name(&data);
        }

        /// A well-formed INFO request round-trips.
        #[test]
        fn info_round_trips(name in "[a-z0-9/_-]{0,40}", requests in proptest::collection::vec(any::<u16>(), 0..20)) {
            let parsed = parse_info(&info_bytes(&name, &requests)).unwrap();
            prop_assert_eq!(parsed, InfoRequest { name, requests });
        }
    }
}
