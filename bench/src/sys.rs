//! What the bench asks of the OS: limits, core pinning, clocks, CPU and memory of processes,
//! and child processes that are killed when their guard is dropped.

use std::io;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the hard limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from a valid, owned rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_max)
}

/// Pins the calling thread (and the threads it starts later) to one core.
pub fn pin_to_core(core: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only touch it; sched_setaffinity reads
    // it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn cores_online() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so a backend
/// can stamp an event and another process can subtract.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds (user + system) of this process, all threads.
pub fn self_cpu() -> f64 {
    rusage(libc::RUSAGE_SELF)
}

/// CPU seconds of this process's children that have ended and been waited for (wrk, h2load).
pub fn children_cpu() -> f64 {
    rusage(libc::RUSAGE_CHILDREN)
}

/// utime + stime of one process (all its threads), from /proc/PID/stat.
pub fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// Busy seconds of each core so far (user, nice, system, irq, softirq and steal), from
/// /proc/stat: compared with the bench's own processes, it shows load from other processes.
pub fn cores_busy() -> Vec<f64> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    let tck = clk_tck();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let f: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            [0, 1, 2, 5, 6, 7]
                .iter()
                .filter_map(|&i| f.get(i))
                .sum::<f64>()
                / tck
        })
        .collect()
}

/// `pid` and its descendants (nginx: master and worker).
pub fn proc_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(c.split_whitespace().filter_map(|s| s.parse::<u32>().ok()));
                }
            }
        }
        i += 1;
    }
    out
}

/// CPU seconds of a process tree.
pub fn tree_cpu(pid: u32) -> f64 {
    proc_tree(pid).into_iter().filter_map(proc_cpu).sum()
}

/// Resident memory of a process tree in KiB (VmRSS summed).
pub fn tree_rss_kib(pid: u32) -> u64 {
    proc_tree(pid)
        .into_iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Open descriptors of a process tree.
pub fn tree_fds(pid: u32) -> usize {
    proc_tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|d| d.count())
        .sum()
}

/// A child process that is ended when the guard is dropped: on success, on error, on Ctrl-C
/// (the caller returns early) and on panic (unwinding drops it).
pub struct ProcGuard {
    pub name: String,
    child: Option<Child>,
}

impl ProcGuard {
    /// Starts `cmd`. The child also gets SIGTERM if this thread dies without dropping the guard
    /// (PR_SET_PDEATHSIG), e.g. on SIGKILL. Call from the main thread: the death signal follows
    /// the thread that forked.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<ProcGuard> {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(ProcGuard {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut()?.stderr.take()
    }

    /// The exit status once the process has ended (it is then reaped; std keeps the status).
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Fails if the process has already exited (a config error, a port in use).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("{} exited at start-up: {status}", self.name);
            }
        }
        Ok(())
    }

    /// SIGTERM, up to 5 s to exit, then SIGKILL; descendants still alive (an nginx worker whose
    /// master was killed) get SIGKILL too.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Already ended and reaped: its pid may belong to someone else by now.
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = child.id();
        let tree = proc_tree(pid);
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        for p in tree.into_iter().skip(1) {
            if Path::new(&format!("/proc/{p}")).exists() {
                signal(p, libc::SIGKILL);
            }
        }
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory effects; pid is one we started.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Runs a command to completion with a wall-clock bound; returns its stdout. Async so that
/// Ctrl-C is seen while it runs: dropping the future kills the command (its guard).
pub async fn run_bounded(mut cmd: Command, limit: Duration) -> anyhow::Result<String> {
    use std::process::Stdio;
    let name = format!("{cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut guard = ProcGuard::spawn(&name, cmd)?;
    let mut out = guard.take_stdout().context("stdout")?;
    let mut err = guard.take_stderr().context("stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = guard.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            bail!("{name} did not finish within {limit:?}: killed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if !status.success() {
        bail!("{name} failed ({status}): {}", stderr.trim());
    }
    Ok(stdout)
}

/// A command's first output line, for version strings; "unknown" if it cannot run.
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("unknown")
                .trim()
                .to_string()
        }
        Err(_) => "unknown".to_string(),
    }
}
