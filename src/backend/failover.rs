//! The addresses of one catalog, tried in turn: a request goes to the address that answered
//! last, then to each of the others, until one answers. When none does, the error names every
//! address and why it failed. Consul's and etcd's clients go through it.
//!
//! A request may go in rounds of growing patience ([`Failover::first_answer_within`]): a dead
//! or hung member of a cluster costs a short wait before the next is asked, and a cluster that
//! is slow rather than dead is asked again with more time.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What one address made of a request.
pub enum Attempt<T, E> {
    /// It answered.
    Answer(T),
    /// It did not answer (refused, broken, an error it would not give for long): the next
    /// address is tried. Says why.
    Next(String),
    /// It did not answer within the time it had: the next address is tried, and when none
    /// answers, the round goes again with more time ([`Failover::first_answer_within`]).
    TimedOut(String),
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
    pub async fn first_answer<T, E, F, Fut>(&self, attempt: F) -> Result<(T, usize), Failed<E>>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Attempt<T, E>>,
    {
        self.round(attempt).await.0
    }

    /// [`Failover::first_answer`] in rounds, the `n`th giving each address `patience[n]`: the
    /// next round comes only when no address answered and one at least ran out of time.
    pub async fn first_answer_within<T, E, F, Fut>(
        &self,
        patience: &[Duration],
        mut attempt: F,
    ) -> Result<(T, usize), Failed<E>>
    where
        F: FnMut(usize, Duration) -> Fut,
        Fut: Future<Output = Attempt<T, E>>,
    {
        let mut last = Failed::Unanswered("no address to ask".to_string());
        for (n, &t) in patience.iter().enumerate() {
            let (answer, timed_out) = self.round(|idx| attempt(idx, t)).await;
            match answer {
                Err(Failed::Unanswered(why)) if timed_out => {
                    if let Some(more) = patience.get(n + 1) {
                        tracing::debug!(error = %why, patience = ?more, "no address answered in time; asking each again with more time");
                    }
                    last = Failed::Unanswered(why);
                }
                answer => return answer,
            }
        }
        Err(last)
    }

    /// One round over the addresses; true when one of them ran out of time.
    async fn round<T, E, F, Fut>(&self, mut attempt: F) -> (Result<(T, usize), Failed<E>>, bool)
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Attempt<T, E>>,
    {
        let n = self.addresses.len();
        let start = self.preferred();
        let mut failures = Vec::new();
        let mut timed_out = false;
        for i in 0..n {
            let idx = (start + i) % n;
            let why = match attempt(idx).await {
                Attempt::Answer(v) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return (Ok((v, idx)), timed_out);
                }
                Attempt::Next(why) => why,
                Attempt::TimedOut(why) => {
                    timed_out = true;
                    why
                }
                Attempt::Stop(e) => return (Err(Failed::Stopped(e)), timed_out),
            };
            tracing::debug!(address = %self.addresses[idx], error = %why, "address failed; trying the next");
            failures.push(format!("{} ({why})", self.addresses[idx]));
        }
        (Err(Failed::Unanswered(failures.join(", "))), timed_out)
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

    #[tokio::test]
    async fn a_round_that_ran_out_of_time_goes_again_with_more_and_a_refusal_does_not() {
        let (quick, patient) = (Duration::from_millis(1), Duration::from_millis(5));
        let f = Failover::new(vec!["a".into(), "b".into()]);
        let mut asked = Vec::new();
        let got = f
            .first_answer_within(&[quick, patient], |i, t| {
                asked.push((i, t));
                async move {
                    match (i, t == patient) {
                        (1, true) => Attempt::<usize, ()>::Answer(i),
                        (1, false) => Attempt::TimedOut("no answer in time".into()),
                        _ => Attempt::Next("connection refused".into()),
                    }
                }
            })
            .await;
        assert!(matches!(got, Ok((1, 1))));
        assert_eq!(asked, [(0, quick), (1, quick), (0, patient), (1, patient)]);

        let mut rounds = 0;
        let refused = f
            .first_answer_within(&[quick, patient], |_, t| {
                rounds += usize::from(t == patient);
                async { Attempt::<(), ()>::Next("connection refused".into()) }
            })
            .await;
        assert_eq!(rounds, 0, "nobody ran out of time: no second round");
        match refused {
            Err(Failed::Unanswered(why)) => {
                assert_eq!(why, "b (connection refused), a (connection refused)")
            }
            other => panic!("{other:?}"),
        }
    }
}
