//! `ringblk-nbd -L`: connect as a client, list every export and print its
//! details in qemu-nbd's layout.

use std::time::Duration;

use engine::error::{invalid, Error, Result};

use crate::client::{list, Addr, ExportInfo};
use crate::proto::ReplyMode;
use crate::tls::TlsClient;

const FLAG_NAMES: [&str; 12] = [
    "readonly",
    "flush",
    "fua",
    "rotational",
    "trim",
    "zeroes",
    "df",
    "multi",
    "resize",
    "cache",
    "fast-zero",
    "block-status-payload",
];

/// qemu-nbd's `-L` report for these exports.
pub fn format(exports: &[ExportInfo]) -> String {
    let mut s = format!("exports available: {}\n", exports.len());
    for e in exports {
        s += &format!(" export: '{}'\n", e.name);
        if let Some(d) = &e.description {
            s += &format!("  description: {d}\n");
        }
        s += &format!("  size:  {}\n", e.size);
        s += &format!("  flags: {:#x} (", e.flags);
        for (i, n) in FLAG_NAMES.iter().enumerate() {
            if e.flags & (1 << (i + 1)) != 0 {
                s += &format!(" {n}");
            }
        }
        s += " )\n";
        if e.min_block != 0 {
            s +=
                &format!("  min block: {}\n  opt block: {}\n  max block: {}\n", e.min_block, e.pref_block, e.max_block);
        }
        s += &format!("  transaction size: {}\n", if e.mode == ReplyMode::Extended { "64-bit" } else { "32-bit" });
        s += &format!("  available meta contexts: {}\n", e.contexts.len());
        for (_, c) in &e.contexts {
            s += &format!("   {c}\n");
        }
    }
    s
}

/// Connect to the server (unix socket, else host and port) and print its
/// exports; `tls` is the credentials object's id and the host name its
/// certificate must carry (default: the TCP host; none over a unix socket).
pub fn run(host: &str, port: u16, socket: Option<&str>, tls: (Option<&str>, Option<&str>)) -> Result<()> {
    let addr = match socket {
        Some(p) => Addr::Unix(p.to_string()),
        None => Addr::Tcp { host: if host == "0.0.0.0" { "localhost".into() } else { host.to_string() }, port },
    };
    let tls = match tls {
        (Some(id), name) => {
            let name = name.or(match &addr {
                Addr::Tcp { host, .. } => Some(host.as_str()),
                Addr::Unix(_) => None,
            });
            Some(TlsClient::from_object(id, name)?)
        }
        (None, Some(_)) => return Err(invalid("--tls-hostname is not permitted without --tls-creds")),
        (None, None) => None,
    };
    let exports =
        list(&addr, Some(Duration::from_secs(30)), tls.as_ref()).map_err(|e| Error::os("Failed to list exports", e))?;
    print!("{}", format(&exports));
    Ok(())
}
