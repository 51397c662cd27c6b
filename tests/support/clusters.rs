//! One Service exported to 3-member Consul, etcd and ZooKeeper clusters, and what a test of
//! member faults reads back: readers that poll every 20 ms through the members in a chosen
//! order (as a discovery client given every host does), what each entry's identity is (the etcd
//! lease and revision, the ZooKeeper session and zxid, Consul's ModifyIndex), and which members
//! the controller holds connections to.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use localenv::Env;
use serde_json::{Value, json};

use super::everywhere::catalog;
use super::{ConsulView, consul_catalog, kubectl_apply};

/// The catalogs of the test: one per kind, each a 3-member cluster.
pub const CATALOGS: &str = "consul,etcd,zk";
pub const NODE: &str = "k8s-test";
const EVERY: Duration = Duration::from_millis(20);
/// How long a reader waits for one member before it asks the next.
const READ_TIMEOUT: Duration = Duration::from_millis(300);

/// The three clusters, the API server, the CRDs, and one ExternalCatalog per cluster that lists
/// every member: `consul`, `etcd` (plain layout, lease TTL `etcd_ttl`) and `zk` (plain layout,
/// session timeout `zk_timeout`).
pub async fn setup(etcd_ttl: i64, zk_timeout: i64) -> Result<(Env, kube::Client)> {
    let env = Env::builder()
        .controller_manager()
        .clusters()
        .start()
        .await?;
    let client = env.kube()?.client().await?;
    super::install_crds(&client).await?;
    kubectl_apply(
        &env,
        &consul_catalog("consul", &env.consul_cluster()?.urls(), NODE),
    )?;
    kubectl_apply(
        &env,
        &catalog(
            "etcd",
            json!({"etcd": {"endpoints": env.etcd_cluster()?.endpoints(), "layout": "plain",
                            "leaseTTLSeconds": etcd_ttl}}),
        ),
    )?;
    kubectl_apply(
        &env,
        &catalog(
            "zk",
            json!({"zookeeper": {"connect": env.zookeeper_ensemble()?.connect_string(),
                                 "layout": "plain", "basePath": "/services",
                                 "sessionTimeoutSeconds": zk_timeout}}),
        ),
    )?;
    Ok((env, client))
}

/// The members of each cluster a reader asks, in order: the first that answers is read.
#[derive(Clone, Debug)]
pub struct Through {
    pub consul: Vec<String>,
    pub etcd: Vec<String>,
    pub zookeeper: Vec<String>,
}

impl Through {
    /// Every member, in member order.
    pub fn all(env: &Env) -> Result<Through> {
        Through::avoiding(env, usize::MAX, usize::MAX, usize::MAX)
    }

    /// Every member, member `last[kind]` last: the one a fault hits.
    pub fn avoiding(env: &Env, consul: usize, etcd: usize, zookeeper: usize) -> Result<Through> {
        fn order<T>(all: Vec<T>, last: usize) -> Vec<T> {
            let mut all: Vec<(usize, T)> = all.into_iter().enumerate().collect();
            all.sort_by_key(|(i, _)| *i == last);
            all.into_iter().map(|(_, t)| t).collect()
        }
        Ok(Through {
            consul: order(env.consul_cluster()?.urls(), consul),
            etcd: order(env.etcd_cluster()?.endpoints(), etcd),
            zookeeper: order(
                env.zookeeper_ensemble()?
                    .members()
                    .iter()
                    .map(|m| m.connect_string())
                    .collect(),
                zookeeper,
            ),
        })
    }
}

/// What one catalog's reader saw: looks, how many of them a member answered, and how many
/// answers lacked an entry that should have been there.
#[derive(Debug)]
pub struct Seen {
    pub catalog: &'static str,
    pub looks: u64,
    pub answered: u64,
    pub misses: u64,
}

/// Readers of the three catalogs polling every 20 ms until [`Readers::finish`].
pub struct Readers {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Vec<Seen>>>,
}

impl Readers {
    /// Starts readers that count every answer lacking one of `want` (`ip:port`) as a miss: the
    /// passing instances of `api_x` in Consul (its HTTP API, default consistency), the plain
    /// layout's values in etcd (etcd's Go-compatible client) and its children in ZooKeeper
    /// (kazoo, the hosts in the order given, not shuffled).
    pub fn spawn(through: &Through, want: &[&str]) -> Result<Readers> {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let consul = {
            let views = std::sync::Arc::new(consul_views(&through.consul)?);
            let (want, stopped) = (want.clone(), stopped.clone());
            poll("consul", stopped, move || {
                let (views, want) = (views.clone(), want.clone());
                async move { Ok(consul_passing(&views).await?.is_superset(&want)) }
            })
        };
        let etcd = {
            let (endpoints, want) = (through.etcd.clone(), want.clone());
            let clients = std::sync::Arc::new(tokio::sync::Mutex::new(EtcdReader::new(endpoints)));
            poll("etcd", stopped.clone(), move || {
                let (clients, want) = (clients.clone(), want.clone());
                async move {
                    let got = clients
                        .lock()
                        .await
                        .values("/services/api_x/providers/")
                        .await?;
                    Ok(got.is_superset(&want))
                }
            })
        };
        let zookeeper = kazoo_reader(&through.zookeeper.join(","), &want, stopped)?;
        let task = tokio::spawn(async move {
            let (c, e, z) = tokio::join!(consul, etcd, zookeeper);
            Ok(vec![c?, e?, z?])
        });
        Ok(Readers { stop, task })
    }

    pub async fn finish(self) -> Result<Vec<Seen>> {
        let _ = self.stop.send(true);
        self.task.await.context("the readers' task")?
    }
}

/// Calls `look` every 20 ms until told to stop: `Ok(true)` an answer with every entry,
/// `Ok(false)` an answer that lacked one, `Err` no answer.
async fn poll<F, Fut>(
    catalog: &'static str,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    mut look: F,
) -> Result<Seen>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let mut seen = Seen {
        catalog,
        looks: 0,
        answered: 0,
        misses: 0,
    };
    while !*stopped.borrow() {
        seen.looks += 1;
        if let Ok(all) = look().await {
            seen.answered += 1;
            seen.misses += u64::from(!all);
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stopped.changed() => {}
        }
    }
    Ok(seen)
}

/// A reader of each Consul server at `urls` that waits [`READ_TIMEOUT`] for an answer.
pub fn consul_views(urls: &[String]) -> Result<Vec<ConsulView>> {
    let http = reqwest::Client::builder()
        .timeout(READ_TIMEOUT)
        .build()
        .context("building an HTTP client")?;
    Ok(urls
        .iter()
        .map(|u| ConsulView::with_client(u.clone(), http.clone()))
        .collect())
}

/// `ip:port` of every passing instance of `api_x`, from the first server that answers.
pub async fn consul_passing(views: &[ConsulView]) -> Result<BTreeSet<String>> {
    let mut why = Vec::new();
    for v in views {
        match v.passing("api_x").await {
            Ok(passing) => return Ok(passing.into_iter().collect()),
            Err(e) => why.push(format!("{}: {e:#}", v.url)),
        }
    }
    bail!("no Consul server answered: {why:?}")
}

/// One etcd client per member, connected on first use and dropped when it fails.
pub struct EtcdReader {
    endpoints: Vec<String>,
    clients: Vec<Option<etcd_client::Client>>,
}

impl EtcdReader {
    pub fn new(endpoints: Vec<String>) -> EtcdReader {
        let clients = vec![None; endpoints.len()];
        EtcdReader { endpoints, clients }
    }

    /// Every key-value under `prefix`, from the first member that answers in time.
    pub async fn kvs(&mut self, prefix: &str) -> Result<Vec<etcd_client::KeyValue>> {
        let mut why = Vec::new();
        for i in 0..self.endpoints.len() {
            let answer = tokio::time::timeout(READ_TIMEOUT, async {
                if self.clients[i].is_none() {
                    let options =
                        etcd_client::ConnectOptions::new().with_connect_timeout(READ_TIMEOUT);
                    self.clients[i] = Some(
                        etcd_client::Client::connect([self.endpoints[i].as_str()], Some(options))
                            .await?,
                    );
                }
                let Some(c) = self.clients[i].as_mut() else {
                    unreachable!("connected above")
                };
                c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
            })
            .await;
            match answer {
                Ok(Ok(mut r)) => return Ok(r.take_kvs()),
                Ok(Err(e)) => why.push(format!("{}: {e}", self.endpoints[i])),
                Err(_) => why.push(format!("{}: no answer in time", self.endpoints[i])),
            }
            self.clients[i] = None;
        }
        bail!("no etcd member answered: {why:?}")
    }

    /// The values under `prefix` (`ip:port` in the plain layout).
    pub async fn values(&mut self, prefix: &str) -> Result<BTreeSet<String>> {
        Ok(self
            .kvs(prefix)
            .await?
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .collect())
    }
}

/// A kazoo reader of `/services/api_x/providers`, run as a child process until `stopped`.
fn kazoo_reader(
    hosts: &str,
    want: &BTreeSet<String>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = Result<Seen>> + use<>> {
    let mut child = tokio::process::Command::new(localenv::programs::python()?)
        .arg("-c")
        .arg(
            "import sys, json, time, threading\n\
             from kazoo.client import KazooClient\n\
             zk = KazooClient(hosts=sys.argv[1], randomize_hosts=False, timeout=10)\n\
             zk.start(timeout=15)\n\
             want = set(json.loads(sys.argv[2]))\n\
             done = threading.Event()\n\
             threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()\n\
             looks, answered, misses = 0, 0, 0\n\
             while not done.is_set():\n\
             \x20   looks += 1\n\
             \x20   try:\n\
             \x20       got = set(zk.get_children('/services/api_x/providers'))\n\
             \x20       answered += 1\n\
             \x20       misses += 0 if want <= got else 1\n\
             \x20   except Exception:\n\
             \x20       pass\n\
             \x20   time.sleep(0.02)\n\
             print(json.dumps({'looks': looks, 'answered': answered, 'misses': misses}))\n\
             zk.stop()\n",
        )
        .args([hosts, &serde_json::to_string(want)?])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the kazoo reader")?;
    let stdin = child.stdin.take();
    Ok(async move {
        let _ = stopped.wait_for(|s| *s).await;
        drop(stdin);
        let out = child.wait_with_output().await.context("the kazoo reader")?;
        anyhow::ensure!(
            out.status.success(),
            "the kazoo reader failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).context("the kazoo reader's answer")?;
        Ok(Seen {
            catalog: "zookeeper",
            looks: v["looks"].as_u64().unwrap_or(0),
            answered: v["answered"].as_u64().unwrap_or(0),
            misses: v["misses"].as_u64().unwrap_or(u64::MAX),
        })
    })
}

/// Every answer of every reader had every entry, and each reader was answered at least
/// `min_answered` times.
pub fn no_miss(seen: &[Seen], min_answered: u64) -> Result<()> {
    println!("readers: {seen:?}");
    for s in seen {
        anyhow::ensure!(
            s.misses == 0 && s.answered >= min_answered,
            "{}: {} of {} answers (of {} looks) lacked an entry",
            s.catalog,
            s.misses,
            s.answered,
            s.looks
        );
    }
    Ok(())
}

/// What makes each entry what it is, by catalog and `ip:port`: the etcd lease and
/// ModRevision, the ZooKeeper session (ephemeralOwner) and mzxid, Consul's ModifyIndex.
pub type Identities = BTreeMap<(&'static str, String), (i64, i64)>;

pub async fn identities(env: &Env) -> Result<Identities> {
    let mut out = Identities::new();
    let http = localenv::http_client()?;
    let urls = env.consul_cluster()?.urls();
    let v: Vec<Value> = {
        let mut got = None;
        for url in &urls {
            if let Ok(r) = http
                .get(format!("{url}/v1/catalog/service/api_x"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
            {
                got = Some(r.json().await?);
                break;
            }
        }
        got.context("no Consul server answered")?
    };
    for e in v {
        let key = format!(
            "{}:{}",
            e["ServiceAddress"].as_str().unwrap_or(""),
            e["ServicePort"]
        );
        out.insert(
            ("consul", key),
            (e["ModifyIndex"].as_i64().unwrap_or(-1), 0),
        );
    }
    let mut etcd = EtcdReader::new(env.etcd_cluster()?.endpoints());
    for kv in etcd.kvs("/services/api_x/providers/").await? {
        out.insert(
            ("etcd", String::from_utf8_lossy(kv.value()).into_owned()),
            (kv.lease(), kv.mod_revision()),
        );
    }
    let zk = zookeeper_client::Client::connect(&env.zookeeper_ensemble()?.connect_string())
        .await
        .context("connecting to the ZooKeeper ensemble")?;
    let (children, _) = zk.get_children("/services/api_x/providers").await?;
    for c in children {
        let (_, stat) = zk
            .get_data(&format!("/services/api_x/providers/{c}"))
            .await?;
        out.insert(("zookeeper", c), (stat.ephemeral_owner, stat.mzxid));
    }
    Ok(out)
}

/// Waits until every catalog answers exactly `want` for `api_x`, read through the members in
/// the order of `through` (ZooKeeper through its first member only: a client given a hung
/// server among its hosts may sit on it for seconds); returns how long each took from
/// `since`, by catalog. The catalogs are watched side by side: a member that hangs under one
/// reader delays no other catalog's answer.
pub async fn wait_all(
    through: &Through,
    want: &[&str],
    since: Instant,
) -> Result<Vec<(&'static str, Duration)>> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let views = consul_views(&through.consul)?;
    let etcd = tokio::sync::Mutex::new(EtcdReader::new(through.etcd.clone()));
    let first = through.zookeeper.first().cloned().unwrap_or_default();
    let zk = tokio::sync::Mutex::new(ZooKeeperReader(first, None));
    let (views, want, etcd, zk) = (&views, &want, &etcd, &zk);
    let (c, e, z) = tokio::join!(
        landed("consul", since, || async {
            consul_passing(views).await.map(|g| g == *want)
        }),
        landed("etcd", since, || async {
            let got = etcd.lock().await.values("/services/api_x/providers/").await;
            got.map(|g| g == *want)
        }),
        landed("zookeeper", since, || async {
            let got = zk.lock().await.children("/services/api_x/providers").await;
            got.map(|g| g == *want)
        }),
    );
    Ok(vec![c?, e?, z?])
}

/// Polls `look` every 20 ms until it says yes: how long that took from `since`.
async fn landed<F, Fut>(
    catalog: &'static str,
    since: Instant,
    mut look: F,
) -> Result<(&'static str, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let last = look().await;
        if matches!(last, Ok(true)) {
            return Ok((catalog, since.elapsed()));
        }
        if Instant::now() > until {
            bail!("{catalog} did not answer as wanted within 60 s; last: {last:?}");
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// A ZooKeeper session to the hosts of a connect string, made again when a read fails.
struct ZooKeeperReader(String, Option<zookeeper_client::Client>);

impl ZooKeeperReader {
    async fn children(&mut self, path: &str) -> Result<BTreeSet<String>> {
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            if self.1.is_none() {
                self.1 = Some(zookeeper_client::Client::connect(&self.0).await?);
            }
            match &self.1 {
                Some(zk) => zk.get_children(path).await.map(|(c, _)| c),
                None => unreachable!("connected above"),
            }
        })
        .await;
        match answer {
            Ok(Ok(children)) => Ok(children.into_iter().collect()),
            other => {
                self.1 = None;
                bail!("ZooKeeper at {}: {other:?}", self.0)
            }
        }
    }
}

/// The indexes of the members (by their client `ports`) that process `pid` holds an
/// established TCP connection to.
pub fn connected_members(pid: u32, ports: &[u16]) -> Result<Vec<usize>> {
    let mut inodes = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(link) = std::fs::read_link(fd.path())
            && let Some(n) = link
                .to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
        {
            inodes.insert(n.to_string());
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))?;
    let mut out = BTreeSet::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local remote st … inode (the tenth field)
        let (Some(remote), Some(state), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else {
            continue;
        };
        if *state != "01" || !inodes.contains(*inode) {
            continue;
        }
        let port = remote
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        if let Some(i) = port.and_then(|p| ports.iter().position(|q| *q == p)) {
            out.insert(i);
        }
    }
    Ok(out.into_iter().collect())
}

/// The port of `host:port` or `scheme://host:port`.
pub fn port_of(address: &str) -> Result<u16> {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .with_context(|| format!("no port in {address:?}"))
}

/// The Events of `reason` on ExternalCatalogs, one line each:
/// `<name> <type> <reason> x<count>: <note>` (count 1 without a series).
pub fn catalog_events(env: &Env, reason: &str) -> Result<Vec<String>> {
    let out = env.kube()?.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-A",
        "--field-selector",
        &format!("reason={reason}"),
        "-o",
        "jsonpath={range .items[?(@.regarding.kind==\"ExternalCatalog\")]}{.regarding.name} {.type} {.reason} x{.series.count}: {.note}{\"\\n\"}{end}",
    ])?;
    Ok(out
        .lines()
        .map(|l| l.replacen(" x: ", " x1: ", 1))
        .collect())
}
