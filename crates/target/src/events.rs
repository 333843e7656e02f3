//! Events for the users of a volume: the volume was deleted, a backup view was
//! released, the server stops. SPDK's `event_cb` of `spdk_bdev_open_ext`.
//!
//! A front end subscribes, on the reactor that serves it, for one volume seen
//! through one [`View`]; the control plane calls [`notify`] when something happens to
//! the volume, and every subscriber whose view matches is called on its own reactor.
//! The layer never closes anything itself: a subscriber closes its connection (or
//! device) and drops what it holds of the volume. Requests submitted after an event
//! still complete; the layer never drops a request.
//!
//! Layer: rank 7; imports `volume` (for [`View`] and `Volume`) and the reactor crate.
//! `bdev` (8) wraps [`subscribe`] as `Channel::subscribe`; `switchover` (release) and
//! the server's volume removal call [`notify`].
//!
//! # Ownership
//! Each reactor keeps its own subscriber table (a reactor-local, `!Send`); only
//! that reactor touches it. A [`Subscription`] removes its entry when dropped. A
//! table entry holds a `Weak<Volume>`, so the volume's address (the key) cannot be
//! reused by another volume while the entry exists, and a deleted volume and a new
//! one of the same name are never confused.
//!
//! # Ordering
//! [`notify`] runs one message round over every reactor (`for_each_reactor`) and
//! returns once it has visited them all (or the reactors stop). A subscription
//! made on a reactor before the round visits it is called; one made after sees the
//! state change that preceded the `notify` call (message passing orders them), so a
//! subscriber checks that state when it subscribes (the NBD session looks the
//! export up, and the backup's id, in the same reactor step as it subscribes).
//!
//! # Bounds
//! One entry per subscriber (a front end's connection), so a table is bounded by
//! the connections the server admits. Delivery scans it: events are rare.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak as RcWeak};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ringblk_reactor::{ForEachNext, Reactor, ReactorHandle};

use crate::volume::{View, Volume};

/// What happened to a volume, as its users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BdevEvent {
    /// The volume was deleted, or the backup a view reads was released: close, then
    /// drop everything held of the volume.
    Removed,
    /// The server is stopping.
    Shutdown,
}

/// How long [`notify`] waits for its round to start on a reactor whose inbox is
/// full, and for the round to finish, at most: events are best effort when the
/// reactors are stuck, never a hang of the control plane.
pub const NOTIFY_WAIT: Duration = Duration::from_secs(5);

type Callback = Rc<dyn Fn(&mut Reactor, BdevEvent)>;

struct Entry {
    id: u64,
    vol: Weak<Volume>,
    view: View,
    cb: Callback,
}

/// One reactor's subscribers.
#[derive(Default)]
struct Table {
    next_id: Cell<u64>,
    entries: RefCell<Vec<Entry>>,
}

fn table(r: &mut Reactor) -> Rc<Table> {
    if let Some(t) = r.local::<Table>() {
        return t;
    }
    let t = Rc::new(Table::default());
    r.set_local(t.clone());
    t
}

/// An active subscription; dropping it unsubscribes (on the reactor it was made
/// on: it is `!Send`).
pub struct Subscription {
    table: RcWeak<Table>,
    id: u64,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(t) = self.table.upgrade() {
            t.entries.borrow_mut().retain(|e| e.id != self.id);
        }
    }
}

/// Calls `f` on this reactor for every event of `vol` whose filter matches `view`,
/// until the returned [`Subscription`] is dropped. `f` must not hold what keeps the
/// subscription alive (a connection holding both would never be freed): hold a weak
/// reference to it.
pub fn subscribe(
    r: &mut Reactor,
    vol: &Arc<Volume>,
    view: View,
    f: impl Fn(&mut Reactor, BdevEvent) + 'static,
) -> Subscription {
    let t = table(r);
    let id = t.next_id.get();
    t.next_id.set(id + 1);
    t.entries.borrow_mut().push(Entry {
        id,
        vol: Arc::downgrade(vol),
        view,
        cb: Rc::new(f),
    });
    Subscription {
        table: Rc::downgrade(&t),
        id,
    }
}

/// Subscribers on this reactor.
pub fn subscribers(r: &Reactor) -> usize {
    r.local::<Table>().map_or(0, |t| t.entries.borrow().len())
}

/// Calls, on this reactor, every subscriber of `vol` whose view passes `filter`.
fn deliver(r: &mut Reactor, vol: *const Volume, filter: &dyn Fn(View) -> bool, ev: BdevEvent) {
    let Some(t) = r.local::<Table>() else { return };
    // Collected first: a callback may unsubscribe (or subscribe) as it runs.
    let due: Vec<Callback> = t
        .entries
        .borrow()
        .iter()
        .filter(|e| std::ptr::eq(e.vol.as_ptr(), vol) && filter(e.view))
        .map(|e| e.cb.clone())
        .collect();
    for cb in due {
        cb(r, ev);
    }
}

/// Sends `ev` to every subscriber of `vol` whose view passes `filter`, on every
/// reactor, in one round (module docs: # Ordering). Returns once the round visited
/// every reactor, or after [`NOTIFY_WAIT`] (stuck or stopping reactors). Call it
/// from a control thread, never from a reactor (it waits for the reactors).
pub fn notify(
    reactors: &[ReactorHandle],
    vol: &Arc<Volume>,
    filter: impl Fn(View) -> bool + Send + Sync + 'static,
    ev: BdevEvent,
) {
    let Some(first) = reactors.first() else {
        return;
    };
    // The address only names the volume; the round never dereferences it, and the
    // caller's Arc keeps it from being reused until the round is over.
    let key = Arc::as_ptr(vol) as usize;
    let filter: Arc<dyn Fn(View) -> bool + Send + Sync> = Arc::new(filter);
    let step: ringblk_reactor::ForEachFn = Arc::new(move |r: &mut Reactor, next: ForEachNext| {
        deliver(r, key as *const Volume, &*filter, ev);
        next.next(r);
    });
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    let sent = first.send_blocking(
        move |r| {
            r.for_each_reactor(step, move |_| {
                let _ = tx.send(());
            })
        },
        NOTIFY_WAIT,
    );
    if sent.is_err() {
        tracing::warn!(volume = vol.name(), event = ?ev, "event round not sent (reactors stopping or stuck)");
        return;
    }
    // Disconnected: the round was dropped by stopping reactors.
    if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = rx.recv_timeout(NOTIFY_WAIT) {
        tracing::warn!(volume = vol.name(), event = ?ev, "event round still running; not waiting for it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{BackendKind, VolumeSpec};
    use crate::volume::BackupId;
    use ringblk_reactor::{manual_reactors, ReactorConfig};
    use std::time::Instant;

    fn volume(dir: &std::path::Path, name: &str) -> Arc<Volume> {
        let spec = VolumeSpec {
            name: name.into(),
            path: None,
            size_bytes: Some(1 << 20),
            block_size: 512,
            backend: BackendKind::Mem,
            read_only: false,
            direct: false,
            chunk_size: 4096,
            grow: false,
        };
        Arc::new(Volume::open(spec, 2, dir).expect("volume"))
    }

    /// Runs `f` on a thread while this one polls the reactors until it returns.
    fn on_thread(rs: &mut [Reactor], f: impl FnOnce() + Send + 'static) {
        let t = std::thread::spawn(f);
        let start = Instant::now();
        while !t.is_finished() {
            for r in rs.iter_mut() {
                r.poll_once();
            }
            assert!(start.elapsed() < Duration::from_secs(30), "stalled");
        }
        t.join().expect("thread");
    }

    /// Events reach exactly the subscribers of that volume (by identity, not by
    /// name) whose view passes the filter, on every reactor; a dropped
    /// subscription gets nothing.
    #[test]
    fn events_reach_the_matching_views_of_that_volume_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = volume(dir.path(), "v");
        // Same name, another volume (a deleted one and its re-creation).
        let b = volume(dir.path(), "v");
        let mut rs = manual_reactors(ReactorConfig {
            cores: vec![None, None],
            ..Default::default()
        })
        .expect("reactors");
        let got: Rc<RefCell<Vec<(&'static str, BdevEvent)>>> = Rc::default();
        let sub = |r: &mut Reactor, v: &Arc<Volume>, view: View, tag: &'static str| {
            let got = got.clone();
            subscribe(r, v, view, move |_, ev| got.borrow_mut().push((tag, ev)))
        };
        let (r0, r1) = rs.split_at_mut(1);
        let _a_live = sub(&mut r0[0], &a, View::Live, "a-live@0");
        let _a_b1 = sub(&mut r0[0], &a, View::Backup(BackupId(1)), "a-b1@0");
        let _b_live = sub(&mut r0[0], &b, View::Live, "b-live@0");
        let _a_b1_r1 = sub(&mut r1[0], &a, View::Backup(BackupId(1)), "a-b1@1");
        let a_b2 = sub(&mut r1[0], &a, View::Backup(BackupId(2)), "a-b2@1");
        assert_eq!((subscribers(&rs[0]), subscribers(&rs[1])), (3, 2));
        let handles = rs[0].peers().clone();

        let (h, v) = (handles.clone(), a.clone());
        on_thread(&mut rs, move || {
            notify(
                &h,
                &v,
                |view| view == View::Backup(BackupId(1)),
                BdevEvent::Removed,
            )
        });
        let mut seen = got.borrow_mut().drain(..).collect::<Vec<_>>();
        seen.sort_by_key(|(tag, _)| *tag);
        assert_eq!(
            seen,
            [
                ("a-b1@0", BdevEvent::Removed),
                ("a-b1@1", BdevEvent::Removed)
            ]
        );

        drop(a_b2);
        assert_eq!(subscribers(&rs[1]), 1);
        let (h, v) = (handles.clone(), a.clone());
        on_thread(&mut rs, move || {
            notify(&h, &v, |_| true, BdevEvent::Shutdown)
        });
        let mut seen = got.borrow_mut().drain(..).collect::<Vec<_>>();
        seen.sort_by_key(|(tag, _)| *tag);
        assert_eq!(
            seen,
            [
                ("a-b1@0", BdevEvent::Shutdown),
                ("a-b1@1", BdevEvent::Shutdown),
                ("a-live@0", BdevEvent::Shutdown),
            ]
        );
    }
}
