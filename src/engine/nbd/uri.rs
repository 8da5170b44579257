//! NBD URIs as QEMU, libnbd and nbdkit write them: `nbd+unix:///EXPORT?socket=PATH` and
//! `nbd://HOST[:PORT]/EXPORT` (the export name may be empty: the server's default export).

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// Where an NBD export is: its server's address and the export's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdSpec {
    pub addr: NbdAddr,
    pub export: String,
}

impl NbdSpec {
    /// Whether `image` is meant as an NBD URI (and must then parse as one).
    pub fn is_uri(image: &str) -> bool {
        image.starts_with("nbd://") || image.starts_with("nbd+unix://")
    }

    pub fn parse(uri: &str) -> Result<NbdSpec, String> {
        Self::parse_parts(uri).map_err(|why| format!("{uri}: {why}"))
    }

    fn parse_parts(uri: &str) -> Result<NbdSpec, String> {
        let bad = |why: &str| Err(why.to_string());
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.is_empty() && !path.starts_with('/') {
                return bad("nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)");
            }
            let export = decode(path.strip_prefix('/').unwrap_or(path))?;
            let mut socket = None;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("socket", p)) if !p.is_empty() => socket = Some(decode(p)?),
                    _ => return bad(&format!("unknown or empty query parameter '{pair}'")),
                }
            }
            let Some(socket) = socket else { return bad("missing ?socket=PATH") };
            Ok(NbdSpec { addr: NbdAddr::Unix(PathBuf::from(socket)), export })
        } else if let Some(rest) = uri.strip_prefix("nbd://") {
            if rest.contains('?') {
                return bad("nbd:// takes no query parameters");
            }
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, ""),
            };
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let Some((host, after)) = v6.split_once(']') else {
                    return bad("unclosed [ in the host");
                };
                (host, after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return bad("missing host (nbd://HOST[:PORT]/EXPORT)");
            }
            let port = match port {
                None => DEFAULT_PORT,
                Some(p) => match p.parse::<u16>() {
                    Ok(n) if n > 0 => n,
                    _ => return bad(&format!("port '{p}' is not 1 to 65535")),
                },
            };
            Ok(NbdSpec {
                addr: NbdAddr::Tcp { host: host.to_string(), port },
                export: decode(path)?,
            })
        } else {
            bad("not an NBD URI (nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT)")
        }
    }
}

impl fmt::Display for NbdSpec {
    /// The URI again, which `parse` reads back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            NbdAddr::Unix(p) => write!(
                f,
                "nbd+unix:///{}?socket={}",
                encode(&self.export),
                encode(&p.display().to_string())
            ),
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", encode(&self.export))
            }
            NbdAddr::Tcp { host, port } => {
                write!(f, "nbd://{host}:{port}/{}", encode(&self.export))
            }
        }
    }
}

/// Percent-decoding (`%2F` and the like), as URIs carry names with reserved characters.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(b) = hex else { return Err(format!("bad percent escape in '{s}'")) };
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8 once decoded"))
}

/// The inverse of `decode` for what a URI cannot carry as it is.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_and_tcp_uris() {
        let s = NbdSpec::parse("nbd+unix:///disk?socket=/run/nbd.sock").unwrap();
        assert_eq!(s.addr, NbdAddr::Unix("/run/nbd.sock".into()));
        assert_eq!(s.export, "disk");
        let s = NbdSpec::parse("nbd+unix://?socket=/s").unwrap();
        assert_eq!(s.export, "");
        let s = NbdSpec::parse("nbd://example:1234/a%20b").unwrap();
        assert_eq!(s.addr, NbdAddr::Tcp { host: "example".into(), port: 1234 });
        assert_eq!(s.export, "a b");
        let s = NbdSpec::parse("nbd://127.0.0.1").unwrap();
        assert_eq!(s.addr, NbdAddr::Tcp { host: "127.0.0.1".into(), port: DEFAULT_PORT });
        let s = NbdSpec::parse("nbd://[::1]:99/x").unwrap();
        assert_eq!(s.addr, NbdAddr::Tcp { host: "::1".into(), port: 99 });
        for uri in [
            "nbd+unix:///disk?socket=/run/a%20b.sock",
            "nbd://h:1/e",
            "nbd://[::1]:99/x",
            "nbd://h:1/",
        ] {
            let spec = NbdSpec::parse(uri).unwrap();
            assert_eq!(NbdSpec::parse(&spec.to_string()).unwrap(), spec, "{uri}");
        }
    }

    #[test]
    fn bad_uris_say_why() {
        let err = |u: &str| NbdSpec::parse(u).unwrap_err();
        assert_eq!(err("nbd+unix:///disk"), "nbd+unix:///disk: missing ?socket=PATH");
        assert_eq!(err("nbd://h:0/x"), "nbd://h:0/x: port '0' is not 1 to 65535");
        assert_eq!(err("nbd://h:70000/x"), "nbd://h:70000/x: port '70000' is not 1 to 65535");
        assert_eq!(err("nbd:///x"), "nbd:///x: missing host (nbd://HOST[:PORT]/EXPORT)");
        assert_eq!(
            err("nbd+unix:///d?sock=/x"),
            "nbd+unix:///d?sock=/x: unknown or empty query parameter 'sock=/x'"
        );
        assert_eq!(err("nbd://h/%zz"), "nbd://h/%zz: bad percent escape in '%zz'");
        assert!(!NbdSpec::is_uri("/var/lib/nbd.img"));
    }
}
