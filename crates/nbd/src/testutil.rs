//! Client-side byte builders shared by the unit tests and the seed corpus generator.

use super::proto::IHAVEOPT;

/// One option as a client sends it: `IHAVEOPT`, option, length, data.
pub(crate) fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Data of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub(crate) fn name_and_infos(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        v.extend_from_slice(&info.to_be_bytes());
    }
    v
}

/// Data of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub(crate) fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (export.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Client flags followed by options.
pub(crate) fn client(flags: u32, options: &[Vec<u8>]) -> Vec<u8> {
    let mut v = flags.to_be_bytes().to_vec();
    for o in options {
        v.extend_from_slice(o);
    }
    v
}
