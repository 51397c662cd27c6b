//! The one backoff every retry loop uses: exponential, doubling from a minimum to a maximum,
//! started again from the minimum after a success.

use std::time::Duration;

/// Pauses between attempts: `min`, `2·min`, `4·min`… up to `max`, and `min` again after
/// [`Backoff::reset`].
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The pause before the next attempt; the one after it is twice as long, up to the maximum.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    /// After a success: the next pause is the minimum again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Sleeps for [`Backoff::next_pause`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum_and_starts_again_after_a_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(1000));
        let pauses: Vec<Duration> = (0..5).map(|_| b.next_pause()).collect();
        assert_eq!(pauses, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        b.reset();
        assert_eq!(b.next_pause(), ms(200));
    }
}
