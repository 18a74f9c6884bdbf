//! Userspace copy engine: one buffer per direction, allocated when the
//! first byte arrives. Each chunk is copied twice (kernel → buffer →
//! kernel).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;

use super::{shutdown_write, PumpError, Side};

/// Buffer per direction. Small buffers cost throughput badly; 64 KiB
/// matches a default pipe.
const BUF_SIZE: usize = 64 * 1024;

/// Copy `src` → `dst` until EOF, then shut down writing on `dst`.
pub async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    (from, to): (Side, Side),
    count: &AtomicU64,
) -> Result<(), PumpError> {
    let read_err = |source| PumpError::Read { side: from, source };
    let mut buf = Vec::new();
    loop {
        src.readable().await.map_err(read_err)?;
        if buf.is_empty() {
            buf = vec![0u8; BUF_SIZE];
        }
        let n = match src.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(read_err(e)),
        };
        write_all(dst, &buf[..n], count)
            .await
            .map_err(|source| PumpError::Write { side: to, source })?;
    }
    shutdown_write(dst);
    Ok(())
}

pub(super) async fn write_all(
    dst: &TcpStream,
    mut data: &[u8],
    count: &AtomicU64,
) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => {
                data = &data[n..];
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
