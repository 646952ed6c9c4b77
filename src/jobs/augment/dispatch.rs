//! The work queue between the plan and the engines: workers ([`super::local`],
//! [`super::remote`]) take tasks from a [`Dispatch`] in plan order and send
//! back an [`Outcome`] each.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use super::plan::Task;
use crate::error::Error;
use crate::pipeline::request::SynthesisParameters;

/// A finished synthesis, before it is written.
pub struct Generated {
    pub task: Task,
    /// The encoded image.
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub score: Option<f32>,
    pub parameters: SynthesisParameters,
    /// The server that made it (remote mode).
    pub server: Option<String>,
    /// Milliseconds by stage.
    pub timings: BTreeMap<String, f64>,
}

/// What a worker reports.
pub enum Outcome {
    Done(Box<Generated>),
    /// The source cannot be used (bad input); its other tasks are dropped.
    BadSource {
        source: usize,
        reason: String,
    },
    /// This output could not be made (not the input's fault); a rerun retries it.
    Failed {
        task: Task,
        reason: String,
    },
    /// Nothing more can be done (no server answers, a model error).
    Fatal(Error),
}

/// The work queue the workers share: tasks are taken in plan order, a
/// task that failed for a transient reason goes back to the front.
pub struct Dispatch {
    state: Mutex<DispatchState>,
    cv: Condvar,
    /// Set when the job stops early (fatal error).
    pub stop: AtomicBool,
    /// Answers 429 / 503 that were waited out and retried.
    pub retried_busy: AtomicU64,
    /// Requests moved to another server after a connection failure.
    pub failed_over: AtomicU64,
}

struct DispatchState {
    queue: VecDeque<Task>,
    in_flight: usize,
    bad_sources: HashSet<usize>,
}

impl Dispatch {
    pub(super) fn new(tasks: Vec<Task>) -> Self {
        Self {
            state: Mutex::new(DispatchState {
                queue: tasks.into(),
                in_flight: 0,
                bad_sources: HashSet::new(),
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            retried_busy: AtomicU64::new(0),
            failed_over: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DispatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next tasks: the first in the queue and up to `max - 1` more that
    /// `same` groups with it. Waits while the queue is empty but tasks are in
    /// flight (they may come back); `None` when everything is done.
    pub fn take(&self, max: usize, same: impl Fn(&Task, &Task) -> bool) -> Option<Vec<Task>> {
        let mut st = self.lock();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            while let Some(t) = st.queue.front() {
                if st.bad_sources.contains(&t.source) {
                    st.queue.pop_front();
                } else {
                    break;
                }
            }
            if let Some(first) = st.queue.pop_front() {
                let mut group = vec![first];
                while group.len() < max {
                    match st.queue.front() {
                        Some(t) if same(&group[0], t) => {
                            group.push(st.queue.pop_front().expect("front exists"))
                        }
                        _ => break,
                    }
                }
                st.in_flight += group.len();
                return Some(group);
            }
            if st.in_flight == 0 {
                return None;
            }
            st = self
                .cv
                .wait_timeout(st, std::time::Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// `n` taken tasks are finished (whatever their outcome).
    pub fn finish(&self, n: usize) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(n);
        self.cv.notify_all();
    }

    /// A taken task goes back to the front of the queue.
    pub fn retry(&self, task: Task) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.queue.push_front(task);
        self.cv.notify_all();
    }

    /// Drop the queued tasks of a bad source.
    pub fn bad_source(&self, source: usize) {
        self.lock().bad_sources.insert(source);
    }

    /// Whether every task is done (nothing queued or in flight).
    pub fn finished(&self) -> bool {
        let st = self.lock();
        st.in_flight == 0 && st.queue.iter().all(|t| st.bad_sources.contains(&t.source))
    }

    /// Stop every worker.
    pub fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
}
