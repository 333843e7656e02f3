//! What a volume is made from: [`VolumeSpec`], [`BackendKind`], and their text forms
//! (`--volume NAME=PATH[,k=v...]`, sizes with K/M/G/T suffixes).
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

/// Parses `4096`, `64K`, `512M`, `1G`, `2T` (also `KiB`, `MiB`, … and lowercase);
/// binary units. Rejects zero-free garbage and overflow with a message.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K/M/G/T suffix")
    })?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return Err(format!("invalid size unit in {s:?}: use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

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
