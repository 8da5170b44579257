//! The vhost-user-blk device as the control thread sees it: negotiated features, the memory
//! table, and per-queue vring state. The rust-vmm `vhost` crate parses and validates every
//! wire message and calls in here; we own what the messages mean.

use std::fs::File;
use std::io;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::debug;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;

use crate::blk::config::offset::WRITEBACK;
use crate::blk::feature;
use crate::disk::Disk;
use crate::iothread::{start_queue, Placement, QueueHandle, QueueSetup};
use crate::ratelimit::RateLimiter;
use crate::sys::checked_eventfd;
use crate::virtq::dirty::{self, DirtyLog, QueueLog};
use crate::virtq::inflight;
use crate::virtq::memory::MAX_MEM_REGIONS;
use crate::virtq::{
    GuestMemory, InflightError, InflightRegion, MappedRegion, MemoryError, RingAddrs, RingFormat,
};
use crate::{info_limited, warn_limited};

#[derive(Default)]
struct Vring {
    size: u16,
    addrs: Option<RingAddrs>,
    /// VRING_BASE: where the next request will be taken from (and, for a packed ring, where
    /// the next used element goes); updated whenever the I/O thread stops.
    base: u32,
    /// SET_VRING_KICK arrived since the last stop (with an fd, or "poll instead").
    kick_set: bool,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    enabled: bool,
    /// With the ring's LOG flag (SET_VRING_ADDR): where writes to its used ring are logged.
    used_log_addr: Option<u64>,
    /// The queue being served, on whichever I/O thread the export's placement chose.
    thread: Option<QueueHandle>,
}

/// One connected frontend's view of an export.
pub struct BlkDevice {
    disk: Arc<Disk>,
    /// Which I/O threads serve the queues.
    placement: Placement,
    acked_features: u64,
    acked_protocol_features: u64,
    memory: Arc<GuestMemory>,
    /// The rings the frontend has named so far (up to the highest index it used, at most
    /// the export's `num_queues`): an export offering 1024 queues to a VM that uses 2 keeps
    /// 2 here.
    vrings: Vec<Vring>,
    /// The frontend's connection (a duplicate): shut down if its guest RAM shrinks under us.
    hangup: Arc<OwnedFd>,
    /// Lines this frontend can trigger are rate limited, by the export's limiter (which
    /// outlives connections: reconnecting does not buy a fresh budget).
    log: Arc<Mutex<RateLimiter>>,
    /// The inflight region (GET_INFLIGHT_FD / SET_INFLIGHT_FD): survives our restarts in the
    /// frontend's hands, and tells the next daemon what was in flight.
    inflight: Option<Arc<InflightRegion>>,
    /// The dirty log of a live migration (SET_LOG_BASE); used while LOG_ALL is acked.
    dirty: Option<Arc<DirtyLog>>,
}

fn handler_error(e: impl std::fmt::Display) -> Error {
    Error::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

impl BlkDevice {
    pub fn new(
        disk: Arc<Disk>,
        placement: Placement,
        hangup: Arc<OwnedFd>,
        log: Arc<Mutex<RateLimiter>>,
    ) -> BlkDevice {
        disk.reset_writeback();
        BlkDevice {
            disk,
            placement,
            acked_features: 0,
            acked_protocol_features: 0,
            memory: Arc::new(GuestMemory::default()),
            vrings: Vec::new(),
            hangup,
            log,
            inflight: None,
            dirty: None,
        }
    }

    fn log(&self) -> MutexGuard<'_, RateLimiter> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn memory_error(&mut self, e: MemoryError) -> Error {
        warn_limited!(self.log(), parent: &self.disk.span, "refused a memory region: {e}");
        handler_error(e)
    }

    /// Refuses a memory table of `regions` regions and `total` bytes (None: it overflowed)
    /// over the connection's bounds, before anything of it is mapped. (`GuestMemory` checks
    /// the region count again as it builds the table; this spares mapping what it would
    /// refuse.)
    fn check_table(&mut self, total: Option<u64>, regions: usize) -> Result<()> {
        let limit = self.disk.max_guest_memory_bytes;
        let error = match total {
            _ if regions > MAX_MEM_REGIONS => MemoryError::TooManyRegions { max: MAX_MEM_REGIONS },
            Some(t) if t <= limit => return Ok(()),
            t => MemoryError::ConnectionLimit { total: t.unwrap_or(u64::MAX), limit },
        };
        Err(self.memory_error(error))
    }

    /// A kick/call/err descriptor from the frontend, if it is one we can use.
    fn vring_fd(&mut self, what: &str, index: u8, fd: Option<File>) -> Result<Option<File>> {
        match fd.map(checked_eventfd).transpose() {
            Ok(fd) => Ok(fd),
            Err(e) => {
                warn_limited!(self.log(), parent: &self.disk.span, queue = index, "refused the {what} descriptor: {e}");
                Err(handler_error(format!("{what} descriptor: {e}")))
            }
        }
    }

    /// The geometry an inflight message asks for, if within what the export offers (which
    /// bounds the region we create or map).
    fn inflight_geometry(&mut self, inflight: &VhostUserInflight) -> Result<(u16, u16)> {
        let (num_queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        if num_queues == 0
            || num_queues > self.disk.num_queues
            || queue_size == 0
            || queue_size > self.disk.max_queue_size
        {
            return Err(self.inflight_error(InflightError::Geometry {
                num_queues,
                queue_size,
                max_queues: self.disk.num_queues,
                max_queue_size: self.disk.max_queue_size,
            }));
        }
        Ok((num_queues, queue_size))
    }

    fn inflight_error(&mut self, e: InflightError) -> Error {
        warn_limited!(self.log(), parent: &self.disk.span, "{e}");
        handler_error(e)
    }

    /// Takes a new inflight region; running rings restart on it (after their in-flight
    /// requests, which the old region then shows answered).
    fn set_inflight(&mut self, region: InflightRegion) -> Result<()> {
        self.inflight = Some(Arc::new(region));
        self.apply_running()
    }

    /// Whether the frontend's guest RAM shrank under a running queue (see virtq/fault.rs).
    pub fn memory_faulted(&self) -> bool {
        self.memory.faulted()
    }

    /// The ring layout the frontend negotiated (VIRTIO_F_RING_PACKED).
    fn ring_format(&self) -> RingFormat {
        if self.acked_features & feature::RING_PACKED != 0 {
            RingFormat::Packed
        } else {
            RingFormat::Split
        }
    }

    /// Ring `index`, made when the frontend first names it; an index past the queues the
    /// export offers is refused.
    fn vring(&mut self, index: u32) -> Result<&mut Vring> {
        let i = index as usize;
        if i >= usize::from(self.disk.num_queues) {
            let offered = self.disk.num_queues;
            warn_limited!(self.log(), parent: &self.disk.span, "ring {index} refused: the export offers {offered} queues (0 to {})", offered - 1);
            return Err(Error::InvalidParam);
        }
        if i >= self.vrings.len() {
            self.vrings.resize_with(i + 1, Vring::default);
        }
        Ok(&mut self.vrings[i])
    }

    /// A ring runs once it has a size, addresses, a kick (or "poll"), memory, and is enabled
    /// (rings start disabled when protocol features are negotiated, enabled otherwise).
    fn startable(&self, index: usize) -> bool {
        let v = &self.vrings[index];
        let enabled = v.enabled || self.acked_features & feature::VHOST_USER_PROTOCOL_FEATURES == 0;
        v.size > 0 && v.addrs.is_some() && v.kick_set && enabled && !self.memory.is_empty()
    }

    fn stop_thread(&mut self, index: usize) {
        let v = &mut self.vrings[index];
        if let Some(thread) = v.thread.take() {
            v.base = thread.stop();
        }
    }

    /// Brings ring `index` to the state its settings call for: stopped, or running with
    /// exactly the current settings (restarted if it was running with older ones).
    fn apply(&mut self, index: usize) -> Result<()> {
        self.stop_thread(index);
        if !self.startable(index) {
            return Ok(());
        }
        let log = self.queue_log(index)?;
        // A migration's destination takes the image's write permission as its guest arrives.
        match self.disk.activate() {
            Ok(true) => {
                info_limited!(self.log(), parent: &self.disk.span, "took the image's write permission");
            }
            Ok(false) => {}
            Err(e) => {
                warn_limited!(self.log(), parent: &self.disk.span, queue = index, "cannot start the ring: {e}");
                return Err(handler_error(e));
            }
        }
        let clone = |f: &Option<File>| f.as_ref().map(File::try_clone).transpose();
        let v = &self.vrings[index];
        let setup = QueueSetup {
            index: index as u16,
            memory: Arc::clone(&self.memory),
            addrs: v.addrs.unwrap_or_default(),
            size: v.size,
            base: v.base,
            format: self.ring_format(),
            event_idx: self.acked_features & feature::RING_EVENT_IDX != 0,
            indirect: self.acked_features & feature::RING_INDIRECT_DESC != 0,
            kick: clone(&v.kick).map_err(Error::ReqHandlerError)?,
            call: clone(&v.call).map_err(Error::ReqHandlerError)?,
            err: clone(&v.err).map_err(Error::ReqHandlerError)?,
            inflight: self.inflight.clone(),
            log,
        };
        match start_queue(&self.placement, &self.disk, setup) {
            Ok(thread) => {
                self.vrings[index].thread = Some(thread);
                Ok(())
            }
            Err(e) => {
                warn_limited!(self.log(), parent: &self.disk.span, queue = index, "cannot start queue: {e}");
                Err(Error::ReqHandlerError(e))
            }
        }
    }

    /// What ring `index` logs, if the frontend migrates the guest (LOG_ALL acked): its writes
    /// to guest memory, and its used ring if the ring's LOG flag is set. A log that does not
    /// cover guest memory or the used ring's log range refuses the ring's start.
    fn queue_log(&mut self, index: usize) -> Result<Option<QueueLog>> {
        if self.acked_features & feature::VHOST_LOG_ALL == 0 {
            return Ok(None);
        }
        let v = &self.vrings[index];
        let used_bytes = self.ring_format().used_area_bytes(v.size);
        let problem = match &self.dirty {
            None => Some("logging is on (LOG_ALL) but no log was given (SET_LOG_BASE)".to_string()),
            Some(log) if !log.covers(self.memory.gpa_end()) => Some(format!(
                "the dirty log ({} bytes) does not cover guest memory up to {:#x}",
                log.bytes(),
                self.memory.gpa_end()
            )),
            Some(log) => match v.used_log_addr {
                Some(addr) if addr.checked_add(used_bytes).is_none_or(|end| !log.covers(end)) => {
                    Some(format!("ring {index}'s used ring log address {addr:#x} is outside the dirty log ({} bytes)", log.bytes()))
                }
                _ => None,
            },
        };
        if let Some(problem) = problem {
            warn_limited!(self.log(), parent: &self.disk.span, queue = index, "{problem}");
            return Err(handler_error(problem));
        }
        let log = self
            .dirty
            .clone()
            .map(|log| QueueLog { log, used: v.used_log_addr.map(|addr| (addr, used_bytes)) });
        Ok(log)
    }

    /// Stops every running ring (their requests in flight complete first) and returns which
    /// ran, for `restart_on`.
    pub fn stop_running(&mut self) -> Vec<usize> {
        let running: Vec<usize> =
            (0..self.vrings.len()).filter(|&i| self.vrings[i].thread.is_some()).collect();
        for &i in &running {
            self.stop_thread(i);
        }
        running
    }

    /// Serves `disk` from now on (a mirror's pivot), and starts `rings` again on it where
    /// they stopped. The guest's write-cache bit carries over.
    pub fn restart_on(
        &mut self,
        disk: Arc<Disk>,
        rings: &[usize],
    ) -> std::result::Result<(), String> {
        disk.set_writeback(self.disk.writeback());
        self.disk = disk;
        let mut result = Ok(());
        for &i in rings {
            if let Err(e) = self.apply(i) {
                result = Err(format!("restarting ring {i}: {e}"));
            }
        }
        result
    }

    /// Re-applies every ring that is running (after a change that affects them all).
    fn apply_running(&mut self) -> Result<()> {
        let mut result = Ok(());
        for i in 0..self.vrings.len() {
            if self.vrings[i].thread.is_some() {
                if let Err(e) = self.apply(i) {
                    result = Err(e);
                }
            }
        }
        result
    }

    fn set_memory(&mut self, memory: GuestMemory) -> Result<()> {
        // A running thread keeps the table it started with (its pointers came from it), so
        // swapping first is safe; apply() then restarts each ring on the new table.
        self.disk.note_guest_memory(memory.regions().len(), memory.total_bytes());
        self.memory = Arc::new(memory);
        let mut result = Ok(());
        for i in 0..self.vrings.len() {
            if self.vrings[i].thread.is_some() || self.startable(i) {
                if let Err(e) = self.apply(i) {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Whether replies to NEED_REPLY messages are on: REPLY_ACK acked among the protocol
    /// features (which we always offer), as the vhost crate decides it.
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// Stops every queue; in-flight requests complete first. Called on disconnect. The
    /// queues leave together: the wait is the slowest one's, not the sum.
    pub fn stop_all(&mut self) {
        let leaving: Vec<_> = self
            .vrings
            .iter_mut()
            .enumerate()
            .filter_map(|(i, v)| v.thread.take().map(|t| (i, t.leave())))
            .collect();
        for (i, l) in leaving {
            self.vrings[i].base = l.wait();
        }
    }

    fn reset(&mut self) {
        self.stop_all();
        self.vrings = Vec::new();
        self.acked_features = 0;
        self.memory = Arc::new(GuestMemory::default());
        self.disk.note_guest_memory(0, 0);
        // A reset device starts its rings afresh; the frontend asks for a new region, and
        // gives a new log if it migrates.
        self.inflight = None;
        self.dirty = None;
        self.disk.reset_writeback();
    }
}

impl Drop for BlkDevice {
    fn drop(&mut self) {
        self.stop_all();
        self.disk.note_guest_memory(0, 0);
    }
}

impl VhostUserBackendReqHandlerMut for BlkDevice {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.disk.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let unknown = features & !self.disk.features();
        if unknown != 0 {
            warn_limited!(self.log(), parent: &self.disk.span, "frontend acked features we did not offer: {unknown:#x}");
            return Err(Error::InvalidParam);
        }
        let logging = features & feature::VHOST_LOG_ALL;
        if logging != self.acked_features & feature::VHOST_LOG_ALL {
            let state = if logging != 0 { "on (live migration)" } else { "off" };
            info_limited!(self.log(), parent: &self.disk.span, "dirty logging {state}");
        }
        self.acked_features = features;
        self.apply_running()
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let total = regions.iter().try_fold(0u64, |sum, r| sum.checked_add(r.memory_size));
        self.check_table(total, regions.len())?;
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files.iter()) {
            let region = MappedRegion::map(
                file,
                r.mmap_offset,
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                Some(Arc::clone(&self.hangup)),
            );
            mapped.push(region.map_err(|e| self.memory_error(e))?);
        }
        let memory = GuestMemory::from_regions(mapped).map_err(|e| self.memory_error(e))?;
        self.set_memory(memory)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let max = u32::from(self.disk.max_queue_size);
        if num == 0 || num > max || !num.is_power_of_two() {
            warn_limited!(self.log(), parent: &self.disk.span, "vring size {num} refused (power of two up to {max})");
            return Err(Error::InvalidParam);
        }
        self.vring(index)?;
        self.stop_thread(index as usize);
        self.vrings[index as usize].size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> Result<()> {
        let v = self.vring(index)?;
        // The LOG flag: writes to this ring's used ring are logged at `log` (a guest-physical
        // address in the dirty log's terms, not necessarily in guest memory).
        v.used_log_addr = flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG).then_some(log);
        v.addrs = Some(RingAddrs {
            desc_user_addr: descriptor,
            avail_user_addr: available,
            used_user_addr: used,
        });
        if self.vrings[index as usize].thread.is_some() {
            return self.apply(index as usize);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        // A split ring's base is its 16-bit avail index; a packed ring's carries both
        // positions and wrap counters in 32 bits (virtq::packed::split_base).
        if self.ring_format() == RingFormat::Split && base > u32::from(u16::MAX) {
            return Err(Error::InvalidParam);
        }
        self.vring(index)?;
        self.stop_thread(index as usize);
        self.vrings[index as usize].base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.vring(index)?;
        self.stop_thread(index as usize);
        let v = &mut self.vrings[index as usize];
        // The ring is stopped until the frontend sends a new kick.
        v.kick_set = false;
        v.kick = None;
        let base = v.base;
        let state = VhostUserVringState::new(index, base);
        debug!(parent: &self.disk.span, queue = index, base, "ring stopped");
        // Every ring stopped while the frontend logs dirty pages: the migration's switch-over.
        // The destination may now take the image; ours comes back if a ring restarts here.
        if self.acked_features & feature::VHOST_LOG_ALL != 0
            && self.vrings.iter().all(|v| v.thread.is_none())
        {
            // A mirror (migration without shared storage) has every write the guest was
            // answered for on its target already; it is made durable there now.
            if let Some(job) = self.disk.mirror.job() {
                job.switch_over();
            }
            match self.disk.inactivate() {
                Ok(true) => {
                    info_limited!(self.log(), parent: &self.disk.span, "gave up the image's write permission (migration switch-over)");
                }
                Ok(false) => {}
                Err(e) => {
                    warn_limited!(self.log(), parent: &self.disk.span, "kept the image's write permission at the switch-over: {e}");
                }
            }
        }
        Ok(state)
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?;
        let fd = self.vring_fd("kick", index, fd)?;
        let v = self.vring(u32::from(index))?;
        v.kick = fd;
        v.kick_set = true;
        self.apply(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?;
        let fd = self.vring_fd("call", index, fd)?;
        self.vring(u32::from(index))?.call = fd;
        if self.vrings[usize::from(index)].thread.is_some() {
            self.apply(usize::from(index))?;
        }
        // A completion published while the frontend switched call fds (a reconnect, a
        // migration, a reset) was signalled on the old fd or not at all: one interrupt on the
        // new one makes the guest look at its used ring, as QEMU's own backends do. A guest
        // with nothing new finds nothing; an eventfd write fails only on a counter that is
        // already pending.
        if let Some(call) = &self.vrings[usize::from(index)].call {
            let _ = (&*call).write(&1u64.to_ne_bytes());
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?;
        let fd = self.vring_fd("err", index, fd)?;
        self.vring(u32::from(index))?.err = fd;
        if self.vrings[usize::from(index)].thread.is_some() {
            return self.apply(usize::from(index));
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(u64::from(self.disk.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let v = self.vring(index)?;
        if v.enabled == enable {
            return Ok(());
        }
        v.enabled = enable;
        self.apply(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let space = self.disk.config_space();
        let start = offset as usize;
        let end = start.checked_add(size as usize).ok_or(Error::InvalidParam)?;
        space.get(start..end).map(<[u8]>::to_vec).ok_or(Error::InvalidParam)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        // The only writable field is the write-cache bit, and only with CONFIG_WCE.
        if offset as usize == WRITEBACK
            && buf.len() == 1
            && self.acked_features & feature::CONFIG_WCE != 0
        {
            self.disk.set_writeback(buf[0] != 0);
            return Ok(());
        }
        Err(Error::InvalidParam)
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("shared objects are not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        // A region we cannot give is answered with none (mmap_size 0, which QEMU takes as
        // "no inflight tracking"): the frontend goes on without it, and learns why from us.
        let no_region = VhostUserInflight { mmap_size: 0, mmap_offset: 0, ..*inflight };
        let created = self.inflight_geometry(inflight).and_then(|(num_queues, queue_size)| {
            InflightRegion::create(num_queues, queue_size, Some(Arc::clone(&self.hangup)))
                .map_err(|e| self.inflight_error(e))
                .map(|(region, file)| (region, file, num_queues, queue_size))
        });
        let Ok((region, file, num_queues, queue_size)) = created else {
            let file = inflight::no_region_file().map_err(Error::ReqHandlerError)?;
            return Ok((no_region, file));
        };
        let reply = VhostUserInflight {
            mmap_size: inflight::region_bytes(num_queues, queue_size),
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        // The frontend sends it back with SET_INFLIGHT_FD before starting rings; using it
        // now as well serves a frontend that does not.
        self.set_inflight(region)?;
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let (num_queues, queue_size) = self.inflight_geometry(inflight)?;
        let region = InflightRegion::map(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size,
            num_queues,
            queue_size,
            Some(Arc::clone(&self.hangup)),
        )
        .map_err(|e| self.inflight_error(e))?;
        self.set_inflight(region)
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        let total = self.memory.total_bytes().checked_add(region.memory_size);
        self.check_table(total, self.memory.regions().len() + 1)?;
        let mapped = MappedRegion::map(
            &fd,
            region.mmap_offset,
            region.guest_phys_addr,
            region.memory_size,
            region.user_addr,
            Some(Arc::clone(&self.hangup)),
        )
        .map_err(|e| self.memory_error(e))?;
        let memory = self.memory.with_region(mapped).map_err(|e| self.memory_error(e))?;
        let regions = memory.regions().len();
        self.set_memory(memory)?;
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        debug!(parent: &self.disk.span, regions, "memory region {gpa:#x}+{size:#x} added");
        Ok(None)
    }

    /// Takes a region out of the table. The queues restart on the table without it, each
    /// after its in-flight requests are answered (`set_memory`); the mapping goes when the
    /// last table holding it does, so nothing touches it once it is unmapped.
    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let memory = self.memory.without_region(gpa, size).map_err(|e| self.memory_error(e))?;
        let used = self.memory.regions().iter().any(|r| r.guest_phys_addr() == gpa && r.used());
        let regions = memory.regions().len();
        self.set_memory(memory)?;
        info_limited!(self.log(), parent: &self.disk.span, regions,
            "memory region {gpa:#x}+{size:#x} removed (guest requests used it: {})",
            if used { "yes" } else { "no" });
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(Error::InvalidOperation("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::InvalidOperation("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(Error::InvalidOperation("shared memory regions are not supported"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        // SET_LOG_BASE has no error reply (its reply echoes the request): a log we cannot use
        // ends the connection, so the frontend learns of it rather than migrate a guest whose
        // writes go unlogged.
        // At most the bitmap of the connection's max-guest-memory: the log is part of the
        // connection's budget, and cannot take the daemon-wide one from other tenants.
        let limit_bytes = dirty::max_log_bytes(self.disk.max_guest_memory_bytes);
        let hangup = Some(Arc::clone(&self.hangup));
        let mapped = DirtyLog::map(&file, log.mmap_offset, log.mmap_size, limit_bytes, hangup);
        let dirty = match mapped {
            Ok(d) if d.covers(self.memory.gpa_end()) => d,
            Ok(d) => {
                warn_limited!(self.log(), parent: &self.disk.span, "closing the connection: the dirty log ({} bytes) does not cover guest memory up to {:#x}", d.bytes(), self.memory.gpa_end());
                return Err(Error::InvalidMessage);
            }
            Err(e) => {
                warn_limited!(self.log(), parent: &self.disk.span, "closing the connection: dirty log: {e}");
                return Err(Error::InvalidMessage);
            }
        };
        self.dirty = Some(Arc::new(dirty));
        // Running rings go on with the new log (their in-flight requests finish on the old).
        if self.acked_features & feature::VHOST_LOG_ALL != 0 {
            self.apply_running()?;
        }
        Ok(())
    }
}
