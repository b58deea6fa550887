//! Human-friendly sizes: `1073741824`, `512M`, `1G`, `1GiB`, `4k`. Suffixes
//! are binary (powers of 1024), as in qemu-img. The command line and the group
//! config share this one parser, so a size means the same in both.

use thiserror::Error;

/// Why a size did not parse. The variants let a caller (the group config)
/// phrase the error in its own terms; `Display` is the command line's wording.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    /// The text does not start with a digit.
    #[error("size {text:?} does not start with a number (try 1G or 1073741824)")]
    NoNumber {
        /// The text as given (trimmed).
        text: String,
    },
    /// The size does not fit in 64 bits.
    #[error("size {text:?} is too large")]
    TooLarge {
        /// The text as given (trimmed).
        text: String,
    },
    /// The suffix after the number is not a known unit.
    #[error("size {text:?} has an unknown unit {unit:?} (use K, M, G or T)")]
    UnknownUnit {
        /// The text as given (trimmed).
        text: String,
        /// The suffix as given, case kept.
        unit: String,
    },
}

/// Parse a size; the error says what was wrong.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::NoNumber { text: text.to_string() });
    }
    let too_large = || SizeError::TooLarge { text: text.to_string() };
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    let unit = suffix.trim();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::UnknownUnit { text: text.to_string(), unit: unit.to_string() }),
    };
    number.checked_mul(1u64 << shift).ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(matches!(parse_size("G"), Err(SizeError::NoNumber { .. })));
        assert!(matches!(parse_size("99999999999T"), Err(SizeError::TooLarge { .. })));
        assert!(matches!(parse_size("99999999999999999999"), Err(SizeError::TooLarge { .. })));
    }

    /// The unknown unit is reported as written, so the message quotes the user's text.
    #[test]
    fn an_unknown_unit_keeps_its_case() {
        assert_eq!(parse_size("1X"), Err(SizeError::UnknownUnit { text: "1X".to_string(), unit: "X".to_string() }));
        assert_eq!(
            parse_size("1X").unwrap_err().to_string(),
            "size \"1X\" has an unknown unit \"X\" (use K, M, G or T)"
        );
    }
}
