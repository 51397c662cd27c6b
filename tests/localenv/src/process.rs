//! One server process of the local environment: started, stopped, killed, paused and restarted
//! on demand, with its output in a log file whose tail goes into every error.
//!
//! Processes are forked by one long-lived thread and carry `PR_SET_PDEATHSIG`, so the kernel
//! kills them when the test binary exits, however it exits (a panic, an abort, a static
//! environment that is never dropped). The death signal follows the *thread* that forked, which
//! is why a dedicated thread does the forking rather than whichever test thread asked. There
//! is one such thread per network namespace the asking threads are in (a node's tests run in
//! one of their own, see [`crate::node::run`]): a child starts in its forking thread's.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

type SpawnJob = Box<dyn FnOnce() -> std::io::Result<Child> + Send>;
type SpawnRequest = (SpawnJob, mpsc::Sender<std::io::Result<Child>>);

/// The spawner thread of the calling thread's network namespace, started from the calling
/// thread (so in that namespace) the first time.
fn spawner() -> std::io::Result<mpsc::Sender<SpawnRequest>> {
    static SPAWNERS: OnceLock<Mutex<HashMap<u64, mpsc::Sender<SpawnRequest>>>> = OnceLock::new();
    let netns = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    let mut spawners = SPAWNERS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| std::io::Error::other("spawner lock poisoned"))?;
    if let Some(tx) = spawners.get(&netns) {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("localenv-spawner".into())
        .spawn(move || {
            for (job, reply) in rx {
                let _ = reply.send(job());
            }
        })?;
    spawners.insert(netns, tx.clone());
    Ok(tx)
}

fn spawn_on_spawner(job: SpawnJob) -> std::io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    spawner()?
        .send((job, tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("spawner thread dropped the request"))?
}

/// How a server process is started; kept so that it can be started again after a stop.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub envs: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub log: PathBuf,
}

impl Spec {
    pub fn new(name: &str, program: impl Into<PathBuf>, dir: &Path) -> Self {
        Spec {
            name: name.to_string(),
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            cwd: dir.to_path_buf(),
            log: dir.join(format!("{name}.log")),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }
}

/// A running (or stopped) server process. Dropping it kills the process.
#[derive(Debug)]
pub struct Process {
    spec: Spec,
    child: Mutex<Option<Child>>,
    /// Between [`Process::pause`] and [`Process::resume`] (or a kill or stop).
    paused: std::sync::atomic::AtomicBool,
}

impl Process {
    /// Starts the process; its output goes to `spec.log` (appended across restarts).
    pub fn start(spec: Spec) -> Result<Process> {
        let p = Process {
            spec,
            child: Mutex::new(None),
            paused: Default::default(),
        };
        p.spawn()?;
        Ok(p)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.spec.log
    }

    fn spawn(&self) -> Result<()> {
        let mut slot = self.lock();
        if let Some(child) = slot.as_mut()
            && child.try_wait().ok().flatten().is_none()
        {
            bail!("{} is already running", self.spec.name);
        }
        if !self.spec.program.exists() {
            bail!(
                "{}: program {} does not exist (run `make peers` to build the test peers)",
                self.spec.name,
                self.spec.program.display()
            );
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening log {}", self.spec.log.display()))?;
        let log2 = log.try_clone().context("cloning log handle")?;
        let spec = self.spec.clone();
        let child = spawn_on_spawner(Box::new(move || {
            let mut cmd = Command::new(&spec.program);
            cmd.args(&spec.args)
                .envs(spec.envs.iter().map(|(k, v)| (k, v)))
                .current_dir(&spec.cwd)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .process_group(0);
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn()
        }))
        .with_context(|| {
            format!(
                "starting {} ({})",
                self.spec.name,
                self.spec.program.display()
            )
        })?;
        *slot = Some(child);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let slot = self.lock();
        let child = slot
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.spec.name))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) on a pid we own.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {sig} to {}", self.spec.name));
        }
        Ok(())
    }

    /// True while the process runs (a paused process counts as running).
    pub fn is_running(&self) -> bool {
        let mut slot = self.lock();
        match slot.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// The exit status if the process has exited on its own.
    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut slot = self.lock();
        slot.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Graceful stop: SIGTERM, then SIGKILL after `grace`.
    pub fn stop_with_grace(&self, grace: Duration) -> Result<()> {
        if !self.is_running() {
            self.lock().take();
            return Ok(());
        }
        let _ = self.resume();
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.is_running() {
                self.lock().take();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()
    }

    /// Graceful stop with a 10 s grace period.
    pub fn stop(&self) -> Result<()> {
        self.stop_with_grace(Duration::from_secs(10))
    }

    /// SIGKILL, as a crash or a power cut would.
    pub fn kill(&self) -> Result<()> {
        self.paused
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let mut slot = self.lock();
        if let Some(mut child) = slot.take() {
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("waiting for {}", self.spec.name))?;
        }
        Ok(())
    }

    /// SIGSTOP: the process holds its sockets but answers nothing, like a hung server or a
    /// network partition.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)?;
        self.paused
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // kill(2) returns before every thread has stopped: wait until they all have, so that
        // no request sent after this returns is answered.
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.spec.name))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            if Instant::now() > deadline {
                bail!("{} did not stop within 5 s of SIGSTOP", self.spec.name);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)?;
        self.paused
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether the process was paused ([`Process::pause`]) and not resumed since.
    pub fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts the process again with the same arguments (same ports, same data directory).
    pub fn restart_process(&self) -> Result<()> {
        self.spawn()
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_of(&self.spec.log, lines)
    }
}

/// Whether every thread of `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                Some(rest.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    })
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The last `lines` lines of a file (reads at most the last 64 KiB).
pub fn tail_of(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = String::new();
    let mut bytes = Vec::new();
    if f.read_to_end(&mut bytes).is_ok() {
        buf = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = buf.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
