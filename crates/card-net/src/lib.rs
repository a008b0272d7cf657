//! Card networking: the part of the card that carries a VM's Ethernet frames to VMs on other
//! hosts through a Geneve overlay, spraying each flow over several underlay paths
//! (US 10225193: encapsulation with congestion-aware path balancing; the idea of AWS SRD).
//!
//! ```text
//!  TAP (VM NIC) ─► table (anti-spoofing, MAC → host) ─► path (hash | spray | adaptive)
//!       ▲                                                    │ geneve encap + option
//!       │                                                    ▼
//!  reorder (per flow, timeout) ◄─ table (VNI, source) ◄─ geneve decap ◄─ UDP 6081 (underlay)
//! ```
//!
//! - [`geneve`]: RFC 8926 header and our option (sequence, path, timestamps); hostile input.
//! - [`table`]: virtual networks, local VM ports, remote MAC → host mappings, anti-spoofing.
//! - [`path`]: path selection policies and per-path congestion state (pure, injected clock).
//! - [`reorder`]: receiver-side per-flow reorder buffer with a short timeout, bounded.
//! - [`frag`]: large (TSO) frames cut into datagrams and rebuilt after reordering.
//! - [`vnet`]: the virtio-net header (checksum/segmentation offload) of TAP frames.
//! - [`counters`]: per-path and per-NIC atomic counters and RTT/reorder histograms.
//! - [`flow`]: inner frame classification (flow hash) shared by sender and anti-spoofing.
//! - [`sys`]: the unsafe wrappers (TAP with offloads, `sendmmsg`/`recvmmsg` with UDP GSO/GRO
//!   and the outer TOS/ECN, socket options, network namespaces).
//! - [`dataplane`]: the worker loop joining a TAP to the underlay.
//! - [`vport`]: a VM's NIC as a vhost-user-net backend, read and written like a TAP.
//! - [`nic`]: the dataplane's local port, a virtual port or a TAP.

pub mod counters;
pub mod dataplane;
mod echo;
pub mod flow;
pub mod frag;
pub mod geneve;
pub mod nic;
pub mod path;
pub mod reorder;
pub mod sys;
pub mod table;
pub mod vnet;
pub mod vport;
