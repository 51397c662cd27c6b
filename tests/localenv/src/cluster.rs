//! Catalogs as they run in production: three members on their own loopback ports that elect a
//! leader, lose members and get them back. Any one member can be killed (SIGKILL), stopped
//! gracefully, hung (SIGSTOP) and resumed, or started again with its data; [`Cluster::leader`]
//! says which one leads.
//!
//! A 3-member etcd cluster ([`Cluster::<Etcd>::start`]), a 3-server ZooKeeper ensemble
//! ([`Cluster::<ZooKeeper>::start`]) and a 3-server Consul cluster
//! ([`Cluster::<Consul>::start`]) each come from their member modules; this module holds what
//! is the same for all three.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::Process;

/// How many members a cluster has: the smallest that survives the loss of one.
pub const MEMBERS: usize = 3;

/// One member of a cluster: its process, and how to start it again and wait until it serves.
pub trait Member: Sync {
    fn process(&self) -> &Process;
    /// Starts the member again after a kill or stop (same ports, same data) and waits until it
    /// serves.
    fn start_again(&self) -> impl Future<Output = Result<()>> + Send;
    /// Waits until the member serves clients.
    fn wait_serving(&self) -> impl Future<Output = Result<()>> + Send;
    /// Whether this member says it leads the cluster.
    fn is_leader(&self) -> impl Future<Output = Result<bool>> + Send;
}

/// Three members of one catalog.
pub struct Cluster<M> {
    members: Vec<M>,
}

impl<M: Member> Cluster<M> {
    pub(crate) fn new(members: Vec<M>) -> Cluster<M> {
        Cluster { members }
    }

    pub fn members(&self) -> &[M] {
        &self.members
    }

    pub fn member(&self, i: usize) -> Result<&M> {
        self.members
            .get(i)
            .with_context(|| format!("the cluster has {} members, not {}", MEMBERS, i + 1))
    }

    /// SIGKILL, as a crash or a power cut would.
    pub fn kill(&self, i: usize) -> Result<()> {
        self.member(i)?.process().kill()
    }

    /// A graceful stop (SIGTERM), as an upgrade would.
    pub fn stop(&self, i: usize) -> Result<()> {
        self.member(i)?.process().stop()
    }

    /// SIGSTOP: the member holds its sockets and answers nothing, as a hung server would.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.member(i)?.process().pause()
    }

    pub fn resume(&self, i: usize) -> Result<()> {
        self.member(i)?.process().resume()
    }

    /// Starts member `i` again with its data and waits until it serves.
    pub async fn start_again(&self, i: usize) -> Result<()> {
        self.member(i)?.start_again().await
    }

    /// The one member that says it leads, of those running and not paused; waits up to
    /// `within` for there to be exactly one (an election in progress has none).
    pub async fn leader(&self, within: Duration) -> Result<usize> {
        let until = Instant::now() + within;
        loop {
            let mut leaders = Vec::new();
            for (i, m) in self.members.iter().enumerate() {
                let answers = m.process().is_running() && !m.process().is_paused();
                if answers && m.is_leader().await.unwrap_or(false) {
                    leaders.push(i);
                }
            }
            if let [one] = leaders[..] {
                return Ok(one);
            }
            if Instant::now() > until {
                bail!("not one leader within {within:?}: members {leaders:?} said they lead");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A member other than `not`, running: the one a reader goes through.
    pub fn other_than(&self, not: &[usize]) -> Result<usize> {
        (0..self.members.len())
            .find(|i| !not.contains(i) && self.members[*i].process().is_running())
            .context("every member is down or excluded")
    }
}

/// Starts the members (each one's process, none waited for) and then waits until every one
/// serves: a member of a cluster serves only once a quorum of its peers runs.
pub(crate) async fn start_all<M: Member>(spawn: impl Fn(usize) -> Result<M>) -> Result<Vec<M>> {
    let members = (0..MEMBERS).map(spawn).collect::<Result<Vec<M>>>()?;
    // One after the other is enough: every member's process runs meanwhile.
    for m in &members {
        m.wait_serving().await?;
    }
    Ok(members)
}
