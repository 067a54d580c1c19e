//! The backstop's reads of the whole connection table, off the acting thread. Reading `CONNS`
//! takes a syscall pair per entry (aya has no batch lookup): about 100 ms at 50,000 tracked
//! connections, and a burst of deadlines is exactly when the kernel's failure counters move
//! and ask for it. The acting thread asks (`request`), goes on acting, and takes the result
//! when the reader thread wakes it (`take`). The requests it hands on are marked ones, whose
//! deadline is usually still ahead when a read ends: the backstop then waits for it.

use std::{os::fd::OwnedFd, sync::mpsc, thread::JoinHandle};

use super::*;
use crate::loader::ConnsReader;

pub(super) struct Sweeper {
    ask: Option<mpsc::Sender<()>>,
    answers: mpsc::Receiver<(u64, Vec<ConnInfo>)>,
    /// A read is under way; `again`: another was asked for meanwhile.
    pending: bool,
    again: bool,
    handle: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Starts the reader thread; it wakes the acting thread through `wake` when a read is done.
    pub(super) fn start(reader: Arc<ConnsReader>, wake: Arc<OwnedFd>) -> anyhow::Result<Self> {
        let (ask, asked) = mpsc::channel::<()>();
        let (answer, answers) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("watchdog-sweep".into())
            .spawn(move || {
                for () in asked {
                    // Taken before the read: a request whose deadline passes during the read
                    // is not yet due by this clock, so the backstop re-reads it alone at once.
                    let at = now_ns();
                    let in_flight: Vec<ConnInfo> = reader
                        .records()
                        .into_iter()
                        .map(|r| r.info)
                        .filter(|c| c.state == watchdog_common::ReqState::InFlight as u32)
                        .collect();
                    if answer.send((at, in_flight)).is_err() {
                        return;
                    }
                    acting::wake(&wake);
                }
            })
            .context("starting the table reader thread")?;
        Ok(Self {
            ask: Some(ask),
            answers,
            pending: false,
            again: false,
            handle: Some(handle),
        })
    }

    /// Asks for a read of the whole table (once more after the current one, if one is under way).
    pub(super) fn request(&mut self) {
        if self.pending {
            self.again = true;
            return;
        }
        if let Some(ask) = &self.ask {
            self.pending = ask.send(()).is_ok();
        }
    }

    /// The in-flight entries of a finished read, and the time it began.
    pub(super) fn take(&mut self) -> Option<(u64, Vec<ConnInfo>)> {
        let answer = self.answers.try_recv().ok()?;
        self.pending = false;
        if std::mem::take(&mut self.again) {
            self.request();
        }
        Some(answer)
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.ask = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
