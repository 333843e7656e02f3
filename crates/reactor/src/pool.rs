//! A pool of reactors, one OS thread per configured core.

use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use crate::config::ReactorConfig;
use crate::msg::{Msg, ReactorHandle};
use crate::reactor::Reactor;
use crate::ReactorError;

/// Runs on each reactor's thread once its ring exists, before the loop starts.
pub type Init = Arc<dyn Fn(&mut Reactor) + Send + Sync>;

/// Running reactors and their threads.
pub struct ReactorPool {
    handles: Arc<[ReactorHandle]>,
    threads: Vec<JoinHandle<()>>,
}

type Inboxes = Vec<crossbeam_channel::Receiver<Msg>>;

fn make_handles(config: &ReactorConfig) -> Result<(Arc<[ReactorHandle]>, Inboxes), ReactorError> {
    config.validate()?;
    let mut handles = Vec::new();
    let mut inboxes = Vec::new();
    for (id, core) in config.cores.iter().enumerate() {
        let (h, rx) = ReactorHandle::new(id, *core, config.idle, config.inbox_capacity)
            .map_err(|e| ReactorError::Ring("eventfd", e))?;
        handles.push(h);
        inboxes.push(rx);
    }
    Ok((handles.into(), inboxes))
}

impl ReactorPool {
    /// Starts one reactor thread per entry of `config.cores`, pinned where a core is
    /// given, runs `init` on each, and returns once every ring is set up (or the
    /// first error).
    pub fn start(config: ReactorConfig, init: Init) -> Result<ReactorPool, ReactorError> {
        let (handles, inboxes) = make_handles(&config)?;
        if let Some(max) = config.cores.iter().flatten().max() {
            let avail = core_affinity::get_core_ids().unwrap_or_default();
            if !avail.iter().any(|c| c.id == *max) {
                return Err(ReactorError::Config(format!(
                    "core {max} is not available to this process ({} cores)",
                    avail.len()
                )));
            }
        }
        let n = handles.len();
        let ready = Arc::new(Barrier::new(n + 1));
        let (err_tx, err_rx) = crossbeam_channel::bounded::<ReactorError>(n);
        let mut threads = Vec::with_capacity(n);
        for (id, inbox) in inboxes.into_iter().enumerate() {
            let (config, handles, init, ready, err_tx) = (
                config.clone(),
                handles.clone(),
                init.clone(),
                ready.clone(),
                err_tx.clone(),
            );
            let me = handles[id].clone();
            let t = std::thread::Builder::new()
                .name(format!("reactor-{id}"))
                .spawn(move || {
                    if let Some(core) = me.core() {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                            tracing::warn!(reactor = id, core, "could not pin reactor to core");
                        }
                    }
                    let mut r = match Reactor::new(&config, me.clone(), inbox, handles) {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = err_tx.send(e);
                            me.shared
                                .stopped
                                .store(true, std::sync::atomic::Ordering::Release);
                            ready.wait();
                            return;
                        }
                    };
                    init(&mut r);
                    ready.wait();
                    r.run();
                })
                .map_err(|e| ReactorError::Ring("spawn reactor thread", e))?;
            threads.push(t);
        }
        ready.wait();
        let pool = ReactorPool { handles, threads };
        if let Ok(e) = err_rx.try_recv() {
            pool.shutdown();
            return Err(e);
        }
        Ok(pool)
    }

    pub fn handles(&self) -> &Arc<[ReactorHandle]> {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Graceful stop: every reactor runs its stop hooks, finishes its in-flight
    /// operations and exits; returns when all threads have joined.
    pub fn shutdown(self) {
        for h in self.handles.iter() {
            h.request_stop();
        }
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!("a reactor thread panicked");
            }
        }
    }
}

/// Reactors that are not running on threads of their own: the caller drives them
/// with [`Reactor::poll_once`], for deterministic tests that interleave several
/// reactors on one thread (like SPDK's ut_multithread).
pub fn manual_reactors(config: ReactorConfig) -> Result<Vec<Reactor>, ReactorError> {
    let (handles, inboxes) = make_handles(&config)?;
    inboxes
        .into_iter()
        .enumerate()
        .map(|(id, inbox)| Reactor::new(&config, handles[id].clone(), inbox, handles.clone()))
        .collect()
}
