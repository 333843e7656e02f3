//! The in-flight slab: every operation the kernel may be working on, and the one
//! place that encodes and decodes io_uring `user_data`.
//!
//! # Ownership
//! A slot owns its [`Op`] (and so every buffer of it) from submission until the
//! op's final CQE is reaped. Cancelling or orphaning an op only drops its callback;
//! the memory stays here until the kernel says it is done.
//!
//! # Encoding
//! `user_data = generation << 32 | index`, generation in 31 bits, so values with the
//! top bit set never name a slot; those are reserved sentinels (doorbell, internal).
//! The generation makes a stale id (a slot reused after completion) harmless.

use crate::op::{Completion, Op};
use crate::reactor::Reactor;

/// Callback run on the reactor thread when an op completes.
pub type Callback = Box<dyn FnOnce(&mut Reactor, Completion)>;

/// Identifies one submitted operation (for cancel/orphan).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId {
    index: u32,
    generation: u32,
}

const GENERATION_MASK: u32 = 0x7fff_ffff;
/// CQE of the doorbell eventfd read.
pub(crate) const USER_DATA_DOORBELL: u64 = u64::MAX;
/// CQEs whose result nobody needs (async cancels issued for orphans).
pub(crate) const USER_DATA_INTERNAL: u64 = u64::MAX - 1;

// The sentinels must not collide with any slot encoding (top bit clear).
const _: () = assert!(USER_DATA_DOORBELL >> 63 == 1 && USER_DATA_INTERNAL >> 63 == 1);
const _: () = assert!(((GENERATION_MASK as u64) << 32 | u32::MAX as u64) >> 63 == 0);

/// What a CQE's user_data names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Tag {
    Op(OpId),
    Doorbell,
    Internal,
}

impl OpId {
    pub(crate) fn user_data(self) -> u64 {
        (self.generation as u64) << 32 | self.index as u64
    }

    /// The one decoder of `user_data`.
    pub(crate) fn decode(user_data: u64) -> Tag {
        match user_data {
            USER_DATA_DOORBELL => Tag::Doorbell,
            USER_DATA_INTERNAL => Tag::Internal,
            v if v >> 63 == 0 => Tag::Op(OpId {
                index: v as u32,
                generation: (v >> 32) as u32,
            }),
            // No other value is ever submitted; treat it as internal noise.
            _ => Tag::Internal,
        }
    }
}

pub(crate) struct InFlight {
    pub op: Op,
    /// `None` once orphaned: the result is discarded at the final CQE.
    pub cb: Option<Callback>,
}

struct Slot {
    generation: u32,
    entry: Option<InFlight>,
}

/// Fixed-capacity slab; full means back-pressure for the submitter.
pub(crate) struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl Slab {
    pub fn with_capacity(cap: usize) -> Self {
        let cap = cap.clamp(1, u32::MAX as usize);
        Slab {
            slots: (0..cap)
                .map(|_| Slot {
                    generation: 0,
                    entry: None,
                })
                .collect(),
            free: (0..cap as u32).rev().collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    pub fn insert(&mut self, op: Op, cb: Option<Callback>) -> Result<OpId, (Op, Option<Callback>)> {
        let Some(index) = self.free.pop() else {
            return Err((op, cb));
        };
        let slot = &mut self.slots[index as usize];
        debug_assert!(slot.entry.is_none());
        slot.entry = Some(InFlight { op, cb });
        Ok(OpId {
            index,
            generation: slot.generation,
        })
    }

    pub fn get_mut(&mut self, id: OpId) -> Option<&mut InFlight> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.entry.as_mut()
    }

    /// Removes the op at its final CQE.
    pub fn remove(&mut self, id: OpId) -> Option<InFlight> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let e = slot.entry.take()?;
        slot.generation = (slot.generation + 1) & GENERATION_MASK;
        self.free.push(id.index);
        Some(e)
    }

    /// User data of every op still in flight (for shutdown cancellation).
    pub fn in_flight_ids(&self) -> Vec<u64> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.entry.is_some())
            .map(|(i, s)| {
                OpId {
                    index: i as u32,
                    generation: s.generation,
                }
                .user_data()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_and_sentinels_are_distinct() {
        let mut slab = Slab::with_capacity(3);
        let a = slab.insert(Op::Nop, None).ok().unwrap();
        assert_eq!(OpId::decode(a.user_data()), Tag::Op(a));
        assert_eq!(OpId::decode(USER_DATA_DOORBELL), Tag::Doorbell);
        assert_eq!(OpId::decode(USER_DATA_INTERNAL), Tag::Internal);
    }

    #[test]
    fn stale_ids_do_not_reach_a_reused_slot() {
        let mut slab = Slab::with_capacity(1);
        let a = slab.insert(Op::Nop, None).ok().unwrap();
        assert!(slab.insert(Op::Nop, None).is_err(), "full slab pushes back");
        assert!(slab.remove(a).is_some());
        let b = slab.insert(Op::Nop, None).ok().unwrap();
        assert_ne!(a, b);
        assert!(slab.get_mut(a).is_none());
        assert!(slab.remove(a).is_none());
        assert_eq!(slab.len(), 1);
    }
}
