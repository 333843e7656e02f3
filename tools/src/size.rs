//! Byte sizes: parsing `10G`-style arguments (the shared grammar of
//! `ringblk_target::spec::parse_size`) and printing `1.0 GiB`-style values.
//!
//! Suffixes are binary (1K = 1024) because block devices and their users count in
//! powers of two; `KB`/`MB`/`GB`/`TB` are refused rather than guessed.

const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// The project's one size grammar (`ringblk serve`, its TOML file and this CLI parse
/// sizes alike, and explain a bad one with the same message).
pub use ringblk_target::spec::parse_size;

/// `512 B`, `1.0 KiB`, `10.0 GiB`: one decimal, binary units.
pub fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Move up while the value would print as 1024.0 or more (rounding included).
    while unit + 1 < UNITS.len() && value >= 1023.95 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_bytes_and_binary_suffixes() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("512B", 512),
            ("1K", 1024),
            ("1k", 1024),
            ("1KiB", 1024),
            ("64M", 64 << 20),
            ("64mib", 64 << 20),
            ("10G", 10 << 30),
            ("10 GiB", 10 << 30),
            ("2T", 2 << 40),
            ("2TiB", 2 << 40),
            (" 7 ", 7),
            ("16777215T", 16_777_215 << 40),
            ("1.5G", 3 << 29),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for (text, reason) in [
            ("", "not a size"),
            ("G", "not a size"),
            ("-1", "not a size"),
            ("ten", "not a size"),
            ("10X", "unknown size suffix"),
            ("10GG", "unknown size suffix"),
            ("10G5", "unknown size suffix"),
            ("10gb", "ambiguous"),
            ("1.3K", "whole number of bytes"),
            ("10GB", "ambiguous"),
            ("10kb", "ambiguous"),
            ("16777216T", "too large"),
            ("99999999999999999999", "too large"),
        ] {
            let err = parse_size(text).err();
            assert!(
                err.as_deref().is_some_and(|e| e.contains(reason)),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn formats_human_sizes() {
        for (bytes, text) in [
            (0, "0 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (1 << 30, "1.0 GiB"),
            (10 << 30, "10.0 GiB"),
            ((1 << 20) - 1, "1.0 MiB"),
            (5 << 40, "5.0 TiB"),
            (u64::MAX, "16.0 EiB"),
        ] {
            assert_eq!(format_size(bytes), text, "{bytes}");
        }
    }
}
