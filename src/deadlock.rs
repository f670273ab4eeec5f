//! Deadlocks: the wait-for graph of one `:threads` reading (thread → mutex it waits for →
//! the thread owning that mutex) searched for cycles.
//!
//! SBCL 2.2.9 checks for a cycle itself when a thread starts waiting on a mutex, and signals
//! `SB-THREAD:THREAD-DEADLOCK` in the thread that would close it; that thread then sits in the
//! debugger (or dies) still holding its own mutexes, and the others wait on forever. So an
//! edge is either a thread waiting on a mutex, or a thread in the debugger with a
//! THREAD-DEADLOCK, pointing at the mutex SBCL stopped it from waiting for (the agent reads it
//! from the condition's cycle): without those edges the cycle SBCL found would never show.
//!
//! A thread waits on at most one object, so each thread has at most one outgoing edge and
//! every cycle is found by following edges from each thread in turn (linear time).

use std::collections::HashMap;

use schemars::JsonSchema;
use serde::Serialize;

use crate::agent::reply::LispThread;

/// One edge of the wait-for graph: `tid` waits for (or was stopped waiting for) `mutex`,
/// which `owner_tid` holds.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct WaitEdge {
    pub tid: i32,
    pub name: Option<String>,
    /// The mutex's name ("" when unnamed).
    pub mutex: String,
    pub owner_tid: i32,
    pub owner_name: Option<String>,
    /// True when the thread is not waiting but sits in the debugger: SBCL signalled
    /// THREAD-DEADLOCK when it was about to wait for `mutex`.
    pub stopped_in_debugger: bool,
}

/// One cycle: each edge's owner is the next edge's thread, and the last edge's owner the
/// first edge's thread. It starts at its lowest tid.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Deadlock {
    pub threads: Vec<WaitEdge>,
}

impl Deadlock {
    /// `a -[m]-> b -[n]-> a`: the cycle in one line.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for e in &self.threads {
            out.push_str(&format!(
                "{} {} -[{:?}{}]-> ",
                e.tid,
                e.name.as_deref().unwrap_or("unnamed"),
                e.mutex,
                if e.stopped_in_debugger {
                    ", THREAD-DEADLOCK in debugger"
                } else {
                    ""
                }
            ));
        }
        if let Some(first) = self.threads.first() {
            out.push_str(&first.tid.to_string());
        }
        out
    }
}

/// The edges of the wait-for graph in one `:threads` reading: mutex waits whose owner is
/// known, and threads in the debugger with the mutex a THREAD-DEADLOCK stopped.
pub fn edges(threads: &[LispThread]) -> Vec<WaitEdge> {
    threads
        .iter()
        .filter_map(|t| {
            let tid = t.tid?;
            if t.waiting_for_type.as_deref() == Some("mutex")
                && let Some(owner) = t.owner_tid
            {
                return Some(WaitEdge {
                    tid,
                    name: t.name.clone(),
                    mutex: t.waiting_for.clone().unwrap_or_default(),
                    owner_tid: owner,
                    owner_name: t.owner_name.clone(),
                    stopped_in_debugger: false,
                });
            }
            let wanted = t.debugger.as_ref()?.wanted.as_ref()?;
            Some(WaitEdge {
                tid,
                name: t.name.clone(),
                mutex: wanted.waiting_for.clone().unwrap_or_default(),
                owner_tid: wanted.owner_tid?,
                owner_name: wanted.owner_name.clone(),
                stopped_in_debugger: true,
            })
        })
        .collect()
}

/// Every cycle of the graph, each once, ordered by their lowest tid. An edge whose thread
/// appears twice keeps the first (a reading lists each thread once).
pub fn cycles(edges: &[WaitEdge]) -> Vec<Deadlock> {
    let mut next: HashMap<i32, &WaitEdge> = HashMap::new();
    for e in edges {
        next.entry(e.tid).or_insert(e);
    }
    let mut starts: Vec<i32> = next.keys().copied().collect();
    starts.sort_unstable();
    // Which walk first reached each thread: a walk that meets an earlier walk's thread
    // cannot find a new cycle.
    let mut walked: HashMap<i32, usize> = HashMap::new();
    let mut found = Vec::new();
    for (walk, start) in starts.into_iter().enumerate() {
        let mut path: Vec<&WaitEdge> = Vec::new();
        let mut at = start;
        loop {
            match walked.get(&at) {
                Some(&w) if w == walk => {
                    // Back on this walk's own path: the cycle is the path from `at` on.
                    let from = path.iter().position(|e| e.tid == at).unwrap_or(0);
                    let mut cycle: Vec<WaitEdge> =
                        path[from..].iter().map(|e| (*e).clone()).collect();
                    let lowest = cycle
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, e)| e.tid)
                        .map_or(0, |(i, _)| i);
                    cycle.rotate_left(lowest);
                    found.push(Deadlock { threads: cycle });
                    break;
                }
                Some(_) => break,
                None => {}
            }
            walked.insert(at, walk);
            let Some(edge) = next.get(&at) else { break };
            path.push(edge);
            at = edge.owner_tid;
        }
    }
    found.sort_by_key(|d| d.threads.first().map(|e| e.tid));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(tid: i32, mutex: &str, owner: i32) -> WaitEdge {
        WaitEdge {
            tid,
            name: Some(format!("t{tid}")),
            mutex: mutex.into(),
            owner_tid: owner,
            owner_name: Some(format!("t{owner}")),
            stopped_in_debugger: false,
        }
    }

    fn tids(d: &Deadlock) -> Vec<i32> {
        d.threads.iter().map(|e| e.tid).collect()
    }

    #[test]
    fn no_edges_no_cycles() {
        assert!(cycles(&[]).is_empty());
    }

    #[test]
    fn a_wait_on_a_held_mutex_is_not_a_deadlock() {
        // 2 waits for 1, 3 waits for 2: a chain ending at a thread that waits for nothing.
        assert!(cycles(&[edge(2, "m", 1), edge(3, "n", 2)]).is_empty());
    }

    #[test]
    fn two_threads_in_opposite_lock_order() {
        let found = cycles(&[edge(20, "lock-a", 10), edge(10, "lock-b", 20)]);
        assert_eq!(found.len(), 1);
        assert_eq!(tids(&found[0]), [10, 20], "starts at the lowest tid");
        let mutexes: Vec<&str> = found[0].threads.iter().map(|e| e.mutex.as_str()).collect();
        assert_eq!(mutexes, ["lock-b", "lock-a"]);
        assert_eq!(
            found[0].describe(),
            "10 t10 -[\"lock-b\"]-> 20 t20 -[\"lock-a\"]-> 10"
        );
    }

    #[test]
    fn threads_waiting_on_a_cycle_are_not_part_of_it() {
        // 1 -> 2 -> 3 -> 1 is the cycle; 4 and 5 wait on its members; 6 -> 7 is a chain.
        let found = cycles(&[
            edge(4, "x", 2),
            edge(5, "y", 4),
            edge(1, "a", 2),
            edge(2, "b", 3),
            edge(3, "c", 1),
            edge(6, "z", 7),
        ]);
        assert_eq!(found.len(), 1);
        assert_eq!(tids(&found[0]), [1, 2, 3]);
    }

    #[test]
    fn separate_cycles_are_reported_separately() {
        let found = cycles(&[
            edge(9, "p", 8),
            edge(8, "q", 9),
            edge(3, "r", 5),
            edge(5, "s", 3),
        ]);
        assert_eq!(
            found.iter().map(tids).collect::<Vec<_>>(),
            [vec![3, 5], vec![8, 9]]
        );
    }

    #[test]
    fn a_thread_waiting_for_its_own_mutex_is_a_cycle_of_one() {
        let found = cycles(&[edge(7, "self", 7)]);
        assert_eq!(found.iter().map(tids).collect::<Vec<_>>(), [vec![7]]);
    }

    #[test]
    fn a_duplicate_thread_keeps_its_first_edge() {
        let found = cycles(&[edge(1, "a", 2), edge(1, "z", 9), edge(2, "b", 1)]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].threads[0].mutex, "a");
    }

    #[test]
    fn edges_come_from_waits_with_owners_and_from_thread_deadlock_in_the_debugger() {
        let s = crate::wire::Sexp::parse(
            r#"((:tid 1 :name "waiter" :alive t :main nil :waiting-for "m" :waiting-for-type "mutex"
                 :waiting-for-id 1 :owner-tid 2 :owner-name "holder" :waiting-seconds 3.5)
                (:tid 2 :name "holder" :alive t :main nil :waiting-for nil :waiting-for-type nil
                 :debugger (:type "SB-THREAD:THREAD-DEADLOCK" :message "Deadlock cycle detected"
                            :found-by "sb-debug:*debug-condition*"
                            :wanted (:waiting-for "n" :waiting-for-type "mutex" :waiting-for-id 2
                                     :owner-tid 1 :owner-name "waiter")))
                (:tid 3 :name "q" :alive t :main nil :waiting-for "work" :waiting-for-type "waitqueue"
                 :waiting-for-id 3)
                (:tid 4 :name "free" :alive t :main nil :waiting-for "gone" :waiting-for-type "mutex"
                 :waiting-for-id 4 :owner-tid nil))"#,
        )
        .unwrap();
        let threads: Vec<LispThread> = crate::wire::from_sexp(&s).unwrap();
        let e = edges(&threads);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(
            (e[0].tid, e[0].owner_tid, e[0].stopped_in_debugger),
            (1, 2, false)
        );
        assert_eq!(
            (e[1].tid, e[1].mutex.as_str(), e[1].stopped_in_debugger),
            (2, "n", true)
        );
        assert_eq!(threads[0].waiting_seconds, Some(3.5));
        let found = cycles(&e);
        assert_eq!(found.len(), 1);
        assert_eq!(tids(&found[0]), [1, 2]);
    }
}
