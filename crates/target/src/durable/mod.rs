//! Durability (ARCHITECTURE.md §6): journaled lookup tables, the volume manifest,
//! group commit, crash recovery and the offline check.
//!
//! A volume behaves like a disk with a volatile write cache. A write is durable
//! once a FLUSH (or its own FUA) that started after it completed; until then a
//! crash may lose it. What makes the live image durable:
//! - the base image and delta data files: fdatasync (data first);
//! - each delta's lookup table: its append-only journal ([`journal`]), written by a
//!   group commit ([`commit`]) after the data files were synced;
//! - the image stack: the manifest ([`manifest`]), replaced atomically.
//!
//! Everything here goes through [`store::Store`], so the same code runs on real
//! files and on the simulated disk of the power-cut tests (`sim`).

pub(crate) mod check;
pub(crate) mod commit;
pub(crate) mod journal;
pub(crate) mod manifest;
pub(crate) mod recover;
#[cfg(test)]
pub(crate) mod sim;
#[cfg(test)]
mod sim_tests;
pub(crate) mod store;
pub(crate) mod volumes;
