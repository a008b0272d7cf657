//! The set-up conversation with a backend: handshake, session (features, memory table,
//! inflight region) and vrings, in the order libvhost-user and rust-vmm backends expect.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{
    is_disconnect, vu, Conn, InflightInfo, Kind, MemRegionLabel, VhostUserDevice, VhostUserState,
    BLK_CONFIG_SIZE, PROTOCOL_WANTED,
};
use crate::Error;

impl VhostUserDevice {
    /// Features, protocol features, owner, and the device config cache.
    /// A disk whose backend offers BACKEND_REQ also gets a new backend request channel
    /// (replacing `channel`).
    pub(super) fn handshake(
        &self,
        frontend: &mut Frontend,
        st: &mut VhostUserState,
        channel: &mut Option<UnixStream>,
    ) -> Result<(), Error> {
        let features = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        st.backend_features = features;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & PROTOCOL_WANTED;
            if self.kind != Kind::Block {
                // A net device's config space is the VMM's own: nothing to be told about.
                protocol.remove(VhostUserProtocolFeatures::BACKEND_REQ);
            }
            frontend
                .set_protocol_features(protocol)
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        st.protocol_features = protocol.bits();
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        if self.kind == Kind::Block && protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let buf = [0u8; BLK_CONFIG_SIZE];
            let (_, config) = frontend
                .get_config(
                    0,
                    BLK_CONFIG_SIZE as u32,
                    VhostUserConfigFlags::WRITABLE,
                    &buf,
                )
                .map_err(vu("GET_CONFIG"))?;
            st.config = config;
        }
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            match self.open_backend_req(frontend, channel) {
                Err(e) if is_disconnect(&e) => return Err(e),
                // The device works without: a grown disk then shows on the next connection.
                Err(e) => log::warn!(
                    "vhost-user {}: no backend request channel: {e}",
                    self.socket.display()
                ),
                Ok(()) => {}
            }
        }
        Ok(())
    }

    pub(super) fn protocol(st: &VhostUserState) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::from_bits_truncate(st.protocol_features)
    }

    pub(super) fn hva(&self, gpa: u64) -> Result<u64, Error> {
        self.memory
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| Error::QueueAddress {
                index: 0,
                addr: gpa,
            })
    }

    /// The features to SET_FEATURES: the driver's, less those the VMM provides itself (net
    /// MAC and status), plus vhost-user's protocol-features bit where offered.
    pub(super) fn backend_ack(st: &VhostUserState) -> u64 {
        let mut features = st.acked_features & st.backend_features;
        if st.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        features
    }

    /// `gpa` in the backend's address labels (see [`VhostUserState::mem_table`]).
    pub(super) fn label(st: &VhostUserState, gpa: u64) -> Result<u64, Error> {
        st.mem_table
            .iter()
            .find(|r| gpa >= r.guest_phys_addr && gpa - r.guest_phys_addr < r.size)
            .map(|r| r.userspace_addr + (gpa - r.guest_phys_addr))
            .ok_or(Error::QueueAddress {
                index: 0,
                addr: gpa,
            })
    }

    /// Features, memory table, inflight region (once per connection) and every vring: the
    /// whole data-path set-up.
    pub(super) fn start_vrings(&self, conn: &mut Conn) -> Result<(), Error> {
        let Conn {
            frontend,
            session_ready,
            state: st,
            inflight_file,
            queues,
            ..
        } = conn;
        let frontend = frontend.as_mut().ok_or(Error::Disconnected)?;
        if !*session_ready {
            self.start_session(frontend, st, inflight_file)?;
            *session_ready = true;
        }
        for (vring, queue) in st.vrings.iter().zip(queues.iter()) {
            let i = vring.index;
            let c = vring.config;
            frontend
                .set_vring_num(i, c.size)
                .map_err(vu("SET_VRING_NUM"))?;
            frontend
                .set_vring_base(i, vring.base)
                .map_err(vu("SET_VRING_BASE"))?;
            let addr = VringConfigData {
                queue_max_size: self.queue_size,
                queue_size: c.size,
                flags: 0,
                desc_table_addr: Self::label(st, c.desc)?,
                used_ring_addr: Self::label(st, c.used)?,
                avail_ring_addr: Self::label(st, c.avail)?,
                log_addr: None,
            };
            frontend
                .set_vring_addr(i, &addr)
                .map_err(vu("SET_VRING_ADDR"))?;
            frontend
                .set_vring_call(i, &queue.call)
                .map_err(vu("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(i, &queue.kick)
                .map_err(vu("SET_VRING_KICK"))?;
        }
        if st.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for vring in &st.vrings {
                frontend
                    .set_vring_enable(vring.index, true)
                    .map_err(vu("SET_VRING_ENABLE"))?;
            }
        }
        // A kick the previous backend (or the paused ring) consumed would otherwise be lost:
        // requests already in the avail ring would wait for the guest's next kick. A spurious
        // kick only makes the backend look at the ring.
        for queue in queues.iter() {
            let _ = queue.kick.write(1);
        }
        Ok(())
    }

    pub(super) fn start_session(
        &self,
        frontend: &mut Frontend,
        st: &mut VhostUserState,
        inflight_file: &mut Option<File>,
    ) -> Result<(), Error> {
        let protocol = Self::protocol(st);
        let features = Self::backend_ack(st);
        frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES"))?;
        let regions = self
            .memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(vu("SET_MEM_TABLE"))?;
        frontend
            .set_mem_table(&regions)
            .map_err(vu("SET_MEM_TABLE"))?;
        st.mem_table = regions
            .iter()
            .map(|r| MemRegionLabel {
                guest_phys_addr: r.guest_phys_addr,
                size: r.memory_size,
                userspace_addr: r.userspace_addr,
            })
            .collect();
        if protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if inflight_file.is_none() {
                let ask = VhostUserInflight::new(0, 0, self.num_queues as u16, self.queue_size);
                let (info, file) = frontend
                    .get_inflight_fd(&ask)
                    .map_err(vu("GET_INFLIGHT_FD"))?;
                st.inflight = Some(InflightInfo {
                    mmap_size: info.mmap_size,
                    mmap_offset: info.mmap_offset,
                    num_queues: info.num_queues,
                    queue_size: info.queue_size,
                });
                *inflight_file = Some(file);
            }
            if let (Some(info), Some(file)) = (st.inflight, inflight_file.as_ref()) {
                let msg = VhostUserInflight::new(
                    info.mmap_size,
                    info.mmap_offset,
                    info.num_queues,
                    info.queue_size,
                );
                frontend
                    .set_inflight_fd(&msg, file.as_raw_fd())
                    .map_err(vu("SET_INFLIGHT_FD"))?;
            }
        }
        Ok(())
    }

    /// Vring bases after a crash: what the guest sees as used is where the backend resumes.
    pub(super) fn bases_from_used_ring(&self, st: &mut VhostUserState) {
        for vring in &mut st.vrings {
            let addr = GuestAddress(vring.config.used + 2);
            if let Ok(idx) = self.memory.read_obj::<u16>(addr) {
                vring.base = idx;
            }
        }
    }
}
