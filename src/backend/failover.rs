//! The addresses of one catalog, tried in turn: a request goes to the address that answered
//! last, then to each of the others, until one answers. When none does, the error names every
//! address and why it failed. Consul's and etcd's clients go through it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What one address made of a request.
pub enum Attempt<T, E> {
    /// It answered.
    Answer(T),
    /// It did not answer (refused, timed out, broken): the next address is tried. Says why.
    Next(String),
    /// It answered with an error every address would give (refused credentials): no other
    /// address is tried.
    Stop(E),
}

/// Why no address gave an answer.
#[derive(Debug)]
pub enum Failed<E> {
    /// One answered with an error ([`Attempt::Stop`]).
    Stopped(E),
    /// None answered: `a (why), b (why)`, in the order tried.
    Unanswered(String),
}

/// Addresses, and which one answered last.
#[derive(Debug)]
pub struct Failover {
    addresses: Vec<String>,
    preferred: AtomicUsize,
}

impl Failover {
    /// `addresses` as configured: how they are named in errors.
    pub fn new(addresses: Vec<String>) -> Failover {
        Failover {
            addresses,
            preferred: AtomicUsize::new(0),
        }
    }

    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The index of the address that answered last.
    fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.addresses.len().max(1)
    }

    /// Runs `attempt` with the index of each address in turn, from the one that answered last,
    /// until one answers (its answer and index) or stops.
    pub async fn first_answer<T, E, F, Fut>(&self, mut attempt: F) -> Result<(T, usize), Failed<E>>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Attempt<T, E>>,
    {
        let n = self.addresses.len();
        let start = self.preferred();
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            match attempt(idx).await {
                Attempt::Answer(v) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok((v, idx));
                }
                Attempt::Next(why) => {
                    tracing::debug!(address = %self.addresses[idx], error = %why, "address failed; trying the next");
                    failures.push(format!("{} ({why})", self.addresses[idx]));
                }
                Attempt::Stop(e) => return Err(Failed::Stopped(e)),
            }
        }
        Err(Failed::Unanswered(failures.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_address_that_answered_is_tried_first_and_failures_are_named() {
        let f = Failover::new(vec!["a".into(), "b".into(), "c".into()]);
        let got = f
            .first_answer(|i| async move {
                if i == 2 {
                    Attempt::<usize, ()>::Answer(i)
                } else {
                    Attempt::Next("connection refused".into())
                }
            })
            .await;
        assert!(matches!(got, Ok((2, 2))));
        let mut order = Vec::new();
        let none = f
            .first_answer(|i| {
                order.push(i);
                async { Attempt::<(), ()>::Next("timed out".into()) }
            })
            .await;
        assert_eq!(order, [2, 0, 1], "the one that answered last first");
        match none {
            Err(Failed::Unanswered(why)) => {
                assert_eq!(why, "c (timed out), a (timed out), b (timed out)")
            }
            other => panic!("{other:?}"),
        }
        let stopped = f
            .first_answer(|_| async { Attempt::<(), &str>::Stop("refused") })
            .await;
        assert!(matches!(stopped, Err(Failed::Stopped("refused"))));
    }
}
