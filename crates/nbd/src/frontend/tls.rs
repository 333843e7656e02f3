//! NBD over TLS (#16): the server's TLS settings ([`NbdTls`]), who a client is
//! (its verified certificate's identities), which exports it may see ([`Gated`]),
//! and one connection's TLS state machine fed bytes by the session (`TlsConn`).
//!
//! Layer: the NBD front end; imports rustls (ring provider, no OpenSSL),
//! x509-parser (to read a verified certificate's subject and SANs) and the
//! handshake's `ExportCatalog`. Sockets stay in `session.rs` on io_uring: this module
//! never does I/O, it moves bytes between buffers.
//!
//! # Access rules
//! An export's access is its volume's ([`ExportAccess`]; `VOL@BACKUP` is covered by
//! `VOL`'s). A client sees (`NBD_OPT_LIST`) and opens (INFO/GO/EXPORT_NAME) an
//! export only if
//! - before TLS: the server's mode is `On` and the export allows plaintext, or the
//!   mode is `Off` (no TLS at all);
//! - and, when the export has an allow-list, the client's verified certificate has
//!   an identity on it: `dns:NAME`, `ip:ADDR`, `uri:URI` (exact SANs) or `dn:SUBJECT`
//!   (the exact subject DN as the server logs it on connect). A plain client has no
//!   identity, so an export with an allow-list is TLS-only whatever its plaintext
//!   flag says, and with `--tls off` it is hidden from everyone (fail closed).
//!
//! Hidden exports are absent from `NBD_OPT_LIST` and answered exactly like a missing
//! one (`NBD_REP_ERR_UNKNOWN`; EXPORT_NAME disconnects), so a client cannot tell them
//! from names that do not exist. Before TLS in mode `On`, every name a plain client
//! may not open, missing or not, gets the spec's `NBD_REP_ERR_TLS_REQD`, so that
//! answer tells nothing either.
//!
//! # Bounds
//! Ciphertext is received into one buffer of [`TLS_RX_BYTES`] and given to rustls
//! only while the session's plaintext buffer has room, so rustls holds at most one
//! record of plaintext (its own limit) and a client that floods is read no faster
//! than the session consumes. Plaintext is encrypted at most
//! [`TLS_SEND_BATCH_BYTES`] per send, and no more until that ciphertext is out.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{ExportCatalog, ExportInfo, TlsMode};

/// Ciphertext receive buffer per TLS connection.
pub(crate) const TLS_RX_BYTES: usize = 64 * 1024;
/// Plaintext encrypted per send at most (records are 16 KiB).
pub(crate) const TLS_SEND_BATCH_BYTES: usize = 256 * 1024;
/// Identities kept from one certificate at most (SANs beyond are ignored).
const IDENTITIES_MAX: usize = 64;

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// Who may see one volume's exports (module docs: access rules).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportAccess {
    /// Identities (`dns:`, `ip:`, `uri:`, `dn:`) of which the client needs one;
    /// empty: any client the mode lets in.
    pub allow: Vec<String>,
    /// Served to plain clients when the mode is `On`.
    pub plaintext: bool,
}

/// The server's TLS settings, shared by every session.
#[derive(Debug, Default)]
pub struct NbdTls {
    pub mode: TlsMode,
    /// The rustls server configuration (`None` with mode `Off`).
    pub config: Option<Arc<ServerConfig>>,
    /// Access by volume name; volumes not named here have the default (no allow-list,
    /// no plaintext).
    pub access: HashMap<String, ExportAccess>,
}

impl NbdTls {
    /// Loads `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from `dir` (qemu's
    /// `tls-creds-x509` layout). With `verify_peer` a client must present a
    /// certificate signed by the CA; without, one it presents is still verified (an
    /// allow-list needs it) but none is required. Without `ca-cert.pem` (and without
    /// `verify_peer`) clients are not asked for certificates at all.
    pub fn load_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, TlsSetupError> {
        let certs = read_certs(&dir.join("server-cert.pem"))?;
        let key_path = dir.join("server-key.pem");
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
        // ring, as #16 asks (no C toolchain step beyond ring's own); rustls 0.23.48
        // deprecates it only for lacking post-quantum key exchange, which none of
        // the NBD clients (GnuTLS) we serve needs.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        let ca_path = dir.join("ca-cert.pem");
        let builder = if verify_peer || ca_path.exists() {
            let mut roots = RootCertStore::empty();
            for ca in read_certs(&ca_path)? {
                roots
                    .add(ca)
                    .map_err(|e| TlsSetupError::Rustls(format!("ca-cert.pem: {e}")))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if verify_peer {
                v
            } else {
                v.allow_unauthenticated()
            };
            let v = v
                .build()
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        Ok(Arc::new(config))
    }

    fn access_of(&self, export: &str) -> Option<&ExportAccess> {
        // A backup `VOL@NAME` is covered by its volume's access (volume names hold
        // no '@').
        let volume = export.split('@').next().unwrap_or(export);
        self.access.get(volume)
    }

    /// Whether a client (TLS or not, with these identities) may see `export`.
    pub fn visible(&self, export: &str, tls_active: bool, peer: &[String]) -> bool {
        let default = ExportAccess::default();
        let access = self.access_of(export).unwrap_or(&default);
        if self.mode == TlsMode::Off && !access.allow.is_empty() {
            // No TLS, no identity to check: fail closed.
            return false;
        }
        let channel_ok = match self.mode {
            TlsMode::Off => true,
            TlsMode::On => tls_active || access.plaintext,
            TlsMode::Require => tls_active,
        };
        let who_ok = access.allow.is_empty() || peer.iter().any(|id| access.allow.contains(id));
        channel_ok && who_ok
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The identities of a verified client certificate (module docs: access rules):
/// `dn:` its subject, then `dns:`/`ip:`/`uri:` per SAN. A certificate that does not
/// parse (rustls verified it, so this does not happen) has none.
pub fn peer_identities(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut ids = vec![format!("dn:{}", cert.subject())];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let id = match name {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::URI(u) => format!("uri:{u}"),
                GeneralName::IPAddress(b) => match ip_string(b) {
                    Some(ip) => format!("ip:{ip}"),
                    None => continue,
                },
                _ => continue,
            };
            if ids.len() >= IDENTITIES_MAX {
                break;
            }
            ids.push(id);
        }
    }
    ids
}

fn ip_string(b: &[u8]) -> Option<String> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Some(std::net::Ipv4Addr::from(v4).to_string());
    }
    let v6 = <[u8; 16]>::try_from(b).ok()?;
    Some(std::net::Ipv6Addr::from(v6).to_string())
}

/// The export catalog as one client may see it (module docs: access rules).
pub(crate) struct Gated<'a> {
    pub inner: &'a dyn ExportCatalog,
    pub tls: &'a NbdTls,
    pub tls_active: bool,
    pub peer: &'a [String],
}

impl ExportCatalog for Gated<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let info = self.inner.lookup(name)?;
        self.tls
            .visible(&info.name, self.tls_active, self.peer)
            .then_some(info)
    }

    fn list(&self) -> Vec<ExportInfo> {
        let mut all = self.inner.list();
        all.retain(|e| self.tls.visible(&e.name, self.tls_active, self.peer));
        all
    }

    fn meta_contexts(&self, export: &str) -> Vec<String> {
        if !self.tls.visible(export, self.tls_active, self.peer) {
            return Vec::new();
        }
        self.inner.meta_contexts(export)
    }

    fn meta_context_binding(&self, export: &str, context: &str) -> u64 {
        self.inner.meta_context_binding(export, context)
    }

    fn needs_tls(&self, _name: &str) -> bool {
        // SELECTIVETLS: every name a plain client may not open gets TLS_REQD, missing
        // ones too (the spec allows it), so the answer does not tell a plain client
        // which TLS-only names exist.
        self.tls.mode == TlsMode::On && !self.tls_active
    }
}

/// Why a TLS connection failed.
#[derive(Debug)]
pub(crate) struct TlsFailed(pub String);

/// One connection's TLS state (module docs: bounds).
///
/// # Ownership
/// `cin` is lent to the in-flight receive (taken, then given back by its
/// completion); `wire_out` is ciphertext (or, first, the STARTTLS ACK in the clear)
/// not yet handed to a send.
pub(crate) struct TlsConn {
    pub conn: ServerConnection,
    pub cin: Option<Vec<u8>>,
    pub cin_start: usize,
    pub cin_end: usize,
    pub wire_out: Vec<u8>,
    /// Reply bytes (counted in the session's `unsent_bytes`) that `wire_out` carries.
    pub wire_plain: usize,
    /// Bytes of the front queued reply already encrypted.
    pub front_offset: usize,
    /// The verified peer's identities, once the TLS handshake completed.
    pub peer: Vec<String>,
    pub established: bool,
    /// The peer sent close_notify.
    pub eof: bool,
    /// Our close_notify was queued (a clean close sends it once, last).
    pub close_sent: bool,
}

impl TlsConn {
    pub fn new(config: Arc<ServerConfig>, clear_prefix: Vec<u8>) -> Result<TlsConn, TlsFailed> {
        let mut conn = ServerConnection::new(config).map_err(|e| TlsFailed(e.to_string()))?;
        // The session bounds what it encrypts per send (TLS_SEND_BATCH_BYTES) and
        // encrypts no more until that is out; rustls's own limit would only make
        // `encrypt` take only part of a batch.
        conn.set_buffer_limit(None);
        Ok(TlsConn {
            conn,
            cin: Some(vec![0u8; TLS_RX_BYTES]),
            cin_start: 0,
            cin_end: 0,
            wire_plain: clear_prefix.len(),
            wire_out: clear_prefix,
            front_offset: 0,
            peer: Vec::new(),
            established: false,
            eof: false,
            close_sent: false,
        })
    }

    /// Whether ciphertext waits in `cin` for room in the plaintext buffer.
    pub fn has_input(&self) -> bool {
        self.cin_start < self.cin_end
    }

    /// Appends received ciphertext to `cin` when it holds no pending input (the
    /// STARTTLS leftovers). Bounded by `cin`'s size: the rest is refused.
    pub fn push_input(&mut self, bytes: &[u8]) -> Result<(), TlsFailed> {
        let Some(cin) = self.cin.as_mut() else {
            return Err(TlsFailed("receive buffer busy".into()));
        };
        if bytes.len() > cin.len() - self.cin_end {
            return Err(TlsFailed("too many bytes after STARTTLS".into()));
        }
        cin[self.cin_end..self.cin_end + bytes.len()].copy_from_slice(bytes);
        self.cin_end += bytes.len();
        Ok(())
    }

    /// Decrypts pending ciphertext into `rx[*rx_end..]` while there is room; returns
    /// whether the handshake just completed (identities are then in `peer`).
    pub fn pump(&mut self, rx: &mut [u8], rx_end: &mut usize) -> Result<bool, TlsFailed> {
        let was = self.established;
        loop {
            if *rx_end < rx.len() {
                match self.conn.reader().read(&mut rx[*rx_end..]) {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        *rx_end += n;
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(TlsFailed(e.to_string())),
                }
            }
            // Only with room for what it decrypts (rustls refuses input while its
            // own plaintext buffer is full).
            if *rx_end >= rx.len() || !self.has_input() || self.eof {
                break;
            }
            let Some(cin) = self.cin.as_ref() else { break };
            let mut slice = &cin[self.cin_start..self.cin_end];
            let n = self
                .conn
                .read_tls(&mut slice)
                .map_err(|e| TlsFailed(e.to_string()))?;
            self.cin_start += n;
            if self.cin_start == self.cin_end {
                self.cin_start = 0;
                self.cin_end = 0;
            }
            self.conn
                .process_new_packets()
                .map_err(|e| TlsFailed(e.to_string()))?;
            if n == 0 {
                break;
            }
        }
        if !self.established && !self.conn.is_handshaking() {
            self.established = true;
            if let Some(chain) = self.conn.peer_certificates() {
                if let Some(leaf) = chain.first() {
                    self.peer = peer_identities(leaf);
                }
            }
        }
        Ok(!was && self.established)
    }

    /// Encrypts `plain`, `len` bytes in all (application data; call only once
    /// established). One write: rustls fills each record across the pieces.
    pub fn encrypt(&mut self, plain: &[std::io::IoSlice<'_>], len: usize) -> Result<(), TlsFailed> {
        if len == 0 {
            return Ok(());
        }
        // With no buffer limit (`new`) rustls takes everything once established.
        match self.conn.writer().write_vectored(plain) {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(TlsFailed(format!("rustls took {n} of {len} bytes"))),
            Err(e) => Err(TlsFailed(e.to_string())),
        }
    }

    /// Moves what rustls has to send into `wire_out`.
    pub fn drain_records(&mut self) -> Result<(), TlsFailed> {
        while self.conn.wants_write() {
            self.conn
                .write_tls(&mut self.wire_out)
                .map_err(|e| TlsFailed(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(mode: TlsMode) -> NbdTls {
        let mut access = HashMap::new();
        access.insert(
            "secret".to_string(),
            ExportAccess {
                allow: vec!["dns:alice".into()],
                plaintext: true,
            },
        );
        access.insert(
            "open".to_string(),
            ExportAccess {
                allow: vec![],
                plaintext: true,
            },
        );
        NbdTls {
            mode,
            config: None,
            access,
        }
    }

    #[test]
    fn allow_list_covers_backups_and_needs_an_identity() {
        let t = tls(TlsMode::On);
        let alice = ["dn:CN=alice".to_string(), "dns:alice".to_string()];
        let bob = ["dns:bob".to_string()];
        assert!(t.visible("secret", true, &alice));
        assert!(t.visible("secret@b1", true, &alice));
        // Negative space: another client, no client, a plain client.
        assert!(!t.visible("secret", true, &bob));
        assert!(!t.visible("secret@b1", true, &bob));
        assert!(!t.visible("secret", true, &[]));
        // A plain client has no identity (the session gives it none).
        assert!(!t.visible("secret", false, &[]));
    }

    #[test]
    fn plain_clients_see_only_plaintext_exports() {
        let t = tls(TlsMode::On);
        assert!(t.visible("open", false, &[]));
        assert!(!t.visible("other", false, &[]));
        assert!(t.visible("other", true, &[]));
        let r = tls(TlsMode::Require);
        assert!(!r.visible("open", false, &[]));
        // TLS off: an allow-list cannot be checked, so its export is hidden.
        let off = tls(TlsMode::Off);
        assert!(off.visible("open", false, &[]));
        assert!(!off.visible("secret", false, &[]));
    }
}
