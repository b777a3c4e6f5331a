//! Sizes as users write them (`1G`, `512M`, `1.5T`, plain bytes) and as qemu-img
//! prints them (`1 GiB`, `1.5 MiB`).

use crate::error::{invalid, Result};

/// Parse a size with an optional binary suffix (b, k/K, M, G, T, P, E; an
/// optional trailing "iB"/"B" is accepted). A fraction is allowed with a suffix.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let err = || invalid(format!("invalid size '{s}': expected a number with an optional k, M, G, T, P or E suffix"));
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(err());
    }
    let suffix = suffix.trim();
    let suffix = suffix.strip_suffix("iB").or_else(|| suffix.strip_suffix('B').filter(|s| !s.is_empty())).unwrap_or(suffix);
    let mult: u64 = match suffix {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(err()),
    };
    if num.contains('.') {
        if mult == 1 {
            return Err(err());
        }
        let v: f64 = num.parse().map_err(|_| err())?;
        let bytes = v * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(err());
        }
        return Ok(bytes as u64);
    }
    let v: u64 = num.parse().map_err(|_| err())?;
    v.checked_mul(mult).ok_or_else(err)
}

/// Human size as qemu-img prints it: "1 GiB", "1.5 MiB", "512 B", three
/// significant digits.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    // Three significant digits, trailing zeros dropped (1 GiB, 1.5 GiB, 100 MiB).
    let s = if v >= 100.0 {
        format!("{:.0}", v)
    } else if v >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    };
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    format!("{s} {}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn prints_like_qemu() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(2 << 20), "2 MiB");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(200 << 20), "200 MiB");
    }
}
