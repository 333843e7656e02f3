//! NBD URIs as qemu, libnbd and nbdkit write them (the NBD project's `uri.md`):
//! `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///EXPORT?socket=PATH`.
//!
//! The export name is the path without its leading `/`, percent-decoded. TLS schemes
//! (`nbds://`) and query parameters other than `socket` are refused with a message,
//! rather than silently ignored.

use std::fmt;
use std::path::PathBuf;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Endpoint::Unix { path } => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// Parses an NBD URI.
pub fn parse(s: &str) -> Result<NbdUri, String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("{s:?} is not a URI (want nbd://HOST:PORT/EXPORT)"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = percent_decode(path)?;
    let mut socket = None;
    for kv in query.into_iter().flat_map(|q| q.split('&')) {
        match kv.split_once('=') {
            Some(("socket", v)) => socket = Some(PathBuf::from(percent_decode(v)?)),
            _ => return Err(format!("unsupported URI query parameter {kv:?}")),
        }
    }
    let endpoint = match scheme {
        "nbd" | "nbd+tcp" => {
            if socket.is_some() {
                return Err("socket= belongs to nbd+unix:// URIs".into());
            }
            parse_authority(authority)?
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(format!(
                    "nbd+unix:// URIs have no host ({authority:?}); use nbd+unix:///EXPORT?socket=PATH"
                ));
            }
            Endpoint::Unix {
                path: socket.ok_or("nbd+unix:// needs ?socket=PATH")?,
            }
        }
        "nbds" | "nbds+unix" | "nbds+tcp" => return Err("TLS (nbds://) is not supported".into()),
        other => return Err(format!("unknown URI scheme {other:?}")),
    };
    Ok(NbdUri { endpoint, export })
}

fn parse_authority(a: &str) -> Result<Endpoint, String> {
    let (host, port) = if let Some(v6) = a.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("unterminated [IPv6] host in {a:?}"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("junk after the host in {a:?}")),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let host = if host.is_empty() { "localhost" } else { host };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
        None => DEFAULT_PORT,
    };
    Ok(Endpoint::Tcp {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn the_forms_qemu_and_libnbd_write() {
        assert_eq!(
            parse("nbd://127.0.0.1:10810/vol0"),
            Ok(tcp("127.0.0.1", 10810, "vol0"))
        );
        assert_eq!(parse("nbd://host"), Ok(tcp("host", DEFAULT_PORT, "")));
        assert_eq!(parse("nbd://host/"), Ok(tcp("host", DEFAULT_PORT, "")));
        assert_eq!(parse("nbd://[::1]:99/a%20b"), Ok(tcp("::1", 99, "a b")));
        assert_eq!(parse("nbd://[::1]/x"), Ok(tcp("::1", DEFAULT_PORT, "x")));
        assert_eq!(
            parse("nbd://h/v@snap/with/slash"),
            Ok(tcp("h", DEFAULT_PORT, "v@snap/with/slash"))
        );
        assert_eq!(
            parse("nbd+unix:///vol0?socket=/run/nbd.sock"),
            Ok(NbdUri {
                endpoint: Endpoint::Unix {
                    path: "/run/nbd.sock".into()
                },
                export: "vol0".into()
            })
        );
        assert_eq!(
            parse("nbd+unix://?socket=/s").map(|u| u.export),
            Ok(String::new())
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://127.0.0.1:10809/vol0",
            "nbd://[::1]:1/e",
            "nbd+unix:///v?socket=/tmp/s",
        ] {
            assert_eq!(parse(s).expect("parse").to_string(), s);
        }
    }

    #[test]
    fn refusals_say_why() {
        for (s, why) in [
            ("127.0.0.1:10809", "not a URI"),
            ("http://x/", "unknown URI scheme"),
            ("nbds://x/", "TLS"),
            ("nbd+unix:///v", "socket=PATH"),
            ("nbd+unix://host/v?socket=/s", "no host"),
            ("nbd://x/?tls=on", "query parameter"),
            ("nbd://x:port/", "bad port"),
            ("nbd://x:70000/", "bad port"),
            ("nbd://x/%zz", "percent"),
            ("nbd://[::1/", "unterminated"),
        ] {
            let err = parse(s).expect_err(s);
            assert!(err.contains(why), "{s}: {err}");
        }
    }
}
