//! Network addresses from the command line, parsed one way for every option
//! that takes one (`serve --listen`, `copy-host --listen`, `--admin` on every
//! command, `--mirror NAME=HOST:PORT`), and listening sockets whose errors
//! name the address and the option.
//!
//! Accepted forms: a bare `PORT` (meaning `127.0.0.1:PORT`, loopback),
//! `IPV4:PORT`, `[IPV6]:PORT`, and `HOST:PORT` with the host name resolved
//! once, at start (its first IPv4 address, else its first address).

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

/// The forms an address may take, for error messages.
const FORMS: &str = "use PORT (meaning 127.0.0.1:PORT), IPV4:PORT, [IPV6]:PORT or HOST:PORT";

/// Parse an address given on the command line.
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        let port = text.parse::<u16>().map_err(|_| format!("port {text} is over 65535"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} is neither a port nor HOST:PORT; {FORMS}"));
    };
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!("{text:?}: an IPv6 address goes in brackets, like [::1]:7790"));
    }
    let port: u16 = port.parse().map_err(|_| format!("{text:?}: {port:?} is not a port (0 to 65535); {FORMS}"))?;
    if host.is_empty() || host.starts_with('[') {
        return Err(format!("{text:?} is not an address; {FORMS}"));
    }
    let resolved: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|error| format!("{text:?}: cannot resolve host {host:?}: {error}"))?
        .collect();
    resolved
        .iter()
        .find(|address| address.is_ipv4())
        .or(resolved.first())
        .copied()
        .ok_or_else(|| format!("{text:?}: host {host:?} has no address"))
}

/// Listen on `address`, given by option `flag` (e.g. `--listen`); an error
/// names both and what to do.
pub fn bind(address: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).map_err(|error| bind_error(address, flag, &error))
}

/// The error for a failed bind of `address` given by option `flag`, in one line.
pub fn bind_error(address: SocketAddr, flag: &str, error: &io::Error) -> anyhow::Error {
    let cause = match error.kind() {
        io::ErrorKind::AddrInUse => format!(
            "the address is already in use (another crossmirror, or another program, listens there); \
             stop it or give {flag} another port"
        ),
        io::ErrorKind::AddrNotAvailable => {
            format!("{} is not an address of this host; give {flag} one of its addresses", address.ip())
        }
        io::ErrorKind::PermissionDenied => {
            format!("permission denied (ports below 1024 need root); give {flag} a port of 1024 or more")
        }
        _ => error.to_string(),
    };
    anyhow::anyhow!("cannot listen on {address} ({flag}): {cause}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_to_the_same_kind_of_address() {
        assert_eq!(parse_address("12021"), Ok("127.0.0.1:12021".parse().unwrap()));
        assert_eq!(parse_address("0.0.0.0:12021"), Ok("0.0.0.0:12021".parse().unwrap()));
        assert_eq!(parse_address("[::1]:12021"), Ok("[::1]:12021".parse().unwrap()));
        assert_eq!(parse_address("localhost:12021").map(|address| address.port()), Ok(12021));
        assert!(parse_address("localhost:12021").unwrap().ip().is_loopback());
    }

    #[test]
    fn bad_forms_say_what_is_accepted() {
        for text in ["", "70000", "localhost", "::1:80", "host:port", ":80", "[::1]", "[nope]:80"] {
            let error = parse_address(text).expect_err(text);
            assert!(error.contains(text.trim_matches(':')) || error.contains("over 65535"), "{text}: {error}");
        }
        assert!(parse_address("localhost").unwrap_err().contains("PORT"));
    }
}
