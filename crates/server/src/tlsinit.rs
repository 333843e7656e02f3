//! `ringblk tls-init DIR` (#16): a CA, a server and a client certificate for a quick
//! start with NBD over TLS, laid out as qemu's `tls-creds-x509` reads them (server
//! side: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`; client side:
//! `ca-cert.pem`, `client-cert.pem`, `client-key.pem`, which nbdinfo's
//! `tls-certificates=DIR` reads too).
//!
//! Layer: the binary's tooling; imports rcgen only. Not a CA for production: keys
//! are ECDSA P-256, valid for ten years, and the CA key is left beside the rest (the
//! operator moves it away or deletes it).
//!
//! # Durability
//! Existing files are never overwritten (`create_new`); keys are written 0600 and
//! the directory is created 0700.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// `ringblk tls-init` arguments.
#[derive(clap::Args, Debug)]
pub struct TlsInitArgs {
    /// Directory to write the certificates and keys into (created if missing).
    pub dir: PathBuf,
    /// Server certificate name (a DNS name or IP address; repeatable)
    /// [default: localhost and 127.0.0.1].
    #[arg(long, value_name = "NAME")]
    pub server_name: Vec<String>,
    /// Client certificate name: its subject CN and a DNS SAN [default: client].
    #[arg(long, value_name = "NAME", default_value = "client")]
    pub client_name: String,
    /// Another client (repeatable): DIR/clients/NAME/ gets ca-cert.pem,
    /// client-cert.pem and client-key.pem, a directory a client uses as it is.
    #[arg(long = "client", value_name = "NAME")]
    pub clients: Vec<String>,
}

/// Makes a client certificate for `name` signed by the CA; prints its identities.
fn client_cert(
    name: &str,
    ca_cert: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String), String> {
    let params = leaf(
        vec![name.to_string()],
        name,
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let key = KeyPair::generate().map_err(err)?;
    let cert = params.signed_by(&key, ca_cert, ca_key).map_err(err)?;
    let ids = ringblk_nbd::frontend::tls::peer_identities(cert.der());
    println!(
        "client {name}: identities for tls_allow: {}",
        ids.join(" | ")
    );
    Ok((cert.pem(), key.serialize_pem()))
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn write_new(dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), String> {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Leaf certificate parameters: `names` as SANs (IP addresses as IP SANs), `cn`
/// as the subject, the usages GnuTLS (qemu, libnbd) checks for `purpose`.
fn leaf(
    names: Vec<String>,
    cn: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, String> {
    let mut p = CertificateParams::new(names).map_err(err)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "ringblk");
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![purpose];
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(p)
}

/// Writes the CA, server and client certificates (module docs).
pub fn run(args: &TlsInitArgs) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.dir)
        .map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ringblk quick-start CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "ringblk");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

    let server_names = if args.server_name.is_empty() {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        args.server_name.clone()
    };
    let cn = server_names[0].clone();
    let server = leaf(server_names, &cn, ExtendedKeyUsagePurpose::ServerAuth)?;
    let server_key = KeyPair::generate().map_err(err)?;
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(err)?;

    for name in &args.clients {
        // A name becomes a directory: no separators, no dot names.
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(format!("--client {name:?}: use a plain name"));
        }
    }
    let (client_pem, client_key_pem) = client_cert(&args.client_name, &ca_cert, &ca_key)?;

    let d = &args.dir;
    write_new(d, "ca-cert.pem", &ca_cert.pem(), 0o644)?;
    write_new(d, "ca-key.pem", &ca_key.serialize_pem(), 0o600)?;
    write_new(d, "server-cert.pem", &server_cert.pem(), 0o644)?;
    write_new(d, "server-key.pem", &server_key.serialize_pem(), 0o600)?;
    write_new(d, "client-cert.pem", &client_pem, 0o644)?;
    write_new(d, "client-key.pem", &client_key_pem, 0o600)?;
    for name in &args.clients {
        let cd = d.join("clients").join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cd)
            .map_err(|e| format!("{}: {e}", cd.display()))?;
        let (pem, key) = client_cert(name, &ca_cert, &ca_key)?;
        write_new(&cd, "ca-cert.pem", &ca_cert.pem(), 0o644)?;
        write_new(&cd, "client-cert.pem", &pem, 0o644)?;
        write_new(&cd, "client-key.pem", &key, 0o600)?;
    }
    println!("wrote {}", d.display());
    Ok(())
}
