//! [vhost-user] The control plane: the socket, feature and protocol negotiation, the memory
//! table, vring setup, config space, reconnects. It talks to I/O threads only by starting and
//! stopping them, never through a shared lock.

pub mod backend_channel;
pub mod device;
pub mod server;

pub use server::{
    apply_socket_access, bind_socket, open_to_others, ExportServer, SocketAccess, SocketOptions,
};
