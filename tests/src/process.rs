//! The project's programs as child processes, started from the workspace's
//! `target/<profile>` directory (scripts/test.sh builds them first), with
//! their logs written under `target/test-logs/`. A `Process` can be asked to
//! drain (SIGTERM) or be killed outright (SIGKILL); it is killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Ports this test process has handed out: never handed out twice. The
/// kernel may give a just-closed port to the next bind, and two tests
/// running at once in one binary would then start servers on one port (the
/// balancer's per-thread sockets share a port with SO_REUSEPORT, so the
/// second does not even fail: each test reaches the other's balancer).
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A port that was free a moment ago on 127.0.0.1, not handed out before
/// by this process.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` different free ports, none handed out before by this process: each
/// listener is held until all are chosen.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut held = Vec::new();
    let mut ports = Vec::new();
    // Bounded: a few hundred binds at most, even after many tests.
    for _ in 0..(N + 200) {
        if ports.len() == N {
            break;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = listener.local_addr().map(|a| a.port()).expect("a bound port");
        if !handed.contains(&port) {
            handed.push(port);
            ports.push(port);
        }
        held.push(listener);
    }
    assert_eq!(ports.len(), N, "no unused loopback port found");
    std::array::from_fn(|i| ports[i])
}

/// `target/<profile>`, found from the running test executable.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test binary>
    exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
    /// Whether the child leads a process group of its own, killed whole.
    group: bool,
}

impl Process {
    /// Starts one of the workspace's binaries from `target/<profile>`.
    pub fn spawn(binary_name: &str, label: &str, args: &[String]) -> Self {
        Self::start(&binary(binary_name), label, args, false)
    }

    /// Starts any program (a system one such as chromedriver) with its output
    /// in `target/<profile>/test-logs/<label>-….log`, in a process group of
    /// its own: killing it kills what it started too (chromedriver's
    /// browsers, which would otherwise outlive the test and its CPU).
    pub fn spawn_program(program: &std::path::Path, label: &str, args: &[String]) -> Self {
        Self::start(program, label, args, true)
    }

    fn start(program: &std::path::Path, label: &str, args: &[String], group: bool) -> Self {
        use std::os::unix::process::CommandExt;
        let logs = target_dir().join("test-logs");
        let _ = std::fs::create_dir_all(&logs);
        let log = logs.join(format!("{label}-{}.log", free_port()));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(program);
        if group {
            command.process_group(0);
        }
        let child = command
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process { name: label.to_string(), log, child: Some(child), group }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        if self.child.is_some() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// Sends SIGTERM (drain).
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGKILL (the whole group, for a program that leads one) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.group {
                // SAFETY: kill(2) on the process group our child leads.
                unsafe {
                    libc::kill(-(c.id() as i32), libc::SIGKILL);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process has exited by itself (reaps it if so).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                self.child = None;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
