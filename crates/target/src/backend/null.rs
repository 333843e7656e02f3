//! The null backend: no storage at all. Reads return zeros and writes vanish, so a
//! benchmark against it measures the NBD front end and the reactor alone (compare
//! with `nbdkit null`).

use super::{Backend, BackendKind};

/// A null backend (its size is the volume's).
pub(crate) fn open() -> Backend {
    Backend {
        kind: BackendKind::Null,
        file: None,
        lock: None,
        direct: false,
        can_punch: true,
    }
}
