//! The option tree every open and create goes through: flat dotted keys
//! (`file.filename`, `file.aio`) with string values, built from QEMU's
//! `key=val,key2=val2` syntax (`,,` escapes a comma), from `json:{...}` (nested
//! objects flattened to dotted keys) or from code. Drivers take the keys they know;
//! whatever is left is an error naming the key.

use std::collections::BTreeMap;

use crate::error::{invalid, Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionTree(BTreeMap<String, String>);

impl OptionTree {
    pub fn new() -> OptionTree {
        OptionTree::default()
    }

    /// Parse `key=val,key2=val2`. A first element without `=` is stored under
    /// `implied` (as `-o` takes a bare "help" or qemu-img a bare filename), if given.
    pub fn parse(s: &str, implied: Option<&str>) -> Result<OptionTree> {
        let mut t = OptionTree::new();
        for (i, item) in split_commas(s).into_iter().enumerate() {
            if item.is_empty() {
                continue;
            }
            match item.split_once('=') {
                Some((k, v)) => {
                    if k.is_empty() {
                        return Err(invalid(format!("invalid option '{item}': empty key")));
                    }
                    t.0.insert(k.to_string(), v.to_string());
                }
                None => match implied {
                    Some(key) if i == 0 => {
                        t.0.insert(key.to_string(), item);
                    }
                    _ => return Err(invalid(format!("invalid option '{item}': expected key=value"))),
                },
            }
        }
        Ok(t)
    }

    /// Parse the JSON object of a `json:{...}` filename (the prefix already removed).
    pub fn from_json(s: &str) -> Result<OptionTree> {
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| invalid(format!("could not parse json: filename: {e}")))?;
        let serde_json::Value::Object(obj) = v else {
            return Err(invalid("json: filename must be a JSON object"));
        };
        let mut t = OptionTree::new();
        flatten("", &obj, &mut t.0)?;
        Ok(t)
    }

    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.0.insert(key.to_string(), value.into());
    }

    /// Set unless already present.
    pub fn set_default(&mut self, key: &str, value: impl Into<String>) {
        self.0.entry(key.to_string()).or_insert_with(|| value.into());
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Take a boolean (`on|off|true|false|yes|no`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => parse_bool(&v).map(Some).ok_or_else(|| {
                invalid(format!("parameter '{key}' expects 'on' or 'off', got '{v}'"))
            }),
        }
    }

    /// Take a size (with suffixes).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => crate::size::parse_size(&v)
                .map(Some)
                .map_err(|_| invalid(format!("parameter '{key}' expects a size, got '{v}'"))),
        }
    }

    /// Take a parsed value (enums with FromStr).
    pub fn take_parsed<T: std::str::FromStr<Err = Error>>(&mut self, key: &str) -> Result<Option<T>> {
        self.take(key).map(|v| v.parse()).transpose()
    }

    /// Remove and return every key under `prefix.`, with the prefix stripped.
    pub fn take_subtree(&mut self, prefix: &str) -> OptionTree {
        let p = format!("{prefix}.");
        let keys: Vec<String> = self.0.keys().filter(|k| k.starts_with(&p)).cloned().collect();
        let mut sub = OptionTree::new();
        for k in keys {
            let v = self.0.remove(&k).expect("key listed above");
            sub.0.insert(k[p.len()..].to_string(), v);
        }
        sub
    }

    /// Put `sub`'s keys back under `prefix.`.
    pub fn insert_subtree(&mut self, prefix: &str, sub: OptionTree) {
        for (k, v) in sub.0 {
            self.0.insert(format!("{prefix}.{k}"), v);
        }
    }

    /// Add every key of `other`, overriding ours.
    pub fn merge(&mut self, other: OptionTree) {
        self.0.extend(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Fail if any key is left: the driver `what` did not understand it.
    pub fn ensure_consumed(&self, what: &str) -> Result<()> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(invalid(format!("{what} does not support the option '{k}'"))),
        }
    }

    /// Back to `key=val,...` with commas escaped (for messages like "Formatting ...").
    pub fn to_kv_string(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={}", v.replace(',', ",,"))).collect::<Vec<_>>().join(",")
    }
}

pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// Split on single commas; `,,` is a literal comma.
fn split_commas(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("never empty").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

fn flatten(prefix: &str, obj: &serde_json::Map<String, serde_json::Value>, out: &mut BTreeMap<String, String>) -> Result<()> {
    for (k, v) in obj {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            serde_json::Value::Object(o) => flatten(&key, o, out)?,
            serde_json::Value::String(s) => {
                out.insert(key, s.clone());
            }
            serde_json::Value::Bool(b) => {
                out.insert(key, if *b { "on" } else { "off" }.to_string());
            }
            serde_json::Value::Number(n) => {
                out.insert(key, n.to_string());
            }
            serde_json::Value::Null => {}
            serde_json::Value::Array(_) => return Err(invalid(format!("json: option '{key}': arrays are not supported"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_with_escaped_commas_and_subtrees() {
        let mut t = OptionTree::parse("driver=raw,file.driver=file,file.filename=a,,b.img,file.aio=native", None).unwrap();
        assert_eq!(t.take("driver").as_deref(), Some("raw"));
        let mut f = t.take_subtree("file");
        assert!(t.is_empty());
        assert_eq!(f.get("filename"), Some("a,b.img"));
        assert_eq!(f.take("aio").as_deref(), Some("native"));
        assert!(f.ensure_consumed("file").is_err());
    }

    #[test]
    fn json_flattens_to_dotted_keys() {
        let t = OptionTree::from_json(r#"{"driver":"raw","offset":512,"file":{"driver":"file","filename":"x","locking":false}}"#).unwrap();
        assert_eq!(t.get("offset"), Some("512"));
        assert_eq!(t.get("file.filename"), Some("x"));
        assert_eq!(t.get("file.locking"), Some("off"));
        assert!(OptionTree::from_json("[1]").is_err());
        assert!(OptionTree::from_json("{").is_err());
    }

    #[test]
    fn implied_key_and_bad_items() {
        let t = OptionTree::parse("help", Some("help")).unwrap();
        assert_eq!(t.get("help"), Some("help"));
        assert!(OptionTree::parse("a=1,b", None).is_err());
        let mut t = OptionTree::parse("x=maybe", None).unwrap();
        assert!(t.take_bool("x").is_err());
    }
}
