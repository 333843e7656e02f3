//! Opening a connection: blocking `connect` and handshake on std sockets, then the
//! socket is handed to a reactor for the transmission phase.
//!
//! The handshake is a few round trips once per connection, outside every measurement,
//! so doing it with blocking I/O (with timeouts) costs nothing and keeps the reactor
//! code to the hot path.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::uri::{Endpoint, NbdUri};
use ringblk_nbd::client::{ClientHandshake, Export, Status};

/// A connection in the transmission phase.
pub struct Connection {
    pub fd: OwnedFd,
    pub export: Export,
}

/// Connects to `uri` and negotiates its export; `timeout` bounds each blocking step.
pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<Connection, String> {
    match &uri.endpoint {
        Endpoint::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {host}: {e}"))?
                .collect();
            let mut last = format!("{host} resolves to no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(mut s) => {
                        // Requests are small and latency-bound: never wait for Nagle.
                        s.set_nodelay(true)
                            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
                        set_timeouts(&s, Some(timeout))?;
                        let export =
                            handshake(&mut s, &uri.export).map_err(|e| format!("{uri}: {e}"))?;
                        set_timeouts(&s, None)?;
                        return Ok(Connection {
                            fd: OwnedFd::from(s),
                            export,
                        });
                    }
                    Err(e) => last = format!("cannot connect to {a}: {e}"),
                }
            }
            Err(last)
        }
        Endpoint::Unix { path } => {
            let mut s = UnixStream::connect(path)
                .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
            s.set_read_timeout(Some(timeout))
                .and_then(|()| s.set_write_timeout(Some(timeout)))
                .map_err(|e| format!("socket timeout: {e}"))?;
            let export = handshake(&mut s, &uri.export).map_err(|e| format!("{uri}: {e}"))?;
            s.set_read_timeout(None)
                .and_then(|()| s.set_write_timeout(None))
                .map_err(|e| format!("socket timeout: {e}"))?;
            Ok(Connection {
                fd: OwnedFd::from(s),
                export,
            })
        }
    }
}

fn set_timeouts(s: &TcpStream, t: Option<Duration>) -> Result<(), String> {
    s.set_read_timeout(t)
        .and_then(|()| s.set_write_timeout(t))
        .map_err(|e| format!("socket timeout: {e}"))
}

/// Drives [`ClientHandshake`] over a blocking stream. Reads never go past what the
/// handshake asks for, so no transmission byte can be swallowed here.
pub fn handshake(s: &mut (impl Read + Write), export: &str) -> Result<Export, String> {
    let mut hs = ClientHandshake::new(export).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    loop {
        let want = hs.wants().min(buf.len());
        let n = match s.read(&mut buf[..want]) {
            Ok(0) => return Err("server closed the connection during the handshake".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("handshake read: {e}")),
        };
        let (used, st) = hs.feed(&buf[..n]).map_err(|e| e.to_string())?;
        debug_assert_eq!(used, n, "reads are bounded by wants()");
        let out = hs.take_output();
        if !out.is_empty() {
            s.write_all(&out)
                .map_err(|e| format!("handshake write: {e}"))?;
        }
        if let Status::Done(export) = st {
            return Ok(export);
        }
    }
}
