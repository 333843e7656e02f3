//! What a volume is made from: [`VolumeSpec`], [`BackendKind`], and their text forms
//! (`--volume NAME=PATH[,k=v...]`, sizes with K/M/G/T suffixes), and the default RPC
//! socket path: the text grammar `ringblk serve` and `ringblk-ctl` share.
//!
//! Plain data with no I/O, so every layer may name it (rank 0). Checking a spec against
//! the rules of a volume (`VolumeSpec::validate`) lives in `volume`, which owns
//! `VolumeError`.

use std::path::PathBuf;

use serde::Serialize;

/// What kind of backend a volume has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    File,
    Mem,
    Null,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "file" => Ok(BackendKind::File),
            "mem" => Ok(BackendKind::Mem),
            "null" => Ok(BackendKind::Null),
            other => Err(format!(
                "unknown backend {other:?} (expected file, mem or null)"
            )),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::File => "file",
            BackendKind::Mem => "mem",
            BackendKind::Null => "null",
        })
    }
}

/// What a volume is made from (CLI `--volume`, config file, or RPC `volume_create`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct VolumeSpec {
    pub name: String,
    /// Backing file or device; ignored for mem and null.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    #[serde(default)]
    pub read_only: bool,
    /// Open the file O_DIRECT (default); off uses the page cache.
    #[serde(default = "default_true")]
    pub direct: bool,
    /// Redirect-on-write granularity of backups' deltas: a power of two from 4 KiB
    /// to 1 MiB, at least the block size. 4 KiB (default): an aligned 4 KiB write
    /// never copies.
    #[serde(default = "default_chunk")]
    pub chunk_size: u32,
    /// Let `size_bytes` grow an existing, smaller, non-empty file. Off, such a size is
    /// refused: a typo in a size must never change a user's image.
    #[serde(default)]
    pub grow: bool,
}

impl VolumeSpec {
    /// A file volume `name` on `path` with every other setting at its default (the
    /// same values serde fills in for a TOML or RPC spec that omits them).
    pub fn file(name: &str, path: Option<PathBuf>) -> VolumeSpec {
        VolumeSpec {
            name: name.to_string(),
            path,
            size_bytes: None,
            block_size: default_block_size(),
            backend: default_backend(),
            read_only: false,
            direct: default_true(),
            chunk_size: default_chunk(),
            grow: false,
        }
    }
}

fn default_chunk() -> u32 {
    4096
}

fn default_block_size() -> u32 {
    512
}
fn default_backend() -> BackendKind {
    BackendKind::File
}
fn default_true() -> bool {
    true
}

/// What every size in ringblk may be written as, for `--help` texts: one grammar for
/// `serve` flags and `--volume` specs, the TOML file and `ringblk-ctl`.
pub const SIZE_HELP: &str = "bytes, or a number with a binary suffix K, M, G, T (or KiB, \
MiB, GiB, TiB; 1K = 1024), e.g. 4096, 512M, 10G, 1.5G";

/// Parses a size: plain bytes (`4096`), or a number with a binary suffix `K`/`M`/`G`/`T`
/// or `KiB`/`MiB`/`GiB`/`TiB` (case-insensitive; `B` for bytes). A fraction is allowed
/// when the result is a whole number of bytes (`1.5G` = 1610612736, `0.5K` = 512).
/// `KB`/`MB`/`GB`/`TB` are refused with the same message everywhere: half the world
/// reads them as powers of ten, and a volume 7% smaller than meant is a bad surprise.
/// The one size parser of the project (`serve`, TOML, `ringblk-ctl`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let num_end = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(num_end);
    let suffix = suffix.trim_start();
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') || num.ends_with('.') {
        return Err(format!("'{t}' is not a size: expected {SIZE_HELP}"));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            let unit = suffix[..1].to_ascii_uppercase();
            return Err(format!(
                "'{t}': suffix '{suffix}' is ambiguous (decimal or binary?); sizes are \
                 binary: write '{unit}' or '{unit}iB' (1{unit} = 1024^n bytes)"
            ));
        }
        _ => {
            return Err(format!(
                "'{t}': unknown size suffix '{suffix}'; expected {SIZE_HELP}"
            ))
        }
    };
    let too_large = || format!("'{t}' is too large (at most 2^64-1 bytes)");
    if frac.len() > 18 {
        return Err(format!("'{t}': too many decimal places"));
    }
    let scale = 10u128.pow(frac.len() as u32);
    let digits = format!("{int}{frac}");
    let mantissa: u128 = digits.parse().map_err(|_| too_large())?;
    let scaled = mantissa.checked_mul(1u128 << shift).ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!(
            "'{t}' is not a whole number of bytes; use a smaller unit (e.g. 1536M)"
        ));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

/// A size as the TOML file may write it: a string in the [`parse_size`] grammar
/// (`size = "10G"`) or plain bytes as an integer (`size = 67108864`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s),
        }
    }
}

/// Where `ringblk serve` puts its JSON-RPC socket and `ringblk-ctl` looks for it,
/// unless `--rpc`, `RINGBLK_RPC` or the TOML file say otherwise: absolute, so that
/// `ringblk-ctl` works from any directory. `/run/ringblk/ringblk.sock` for root
/// (`euid` 0), `$XDG_RUNTIME_DIR/ringblk/ringblk.sock` for anyone else; an error
/// that says what to do when neither applies.
pub fn default_rpc_socket(
    euid: u32,
    xdg_runtime_dir: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, String> {
    if euid == 0 {
        return Ok(PathBuf::from(DEFAULT_RPC_SOCKET_ROOT));
    }
    match xdg_runtime_dir.map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => Ok(dir.join("ringblk").join("ringblk.sock")),
        _ => Err(
            "no default RPC socket: not root and $XDG_RUNTIME_DIR is not set (or not \
             absolute); give --rpc PATH or set RINGBLK_RPC"
                .to_string(),
        ),
    }
}

/// The root default of [`default_rpc_socket`].
pub const DEFAULT_RPC_SOCKET_ROOT: &str = "/run/ringblk/ringblk.sock";

/// Parses `--volume NAME=PATH[,size=SIZE][,block-size=512|4096][,backend=file|mem|null][,read-only][,direct=on|off][,grow=true]`.
/// For mem and null the PATH part may be empty: `--volume ram=,backend=mem,size=1G`.
pub fn parse_volume(s: &str) -> Result<VolumeSpec, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid --volume {s:?}: expected NAME=PATH[,key=value...]"))?;
    let mut parts = rest.split(',');
    let path = parts.next().unwrap_or("");
    let mut spec = VolumeSpec::file(name, (!path.is_empty()).then(|| PathBuf::from(path)));
    for kv in parts {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "size" => spec.size_bytes = Some(parse_size(v)?),
            "block-size" | "block_size" => {
                spec.block_size = v.parse().map_err(|_| format!("invalid block-size {v:?}"))?
            }
            "backend" => spec.backend = v.parse()?,
            "read-only" | "ro" => spec.read_only = true,
            "chunk-size" | "chunk_size" => spec.chunk_size = parse_size(v)?.try_into().map_err(|_| format!("chunk-size {v:?} too large"))?,
            "direct" => {
                spec.direct = match v {
                    "on" | "true" | "1" | "" => true,
                    "off" | "false" | "0" => false,
                    _ => return Err(format!("invalid direct={v:?}: use on or off")),
                }
            }
            "grow" => {
                spec.grow = match v {
                    "true" | "on" | "1" | "" => true,
                    "false" | "off" | "0" => false,
                    _ => return Err(format!("invalid grow={v:?}: use true or false")),
                }
            }
            other => {
                return Err(format!(
                    "unknown volume option {other:?} (size, block-size, chunk-size, backend, read-only, direct, grow)"
                ))
            }
        }
    }
    Ok(spec)
}

impl std::str::FromStr for VolumeSpec {
    type Err = String;
    /// [`parse_volume`]: `NAME=PATH[,key=value...]`.
    fn from_str(s: &str) -> Result<VolumeSpec, String> {
        parse_volume(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_to_exact_bytes() {
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
            ("10GiB", 10 << 30),
            ("10 GiB", 10 << 30),
            ("1.5G", 3 << 29),
            ("0.5K", 512),
            ("2T", 2 << 40),
            (" 7 ", 7),
            ("16777215T", 16_777_215 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn bad_sizes_are_explained() {
        for (text, reason) in [
            ("", "not a size"),
            ("G", "not a size"),
            ("-1", "not a size"),
            ("ten", "not a size"),
            ("1.", "not a size"),
            ("1.2.3G", "not a size"),
            ("10X", "unknown size suffix"),
            ("10GG", "unknown size suffix"),
            ("1.3K", "whole number of bytes"),
            ("1.5", "whole number of bytes"),
            ("10GB", "ambiguous"),
            ("10gb", "ambiguous"),
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
    fn toml_sizes_are_strings_or_integers() {
        #[derive(serde::Deserialize)]
        struct T {
            size: SizeValue,
        }
        let n: T = serde_json::from_str(r#"{"size": 67108864}"#).expect("int");
        assert_eq!(n.size.bytes(), Ok(64 << 20));
        let s: T = serde_json::from_str(r#"{"size": "1.5G"}"#).expect("text");
        assert_eq!(s.size.bytes(), Ok(3 << 29));
    }

    #[test]
    fn default_rpc_socket_is_absolute() {
        use std::ffi::OsStr;
        assert_eq!(
            default_rpc_socket(0, Some(OsStr::new("/run/user/1000"))),
            Ok(PathBuf::from("/run/ringblk/ringblk.sock"))
        );
        assert_eq!(
            default_rpc_socket(1000, Some(OsStr::new("/run/user/1000"))),
            Ok(PathBuf::from("/run/user/1000/ringblk/ringblk.sock"))
        );
        for xdg in [None, Some(OsStr::new("relative"))] {
            let err = default_rpc_socket(1000, xdg).expect_err("no default");
            assert!(
                err.contains("--rpc") && err.contains("XDG_RUNTIME_DIR"),
                "{err}"
            );
        }
    }
}
