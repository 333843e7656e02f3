//! Persistent reservations (SPC-5 §5.14) and SPC-2 RESERVE/RELEASE, as a pure state
//! machine over registrants: no I/O, no clock. The session gives each command the
//! I_T nexus it came from and acts on the outcome; persisting the state when APTPL is
//! set is the caller's job ([`Reservations::aptpl`], [`Reservations::snapshot`]).
//!
//! # Bounds
//! At most [`REGISTRANTS_MAX`] registrations; REGISTER beyond that is refused with
//! INSUFFICIENT REGISTRATION RESOURCES rather than growing.
//!
//! # Not done
//! READ FULL STATUS, REGISTER AND MOVE, SPEC_I_PT and ALL_TG_PT (refused as invalid
//! fields; REPORT CAPABILITIES says so); PREEMPT AND ABORT's abort is reported in
//! [`PrOutcome::abort_keys`] for the session to carry out.

use super::sense::{key, Sense};

/// Most registrations kept.
pub const REGISTRANTS_MAX: usize = 64;

/// PR OUT service actions.
pub mod action {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE: u8 = 0x06;
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
}

/// Reservation types.
pub mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;
}

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}

fn all_registrants(t: u8) -> bool {
    matches!(t, 7 | 8)
}

/// An I_T nexus: the initiator port (iSCSI: `InitiatorName,i,0xISID`) and the target
/// port. Opaque to this module; compared for equality only.
pub type Nexus = String;

/// Why a PR command failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrError {
    /// RESERVATION CONFLICT status, no sense.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// What the session must do after a successful PR OUT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrOutcome {
    /// PREEMPT AND ABORT: abort the tasks of the nexuses that held these keys.
    pub abort_keys: Vec<u64>,
    /// The state changed and APTPL is set: persist [`Reservations::snapshot`].
    pub persist: bool,
}

/// A reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub holder: Nexus,
    pub pr_type: u8,
}

/// The reservation state of one logical unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reservations {
    /// Registered nexuses and their keys, in registration order (READ KEYS lists them so).
    registrants: Vec<(Nexus, u64)>,
    reservation: Option<Reservation>,
    /// PRgeneration: bumped by every REGISTER, CLEAR, PREEMPT that changes registrations.
    generation: u32,
    aptpl: bool,
    /// SPC-2 RESERVE(6/10) holder.
    legacy: Option<Nexus>,
}

/// The PR OUT parameter list's fields (SPC-5 §6.17.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OutParams {
    key: u64,
    sa_key: u64,
    aptpl: bool,
}

fn parse_out(params: &[u8]) -> Result<OutParams, PrError> {
    if params.len() != 24 {
        return Err(PrError::Check(Sense::PARAMETER_LIST_LENGTH));
    }
    let k = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&params[at..at + 8]);
        u64::from_be_bytes(b)
    };
    // SPEC_I_PT (0x08) and ALL_TG_PT (0x04) are not supported.
    if params[20] & 0x0c != 0 {
        return Err(PrError::Check(Sense::INVALID_FIELD_IN_PARAMETERS));
    }
    Ok(OutParams {
        key: k(0),
        sa_key: k(8),
        aptpl: params[20] & 0x01 != 0,
    })
}

impl Reservations {
    pub fn new() -> Reservations {
        Reservations::default()
    }

    /// Whether the state asks to persist through power loss (APTPL).
    pub fn aptpl(&self) -> bool {
        self.aptpl
    }

    /// PRgeneration.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// A copy for persistence (the caller serializes it).
    pub fn snapshot(&self) -> Reservations {
        self.clone()
    }

    fn key_of(&self, nexus: &str) -> Option<u64> {
        self.registrants
            .iter()
            .find(|(n, _)| n == nexus)
            .map(|(_, k)| *k)
    }

    fn holds(&self, nexus: &str) -> bool {
        match &self.reservation {
            Some(r) if all_registrants(r.pr_type) => self.key_of(nexus).is_some(),
            Some(r) => r.holder == nexus,
            None => false,
        }
    }

    /// The nexus holding an SPC-2 RESERVE(6/10) reservation, if any: under it every
    /// command of another nexus but INQUIRY, REPORT LUNS, REQUEST SENSE, RELEASE and
    /// the PR commands conflicts (SPC-2 §5.5.1), not only medium access.
    pub fn legacy_holder(&self) -> Option<&str> {
        self.legacy.as_deref()
    }

    /// Whether `nexus` may run a command that reads (`writes` false) or modifies the
    /// medium, under the current reservations (SPC-5 table 69 for the block commands):
    /// `Err(Conflict)` when not.
    pub fn check_access(&self, nexus: &str, writes: bool) -> Result<(), PrError> {
        if let Some(holder) = &self.legacy {
            return if holder == nexus {
                Ok(())
            } else {
                Err(PrError::Conflict)
            };
        }
        let Some(r) = &self.reservation else {
            return Ok(());
        };
        if self.holds(nexus) {
            return Ok(());
        }
        let registered = self.key_of(nexus).is_some();
        let allowed = match r.pr_type {
            pr_type::WRITE_EXCLUSIVE => !writes,
            pr_type::EXCLUSIVE_ACCESS => false,
            pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY => !writes || registered,
            pr_type::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY => registered,
            // All-registrants types: every registrant holds it (handled above); others
            // may read under write exclusive only.
            pr_type::WRITE_EXCLUSIVE_ALL_REGISTRANTS => !writes,
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(PrError::Conflict)
        }
    }

    /// SPC-2 RESERVE(6/10): refused while persistent reservations or registrations exist
    /// (SPC-5 §5.14.3) or another nexus holds it.
    pub fn reserve_legacy(&mut self, nexus: &str) -> Result<(), PrError> {
        if self.reservation.is_some() || !self.registrants.is_empty() {
            return Err(PrError::Conflict);
        }
        match &self.legacy {
            Some(h) if h != nexus => Err(PrError::Conflict),
            _ => {
                self.legacy = Some(nexus.into());
                Ok(())
            }
        }
    }

    /// SPC-2 RELEASE(6/10): releases our own; another nexus's is left alone (GOOD).
    pub fn release_legacy(&mut self, nexus: &str) -> Result<(), PrError> {
        if self.legacy.as_deref() == Some(nexus) {
            self.legacy = None;
        }
        Ok(())
    }

    /// A reset (LUN RESET, TARGET WARM RESET) drops SPC-2 reservations but not
    /// persistent ones.
    pub fn reset(&mut self) {
        self.legacy = None;
    }

    /// PERSISTENT RESERVE IN data, or INVALID FIELD IN CDB for an action we lack.
    pub fn reserve_in(&self, service_action: u8) -> Result<Vec<u8>, PrError> {
        let mut d = self.generation.to_be_bytes().to_vec();
        match service_action {
            action::READ_KEYS => {
                let len = (self.registrants.len() * 8) as u32;
                d.extend_from_slice(&len.to_be_bytes());
                for (_, k) in &self.registrants {
                    d.extend_from_slice(&k.to_be_bytes());
                }
            }
            action::READ_RESERVATION => match &self.reservation {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    // All-registrants reservations report key 0 (SPC-5 §6.16.3.3).
                    let k = if all_registrants(r.pr_type) {
                        0
                    } else {
                        self.key_of(&r.holder).unwrap_or(0)
                    };
                    d.extend_from_slice(&k.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, r.pr_type & 0x0f, 0, 0]);
                }
            },
            action::REPORT_CAPABILITIES => {
                // LENGTH 8; PTPL_C (persist through power loss capable); TMV with the
                // types we support; PTPL_A when set.
                d = vec![0, 8, 0x01, 0x80 | u8::from(self.aptpl), 0, 0, 0, 0];
                // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
                d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
                d[5] = 0x01;
            }
            _ => return Err(PrError::Check(Sense::INVALID_FIELD_IN_CDB)),
        }
        Ok(d)
    }

    /// PERSISTENT RESERVE OUT from `nexus` with its CDB fields and parameter list.
    pub fn reserve_out(
        &mut self,
        nexus: &str,
        service_action: u8,
        scope: u8,
        pr_type: u8,
        params: &[u8],
    ) -> Result<PrOutcome, PrError> {
        let p = parse_out(params)?;
        let before = self.clone();
        let mut outcome = PrOutcome::default();
        match service_action {
            action::REGISTER => self.register(nexus, p, false)?,
            action::REGISTER_AND_IGNORE => self.register(nexus, p, true)?,
            action::RESERVE | action::RELEASE | action::PREEMPT | action::PREEMPT_AND_ABORT => {
                // These act on a reservation: LU scope and a valid type are required.
                if scope != 0 || !valid_type(pr_type) {
                    return Err(PrError::Check(Sense::INVALID_FIELD_IN_CDB));
                }
                self.require_key(nexus, p.key)?;
                match service_action {
                    action::RESERVE => self.reserve(nexus, pr_type)?,
                    action::RELEASE => self.release(nexus, pr_type)?,
                    _ => {
                        let aborted = self.preempt(nexus, p.sa_key, pr_type)?;
                        if service_action == action::PREEMPT_AND_ABORT {
                            outcome.abort_keys = aborted;
                        }
                    }
                }
            }
            action::CLEAR => {
                self.require_key(nexus, p.key)?;
                self.registrants.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
            }
            _ => return Err(PrError::Check(Sense::INVALID_FIELD_IN_CDB)),
        }
        outcome.persist = self.aptpl && *self != before;
        Ok(outcome)
    }

    /// The nexus must be registered with `key` (RESERVATION CONFLICT otherwise).
    fn require_key(&self, nexus: &str, key: u64) -> Result<(), PrError> {
        match self.key_of(nexus) {
            Some(k) if k == key => Ok(()),
            _ => Err(PrError::Conflict),
        }
    }

    fn register(&mut self, nexus: &str, p: OutParams, ignore: bool) -> Result<(), PrError> {
        match self.key_of(nexus) {
            None => {
                if !ignore && p.key != 0 {
                    return Err(PrError::Conflict);
                }
                if p.sa_key == 0 {
                    return Ok(());
                }
                if self.registrants.len() >= REGISTRANTS_MAX {
                    // INSUFFICIENT REGISTRATION RESOURCES.
                    return Err(PrError::Check(Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x04)));
                }
                self.registrants.push((nexus.into(), p.sa_key));
            }
            Some(k) => {
                if !ignore && p.key != k {
                    return Err(PrError::Conflict);
                }
                if p.sa_key == 0 {
                    self.unregister(nexus);
                } else if let Some(e) = self.registrants.iter_mut().find(|(n, _)| n == nexus) {
                    e.1 = p.sa_key;
                }
            }
        }
        self.aptpl = p.aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// Removes a registration and, with it, a reservation it alone held.
    fn unregister(&mut self, nexus: &str) {
        self.registrants.retain(|(n, _)| n != nexus);
        let drop_it = match &self.reservation {
            Some(r) if all_registrants(r.pr_type) => self.registrants.is_empty(),
            Some(r) => r.holder == nexus,
            None => false,
        };
        if drop_it {
            self.reservation = None;
        }
    }

    fn reserve(&mut self, nexus: &str, t: u8) -> Result<(), PrError> {
        match &self.reservation {
            None => {
                self.reservation = Some(Reservation {
                    holder: nexus.into(),
                    pr_type: t,
                });
                Ok(())
            }
            Some(r) if self.holds(nexus) && r.pr_type == t => Ok(()),
            Some(_) => Err(PrError::Conflict),
        }
    }

    fn release(&mut self, nexus: &str, t: u8) -> Result<(), PrError> {
        match &self.reservation {
            None => Ok(()),
            Some(_) if !self.holds(nexus) => Ok(()),
            Some(r) if r.pr_type != t => Err(PrError::Check(Sense::INVALID_RELEASE)),
            Some(_) => {
                self.reservation = None;
                Ok(())
            }
        }
    }

    /// PREEMPT: removes the registrations with `sa_key` and, when they held the
    /// reservation, takes it with type `t`. Returns the preempted keys.
    fn preempt(&mut self, nexus: &str, sa_key: u64, t: u8) -> Result<Vec<u64>, PrError> {
        let holder_key = self.reservation.as_ref().and_then(|r| {
            if all_registrants(r.pr_type) {
                Some(0)
            } else {
                self.key_of(&r.holder)
            }
        });
        let take_over = holder_key == Some(sa_key);
        if sa_key == 0 && !take_over {
            return Err(PrError::Check(Sense::INVALID_FIELD_IN_PARAMETERS));
        }
        let before = self.registrants.len();
        if take_over && sa_key == 0 {
            // All-registrants reservation preempted with key 0: everyone else goes.
            self.registrants.retain(|(n, _)| n == nexus);
        } else {
            self.registrants.retain(|(n, k)| n == nexus || *k != sa_key);
        }
        let removed = before - self.registrants.len();
        if removed == 0 && !take_over {
            return Err(PrError::Conflict);
        }
        if take_over {
            self.reservation = Some(Reservation {
                holder: nexus.into(),
                pr_type: t,
            });
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(vec![sa_key])
    }
}

#[cfg(test)]
mod tests;
