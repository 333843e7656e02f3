//! Statistics: per-reactor op counters ([`counters`]), latency histograms
//! ([`latency`]), and [`Label`], the name of who submitted a request.
//!
//! A front end registers its label once, on the control plane, and the layer keeps
//! counts per label without interpreting it (plan #12 §2.8): `counters::VolumeCounters`
//! has a slot per (reactor, label), and `stats` reports them under `by_label`.

use std::sync::Mutex;

pub mod counters;
pub mod latency;

/// Labels registered at once, at most (including [`Label::INTERNAL`]).
pub const LABELS_MAX: usize = 8;

/// Who submitted a request (a front end, or internal work), for per-label stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Label(u8);

/// Why a label could not be registered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StatsError {
    #[error("cannot register stats label {0:?}: all {LABELS_MAX} labels are in use")]
    LabelsFull(&'static str),
}

/// Names of the registered labels, by index; slot 0 is [`Label::INTERNAL`].
static LABELS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

fn labels() -> std::sync::MutexGuard<'static, Vec<&'static str>> {
    let mut l = LABELS.lock().unwrap_or_else(|p| p.into_inner());
    if l.is_empty() {
        l.push("internal");
    }
    l
}

impl Label {
    /// Tests and the layer's own clients.
    pub const INTERNAL: Label = Label(0);

    /// The label named `name`, registering it on first use (idempotent by name).
    /// Control plane only: it takes a lock.
    pub fn register(name: &'static str) -> Result<Label, StatsError> {
        let mut l = labels();
        if let Some(i) = l.iter().position(|n| *n == name) {
            return Ok(Label(i as u8));
        }
        if l.len() >= LABELS_MAX {
            return Err(StatsError::LabelsFull(name));
        }
        l.push(name);
        Ok(Label((l.len() - 1) as u8))
    }

    /// The name it was registered with.
    pub fn name(self) -> &'static str {
        labels()
            .get(usize::from(self.0))
            .copied()
            .unwrap_or("internal")
    }

    /// Its slot in per-label arrays (`< LABELS_MAX`).
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// The label in slot `i` (for reports; `i < LABELS_MAX`).
    pub(crate) fn from_index(i: usize) -> Label {
        debug_assert!(i < LABELS_MAX);
        Label(i as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_register_once_by_name_and_are_bounded() {
        assert_eq!(Label::INTERNAL.name(), "internal");
        assert_eq!(Label::register("internal"), Ok(Label::INTERNAL));
        let a = Label::register("stats-test-a").expect("room");
        assert_eq!(Label::register("stats-test-a"), Ok(a));
        assert_eq!(a.name(), "stats-test-a");
        assert_ne!(a, Label::INTERNAL);
        assert!(a.index() < LABELS_MAX);
        // Fill the table (other tests may hold slots too): then registering fails.
        const NAMES: [&str; LABELS_MAX] = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"];
        let mut refused = None;
        for n in NAMES {
            if let Err(e) = Label::register(n) {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(refused, Some(StatsError::LabelsFull(_))),
            "bounded"
        );
        assert_eq!(
            Label::register("stats-test-a"),
            Ok(a),
            "existing names still resolve"
        );
    }
}
