//! Event monitor (client side of the event streams): subscribes to several daemons at
//! once and merges their events in time order, as `bridge monitor` does for one bridge.
//!
//! [`Merger`] is the sans-IO part: a reorder buffer that releases a record once no
//! daemon can still publish an earlier one (each record waits `hold` after its own
//! timestamp). [`Monitor`] owns the sockets: one reader thread per daemon.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use crate::control::{self, ControlError, EventStream};
use crate::events::Record;

/// How long a record is held back for earlier ones from slower daemons: events are
/// published a little after their timestamp is taken (a quiesce is reported once the
/// disk lock is released, a resume once the VM is in the inventory).
pub const DEFAULT_HOLD: Duration = Duration::from_millis(100);

/// The control sockets in the runtime directory (every daemon's).
pub fn daemon_sockets() -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(control::runtime_dir())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("sock"))
        .collect();
    out.sort();
    Ok(out)
}

/// Every daemon this CLI reaches: the control sockets in the runtime directory, then the
/// remote daemons ([`control::remotes`]).
pub fn daemon_endpoints() -> Result<Vec<control::Endpoint>, ControlError> {
    let mut out: Vec<control::Endpoint> = daemon_sockets()?
        .into_iter()
        .map(control::Endpoint::Local)
        .collect();
    out.extend(
        control::remotes()?
            .into_iter()
            .map(|(name, addr)| control::Endpoint::Remote { name, addr }),
    );
    Ok(out)
}

/// Reorders records of several streams by timestamp (sans-IO).
#[derive(Debug)]
pub struct Merger {
    hold_us: u64,
    /// Min-heap by (t_us, arrival), so equal stamps keep their arrival order.
    heap: BinaryHeap<Reverse<(u64, u64, Ordered)>>,
    seq: u64,
}

/// A record ordered only by its place in the heap key.
#[derive(Debug)]
struct Ordered(Record);

impl PartialEq for Ordered {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Ordered {}
impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ordered {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Merger {
    pub fn new(hold: Duration) -> Merger {
        Merger {
            hold_us: hold.as_micros() as u64,
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub fn push(&mut self, r: Record) {
        self.seq += 1;
        self.heap.push(Reverse((r.t_us, self.seq, Ordered(r))));
    }

    /// Records old enough at `now_us` to be final, earliest first.
    pub fn pop_ready(&mut self, now_us: u64) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(Reverse((t, _, _))) = self.heap.peek() {
            if t.saturating_add(self.hold_us) > now_us {
                break;
            }
            if let Some(Reverse((_, _, Ordered(r)))) = self.heap.pop() {
                out.push(r);
            }
        }
        out
    }

    /// Everything still held, earliest first.
    pub fn drain(&mut self) -> Vec<Record> {
        self.pop_ready(u64::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// What a reader thread reports.
#[derive(Debug)]
pub enum Message {
    Event(Record),
    /// The stream of `source` ended: the daemon stopped (`None`), or dropped this
    /// subscriber or failed (`Some`).
    End {
        source: String,
        error: Option<ControlError>,
    },
}

/// Live event streams of several daemons.
pub struct Monitor {
    rx: mpsc::Receiver<Message>,
    closers: Vec<control::Closer>,
    threads: Vec<std::thread::JoinHandle<()>>,
    open: usize,
    sources: Vec<String>,
}

impl Monitor {
    /// Subscribes to every daemon in `paths`; returns once each has acknowledged, so
    /// every event they publish from now on is seen. A path without a daemon is an
    /// error unless `skip_dead`.
    pub fn open<E: Into<control::Endpoint> + Clone>(
        paths: &[E],
        skip_dead: bool,
    ) -> Result<Monitor, ControlError> {
        let (tx, rx) = mpsc::channel();
        let mut m = Monitor {
            rx,
            closers: Vec::new(),
            threads: Vec::new(),
            open: 0,
            sources: Vec::new(),
        };
        for p in paths {
            let stream = match EventStream::open(p.clone()) {
                Ok(s) => s,
                Err(ControlError::Connect { .. }) if skip_dead => continue,
                Err(e) => return Err(e),
            };
            m.add(stream, tx.clone())?;
        }
        Ok(m)
    }

    /// Subscribes to the daemon at `to` (a socket path or an endpoint).
    pub fn open_one(to: impl Into<control::Endpoint>) -> Result<Monitor, ControlError> {
        Self::open(&[to.into()], false)
    }

    fn add(&mut self, mut stream: EventStream, tx: mpsc::Sender<Message>) -> std::io::Result<()> {
        self.closers.push(stream.closer()?);
        self.open += 1;
        self.sources.push(stream.source().to_string());
        self.threads.push(
            std::thread::Builder::new()
                .name("events".into())
                .spawn(move || loop {
                    match stream.next_event() {
                        Ok(Some(r)) => {
                            if tx.send(Message::Event(r)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            let source = stream.source().to_string();
                            let _ = tx.send(Message::End {
                                source,
                                error: None,
                            });
                            return;
                        }
                        Err(e) => {
                            let source = stream.source().to_string();
                            let _ = tx.send(Message::End {
                                source,
                                error: Some(e),
                            });
                            return;
                        }
                    }
                })?,
        );
        Ok(())
    }

    /// The daemons subscribed to, by the names their records carry.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Streams still open.
    pub fn open_streams(&self) -> usize {
        self.open
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Message> {
        let m = self.rx.recv_timeout(timeout).ok()?;
        if matches!(m, Message::End { .. }) {
            self.open = self.open.saturating_sub(1);
        }
        Some(m)
    }

    /// Every record received until the streams have been quiet for `quiet`, in time
    /// order; the monitor closes.
    pub fn finish(mut self, quiet: Duration) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(m) = self.recv(quiet) {
            if let Message::Event(r) = m {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.t_us);
        out
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        for c in &self.closers {
            c.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;

    fn rec(t_us: u64, source: &str) -> Record {
        Record {
            t_us,
            source: source.into(),
            event: Event::FdbFlushed {
                entries: t_us as usize,
            },
        }
    }

    #[test]
    fn merger_releases_in_time_order_after_the_hold() {
        let mut m = Merger::new(Duration::from_micros(100));
        m.push(rec(1_000, "silo105"));
        m.push(rec(900, "silo104"));
        m.push(rec(1_000, "switch"));
        assert!(m.pop_ready(999).is_empty(), "nothing is old enough yet");
        let got: Vec<(u64, String)> = m
            .pop_ready(1_100)
            .into_iter()
            .map(|r| (r.t_us, r.source))
            .collect();
        assert_eq!(
            got,
            vec![
                (900, "silo104".into()),
                (1_000, "silo105".into()),
                (1_000, "switch".into())
            ]
        );
        m.push(rec(5_000, "switch"));
        assert!(m.pop_ready(5_050).is_empty());
        assert_eq!(m.drain().len(), 1);
        assert!(m.is_empty());
    }
}
