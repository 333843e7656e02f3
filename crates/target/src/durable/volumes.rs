//! The server's volume list on disk (`volumes.json` in the data dir): its format
//! only. What the list means at start (the truth, reconciling it with flags, what
//! a delete removes) is `catalog`'s policy, a layer above; the offline `check`
//! reads the list through this module.
//!
//! Layer: `durable` (rank 1); imports `spec` and `durable::store` only.
//!
//! # Format
//! One line of JSON `{"format":1,"volumes":[SPEC...]}`, then `crc32c=XXXXXXXX`
//! over the JSON. A format this code does not know is refused, never misread.
//!
//! # Durability
//! Written by `catalog::save` through `store::replace_atomically` (temp file, fsync,
//! rename, fsync of the dir), like the manifests: a reader sees the old list or the
//! new one, whole.

use serde::{Deserialize, Serialize};

use crate::spec::VolumeSpec;

/// The list's name in the data dir.
pub(crate) const FILE_NAME: &str = "volumes.json";
/// The one format this code reads and writes.
pub(crate) const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
/// Every volume the server had when the list last changed (`catalog`: # Truth).
pub(crate) struct VolumeList {
    pub format: u32,
    pub volumes: Vec<VolumeSpec>,
}

impl VolumeList {
    pub(crate) fn new(volumes: Vec<VolumeSpec>) -> VolumeList {
        VolumeList {
            format: FORMAT,
            volumes,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_string(self).unwrap_or_else(|_| unreachable!("plain data"));
        format!("{json}\ncrc32c={:08x}\n", crc32c::crc32c(json.as_bytes())).into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<VolumeList, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let mut lines = text.lines();
        let json = lines.next().ok_or("empty")?;
        let crc = lines
            .next()
            .and_then(|l| l.strip_prefix("crc32c="))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or("no crc32c line")?;
        if crc32c::crc32c(json.as_bytes()) != crc {
            return Err("checksum mismatch".into());
        }
        let format = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_u64()));
        if format != Some(FORMAT as u64) {
            return Err(format!(
                "unsupported format {format:?} (this ringblk reads format {FORMAT}; a newer release wrote it)"
            ));
        }
        serde_json::from_str(json).map_err(|e| format!("does not parse: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, path: &str, size: Option<u64>) -> VolumeSpec {
        crate::spec::parse_volume(&format!("{name}={path}"))
            .map(|mut s| {
                s.size_bytes = size;
                s
            })
            .expect("spec")
    }

    #[test]
    fn round_trip_checksum_and_unknown_format() {
        let l = VolumeList::new(vec![spec("a", "/x/a.img", Some(1 << 20))]);
        let b = l.encode();
        assert_eq!(VolumeList::decode(&b), Ok(l));
        let mut bad = b.clone();
        bad[12] ^= 1;
        assert!(VolumeList::decode(&bad).is_err());
        let json = r#"{"format":2,"volumes":[]}"#;
        let v2 = format!("{json}\ncrc32c={:08x}\n", crc32c::crc32c(json.as_bytes()));
        let e = VolumeList::decode(v2.as_bytes()).expect_err("format 2");
        assert!(e.contains("format"), "{e}");
    }
}
