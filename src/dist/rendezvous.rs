//! The rendezvous: rank 0 makes the communicator's unique id (NCCL's is 128 bytes) and serves it
//! over TCP at MASTER_ADDR:MASTER_PORT; every other rank connects (retrying while rank 0 starts),
//! says who it is, and receives the id. Each side checks the other: a world size that differs, a
//! rank out of range or taken twice ends both with one clear line; a rank that never comes ends
//! rank 0 at the timeout naming the missing ranks, and a rank 0 that never answers ends the others.
//!
//! Wire format (little endian): hello = b"LWRV", version u32, world u32, rank u32; answer =
//! b"LWRV", status u32 (0 ok, else an error code), rank 0's world u32, then on success the id.

use crate::error::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Bytes of a unique id (NCCL's `ncclUniqueId`).
pub const ID_BYTES: usize = 128;
/// A communicator's unique id.
pub type Id = [u8; ID_BYTES];

const MAGIC: &[u8; 4] = b"LWRV";
const VERSION: u32 = 1;
const OK: u32 = 0;
const WORLD_DIFFERS: u32 = 1;
const RANK_OUT_OF_RANGE: u32 = 2;
const RANK_TAKEN: u32 = 3;

/// Rank 0: serves `id` to the other `world - 1` ranks on `port` (all interfaces), waiting at most
/// `timeout` for all of them.
pub fn serve(port: u16, world: usize, id: &Id, timeout: Duration) -> Result<()> {
    if world <= 1 {
        return Ok(());
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| match e.kind() {
        ErrorKind::AddrInUse => Error::user(format!(
            "--master-port {port}: the port is in use on this host (another run?): choose another"
        )),
        _ => Error::user(format!(
            "--master-port {port}: rank 0 cannot listen there: {e}"
        )),
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Other(format!("rendezvous on port {port}: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut joined = vec![false; world];
    joined[0] = true;
    let mut waiting = world - 1;
    while waiting > 0 {
        let (mut s, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (0..world)
                        .filter(|&r| !joined[r])
                        .map(|r| r.to_string())
                        .collect();
                    return Err(Error::Other(format!(
                        "rendezvous on port {port}: {} of {} ranks joined in {:.0} s; missing rank(s) {}",
                        world - 1 - waiting,
                        world - 1,
                        timeout.as_secs_f64(),
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(Error::Other(format!("rendezvous on port {port}: {e}"))),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let hello = read_hello(&mut s, left.max(Duration::from_millis(100)));
        let Ok((their_world, rank)) = hello else {
            // Not one of ours (a port scan, a half-open connection): ignore it.
            continue;
        };
        let status = if their_world != world {
            WORLD_DIFFERS
        } else if rank == 0 || rank >= world {
            RANK_OUT_OF_RANGE
        } else if joined[rank] {
            RANK_TAKEN
        } else {
            OK
        };
        let mut answer = Vec::with_capacity(12 + ID_BYTES);
        answer.extend_from_slice(MAGIC);
        answer.extend_from_slice(&status.to_le_bytes());
        answer.extend_from_slice(&(world as u32).to_le_bytes());
        if status == OK {
            answer.extend_from_slice(id);
        }
        let _ = s.write_all(&answer);
        match status {
            OK => {
                joined[rank] = true;
                waiting -= 1;
            }
            WORLD_DIFFERS => {
                return Err(Error::user(format!(
                    "rendezvous: rank {rank} (from {peer}) was started with a world size of {their_world}, rank 0 with {world}"
                )))
            }
            RANK_TAKEN => {
                return Err(Error::user(format!(
                    "rendezvous: two processes say they are rank {rank} (the second from {peer})"
                )))
            }
            _ => {
                return Err(Error::user(format!(
                    "rendezvous: a process from {peer} says it is rank {rank} in a world of {world}"
                )))
            }
        }
    }
    Ok(())
}

fn read_hello(s: &mut TcpStream, timeout: Duration) -> std::io::Result<(usize, usize)> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(timeout))?;
    let mut b = [0u8; 16];
    s.read_exact(&mut b)?;
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if &b[..4] != MAGIC || word(4) != VERSION {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a hello"));
    }
    Ok((word(8) as usize, word(12) as usize))
}

/// Rank `rank` > 0: fetches the id from rank 0 at `addr:port`, trying for at most `timeout`.
pub fn join(addr: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<Id> {
    let deadline = Instant::now() + timeout;
    let target = format!("{addr}:{port}");
    let unreachable = |why: String| {
        Error::Other(format!(
            "rendezvous: rank {rank} could not reach rank 0 at {target} in {:.0} s ({why}); is rank 0 running, and MASTER_ADDR/MASTER_PORT the same for every rank?",
            timeout.as_secs_f64()
        ))
    };
    let mut s = loop {
        let addrs: Vec<SocketAddr> = match (addr, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                return Err(Error::user(format!(
                    "--master-addr {addr}: cannot resolve the host: {e}"
                )))
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let mut last = String::from("no address");
        let mut got = None;
        for a in &addrs {
            match TcpStream::connect_timeout(
                a,
                left.clamp(Duration::from_millis(10), Duration::from_secs(2)),
            ) {
                Ok(s) => {
                    got = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        if let Some(s) = got {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(unreachable(last));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let io = |e: std::io::Error| unreachable(e.to_string());
    s.set_read_timeout(Some(left.max(Duration::from_millis(100))))
        .map_err(io)?;
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    for w in [VERSION, world as u32, rank as u32] {
        hello.extend_from_slice(&w.to_le_bytes());
    }
    s.write_all(&hello).map_err(io)?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(io)?;
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if &head[..4] != MAGIC {
        return Err(Error::user(format!(
            "rendezvous: {target} answered, but it is not a lewel rank 0 (MASTER_PORT used by something else?)"
        )));
    }
    let (status, their_world) = (word(4), word(8));
    match status {
        OK => {
            let mut id = [0u8; ID_BYTES];
            s.read_exact(&mut id).map_err(io)?;
            Ok(id)
        }
        WORLD_DIFFERS => Err(Error::user(format!(
            "rendezvous: rank 0 at {target} runs a world of {their_world}; this process (rank {rank}) was told {world}"
        ))),
        RANK_TAKEN => Err(Error::user(format!(
            "rendezvous: rank {rank} has joined already at {target}: two processes were given rank {rank}"
        ))),
        _ => Err(Error::user(format!(
            "rendezvous: rank {rank} does not exist in rank 0's world of {their_world}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port free a moment ago.
    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn id() -> Id {
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        id
    }

    #[test]
    fn every_rank_gets_rank_zeros_id() {
        let port = free_port();
        let world = 4;
        // Ranks may start before rank 0: they retry.
        let peers: Vec<_> = (1..world)
            .map(|r| {
                std::thread::spawn(move || {
                    join("127.0.0.1", port, r, world, Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        serve(port, world, &id(), Duration::from_secs(20)).unwrap();
        for p in peers {
            assert_eq!(p.join().unwrap(), id());
        }
    }

    #[test]
    fn a_world_size_that_differs_ends_both() {
        let port = free_port();
        let peer = std::thread::spawn(move || {
            join("127.0.0.1", port, 1, 3, Duration::from_secs(20)).unwrap_err()
        });
        let e = serve(port, 2, &id(), Duration::from_secs(20)).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("rank 1 (from 127.0.0.1:")
                && e.to_string().contains("world size of 3, rank 0 with 2"),
            "{e}"
        );
        let pe = peer.join().unwrap();
        assert!(
            pe.to_string()
                .contains("runs a world of 2; this process (rank 1) was told 3"),
            "{pe}"
        );
    }

    #[test]
    fn the_same_rank_twice_ends_rank_zero() {
        let port = free_port();
        let peers: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || join("127.0.0.1", port, 1, 3, Duration::from_secs(5)))
            })
            .collect();
        let e = serve(port, 3, &id(), Duration::from_secs(20)).unwrap_err();
        assert!(
            e.to_string().contains("two processes say they are rank 1"),
            "{e}"
        );
        let results: Vec<_> = peers.into_iter().map(|p| p.join().unwrap()).collect();
        assert!(
            results.iter().any(|r| r.is_ok()),
            "the first rank 1 got the id"
        );
        assert!(results.iter().any(|r| r
            .as_ref()
            .is_err_and(|e| e.to_string().contains("has joined already"))));
    }

    #[test]
    fn a_missing_rank_times_out_with_its_number() {
        let port = free_port();
        let peer = std::thread::spawn(move || {
            join("127.0.0.1", port, 2, 3, Duration::from_secs(20)).unwrap()
        });
        let t = Instant::now();
        let e = serve(port, 3, &id(), Duration::from_secs(1)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(
            e.to_string().contains("1 of 2 ranks joined")
                && e.to_string().ends_with("missing rank(s) 1"),
            "{e}"
        );
        assert_eq!(peer.join().unwrap(), id());
    }

    #[test]
    fn no_rank_zero_times_out_and_a_busy_port_is_refused() {
        let port = free_port();
        let t = Instant::now();
        let e = join("127.0.0.1", port, 1, 2, Duration::from_millis(500)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(
            e.to_string()
                .contains("could not reach rank 0 at 127.0.0.1:"),
            "{e}"
        );
        let busy = TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let p = busy.local_addr().unwrap().port();
        let e = serve(p, 2, &id(), Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .starts_with(&format!("--master-port {p}: the port is in use")),
            "{e}"
        );
        let e = join("no-such-host.invalid", 1, 1, 2, Duration::from_secs(1)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--master-addr no-such-host.invalid"),
            "{e}"
        );
    }
}
