//! TLS setup for both ends, from QEMU's `tls-creds-x509` objects turned into
//! rustls configurations.
//!
//! Server: the directory holds `ca-cert.pem`, `server-cert.pem` and
//! `server-key.pem`; `verify-peer` (default on) asks clients for a
//! certificate signed by that CA; `authz-simple` names the one client
//! identity (an X.509 distinguished name) allowed in.
//!
//! Client: the directory holds `ca-cert.pem` and, optionally,
//! `client-cert.pem` and `client-key.pem` to present; the server's
//! certificate must chain to that CA and, when a host name is known (the
//! TCP host or `tls-hostname`), carry it. `verify-peer=off` accepts any
//! server certificate. The same directory layout is libnbd's
//! `tls-certificates`.
//!
//! The handshakes drive these; this module only builds and checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use engine::error::{invalid, Error, Result};
use engine::objects::{self, Endpoint, Object};

/// A TLS-enabled server's credentials and authorization.
pub struct TlsServer {
    pub config: Arc<rustls::ServerConfig>,
    /// `--tls-authz`: the distinguished names allowed (None: any verified client).
    pub identities: Option<Vec<String>>,
}

/// The x509 credentials object `id`: (directory, verify-peer), checked to be
/// for this endpoint.
fn creds(id: &str, want: Endpoint) -> Result<(PathBuf, bool)> {
    match objects::get(id) {
        Some(Object::TlsCredsX509 { dir, endpoint, verify_peer }) => {
            if endpoint != want {
                let (w, e) = if want == Endpoint::Server { ("server", "client") } else { ("client", "server") };
                return Err(invalid(format!("Expecting TLS credentials with a {w} endpoint ('{id}' is a {e})")));
            }
            Ok((dir, verify_peer))
        }
        Some(_) => Err(invalid(format!("Object '{id}' is not TLS credentials"))),
        None => Err(invalid(format!("No TLS credentials with id '{id}'"))),
    }
}

impl TlsServer {
    /// The server TLS setup for `--tls-creds ID` and `--tls-authz ID`.
    pub fn new(creds_id: &str, authz: Option<&str>) -> Result<TlsServer> {
        let (dir, verify) = creds(creds_id, Endpoint::Server)?;
        let identities = match authz {
            None => None,
            Some(a) => match objects::get(a) {
                Some(Object::AuthzSimple { identity }) => Some(vec![identity]),
                _ => return Err(invalid(format!("No authorization object with id '{a}'"))),
            },
        };
        if identities.is_some() && !verify {
            return Err(invalid(
                "--tls-authz needs verify-peer=on: without a client certificate there is no identity to check",
            ));
        }
        let config = server_config(&dir, verify)?;
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

/// A client's TLS setup: its configuration and the name it expects.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsClient {
    /// From the credentials object `id` (`tls-creds=ID`).
    pub fn from_object(id: &str, hostname: Option<&str>) -> Result<TlsClient> {
        let (dir, verify) = creds(id, Endpoint::Client)?;
        TlsClient::from_dir(&dir, verify, hostname)
    }

    /// From a directory laid out as QEMU and libnbd do. `hostname` is the
    /// name the server's certificate must carry (None: any name, as QEMU does
    /// over a unix socket).
    pub fn from_dir(dir: &Path, verify_peer: bool, hostname: Option<&str>) -> Result<TlsClient> {
        let mut roots = rustls::RootCertStore::empty();
        if verify_peer {
            for c in read_certs(&dir.join("ca-cert.pem"))? {
                roots.add(c).map_err(tls_err)?;
            }
        }
        let webpki = if verify_peer {
            Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| invalid(format!("TLS server verifier: {e}")))?,
            )
        } else {
            None
        };
        let verifier = Arc::new(ServerVerifier { webpki, check_name: hostname.is_some(), provider: provider() });
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        let mut config = if cert.exists() && key.exists() {
            let k = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
                invalid(format!("Unable to read private key: {e}")).with_file(key.display().to_string())
            })?;
            builder.with_client_auth_cert(read_certs(&cert)?, k).map_err(tls_err)?
        } else {
            builder.with_no_client_auth()
        };
        config.enable_sni = hostname.is_some_and(|h| h.parse::<std::net::IpAddr>().is_err());
        let name = ServerName::try_from(hostname.unwrap_or("localhost").to_string())
            .map_err(|_| invalid(format!("invalid TLS host name '{}'", hostname.unwrap_or_default())))?;
        Ok(TlsClient { config: Arc::new(config), name })
    }

    /// A fresh session for one connection.
    pub fn session(&self) -> std::io::Result<rustls::ClientConnection> {
        rustls::ClientConnection::new(self.config.clone(), self.name.clone()).map_err(std::io::Error::other)
    }
}

/// Checks a server's certificate chain against the CA, and its name only
/// when one is expected; with verify-peer=off, accepts any certificate. The
/// handshake's signatures are checked either way, so the session is bound to
/// the key of the certificate presented.
#[derive(Debug)]
struct ServerVerifier {
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(w) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match w.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // webpki checks the name last, after the chain.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
