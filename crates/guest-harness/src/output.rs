//! Collects the lines a child writes to one pipe (a reader thread per pipe) and lets tests wait
//! for a line with a deadline.
//!
//! Guest output is untrusted: a line longer than [`MAX_LINE`] is split, and only the last
//! [`MAX_LINES`] lines are kept, so a guest that floods its console cannot exhaust the host.

use std::collections::{HashSet, VecDeque};
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

pub const MAX_LINE: usize = 16 * 1024;
pub const MAX_LINES: usize = 100_000;

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<String>,
    /// Absolute index of `lines[0]` (lines dropped from the front so far).
    first: usize,
    /// Absolute indices of lines `wait_for` has returned.
    returned: HashSet<usize>,
    partial: Vec<u8>,
    eof: bool,
}

impl State {
    fn push(&mut self, bytes: &[u8]) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        self.lines
            .push_back(String::from_utf8_lossy(bytes).into_owned());
        if self.lines.len() > MAX_LINES {
            self.lines.pop_front();
            self.returned.remove(&self.first);
            self.first += 1;
        }
    }
}

/// What [`Lines::wait_for`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    Found(String),
    /// The writer closed the pipe without printing a matching line.
    Eof,
    Timeout,
}

#[derive(Debug, Default)]
pub struct Lines {
    state: Mutex<State>,
    changed: Condvar,
}

impl Lines {
    /// Starts a thread that reads `source` until end of file. The thread is never joined: it
    /// ends when the child's pipe closes, which dropping a `GuestVm` causes by killing it.
    pub fn collect<R: Read + Send + 'static>(mut source: R) -> Arc<Self> {
        let lines = Arc::new(Self::default());
        let writer = lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = match source.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                if n == 0 {
                    writer.finish();
                    return;
                }
                writer.feed(&buf[..n]);
            }
        });
        lines
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a test thread panicked while holding it; the data is fine.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn feed(&self, bytes: &[u8]) {
        let mut state = self.lock();
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut state.partial);
                state.push(&line);
            } else {
                state.partial.push(b);
                if state.partial.len() >= MAX_LINE {
                    let line = std::mem::take(&mut state.partial);
                    state.push(&line);
                }
            }
        }
        self.changed.notify_all();
    }

    pub fn finish(&self) {
        let mut state = self.lock();
        if !state.partial.is_empty() {
            let line = std::mem::take(&mut state.partial);
            state.push(&line);
        }
        state.eof = true;
        self.changed.notify_all();
    }

    /// The first line containing `pattern` that no earlier call returned.
    pub fn wait_for(&self, pattern: &str, deadline: Instant) -> Wait {
        let mut state = self.lock();
        let mut searched = state.first;
        loop {
            let start = searched.max(state.first);
            let end = state.first + state.lines.len();
            for index in start..end {
                if !state.returned.contains(&index)
                    && state.lines[index - state.first].contains(pattern)
                {
                    state.returned.insert(index);
                    return Wait::Found(state.lines[index - state.first].clone());
                }
            }
            searched = end;
            if state.eof {
                return Wait::Eof;
            }
            let now = Instant::now();
            if now >= deadline {
                return Wait::Timeout;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the writer closed the pipe; false on timeout.
    pub fn wait_eof(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        while !state.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub fn all(&self) -> Vec<String> {
        let state = self.lock();
        let mut lines: Vec<String> = state.lines.iter().cloned().collect();
        if !state.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&state.partial).into_owned());
        }
        lines
    }

    /// The last `n` lines (with any unterminated one), for error messages.
    pub fn tail(&self, n: usize) -> String {
        let all = self.all();
        all[all.len().saturating_sub(n)..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[test]
    fn returns_each_matching_line_once_in_order() {
        let lines = Lines::default();
        lines.feed(b"boot\r\nA 1\nB\nA 2\npart");
        assert_eq!(lines.wait_for("B", soon()), Wait::Found("B".into()));
        assert_eq!(lines.wait_for("A", soon()), Wait::Found("A 1".into()));
        assert_eq!(lines.wait_for("A", soon()), Wait::Found("A 2".into()));
        assert_eq!(lines.wait_for("A", soon()), Wait::Timeout);
        assert_eq!(
            lines.wait_for("part", soon()),
            Wait::Timeout,
            "an unterminated line is not yet a line"
        );
        lines.finish();
        assert_eq!(lines.wait_for("part", soon()), Wait::Found("part".into()));
        assert_eq!(lines.wait_for("zzz", soon()), Wait::Eof);
        assert_eq!(lines.all(), ["boot", "A 1", "B", "A 2", "part"]);
        assert_eq!(lines.tail(2), "A 2\npart");
    }

    #[test]
    fn wakes_a_waiter_when_the_line_arrives() {
        let lines = Arc::new(Lines::default());
        let writer = lines.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            writer.feed(b"late line\n");
        });
        let found = lines.wait_for("late", Instant::now() + Duration::from_secs(10));
        assert_eq!(found, Wait::Found("late line".into()));
        t.join().unwrap();
    }

    #[test]
    fn bounds_flooding_output() {
        let lines = Lines::default();
        lines.feed(&vec![b'x'; MAX_LINE * 2 + 5]);
        lines.finish();
        let all = lines.all();
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|l| l.len() <= MAX_LINE));

        let lines = Lines::default();
        lines.feed("a\n".repeat(MAX_LINES + 10).as_bytes());
        lines.feed(b"needle\n");
        assert_eq!(lines.all().len(), MAX_LINES);
        assert_eq!(
            lines.wait_for("needle", soon()),
            Wait::Found("needle".into())
        );
    }

    #[test]
    fn collects_from_a_reader_until_eof() {
        let lines = Lines::collect(&b"one\ntwo"[..]);
        assert!(lines.wait_eof(Instant::now() + Duration::from_secs(10)));
        assert_eq!(lines.all(), ["one", "two"]);
    }
}
