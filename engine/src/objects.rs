//! `--object TYPE,id=ID,...`: the objects a command line defines, kept by id
//! for whoever needs one: `secret` (a key for LUKS or encrypted qcow2),
//! `tls-creds-x509` (a directory of certificates, for the NBD server and
//! client) and `authz-simple` (the one identity a TLS server lets in).
//!
//! As in QEMU, objects are process-wide: a front-end defines them once from
//! its command line, and a driver opened anywhere below finds them by id
//! (`driver=nbd,tls-creds=ID`). Definitions are checked when given, so a
//! typo fails before any image is touched.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use base64::Engine as _;

use crate::error::{invalid, unsupported, Error, Result};
use crate::options::OptionTree;

/// Which side of a TLS connection credentials are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Server,
    Client,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Secret(Vec<u8>),
    /// QEMU's file names in `dir`: ca-cert.pem, server-cert.pem and
    /// server-key.pem, client-cert.pem and client-key.pem.
    TlsCredsX509 {
        dir: PathBuf,
        endpoint: Endpoint,
        verify_peer: bool,
    },
    AuthzSimple {
        identity: String,
    },
}

static OBJECTS: Mutex<Option<HashMap<String, Object>>> = Mutex::new(None);

/// Parse one `--object` definition into its id and object.
pub fn parse(def: &str) -> Result<(String, Object)> {
    let mut o = OptionTree::parse(def, Some("qom-type"))?;
    let ty = o.take("qom-type").ok_or_else(|| invalid(format!("--object '{def}': missing object type")))?;
    let id = o.take("id").ok_or_else(|| invalid(format!("--object '{def}': parameter 'id' is missing")))?;
    let what = format!("{ty} '{id}'");
    let obj = match ty.as_str() {
        "secret" => {
            let raw = match (o.take("data"), o.take("file")) {
                (Some(d), None) => d.into_bytes(),
                (None, Some(f)) => std::fs::read(&f).map_err(|e| Error::os("reading secret", e).with_file(f))?,
                _ => return Err(invalid(format!("{what}: exactly one of 'data' or 'file' must be given"))),
            };
            let value = match o.take("format").as_deref() {
                None | Some("raw") => raw,
                Some("base64") => base64::engine::general_purpose::STANDARD
                    .decode(raw.trim_ascii())
                    .map_err(|e| invalid(format!("{what}: invalid base64: {e}")))?,
                Some(f) => return Err(invalid(format!("{what}: invalid format '{f}': expected raw or base64"))),
            };
            o.take("keyid");
            o.take("iv");
            Object::Secret(value)
        }
        "tls-creds-x509" => {
            let dir = o.take("dir").ok_or_else(|| invalid(format!("{what}: parameter 'dir' is missing")))?;
            let endpoint = match o.take("endpoint").as_deref() {
                None | Some("client") => Endpoint::Client,
                Some("server") => Endpoint::Server,
                Some(e) => return Err(invalid(format!("{what}: invalid endpoint '{e}': expected server or client"))),
            };
            let verify_peer = o.take_bool("verify-peer")?.unwrap_or(true);
            // GnuTLS knobs with no rustls counterpart: accepted, the defaults apply.
            o.take("priority");
            o.take("sanity-check");
            Object::TlsCredsX509 { dir: dir.into(), endpoint, verify_peer }
        }
        "authz-simple" => {
            let identity =
                o.take("identity").ok_or_else(|| invalid(format!("{what}: parameter 'identity' is missing")))?;
            Object::AuthzSimple { identity }
        }
        "tls-creds-psk" | "tls-creds-anon" => {
            return Err(unsupported(format!("{what}: only x509 TLS credentials are supported (tls-creds-x509)")))
        }
        _ => return Err(invalid(format!("--object '{def}': unknown object type '{ty}'"))),
    };
    o.ensure_consumed(&what)?;
    Ok((id, obj))
}

/// Define one object from its `--object` text; ids are unique.
pub fn define(def: &str) -> Result<()> {
    let (id, obj) = parse(def)?;
    let mut all = OBJECTS.lock().unwrap_or_else(|e| e.into_inner());
    let map = all.get_or_insert_with(HashMap::new);
    // The same definition twice is one object (a command may check its
    // objects before it opens images, which defines them again).
    if map.get(&id).is_some_and(|o| *o != obj) {
        return Err(invalid(format!("--object '{def}': an object with id '{id}' already exists")));
    }
    map.insert(id, obj);
    Ok(())
}

/// Define every object of a command line.
pub fn define_all<S: AsRef<str>>(defs: &[S]) -> Result<()> {
    defs.iter().try_for_each(|d| define(d.as_ref()))
}

/// The object with this id.
pub fn get(id: &str) -> Option<Object> {
    OBJECTS.lock().unwrap_or_else(|e| e.into_inner()).as_ref()?.get(id).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(def: &str) -> Result<Vec<u8>> {
        match parse(def)?.1 {
            Object::Secret(v) => Ok(v),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn parses_raw_base64_and_file_secrets() {
        assert_eq!(secret("secret,id=a,data=hunter2").unwrap(), b"hunter2");
        assert_eq!(secret("secret,id=b,data=aHVudGVyMg==,format=base64").unwrap(), b"hunter2");
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "filepw").unwrap();
        assert_eq!(secret(&format!("secret,id=c,file={}", f.path().display())).unwrap(), b"filepw");
        assert!(parse("secret,id=d").is_err());
        assert!(parse("secret,id=d,data=x,format=hex").is_err());
        assert!(parse("secret,data=x").is_err());
        assert!(parse("iothread,id=x").is_err());
    }

    #[test]
    fn parses_tls_credentials_and_authz() {
        assert_eq!(
            parse("tls-creds-x509,id=t,dir=/d,endpoint=server,verify-peer=off").unwrap(),
            ("t".into(), Object::TlsCredsX509 { dir: "/d".into(), endpoint: Endpoint::Server, verify_peer: false })
        );
        assert_eq!(
            parse("tls-creds-x509,id=t,dir=/d").unwrap().1,
            Object::TlsCredsX509 { dir: "/d".into(), endpoint: Endpoint::Client, verify_peer: true }
        );
        assert!(parse("tls-creds-x509,id=t").is_err());
        assert!(parse("tls-creds-x509,id=t,dir=/d,endpoint=both").is_err());
        assert!(parse("tls-creds-x509,id=t,dir=/d,colour=red").is_err());
        assert!(parse("tls-creds-psk,id=t,dir=/d").is_err());
        assert_eq!(
            parse("authz-simple,id=a,identity=CN=x").unwrap().1,
            Object::AuthzSimple { identity: "CN=x".into() }
        );
        assert!(parse("authz-simple,id=a").is_err());
    }

    #[test]
    fn ids_are_unique_and_found() {
        define("secret,id=objects-test-unique,data=1").unwrap();
        define("secret,id=objects-test-unique,data=1").unwrap();
        assert!(define("secret,id=objects-test-unique,data=2").is_err());
        assert_eq!(get("objects-test-unique"), Some(Object::Secret(b"1".to_vec())));
        assert_eq!(get("objects-test-missing"), None);
    }
}
