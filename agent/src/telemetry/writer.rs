//! The log's writer: lines are appended to a shared buffer and written to stdout in batches by
//! a thread of their own, so that a slow stdout never stalls a proxy and a busy agent does not
//! wake a thread for every access record (the per-line handoff of a channel cost the agent
//! about a tenth of its CPU per connection). A batch is written at most `BATCH_DELAY` after its
//! first line; when the buffer holds `LIMIT` bytes (stdout stalled), loggers wait: no line is
//! dropped. A write that fails is reported on stderr with the bytes it lost; an exiting agent
//! waits at most `FLUSH_LIMIT` for the last batch.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

/// How long the first line of a batch may wait for others.
const BATCH_DELAY: Duration = Duration::from_millis(10);
/// Buffered bytes beyond which loggers wait for the writer.
const LIMIT: usize = 4 << 20;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled when the buffer stops being empty, or closes.
    filled: Condvar,
    /// Signalled when the writer has taken the buffer.
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hands out writers for `tracing_subscriber::fmt` (each event is one `write` of a whole line).
#[derive(Clone)]
pub(crate) struct BatchWriter(Arc<Shared>);

/// Stops the writer thread when dropped, after it has written every line logged before.
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// A writer to `out`, and the guard that flushes it.
    pub(crate) fn new(mut out: impl Write + Send + 'static) -> io::Result<(Self, Flush)> {
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new().name("log-writer".into()).spawn({
            let shared = shared.clone();
            move || {
                let mut spare = Vec::new();
                loop {
                    let mut buffer = shared.lock();
                    while buffer.bytes.is_empty() && !buffer.closed {
                        buffer = shared.filled.wait(buffer).unwrap_or_else(|e| e.into_inner());
                    }
                    let closed = buffer.closed;
                    if !closed {
                        // Let the batch fill: one write and one wakeup for many lines.
                        drop(buffer);
                        std::thread::sleep(BATCH_DELAY);
                        buffer = shared.lock();
                    }
                    std::mem::swap(&mut buffer.bytes, &mut spare);
                    drop(buffer);
                    shared.drained.notify_all();
                    if let Err(e) = out.write_all(&spare).and_then(|()| out.flush()) {
                        // The lines are gone; stderr is the one place left to say so.
                        eprintln!("ambit: writing the log to stdout failed, {} bytes lost: {e}", spare.len());
                    }
                    spare.clear();
                    if closed && shared.lock().bytes.is_empty() {
                        return;
                    }
                }
            }
        })?;
        Ok((Self(shared.clone()), Flush { shared, thread: Some(thread) }))
    }
}

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut buffer = self.0.lock();
        while buffer.bytes.len() >= LIMIT && !buffer.closed {
            buffer = self.0.drained.wait(buffer).unwrap_or_else(|e| e.into_inner());
        }
        let was_empty = buffer.bytes.is_empty();
        buffer.bytes.extend_from_slice(line);
        drop(buffer);
        if was_empty {
            self.0.filled.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// How long an exiting agent waits for the last lines to be written (a stdout that takes
/// longer is stuck, and must not keep the agent from ending).
const FLUSH_LIMIT: Duration = Duration::from_secs(2);

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.filled.notify_one();
        let deadline = std::time::Instant::now() + FLUSH_LIMIT;
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stdout that records what reached it and how many writes it took.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorded {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut r = self.0.lock().expect("lock");
            r.0.extend_from_slice(bytes);
            r.1 += 1;
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_in_few_writes_and_the_guard_flushes() {
        let out = Recorded::default();
        let (writer, flush) = BatchWriter::new(out.clone()).expect("thread");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        writer.write_all(format!("{t} {i}\n").as_bytes()).expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        drop(flush);
        let (bytes, writes) = out.0.lock().expect("lock").clone();
        let text = String::from_utf8(bytes).expect("utf-8");
        for t in 0..4 {
            let seen: Vec<usize> = text
                .lines()
                .filter_map(|l| {
                    l.split_once(' ').filter(|(w, _)| *w == t.to_string()).map(|(_, i)| i.parse().expect("n"))
                })
                .collect();
            assert_eq!(seen, (0..1000).collect::<Vec<_>>(), "thread {t}'s lines, all and in order");
        }
        assert!(writes < 400, "4,000 lines in {writes} writes");
    }
}
