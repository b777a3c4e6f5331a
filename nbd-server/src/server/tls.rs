//! TLS for the server: QEMU's `tls-creds-x509` object (a directory holding
//! `ca-cert.pem`, `server-cert.pem` and `server-key.pem`; `verify-peer`,
//! default on, asks clients for a certificate signed by that CA) turned into
//! a rustls configuration, and `authz-simple` (the one client identity, an
//! X.509 distinguished name, allowed in). The handshake drives it; this
//! module only builds and checks.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use engine::error::{invalid, Error, Result};
use engine::options::OptionTree;

/// A TLS-enabled server's credentials and authorization.
pub struct TlsServer {
    pub config: Arc<rustls::ServerConfig>,
    /// `--tls-authz`: the distinguished names allowed (None: any verified client).
    pub identities: Option<Vec<String>>,
}

/// `--object` definitions the NBD tools understand besides secrets.
#[derive(Default)]
pub struct Objects {
    /// id -> (dir, endpoint, verify-peer)
    pub creds: Vec<(String, String, String, bool)>,
    /// id -> identity
    pub authz: Vec<(String, String)>,
}

impl Objects {
    /// Take a `--object` definition if it is one of ours; Ok(false) leaves it
    /// to the caller (secrets).
    pub fn add(&mut self, def: &str) -> Result<bool> {
        let mut o = OptionTree::parse(def, Some("qom-type"))?;
        let ty = o.take("qom-type").unwrap_or_default();
        let id = || -> Result<String> { Err(invalid(format!("--object '{def}': parameter 'id' is missing"))) };
        match ty.as_str() {
            "tls-creds-x509" => {
                let id = match o.take("id") {
                    Some(i) => i,
                    None => id()?,
                };
                let dir = o
                    .take("dir")
                    .ok_or_else(|| invalid(format!("tls-creds-x509 '{id}': parameter 'dir' is missing")))?;
                let endpoint = o.take("endpoint").unwrap_or_else(|| "client".into());
                if endpoint != "server" && endpoint != "client" {
                    return Err(invalid(format!(
                        "tls-creds-x509 '{id}': invalid endpoint '{endpoint}': expected server or client"
                    )));
                }
                let verify = o.take_bool("verify-peer")?.unwrap_or(true);
                o.take("priority");
                o.take("sanity-check");
                o.ensure_consumed(&format!("tls-creds-x509 '{id}'"))?;
                self.creds.push((id, dir, endpoint, verify));
                Ok(true)
            }
            "authz-simple" => {
                let id = match o.take("id") {
                    Some(i) => i,
                    None => id()?,
                };
                let identity = o
                    .take("identity")
                    .ok_or_else(|| invalid(format!("authz-simple '{id}': parameter 'identity' is missing")))?;
                o.ensure_consumed(&format!("authz-simple '{id}'"))?;
                self.authz.push((id, identity));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The server TLS setup for `--tls-creds ID` and `--tls-authz ID`.
    pub fn server(&self, creds: &str, authz: Option<&str>) -> Result<TlsServer> {
        let (_, dir, endpoint, verify) = self
            .creds
            .iter()
            .find(|c| c.0 == creds)
            .ok_or_else(|| invalid(format!("No TLS credentials with id '{creds}'")))?;
        if endpoint != "server" {
            return Err(invalid(format!("Expecting TLS credentials with a server endpoint ('{creds}' is a client)")));
        }
        let identities = match authz {
            None => None,
            Some(a) => Some(vec![self
                .authz
                .iter()
                .find(|x| x.0 == a)
                .map(|x| x.1.clone())
                .ok_or_else(|| invalid(format!("No authorization object with id '{a}'")))?]),
        };
        if identities.is_some() && !verify {
            return Err(invalid(
                "--tls-authz needs verify-peer=on: without a client certificate there is no identity to check",
            ));
        }
        let config = server_config(Path::new(dir), *verify)?;
        Ok(TlsServer { config, identities })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("Unable to read certificates: {e}")).with_file(path.display().to_string()))?;
    if certs.is_empty() {
        return Err(invalid("no certificate in file").with_file(path.display().to_string()));
    }
    Ok(certs)
}

fn tls_err(e: rustls::Error) -> Error {
    invalid(format!("TLS setup: {e}"))
}

/// A rustls server configuration from a QEMU-style credentials directory.
pub fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<rustls::ServerConfig>> {
    let certs = read_certs(&dir.join("server-cert.pem"))?;
    let key_path = dir.join("server-key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| invalid(format!("Unable to read private key: {e}")).with_file(key_path.display().to_string()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let builder = if verify_peer {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(&dir.join("ca-cert.pem"))? {
            roots.add(c).map_err(tls_err)?;
        }
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| invalid(format!("TLS client verifier: {e}")))?;
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let cfg = builder.with_single_cert(certs, key).map_err(tls_err)?;
    Ok(Arc::new(cfg))
}

impl TlsServer {
    /// Check a finished handshake against `--tls-authz`.
    pub fn authorize(&self, conn: &rustls::ServerConnection) -> std::result::Result<(), String> {
        let Some(ids) = &self.identities else {
            return Ok(());
        };
        let cert = conn.peer_certificates().and_then(|c| c.first()).ok_or("client sent no certificate")?;
        let dn = distinguished_name(cert).ok_or("client certificate has no readable subject")?;
        if ids.iter().any(|i| i == &dn) {
            Ok(())
        } else {
            Err(format!("TLS x509 authz check for {dn} is denied"))
        }
    }
}

/// The subject of a certificate as QEMU's authz-simple identities spell it:
/// the attributes in the certificate's own order ("C=GB,O=Example,CN=client"),
/// which is what GnuTLS's gnutls_x509_crt_get_dn gives QEMU (not the reversed
/// RFC 4514 order certtool -i prints).
pub fn distinguished_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut parts = Vec::new();
    for rdn in cert.subject().iter() {
        for atv in rdn.iter() {
            let key = x509_parser::objects::oid2abbrev(atv.attr_type(), x509_parser::objects::oid_registry())
                .map(str::to_string)
                .unwrap_or_else(|_| atv.attr_type().to_id_string());
            let val = atv.as_str().ok()?;
            parts.push(format!("{key}={}", escape(val)));
        }
    }
    Some(parts.join(","))
}

fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for (i, ch) in v.chars().enumerate() {
        if matches!(ch, ',' | '+' | '"' | '\\' | '<' | '>' | ';') || (i == 0 && (ch == '#' || ch == ' ')) {
            s.push('\\');
        }
        s.push(ch);
    }
    s
}
