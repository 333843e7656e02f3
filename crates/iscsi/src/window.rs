//! The CmdSN window (RFC 7143 §3.2.2.1, §4.2.2.1): the target's back-pressure. Every
//! response carries ExpCmdSN (the next CmdSN expected) and MaxCmdSN (the last one the
//! initiator may send); a command outside the window is dropped silently. Here the
//! window is the number of free command slots: a slow volume keeps slots busy and so
//! narrows the window, down to closed (MaxCmdSN = ExpCmdSN - 1), and nothing queues
//! without bound.
//!
//! # Ordering
//! One connection per session (MaxConnections=1) and TCP's order mean non-immediate
//! commands arrive in CmdSN order; one that does not carry ExpCmdSN is a protocol error
//! or a duplicate and is dropped. Immediate commands (I bit) carry the current CmdSN,
//! do not advance it and take no slot of the window (RFC 7143 §3.2.2.1); the session
//! bounds them separately.

/// `a < b` in 32-bit serial number arithmetic (RFC 1982), as RFC 7143 compares every
/// sequence number. Distances of exactly 2^31 are undefined there; they compare false.
pub fn sn_lt(a: u32, b: u32) -> bool {
    let d = b.wrapping_sub(a);
    d != 0 && d < 1 << 31
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// What to do with a command's CmdSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Run it (a slot is taken for a non-immediate command; give it back with
    /// [`CmdWindow::complete`]).
    Run,
    /// Outside the window, or not the expected CmdSN: drop silently (RFC 7143 §3.2.2.1).
    Drop,
}

/// ExpCmdSN/MaxCmdSN of one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdWindow {
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    slots: u32,
    in_flight: u32,
}

impl CmdWindow {
    /// A window of `slots` commands (at least 1) starting at the login's CmdSN.
    pub fn new(exp_cmd_sn: u32, slots: u32) -> CmdWindow {
        let slots = slots.max(1);
        CmdWindow {
            exp_cmd_sn,
            max_cmd_sn: exp_cmd_sn.wrapping_add(slots - 1),
            slots,
            in_flight: 0,
        }
    }

    /// ExpCmdSN for the next response.
    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    /// MaxCmdSN for the next response.
    pub fn max_cmd_sn(&self) -> u32 {
        self.max_cmd_sn
    }

    /// Commands admitted and not completed.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Admits a command with `cmd_sn`.
    pub fn admit(&mut self, cmd_sn: u32, immediate: bool) -> Admit {
        if immediate {
            // Immediate commands carry ExpCmdSN and need no room in the window.
            return if cmd_sn == self.exp_cmd_sn {
                Admit::Run
            } else {
                Admit::Drop
            };
        }
        if cmd_sn != self.exp_cmd_sn || !sn_le(cmd_sn, self.max_cmd_sn) {
            return Admit::Drop;
        }
        // Inside the window means a slot is free: the window is never wider than the
        // free slots (see `complete`).
        debug_assert!(self.in_flight < self.slots);
        self.in_flight += 1;
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        Admit::Run
    }

    /// A non-immediate command finished: its slot is free, and the window opens by one.
    /// MaxCmdSN never moves backwards (RFC 7143 §4.2.2.1), so it is recomputed only
    /// upward.
    pub fn complete(&mut self) {
        debug_assert!(self.in_flight > 0, "complete without admit");
        self.in_flight = self.in_flight.saturating_sub(1);
        let free = self.slots - self.in_flight;
        let max = self.exp_cmd_sn.wrapping_add(free).wrapping_sub(1);
        if sn_lt(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn serial_arithmetic() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(u32::MAX, 0), "wraps");
        assert!(!sn_lt(2, 1));
        assert!(!sn_lt(5, 5));
        assert!(!sn_lt(0, 1 << 31), "undefined distance");
        assert!(sn_le(7, 7));
    }

    /// A slow volume closes the window: with every slot busy the initiator may send
    /// nothing more; each completion opens it by one. Negative control: admitting past
    /// MaxCmdSN (dropping the `sn_le` check) fails the Drop assertion (tried).
    #[test]
    fn busy_slots_close_the_window() {
        let mut w = CmdWindow::new(u32::MAX - 1, 3);
        assert_eq!(w.max_cmd_sn(), 0, "wraps");
        for sn in [u32::MAX - 1, u32::MAX, 0] {
            assert_eq!(w.admit(sn, false), Admit::Run);
        }
        // Closed: MaxCmdSN = ExpCmdSN - 1.
        assert_eq!(w.max_cmd_sn().wrapping_add(1), w.exp_cmd_sn());
        assert_eq!(w.admit(1, false), Admit::Drop);
        // Immediate commands still get through.
        assert_eq!(w.admit(1, true), Admit::Run);
        w.complete();
        assert_eq!(w.max_cmd_sn(), 1);
        assert_eq!(w.admit(1, false), Admit::Run);
        // A duplicate or a gap is dropped.
        assert_eq!(w.admit(1, false), Admit::Drop);
        assert_eq!(w.admit(5, false), Admit::Drop);
    }

    proptest! {
        /// Against a model: in flight never exceeds the slots, MaxCmdSN never moves
        /// back, and a command is admitted exactly when it is ExpCmdSN and a slot is free.
        #[test]
        fn window_model(start: u32, slots in 1u32..8, ops in prop::collection::vec(any::<(bool, bool)>(), 0..200)) {
            let mut w = CmdWindow::new(start, slots);
            let mut next = start;
            let mut busy = 0u32;
            for (complete, imm) in ops {
                let before = w.max_cmd_sn();
                if complete && busy > 0 {
                    w.complete();
                    busy -= 1;
                } else {
                    let expect = if imm || busy < slots { Admit::Run } else { Admit::Drop };
                    prop_assert_eq!(w.admit(next, imm), expect);
                    if expect == Admit::Run && !imm {
                        busy += 1;
                        next = next.wrapping_add(1);
                    }
                }
                prop_assert!(sn_le(before, w.max_cmd_sn()));
                prop_assert_eq!(w.in_flight(), busy);
                prop_assert_eq!(w.exp_cmd_sn(), next);
            }
        }
    }
}
