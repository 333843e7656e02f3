//! Parking a request on a busy block-map chunk until the chunk's owner wakes it.
//!
//! The block map takes a `std::task::Waker` (it knows nothing of reactors). Ours
//! sends a message to the reactor that parked the request; the message runs the
//! request's continuation, kept in a reactor-local table (continuations hold `Rc`s
//! and are not `Send`; only their id crosses threads).
//!
//! # Spurious wake-ups
//! A wake-up means "retry": the continuation re-claims the chunk and may park again.
//! A continuation is run at most once; a stale wake-up for an id already run is
//! ignored.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Wake, Waker};

use ringblk_blockmap::{BlockMap, Park};
use ringblk_reactor::{Reactor, ReactorHandle};

type Cont = Box<dyn FnOnce(&mut Reactor)>;

#[derive(Default)]
struct Parked {
    conts: RefCell<HashMap<u64, Cont>>,
    next: Cell<u64>,
}

struct ReactorWaker {
    reactor: ReactorHandle,
    id: u64,
}

impl Wake for ReactorWaker {
    fn wake(self: Arc<Self>) {
        let id = self.id;
        // A full inbox is retried by the sender side's timer in `send_to`; here we
        // are on an arbitrary thread, so fall back to a short blocking send.
        if self.reactor.send(move |r| resume(r, id)).is_err() {
            let _ = self
                .reactor
                .send_blocking(move |r| resume(r, id), std::time::Duration::from_secs(1));
        }
    }
}

fn table(r: &mut Reactor) -> Rc<Parked> {
    match r.local::<Parked>() {
        Some(t) => t,
        None => {
            let t = Rc::new(Parked::default());
            r.set_local(t.clone());
            t
        }
    }
}

fn resume(r: &mut Reactor, id: u64) {
    let cont = table(r).conts.borrow_mut().remove(&id);
    if let Some(c) = cont {
        c(r);
    }
}

/// Keeps `cont` on this reactor until the returned waker is woken (from any
/// thread); then it runs here. For work done off the reactor (group commit).
pub(crate) fn suspend(r: &mut Reactor, cont: impl FnOnce(&mut Reactor) + 'static) -> Waker {
    let t = table(r);
    let id = t.next.get();
    t.next.set(id + 1);
    t.conts.borrow_mut().insert(id, Box::new(cont));
    Waker::from(Arc::new(ReactorWaker {
        reactor: r.handle().clone(),
        id,
    }))
}

/// Parks `cont` until `chunk` of `map` is no longer busy; runs it at once (on the
/// next loop iteration) if it already is not.
pub(crate) fn park_chunk(
    r: &mut Reactor,
    map: &BlockMap,
    chunk: u64,
    cont: impl FnOnce(&mut Reactor) + 'static,
) {
    let waker = suspend(r, cont);
    match map.park(chunk, &waker) {
        Ok(Park::Parked) => {}
        // Not busy any more (or out of range, which the retry reports): retry now,
        // but from a message so the caller's stack unwinds first.
        Ok(Park::Ready(_)) | Err(_) => waker.wake(),
    }
}
