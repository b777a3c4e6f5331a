//! `--object secret,id=ID,data=...|file=...,format=raw|base64`: secrets given on
//! the command line, kept by id for drivers that need a key (LUKS, encrypted
//! qcow2). Parsed now so command lines that carry them keep working.

use std::collections::HashMap;

use base64::Engine as _;

use crate::error::{invalid, Error, Result};
use crate::options::OptionTree;

#[derive(Default, Clone)]
pub struct Secrets(HashMap<String, Vec<u8>>);

impl Secrets {
    /// Add one `--object` definition. Only `secret` objects are known.
    pub fn add_object(&mut self, def: &str) -> Result<()> {
        let mut o = OptionTree::parse(def, Some("qom-type"))?;
        let ty = o.take("qom-type").ok_or_else(|| invalid(format!("--object '{def}': missing object type")))?;
        if ty != "secret" {
            return Err(invalid(format!("--object '{def}': unknown object type '{ty}' (only 'secret' is supported)")));
        }
        let id = o.take("id").ok_or_else(|| invalid(format!("--object '{def}': parameter 'id' is missing")))?;
        let raw = match (o.take("data"), o.take("file")) {
            (Some(d), None) => d.into_bytes(),
            (None, Some(f)) => std::fs::read(&f).map_err(|e| Error::os("reading secret", e).with_file(f))?,
            _ => return Err(invalid(format!("secret '{id}': exactly one of 'data' or 'file' must be given"))),
        };
        let value = match o.take("format").as_deref() {
            None | Some("raw") => raw,
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(raw.trim_ascii())
                .map_err(|e| invalid(format!("secret '{id}': invalid base64: {e}")))?,
            Some(f) => return Err(invalid(format!("secret '{id}': invalid format '{f}': expected raw or base64"))),
        };
        o.take("keyid");
        o.take("iv");
        o.ensure_consumed(&format!("secret '{id}'"))?;
        self.0.insert(id, value);
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&[u8]> {
        self.0.get(id).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_raw_base64_and_file_secrets() {
        let mut s = Secrets::default();
        s.add_object("secret,id=a,data=hunter2").unwrap();
        s.add_object("secret,id=b,data=aHVudGVyMg==,format=base64").unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "filepw").unwrap();
        s.add_object(&format!("secret,id=c,file={}", f.path().display())).unwrap();
        assert_eq!(s.get("a"), Some(&b"hunter2"[..]));
        assert_eq!(s.get("b"), Some(&b"hunter2"[..]));
        assert_eq!(s.get("c"), Some(&b"filepw"[..]));
        assert!(s.add_object("secret,id=d").is_err());
        assert!(s.add_object("secret,id=d,data=x,format=hex").is_err());
        assert!(s.add_object("iothread,id=x").is_err());
    }
}
