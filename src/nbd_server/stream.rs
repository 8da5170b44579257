//! A client's connection as the server reads and writes it: a Unix or TCP socket, in clear
//! or (after NBD_OPT_STARTTLS) inside a TLS session.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The socket under everything.
pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection from another thread (an unexport, the daemon stopping): the
    /// connection's thread sees end of file or an error at its next read or write.
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// How long one read may wait (`None`: for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(t),
            Socket::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_write_timeout(t),
            Socket::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write_vectored(bufs),
            Socket::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The connection: clear, or TLS once STARTTLS succeeded.
pub enum Conn {
    Clear(Socket),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, Socket>>),
}

impl Conn {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// Writes `parts` as one message: a header and its payload leave in one system call in
    /// clear, and in one TLS record sequence otherwise.
    pub fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        match self {
            Conn::Clear(s) => write_all_vectored(s, parts),
            Conn::Tls(t) => {
                for p in parts {
                    t.write_all(p)?;
                }
                t.flush()
            }
        }
    }
}

/// Writes every byte of `parts`, in as few system calls as the socket takes.
fn write_all_vectored(s: &mut Socket, parts: &[&[u8]]) -> io::Result<()> {
    let mut skip: usize = 0;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    while skip < total {
        let mut left = skip;
        let mut slices = Vec::with_capacity(parts.len());
        for p in parts {
            if left >= p.len() {
                left -= p.len();
                continue;
            }
            slices.push(io::IoSlice::new(&p[left..]));
            left = 0;
        }
        match s.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => skip += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Clear(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}
