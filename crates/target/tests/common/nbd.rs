//! A raw NBD client for the integration tests, on a blocking `TcpStream`, simple
//! replies only.
//!
//! The hostile tests must do what no real client does (pipeline without reading, send
//! bare WRITE headers, bad magic, unknown options, garbage), so the byte builders here
//! take any value. Everything that is ordinary protocol comes from `ringblk_nbd`: the
//! wire constants (`proto`), the handshake into an export (`ClientHandshake`) and
//! the request encoder (`put_request`); the raw option and reply readers stay here
//! because tests assert on the exact replies a malformed negotiation gets.
//!
//! Every blocking read and write has a timeout (`bound`): a liveness bound that turns a
//! hang into a failure, never a speed assertion.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ringblk_nbd::client::{put_request, ClientHandshake, Cmd, Export, Status};
use ringblk_nbd::proto::*;

/// Largest option reply payload accepted from the server (a sanity bound).
const OPTION_REPLY_MAX_BYTES: usize = 1 << 20;
/// Bytes kept of what a closing server still sends (`Client::wait_closed`).
const CLOSE_KEEP_BYTES: usize = 1 << 20;

pub struct Client {
    pub s: TcpStream,
    /// The timeout of every blocking read and write.
    pub bound: Duration,
}

/// One option reply: the option it answers, its type and its data.
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Export names in NBD_REP_SERVER replies.
pub fn listed(replies: &[OptReply]) -> Vec<Vec<u8>> {
    replies
        .iter()
        .filter(|r| r.kind == REP_SERVER && r.data.len() >= 4)
        .map(|r| {
            let n = be32(&r.data[0..4]) as usize;
            r.data[4..].get(..n).unwrap_or_default().to_vec()
        })
        .collect()
}

/// Error kinds that mean the peer closed the connection.
pub fn closed_kind(k: ErrorKind) -> bool {
    matches!(
        k,
        ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
    )
}

impl Client {
    /// A TCP connection to the loopback `port`, nothing sent or read yet.
    pub fn connect(port: u16, bound: Duration) -> io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(bound))?;
        s.set_write_timeout(Some(bound))?;
        s.set_nodelay(true)?;
        Ok(Client { s, bound })
    }

    /// A full handshake into `export` (`NBD_OPT_GO`, simple replies): a client in the
    /// transmission phase.
    pub fn open(port: u16, export: &str, bound: Duration) -> io::Result<Client> {
        let mut c = Client::connect(port, bound)?;
        c.handshake(export)?;
        Ok(c)
    }

    /// Drives `ringblk_nbd`'s client handshake over the socket, reading no byte past
    /// its end.
    pub fn handshake(&mut self, export: &str) -> io::Result<Export> {
        let fail = |e: ringblk_nbd::client::HandshakeError| other(format!("{export}: {e}"));
        let mut hs = ClientHandshake::new(export).map_err(fail)?;
        loop {
            let out = hs.take_output();
            if !out.is_empty() {
                self.send(&out)?;
            }
            let input = self.read_n(hs.wants())?;
            let (used, status) = hs.feed(&input).map_err(fail)?;
            debug_assert_eq!(used, input.len(), "read past the handshake");
            if let Status::Done(info) = status {
                let out = hs.take_output();
                if !out.is_empty() {
                    self.send(&out)?;
                }
                return Ok(info);
            }
        }
    }

    pub fn read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Reads and checks the 18-byte greeting.
    pub fn greeting(&mut self) -> io::Result<()> {
        let g = self.read_n(GREETING_LEN)?;
        let flags = be16(&g[16..18]);
        if be64(&g[0..8]) != NBD_MAGIC || be64(&g[8..16]) != IHAVEOPT {
            return Err(other(format!("bad greeting {g:02x?}")));
        }
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(other(format!("bad greeting {g:02x?}")));
        }
        Ok(())
    }

    pub fn flags(&mut self, flags: u32) -> io::Result<()> {
        self.send(&flags.to_be_bytes())
    }

    /// Greeting, then fixed-newstyle + no-zeroes client flags: ready for options.
    pub fn start(port: u16, bound: Duration) -> io::Result<Client> {
        let mut c = Client::connect(port, bound)?;
        c.greeting()?;
        c.flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)?;
        Ok(c)
    }

    /// An option header with any magic and length (no data).
    pub fn option_header(&mut self, magic: u64, option: u32, length: u32) -> io::Result<()> {
        let mut b = Vec::with_capacity(OPTION_HEADER_LEN);
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        self.send(&b)
    }

    pub fn option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    pub fn reply(&mut self) -> io::Result<OptReply> {
        let h = self.read_n(OPTION_REPLY_HEADER_LEN)?;
        let option = be32(&h[8..12]);
        let kind = be32(&h[12..16]);
        let len = be32(&h[16..20]) as usize;
        if be64(&h[0..8]) != OPTION_REPLY_MAGIC || len > OPTION_REPLY_MAX_BYTES {
            return Err(other(format!("bad option reply header {h:02x?}")));
        }
        let data = self.read_n(len)?;
        Ok(OptReply { option, kind, data })
    }

    /// Replies to `option` up to and including the final one (ACK or an error).
    pub fn replies(&mut self, option: u32) -> io::Result<Vec<OptReply>> {
        let mut out = Vec::new();
        loop {
            let r = self.reply()?;
            if r.option != option {
                return Err(other(format!(
                    "reply for option {} to option {option}",
                    r.option
                )));
            }
            let last = r.kind == REP_ACK || r.kind & REP_FLAG_ERROR != 0;
            out.push(r);
            if last {
                return Ok(out);
            }
        }
    }

    /// The final reply type to `option` with `data`.
    pub fn ask(&mut self, option: u32, data: &[u8]) -> io::Result<u32> {
        self.option(option, data)?;
        Ok(self.replies(option)?.last().map_or(0, |r| r.kind))
    }

    /// NBD_OPT_GO with any export name bytes: Ok((size, transmission flags)) or
    /// Err(error reply type).
    pub fn go(&mut self, export: &[u8]) -> io::Result<Result<(u64, u16), u32>> {
        self.option(OPT_GO, &go_data(export))?;
        let mut info = None;
        for r in self.replies(OPT_GO)? {
            if r.kind & REP_FLAG_ERROR != 0 {
                return Ok(Err(r.kind));
            }
            if r.kind == REP_INFO && r.data.len() == INFO_EXPORT_LEN && r.data[0..2] == [0, 0] {
                info = Some((be64(&r.data[2..10]), be16(&r.data[10..12])));
            }
        }
        info.map(Ok)
            .ok_or_else(|| other("GO acknowledged without NBD_INFO_EXPORT".into()))
    }

    /// A request with any command and flags, and its payload.
    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.send(&request_bytes(
            REQUEST_MAGIC,
            cmd,
            flags,
            cookie,
            offset,
            len,
            payload,
        ))
    }

    /// One simple reply header: (error, cookie), whatever the cookie.
    pub fn reply_header(&mut self) -> io::Result<(u32, u64)> {
        let h = self.read_n(SIMPLE_REPLY_HEADER_LEN)?;
        if be32(&h) != SIMPLE_REPLY_MAGIC {
            return Err(other(format!("bad simple reply {h:02x?}")));
        }
        Ok((be32(&h[4..]), be64(&h[8..])))
    }

    /// A simple reply to `cookie`: its error, and `data_len` bytes of data on success.
    pub fn simple_reply(&mut self, cookie: u64, data_len: usize) -> io::Result<(u32, Vec<u8>)> {
        let h = self.read_n(SIMPLE_REPLY_HEADER_LEN)?;
        let error = be32(&h[4..8]);
        if be32(&h[0..4]) != SIMPLE_REPLY_MAGIC || be64(&h[8..16]) != cookie {
            return Err(other(format!(
                "bad simple reply {h:02x?} for cookie {cookie:#x}"
            )));
        }
        let data = if error == 0 {
            self.read_n(data_len)?
        } else {
            Vec::new()
        };
        Ok((error, data))
    }

    /// READ: (NBD error, data).
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> io::Result<(u32, Vec<u8>)> {
        self.request(CMD_READ, 0, cookie, offset, len, &[])?;
        self.simple_reply(cookie, len as usize)
    }

    /// READ that must succeed: an NBD error is an `Err`.
    pub fn read_ok(&mut self, cookie: u64, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        match self.read(cookie, offset, len)? {
            (0, data) => Ok(data),
            (err, _) => Err(other(format!("READ failed with NBD error {err}"))),
        }
    }

    /// WRITE: the NBD error (0 on success).
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> io::Result<u32> {
        self.request(CMD_WRITE, 0, cookie, offset, data.len() as u32, data)?;
        Ok(self.simple_reply(cookie, 0)?.0)
    }

    /// NBD_CMD_DISC, then waits (bounded) for the server to close.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, 0, &[]);
        let _ = self.wait_closed(self.bound);
    }

    /// Reads until the server closes the connection (EOF or reset); returns what it sent
    /// first. `Err` if the connection is still open after `bound`.
    pub fn wait_closed(&mut self, bound: Duration) -> Result<Vec<u8>, String> {
        self.s
            .set_read_timeout(Some(bound))
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => {
                    if got.len() < CLOSE_KEEP_BYTES {
                        got.extend_from_slice(&buf[..n]);
                    }
                }
                Err(e) if closed_kind(e.kind()) => return Ok(got),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(format!(
                        "still open after {bound:?} ({e}); received {} bytes",
                        got.len()
                    ))
                }
            }
        }
    }

    /// The server must close without sending anything more.
    pub fn expect_silent_close(&mut self, what: &str) {
        match self.wait_closed(self.bound) {
            Ok(b) if b.is_empty() => {}
            Ok(b) => panic!(
                "{what}: server sent {} bytes before closing: {:02x?}",
                b.len(),
                &b[..b.len().min(64)]
            ),
            Err(e) => panic!("{what}: not closed: {e}"),
        }
    }
}

/// The data of an NBD_OPT_GO for `export` asking for no information.
pub fn go_data(export: &[u8]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export);
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// A request header with any magic, command and flags, followed by `payload`.
pub fn request_bytes(
    magic: u32,
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(REQUEST_HEADER_LEN + payload.len());
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// One well-formed request header (no payload: a WRITE's data follows it).
pub fn header(cmd: Cmd, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(REQUEST_HEADER_LEN);
    put_request(&mut b, cmd, 0, cookie, offset, len);
    b
}

/// A handshake into `export` (a client with `io_bound`), retried until the server
/// accepts (it frees a slot asynchronously after a client leaves), up to `bound`.
pub fn open_when_accepted(
    port: u16,
    export: &str,
    io_bound: Duration,
    bound: Duration,
) -> Result<Client, String> {
    let start = Instant::now();
    loop {
        match Client::open(port, export, io_bound) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > bound => {
                return Err(format!("not accepted within {bound:?}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Distinct bytes per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
