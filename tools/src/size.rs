//! Byte sizes: parsing `10G`-style arguments and printing `1.0 GiB`-style values.
//!
//! Suffixes are binary (1K = 1024) because block devices and their users count in
//! powers of two. `KB`/`MB`/`GB`/`TB` are refused rather than guessed: half the world
//! reads them as powers of ten, and a volume 7% smaller than intended is a bad surprise.

const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Parses a size in bytes: plain digits, or digits and a binary suffix
/// `K`/`M`/`G`/`T` or `KiB`/`MiB`/`GiB`/`TiB` (case-insensitive, `B` for bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    let suffix = suffix.trim_start();
    if digits.is_empty() {
        return Err(format!(
            "'{text}' is not a size: expected bytes, optionally with a binary suffix \
             K, M, G or T (e.g. 4096, 512M, 10G)"
        ));
    }
    if suffix.starts_with(['.', ',']) {
        return Err(format!(
            "'{text}': fractional sizes are not supported; use a smaller unit (e.g. 1536M)"
        ));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            let unit = &suffix[..1];
            return Err(format!(
                "'{text}': suffix '{suffix}' is ambiguous; sizes are binary, write \
                 '{unit}' or '{unit}iB' (1{unit} = 1024^n bytes)",
                unit = unit.to_ascii_uppercase()
            ));
        }
        _ => {
            return Err(format!(
                "'{text}': unknown size suffix '{suffix}'; use K, M, G or T (binary)"
            ))
        }
    };
    let too_large = || format!("'{text}' is too large (maximum is 2^64-1 bytes)");
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    number.checked_mul(1u64 << shift).ok_or_else(too_large)
}

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
            ("1.5G", "fractional"),
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
