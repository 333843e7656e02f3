//! The data path (#12 step 3): `layered` is today's `io.rs`, moved as it is.

pub(crate) mod layered;
