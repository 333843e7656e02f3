//! One vhost-user-blk device: what it offers (features, protocol features, the
//! virtio-blk config space) and the protocol handler of one client connection
//! ([`Conn`], our `VhostUserBackendReqHandlerMut`), which turns the frontend's
//! messages into memory tables, inflight regions and started or stopped queues.
//!
//! Layer: the control plane of the vhost front end; imports the `vhost` crate's
//! backend messages, `memory`, `inflight`, `queue` (the data plane's interface),
//! `ringblk_target::bdev` and `ringblk_reactor::ReactorHandle`. Runs on the device's
//! control thread (`control`), never on a reactor.
//!
//! # Message checks (the client is hostile)
//! Every field is checked before use, and a bad one fails the message (an error
//! ack with REPLY_ACK; the control thread then closes the connection, see
//! `control`): queue index < `num_queues`; vring size a power of two ≤
//! [`VRING_SIZE_MAX`]; base ≤ 0xffff (split rings); ring addresses inside one region
//! of the memory table, for the whole ring; features a subset of what was offered;
//! memory tables and inflight regions through `memory`/`inflight`'s bounds; no
//! vring, feature or table change that a running queue would not see is taken
//! while it runs (the queue is stopped and restarted around fd changes instead).
//!
//! # Queue life
//! A vring starts when it has a size, addresses, a kick fd and is enabled (with
//! VHOST_USER_F_PROTOCOL_FEATURES a ring starts disabled until SET_VRING_ENABLE, as
//! the spec says), and the memory table is set: then a [`QueueSetup`] goes to
//! reactor `index % n` ([`crate::queue::start_queue`]). GET_VRING_BASE,
//! SET_VRING_ENABLE 0, RESET_OWNER and disconnect stop it
//! ([`crate::queue::stop_queue`]): the control thread waits until its in-flight
//! requests completed and takes the next avail index the queue reports. A new
//! call/err/kick fd for a running queue stops and restarts it at that index, then
//! signals the call fd once: a queue may have started on a kick before its call fd
//! arrived (QEMU sends KICK, then CALL), and completions it made meanwhile would
//! otherwise never interrupt the driver.
//!
//! # Ordering
//! A stop returns only after the queue's requests have completed (their status
//! bytes written and used entries added), so GET_VRING_BASE's answer and the memory
//! unmapped after a disconnect never race a request still touching guest memory.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringblk_reactor::ReactorHandle;
use ringblk_target::bdev::{Bdev, Capabilities, Geometry};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
    VHOST_USER_CONFIG_SIZE,
};
use vhost::vhost_user::{
    Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::inflight::InflightRegion;
use crate::memory::{MemTable, RegionSpec, MEM_REGIONS_MAX};
use crate::queue::{self, QueueCounters, QueueHandle, QueueSetup};

/// Descriptors per vring at most (virtio's split-queue maximum; QEMU's too).
pub const VRING_SIZE_MAX: u16 = 1024;
/// Queues per device at most (the brief: `num_queues` ≤ 16).
pub const QUEUES_MAX: u16 = 16;
/// The request limits advertised are the ones the request parser enforces
/// (`blk`): `seg_max` data segments of at most `size_max` bytes (together below the
/// layer's 32 MiB request limit, so a guest never builds a request it refuses), and
/// discard / write-zeroes segments.
pub use crate::blk::{DISCARD_SECTORS_MAX, DISCARD_SEG_MAX, SEG_MAX, SIZE_MAX_BYTES};
/// Bytes of virtio-blk config space we fill (up to `write_zeroes_may_unmap` and its
/// padding); the rest of what a frontend asks for reads as zeros.
pub const CONFIG_BYTES: usize = 60;

/// How long the control thread waits for room in a reactor's inbox.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a wait for a reactor's answer checks that the reactor still runs.
const REPLY_POLL: Duration = Duration::from_secs(1);

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Virtio features offered for a view with capabilities `caps`.
pub fn device_features(caps: &Capabilities) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if caps.read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        // DISCARD may be served as zeroing where the store cannot punch holes.
        if caps.unmap || caps.write_zeroes {
            f |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if caps.write_zeroes {
            f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
    }
    f
}

/// Protocol features offered: what QEMU's vhost-user-blk needs (CONFIG), what
/// libblkio needs (REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS), MQ and INFLIGHT_SHMFD.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The virtio-blk config space (struct virtio_blk_config, little-endian) of a view.
pub fn config_space(geo: &Geometry, caps: &Capabilities, num_queues: u16) -> [u8; CONFIG_BYTES] {
    let mut c = [0u8; CONFIG_BYTES];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    let bs = geo.block_size.max(512);
    let sectors_per_block = bs / 512;
    put(0, &(geo.size_bytes / 512).to_le_bytes()); // capacity, 512-byte sectors
    put(8, &SIZE_MAX_BYTES.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    // 16..20: geometry (not offered).
    put(20, &bs.to_le_bytes());
    // Topology: logical = physical block (exp 0), no offset, min I/O one block,
    // optimal I/O in blocks.
    put(24, &[0, 0]);
    put(26, &1u16.to_le_bytes());
    put(28, &(geo.optimal_io_bytes / bs).max(1).to_le_bytes());
    // 32: writeback (CONFIG_WCE not offered), 33: unused.
    put(34, &num_queues.to_le_bytes());
    // DISCARD / WRITE_ZEROES: the parser's segment limits, in whole blocks.
    let max_sectors = DISCARD_SECTORS_MAX / sectors_per_block * sectors_per_block;
    put(36, &max_sectors.to_le_bytes());
    put(40, &DISCARD_SEG_MAX.to_le_bytes());
    put(44, &sectors_per_block.to_le_bytes());
    put(48, &max_sectors.to_le_bytes());
    put(52, &DISCARD_SEG_MAX.to_le_bytes());
    put(56, &[u8::from(caps.unmap)]);
    c
}

/// What the control thread, the queues and `vhost_list` share about a device.
pub(crate) struct DeviceShared {
    pub(crate) export: String,
    pub(crate) bdev: Bdev,
    pub(crate) read_only: bool,
    pub(crate) num_queues: u16,
    pub(crate) reactors: Arc<[ReactorHandle]>,
    /// Per queue, for the device's life (they add up over connections).
    pub(crate) counters: Box<[Arc<QueueCounters>]>,
    pub(crate) state: Mutex<DeviceState>,
}

/// What `vhost_list` shows of the connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeviceState {
    pub(crate) connected: bool,
    pub(crate) connections: u64,
    /// Per queue: the reactor it runs on while started.
    pub(crate) running: Vec<Option<usize>>,
    /// Why the last connection ended, when it was an error.
    pub(crate) last_error: Option<String>,
}

impl DeviceShared {
    pub(crate) fn new(
        export: String,
        bdev: Bdev,
        num_queues: u16,
        reactors: Arc<[ReactorHandle]>,
    ) -> DeviceShared {
        let read_only = bdev.capabilities().read_only;
        DeviceShared {
            export,
            bdev,
            read_only,
            num_queues,
            reactors,
            counters: (0..num_queues).map(|_| Arc::default()).collect(),
            state: Mutex::new(DeviceState {
                running: vec![None; usize::from(num_queues)],
                ..DeviceState::default()
            }),
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_running(&self, index: usize, reactor: Option<usize>) {
        if let Some(slot) = self.state().running.get_mut(index) {
            *slot = reactor;
        }
    }
}

/// A vring's setup as the frontend has sent it so far.
#[derive(Default)]
struct Vring {
    /// 0 until SET_VRING_NUM.
    num: u16,
    /// Frontend virtual addresses of the descriptor table, avail and used rings.
    addr: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    enabled: bool,
    /// The started queue's handle and the reactor it runs on.
    running: Option<(QueueHandle, usize)>,
}

fn invalid(why: &'static str) -> VuError {
    VuError::InvalidOperation(why)
}

fn handler_error(why: String) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(why))
}

/// Bytes of a split ring's parts for `num` descriptors (with the event-idx words).
fn ring_bytes(num: u16) -> (u64, u64, u64) {
    let n = u64::from(num);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

/// One client connection's protocol state (module docs).
pub(crate) struct Conn {
    dev: Arc<DeviceShared>,
    features: Option<u64>,
    protocol: u64,
    mem: MemTable,
    inflight: Option<Arc<InflightRegion>>,
    vrings: Vec<Vring>,
}

impl Conn {
    pub(crate) fn new(dev: Arc<DeviceShared>) -> Conn {
        let vrings = (0..dev.num_queues).map(|_| Vring::default()).collect();
        Conn {
            dev,
            features: None,
            protocol: 0,
            mem: MemTable::new(),
            inflight: None,
            vrings,
        }
    }

    fn offered(&self) -> u64 {
        device_features(&self.dev.bdev.capabilities())
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vrings.get_mut(i))
            .ok_or(VuError::InvalidParam)
    }

    fn any_running(&self) -> bool {
        self.vrings.iter().any(|v| v.running.is_some())
    }

    /// Starts vring `i` if it has everything it needs (module docs, *Queue life*).
    fn maybe_start(&mut self, i: usize) -> VuResult<()> {
        let Some(v) = self.vrings.get(i) else {
            return Err(VuError::InvalidParam);
        };
        let ready = v.running.is_none()
            && v.num != 0
            && v.addr.is_some()
            && v.kick.is_some()
            && v.enabled
            && self.features.is_some()
            && !self.mem.is_empty();
        if ready {
            self.start(i)
        } else {
            Ok(())
        }
    }

    fn start(&mut self, i: usize) -> VuResult<()> {
        let index = u16::try_from(i).map_err(|_| VuError::InvalidParam)?;
        let event_idx = self
            .features
            .is_some_and(|f| f & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
        let v = &self.vrings[i];
        let (desc, avail, used) = v.addr.ok_or(invalid("vring has no addresses"))?;
        let (desc_len, avail_len, used_len) = ring_bytes(v.num);
        let gpa = |va, len| {
            self.mem
                .va_to_gpa(va, len)
                .ok_or(invalid("vring outside the memory table"))
        };
        let dup = |f: &Option<File>| -> VuResult<Option<OwnedFd>> {
            f.as_ref()
                .map(|f| f.try_clone().map(OwnedFd::from))
                .transpose()
                .map_err(VuError::ReqHandlerError)
        };
        let kick = dup(&v.kick)?.ok_or(invalid("vring has no kick fd"))?;
        let inflight = self
            .inflight
            .as_ref()
            .and_then(|r| r.queue(index))
            .filter(|q| q.queue_size() >= v.num);
        if self.inflight.is_some() && inflight.is_none() {
            tracing::warn!(
                export = %self.dev.export,
                queue = i,
                "the inflight region does not cover this vring: its requests are not tracked"
            );
        }
        let setup = QueueSetup {
            index,
            size: v.num,
            desc_table: gpa(desc, desc_len)?,
            avail_ring: gpa(avail, avail_len)?,
            used_ring: gpa(used, used_len)?,
            next_avail: v.base,
            event_idx,
            mem: self.mem.mem().clone(),
            kick,
            call: dup(&v.call)?,
            err: dup(&v.err)?,
            bdev: self.dev.bdev.clone(),
            read_only: self.dev.read_only,
            inflight,
            counters: self.dev.counters[i].clone(),
        };
        let n = self.dev.reactors.len();
        if n == 0 {
            return Err(handler_error("no reactor to run the queue".into()));
        }
        let reactor = i % n;
        let h = self.dev.reactors[reactor].clone();
        let handle = ask(&h, move |r, tx| {
            let _ = tx.send(queue::start_queue(r, setup));
        })?;
        self.vrings[i].running = Some((handle, reactor));
        self.dev.set_running(i, Some(reactor));
        tracing::debug!(export = %self.dev.export, queue = i, reactor, "vring started");
        Ok(())
    }

    /// Stops vring `i` if it runs: waits for its drain; its base becomes the next
    /// avail index the queue reports.
    fn stop(&mut self, i: usize) -> VuResult<()> {
        let Some((handle, reactor)) = self.vrings.get_mut(i).and_then(|v| v.running.take()) else {
            return Ok(());
        };
        self.dev.set_running(i, None);
        let h = self.dev.reactors[reactor].clone();
        let next = ask(&h, move |r, tx| {
            queue::stop_queue(
                r,
                &handle,
                Box::new(move |next| {
                    let _ = tx.send(next);
                }),
            );
        })?;
        self.vrings[i].base = next;
        tracing::debug!(export = %self.dev.export, queue = i, next, "vring stopped");
        Ok(())
    }

    /// Runs `change` on vring `i` with the queue stopped, then starts it again if
    /// it ran (a new kick, call or err fd reaches a running queue this way).
    fn restart_around(&mut self, i: usize, change: impl FnOnce(&mut Vring)) -> VuResult<()> {
        let was_running = self.vrings.get(i).is_some_and(|v| v.running.is_some());
        self.stop(i)?;
        if let Some(v) = self.vrings.get_mut(i) {
            change(v);
        }
        if was_running {
            self.maybe_start(i)?;
            // Requests the queue completed while it had no call fd (or the old
            // one) may never have been signalled: one spurious interrupt makes the
            // driver look at the used ring (harmless, virtio drivers expect them).
            if let Some(call) = self.vrings.get(i).and_then(|v| v.call.as_ref()) {
                signal(call);
            }
        }
        Ok(())
    }

    /// Stops every queue and forgets the connection's state (disconnect,
    /// RESET_OWNER). Errors are logged: a reactor that stopped cannot drain.
    pub(crate) fn reset(&mut self) {
        for i in 0..self.vrings.len() {
            if let Err(e) = self.stop(i) {
                tracing::warn!(export = %self.dev.export, queue = i, error = %e, "stopping a vring failed");
            }
        }
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        self.features = None;
        self.protocol = 0;
        // Dropped after the drain: no request holds pointers into it any more
        // (in-flight requests that outlived a failed stop hold their own `Arc`).
        self.mem = MemTable::new();
        self.inflight = None;
    }

    /// A new memory table: running queues take it for new requests. Each handle
    /// travels to its reactor and back (it is not `Clone`).
    fn replace_mem(&mut self, table: MemTable) -> VuResult<()> {
        self.mem = table;
        for i in 0..self.vrings.len() {
            let Some((handle, reactor)) = self.vrings[i].running.take() else {
                continue;
            };
            let mem = self.mem.mem().clone();
            let h = self.dev.reactors[reactor].clone();
            let sent = ask(&h, move |r, tx| {
                queue::set_mem(r, &handle, mem);
                let _ = tx.send(handle);
            });
            match sent {
                Ok(handle) => self.vrings[i].running = Some((handle, reactor)),
                // The reactor stopped: so did the queue.
                Err(e) => {
                    self.dev.set_running(i, None);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Checks vring `i`'s addresses against the table, when all are known.
    fn check_vring_addr(&self, i: usize) -> VuResult<()> {
        let v = &self.vrings[i];
        let (Some((desc, avail, used)), false, false) = (v.addr, v.num == 0, self.mem.is_empty())
        else {
            return Ok(());
        };
        let (dl, al, ul) = ring_bytes(v.num);
        let ok = self.mem.va_to_gpa(desc, dl).is_some()
            && self.mem.va_to_gpa(avail, al).is_some()
            && self.mem.va_to_gpa(used, ul).is_some();
        if ok {
            Ok(())
        } else {
            Err(invalid("vring outside the memory table"))
        }
    }
}

/// A kick, call or err descriptor from the client, made safe to use: it must be an
/// eventfd, and it is switched to non-blocking. The bugs guarded: a pipe or socket
/// as call fd blocks the `write` of a signal (the reactor's, or ours in
/// `restart_around`) once full, and so does a blocking eventfd whose counter the
/// client saturated; a regular file as kick fd reads "a kick" at once, every time,
/// and keeps its reactor spinning. QEMU and libblkio create their eventfds
/// non-blocking already. The flag lives in the open file description the client
/// shares: a client that clears it again can still make a signal block (noted in
/// the crate docs; the writer's side would need an io_uring write to be immune).
fn checked_eventfd(f: File) -> VuResult<File> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|e| handler_error(format!("cannot identify a vring descriptor: {e}")))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(invalid(
            "a vring's kick/call/err descriptor is not an eventfd",
        ));
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let set = unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if !set {
        return Err(VuError::ReqHandlerError(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Adds 1 to eventfd `f` (a call fd). A full counter or a closed peer is ignored:
/// the driver has a notification pending then anyway, or is gone.
fn signal(f: &File) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to a descriptor we own.
    let _ = unsafe {
        libc::write(
            std::os::fd::AsRawFd::as_raw_fd(f),
            (&one as *const u64).cast(),
            8,
        )
    };
}

/// Runs `f` on reactor `h` and waits for what it sends back. The wait has no
/// deadline (a drain lasts as long as the requests it waits for) but gives up when
/// the reactor stopped: a message it will never run would otherwise hang us.
fn ask<T: Send + 'static>(
    h: &ReactorHandle,
    f: impl FnOnce(&mut ringblk_reactor::Reactor, mpsc::SyncSender<T>) + Send + 'static,
) -> VuResult<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    h.send_blocking(move |r| f(r, tx), SEND_TIMEOUT)
        .map_err(|e| handler_error(format!("reactor {}: {e}", h.id())))?;
    loop {
        match rx.recv_timeout(REPLY_POLL) {
            Ok(v) => return Ok(v),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(handler_error(format!(
                    "reactor {} dropped the request",
                    h.id()
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Err(ringblk_reactor::SendError::Stopped) = h.send(|_| {}) {
                    return Err(handler_error(format!("reactor {} stopped", h.id())));
                }
            }
        }
    }
}

impl VhostUserBackendReqHandlerMut for Conn {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered() != 0 {
            return Err(VuError::InvalidParam);
        }
        if self.any_running() && self.features != Some(features) {
            return Err(invalid("features changed while queues run"));
        }
        self.features = Some(features);
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled (the spec).
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for v in &mut self.vrings {
                v.enabled = true;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let specs: Vec<RegionSpec> = ctx.iter().map(spec_of).collect();
        let table =
            MemTable::from_specs(&specs, files).map_err(|e| handler_error(e.to_string()))?;
        self.replace_mem(table)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let v = self.vring(index)?;
        if v.running.is_some() {
            return Err(invalid("SET_VRING_NUM on a running vring"));
        }
        let num = u16::try_from(num).map_err(|_| VuError::InvalidParam)?;
        if num == 0 || num > VRING_SIZE_MAX || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        v.num = num;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let v = self.vring(index)?;
        if v.running.is_some() {
            return Err(invalid("SET_VRING_ADDR on a running vring"));
        }
        v.addr = Some((descriptor, available, used));
        let i = index as usize;
        if let Err(e) = self.check_vring_addr(i) {
            self.vrings[i].addr = None;
            return Err(e);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let v = self.vring(index)?;
        if v.running.is_some() {
            return Err(invalid("SET_VRING_BASE on a running vring"));
        }
        v.base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let i = index as usize;
        self.stop(i)?;
        // The ring is stopped until a new SET_VRING_KICK (libvhost-user closes both).
        let v = &mut self.vrings[i];
        v.kick = None;
        v.call = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        // Polling without a kick fd is not supported: a sleeping reactor needs it.
        let fd = fd.ok_or(invalid("SET_VRING_KICK without a descriptor"))?;
        let fd = checked_eventfd(fd)?;
        let i = usize::from(index);
        self.restart_around(i, |v| v.kick = Some(fd))?;
        self.maybe_start(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        let fd = fd.map(checked_eventfd).transpose()?;
        self.restart_around(usize::from(index), |v| v.call = fd)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        let fd = fd.map(checked_eventfd).transpose()?;
        self.restart_around(usize::from(index), |v| v.err = fd)
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if features & !protocol_features().bits() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.dev.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?;
        let i = index as usize;
        if enable {
            self.vrings[i].enabled = true;
            self.maybe_start(i)
        } else {
            self.stop(i)?;
            self.vrings[i].enabled = false;
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let end = offset.checked_add(size).ok_or(VuError::InvalidParam)?;
        if end > VHOST_USER_CONFIG_SIZE {
            return Err(VuError::InvalidParam);
        }
        let cfg = config_space(
            &self.dev.bdev.geometry(),
            &self.dev.bdev.capabilities(),
            self.dev.num_queues,
        );
        Ok((offset..end)
            .map(|at| cfg.get(at as usize).copied().unwrap_or(0))
            .collect())
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Nothing in our config space is writable (CONFIG_WCE is not offered).
        Err(invalid("the config space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(invalid("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        if self.any_running() {
            return Err(invalid("GET_INFLIGHT_FD while queues run"));
        }
        let region = InflightRegion::create(inflight.num_queues, inflight.queue_size)
            .map_err(|e| handler_error(e.to_string()))?;
        let file = region
            .file()
            .try_clone()
            .map_err(VuError::ReqHandlerError)?;
        let reply = VhostUserInflight::new(
            region.mmap_size(),
            region.mmap_offset(),
            region.num_queues(),
            region.queue_size(),
        );
        self.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        if self.any_running() {
            return Err(invalid("SET_INFLIGHT_FD while queues run"));
        }
        let region = InflightRegion::open(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| handler_error(e.to_string()))?;
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MEM_REGIONS_MAX as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let table = self
            .mem
            .add(spec_of(region), fd)
            .map_err(|e| handler_error(e.to_string()))?;
        self.replace_mem(table)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let spec = spec_of(region);
        let table = self
            .mem
            .remove(spec)
            .map_err(|e| handler_error(e.to_string()))?;
        // A running vring must not lose its ring's memory.
        for (i, v) in self.vrings.iter().enumerate() {
            if v.running.is_some() {
                let (d, a, u) = v.addr.unwrap_or_default();
                let (dl, al, ul) = ring_bytes(v.num);
                let kept = table.va_to_gpa(d, dl).is_some()
                    && table.va_to_gpa(a, al).is_some()
                    && table.va_to_gpa(u, ul).is_some();
                if !kept {
                    tracing::warn!(queue = i, "REM_MEM_REG of a running vring's memory refused");
                    return Err(invalid("region holds a running vring"));
                }
            }
        }
        self.replace_mem(table)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("no device state transfer"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(invalid("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(invalid("no dirty logging"))
    }
}

fn spec_of(r: &VhostUserMemoryRegion) -> RegionSpec {
    // Copies out of the packed wire struct.
    RegionSpec {
        guest_phys_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    fn caps(read_only: bool, unmap: bool) -> Capabilities {
        Capabilities {
            read_only,
            unmap,
            write_zeroes: !read_only,
            fast_zero: unmap,
            flush: true,
            fua: true,
            readahead: true,
            compare_and_write: !read_only,
            flush_covers_all_channels: true,
            rotational: false,
        }
    }

    /// The config space puts each field where Linux's struct virtio_blk_config has
    /// it (the bug guarded: a guest reading its size or queue count at the wrong
    /// offset) and gives capacity in 512-byte sectors whatever the block size.
    #[test]
    fn config_space_matches_virtio_blk_config() {
        assert_eq!(offset_of!(virtio_blk_config, capacity), 0);
        assert_eq!(offset_of!(virtio_blk_config, size_max), 8);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, physical_block_exp), 24);
        assert_eq!(offset_of!(virtio_blk_config, min_io_size), 26);
        assert_eq!(offset_of!(virtio_blk_config, opt_io_size), 28);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_seg), 40);
        assert_eq!(offset_of!(virtio_blk_config, discard_sector_alignment), 44);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
        assert_eq!(
            offset_of!(virtio_blk_config, max_secure_erase_sectors),
            CONFIG_BYTES
        );

        let geo = Geometry {
            size_bytes: 1 << 30,
            block_size: 4096,
            optimal_io_bytes: 4096,
            max_io_bytes: 32 << 20,
            mem_align: 512,
        };
        let c = config_space(&geo, &caps(false, true), 3);
        let u32_at = |at: usize| u32::from_le_bytes(c[at..at + 4].try_into().expect("4"));
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().expect("8")),
            (1 << 30) / 512
        );
        assert_eq!(u32_at(20), 4096);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3);
        assert_eq!(
            u32_at(44),
            8,
            "discard alignment: one 4 KiB block in sectors"
        );
        assert_eq!(u32_at(36) % 8, 0, "max discard in whole blocks");
        assert_eq!(u32_at(40), DISCARD_SEG_MAX);
        assert_eq!(c[56], 1);
        // A request the guest may build fits the layer's limit.
        assert!(u64::from(u32_at(8)) * u64::from(u32_at(12)) <= u64::from(geo.max_io_bytes));
    }

    #[test]
    fn features_follow_the_view() {
        let live = device_features(&caps(false, true));
        let backup = device_features(&caps(true, false));
        let has = |f: u64, b: u32| f & bit(b) != 0;
        assert!(has(live, VIRTIO_BLK_F_DISCARD) && has(live, VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(!has(live, VIRTIO_BLK_F_RO));
        assert!(has(backup, VIRTIO_BLK_F_RO));
        assert!(!has(backup, VIRTIO_BLK_F_DISCARD) && !has(backup, VIRTIO_BLK_F_WRITE_ZEROES));
        for f in [live, backup] {
            assert!(
                has(f, VIRTIO_F_VERSION_1) && has(f, VIRTIO_BLK_F_MQ) && has(f, VIRTIO_BLK_F_FLUSH)
            );
            assert!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        }
        let p = protocol_features();
        assert!(p.contains(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::MQ
        ));
    }

    /// A connection over a 1 MiB mem volume, with no reactor (nothing starts).
    fn conn() -> (tempfile::TempDir, Conn) {
        use ringblk_target::target::Target;
        let dir = tempfile::tempdir().expect("tmp");
        let target = Arc::new(Target::new(dir.path().to_path_buf(), 1, 64));
        let spec = "v=,backend=mem,size=1M,block-size=512"
            .parse()
            .expect("spec");
        target.add_volume(spec).expect("volume");
        let bdev = target
            .open("v", ringblk_target::stats::Label::INTERNAL)
            .expect("open");
        let dev = DeviceShared::new("v".into(), bdev, 2, Arc::from(Vec::new()));
        (dir, Conn::new(Arc::new(dev)))
    }

    fn region(gpa: u64, size: u64, va: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, va, 0)
    }

    /// Every field a frontend sends is checked: the bugs guarded are a queue index,
    /// size or base taken unchecked (an out-of-bounds vring, a ring the queue code
    /// then indexes with a bad mask) and features we never offered.
    #[test]
    fn bad_vring_messages_are_refused() {
        let (_dir, mut c) = conn();
        for num in [0, 3, 1000, 2048, u32::MAX] {
            assert!(c.set_vring_num(0, num).is_err(), "num {num}");
        }
        assert!(c.set_vring_num(0, 1024).is_ok());
        assert!(c.set_vring_num(1, 1).is_ok());
        assert!(
            c.set_vring_num(2, 256).is_err(),
            "queue index past num_queues"
        );
        assert!(c.set_vring_num(u32::MAX, 256).is_err());
        assert!(c.set_vring_base(0, 0x1_0000).is_err());
        assert!(c.set_vring_base(0, 0xffff).is_ok());
        assert!(c.set_vring_kick(2, None).is_err());
        assert!(
            c.set_vring_kick(0, None).is_err(),
            "kick without a descriptor"
        );
        assert!(c.set_vring_call(7, None).is_err());
        assert!(c.set_vring_enable(9, true).is_err());
        assert!(c.get_vring_base(2).is_err());
        let offered = c.offered();
        assert!(
            c.set_features(offered | bit(VIRTIO_BLK_F_RO)).is_err(),
            "RO on a live view"
        );
        assert!(c.set_features(1 << 63).is_err());
        assert!(c.set_features(offered).is_ok());
        assert!(c
            .set_protocol_features(VhostUserProtocolFeatures::LOG_SHMFD.bits())
            .is_err());
        assert!(c.set_protocol_features(protocol_features().bits()).is_ok());
        // A stopped vring answers GET_VRING_BASE with what SET_VRING_BASE said.
        let st = c.get_vring_base(0).expect("base");
        assert_eq!({ st.num }, 0xffff);
        assert_eq!(c.get_queue_num().ok(), Some(2));
    }

    /// A blocking eventfd (as a hostile client would send), as a `File`.
    fn blocking_eventfd() -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; the new descriptor is ours alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is the fresh descriptor just created.
        unsafe { File::from_raw_fd(fd) }
    }

    fn nonblocking(f: &File) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        flags >= 0 && flags & libc::O_NONBLOCK != 0
    }

    /// Kick, call and err descriptors must be eventfds, and are made non-blocking.
    /// The bugs guarded: a pipe as call fd (or a blocking eventfd the client
    /// saturated) blocks the reactor's signal `write` forever; a regular file as
    /// kick fd wakes its reactor on every read. Negative control: the eventfd
    /// cases must be accepted, so a check refusing everything fails too.
    #[test]
    fn vring_descriptors_must_be_nonblocking_eventfds() {
        let (_dir, mut c) = conn();
        let (pipe_r, pipe_w) = nix::unistd::pipe().expect("pipe");
        let not_eventfds = || {
            [
                File::from(pipe_r.try_clone().expect("dup")),
                File::from(pipe_w.try_clone().expect("dup")),
                crate::inflight::memfd("t", 4096).expect("memfd"),
            ]
        };
        for f in not_eventfds() {
            assert!(c.set_vring_kick(0, Some(f)).is_err(), "kick");
        }
        for f in not_eventfds() {
            assert!(c.set_vring_call(0, Some(f)).is_err(), "call");
        }
        for f in not_eventfds() {
            assert!(c.set_vring_err(0, Some(f)).is_err(), "err");
        }
        assert!(c.vrings[0].kick.is_none() && c.vrings[0].call.is_none());

        let (kick, call, err) = (blocking_eventfd(), blocking_eventfd(), blocking_eventfd());
        assert!(!nonblocking(&call), "the control: a blocking eventfd");
        let dup = |f: &File| f.try_clone().expect("dup");
        assert!(c.set_vring_kick(0, Some(dup(&kick))).is_ok());
        assert!(c.set_vring_call(0, Some(dup(&call))).is_ok());
        assert!(c.set_vring_err(0, Some(dup(&err))).is_ok());
        assert!(c.set_vring_call(1, None).is_ok(), "no call fd is allowed");
        for f in [&kick, &call, &err] {
            assert!(nonblocking(f), "the client's eventfd was left blocking");
        }
    }

    /// Vring addresses must lie in the memory table, the whole ring: the bug
    /// guarded is a ring that starts inside a region and runs past its end.
    #[test]
    fn vring_addresses_must_lie_in_the_memory_table() {
        let (_dir, mut c) = conn();
        let f = crate::inflight::memfd("t", 0x10000).expect("memfd");
        let t = c.set_mem_table(&[region(0, 0x10000, 0x7000_0000)], vec![f], None);
        assert!(t.is_ok(), "{:?}", t.err());
        c.set_vring_num(0, 256).expect("num");
        let flags = VhostUserVringAddrFlags::empty;
        let va = 0x7000_0000u64;
        // desc 4 KiB, avail 518 B, used 2054 B.
        assert!(c
            .set_vring_addr(0, flags(), va, va + 0x2000, va + 0x1000, 0)
            .is_ok());
        assert!(
            c.set_vring_addr(
                0,
                flags(),
                va + 0x10000 - 0x800,
                va + 0x2000,
                va + 0x1000,
                0
            )
            .is_err(),
            "descriptor table runs past the region"
        );
        assert!(c
            .set_vring_addr(0, flags(), va, 0x10, va + 0x1000, 0)
            .is_err());
        assert!(c.vrings[0].addr.is_none(), "a refused address is not kept");
        // A memory table with an overlap or a file too short is refused.
        let f1 = crate::inflight::memfd("t", 0x1000).expect("memfd");
        let f2 = crate::inflight::memfd("t", 0x1000).expect("memfd");
        let overlap = [region(0, 0x1000, 0), region(0x800, 0x1000, 0x10000)];
        assert!(c.set_mem_table(&overlap, vec![f1, f2], None).is_err());
        let short = crate::inflight::memfd("t", 0x1000).expect("memfd");
        assert!(c
            .set_mem_table(&[region(0, 0x2000, 0)], vec![short], None)
            .is_err());
    }

    /// GET_CONFIG answers any window of the config space (zeros past our part);
    /// a window past the vhost-user bound is refused. GET_INFLIGHT_FD sizes the
    /// region by the frontend's queue count and size and refuses absurd ones.
    #[test]
    fn config_and_inflight_messages() {
        let (_dir, mut c) = conn();
        let flags = VhostUserConfigFlags::empty();
        let cfg = c.get_config(0, 96, flags).expect("config");
        assert_eq!(cfg.len(), 96);
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().expect("8")), 2048);
        assert!(cfg[CONFIG_BYTES..].iter().all(|&b| b == 0));
        assert_eq!(
            c.get_config(34, 2, flags).expect("num_queues"),
            2u16.to_le_bytes()
        );
        assert!(c.get_config(VHOST_USER_CONFIG_SIZE - 1, 2, flags).is_err());
        assert!(c.get_config(u32::MAX, 2, flags).is_err());

        let (reply, file) = c
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 2, 128))
            .expect("inflight");
        assert_eq!({ reply.mmap_size }, 2 * 2112);
        assert_eq!(file.metadata().expect("stat").len(), 2 * 2112);
        assert!(c
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 2, 4096))
            .is_err());
        // Handed back (as QEMU does after a reconnect): mapped again, same records.
        assert!(c.set_inflight_fd(&reply, file).is_ok());
        let short = crate::inflight::memfd("t", 100).expect("memfd");
        assert!(c.set_inflight_fd(&reply, short).is_err());
    }
}
