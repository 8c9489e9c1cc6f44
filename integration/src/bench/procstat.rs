//! Resource use of the processes under test, read from `/proc`.
//!
//! The benchmark must say what the coordinator and the agents cost, not only how fast they
//! are, and the servers are separate processes, so their CPU time and memory are read from
//! the kernel's accounting: `utime + stime` in `/proc/PID/stat` (sampled at the start and the
//! end of the measured window) and `VmRSS` in `/proc/PID/status` (sampled periodically,
//! because `VmHWM` is the peak since the process started, not the peak of one cell).
//!
//! PostgreSQL forks one backend per connection, and backends come and go, so its CPU is the
//! postmaster's own time plus its reaped children's (`cutime + cstime`) plus the time of the
//! live children: a backend that exits during the window moves from the last term to the
//! second, so the difference of two snapshots stays right. (Live processes are read through
//! `schedstat` as well as `stat`: see [`process_cpu_seconds`].)

use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Kernel clock ticks per second, the unit of the times in `/proc/PID/stat`.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The fields of `/proc/PID/stat` after the command name, which may itself contain spaces
/// and parentheses (hence the split at the last `)`). Index 0 is field 3 (`state`).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is a letter; keep positions by mapping it to 0.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .collect(),
    )
}

// Indices into `stat_fields` (proc(5) field number minus 3).
const PPID: usize = 1;
const UTIME: usize = 11;
const STIME: usize = 12;
const CUTIME: usize = 13;
const CSTIME: usize = 14;

/// On-CPU nanoseconds of one task (thread) from `/proc/.../schedstat`, first field.
fn schedstat_ns(path: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU seconds the process has used so far, if it is alive.
///
/// Two sources, each a lower bound: `utime + stime` of `/proc/PID/stat` was seen to lag far
/// behind on this kind of VM for busy PostgreSQL backends (a fraction of the time that
/// `schedstat` showed and that the postmaster later reaped), while the `schedstat` of the
/// live threads misses threads that exited (a tokio blocking-pool thread after
/// `block_in_place`). The larger of the two is the better estimate. `threads: false` reads
/// only the main thread's schedstat (enough for single-threaded processes, and cheaper).
pub fn process_cpu_seconds(pid: u32, threads: bool) -> Option<f64> {
    let f = stat_fields(pid)?;
    let stat = (f.get(UTIME)? + f.get(STIME)?) as f64 / ticks_per_second();
    let sched_ns: u64 = if threads {
        fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
            .filter_map(|t| {
                schedstat_ns(&format!(
                    "/proc/{pid}/task/{}/schedstat",
                    t.file_name().to_str()?
                ))
            })
            .sum()
    } else {
        schedstat_ns(&format!("/proc/{pid}/schedstat")).unwrap_or(0)
    };
    Some(stat.max(sched_ns as f64 / 1e9))
}

/// [`process_cpu_seconds`] over all threads.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    process_cpu_seconds(pid, true)
}

/// A line like `VmRSS:   12345 kB` of `/proc/PID/status`, in kB.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Context switches of all of a process's threads so far: (voluntary, involuntary). A
/// voluntary switch is a thread going to sleep to wait for something (a message, a lock, the
/// disk), so each one is a wake-up later: what step 10 counts per transfer. Threads that
/// exited are not counted (a tokio runtime keeps its workers).
pub fn context_switches(pid: u32) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(text) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        total.0 += field("voluntary_ctxt_switches:");
        total.1 += field("nonvoluntary_ctxt_switches:");
    }
    Some(total)
}

pub fn rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:")
}

pub fn hwm_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// CPU seconds of a PostgreSQL server and all its backends, dead or alive (see the module
/// comment). `data_dir` holds `postmaster.pid`, whose first line is the postmaster's pid.
pub fn postgres_cpu_seconds(data_dir: &Path) -> Option<f64> {
    let pid: u32 = fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    let own = stat_fields(pid)?;
    // Reaped backends: exact, added when the postmaster waited for them.
    let reaped = (own.get(CUTIME)? + own.get(CSTIME)?) as f64 / ticks_per_second();
    let mut total = reaped + process_cpu_seconds(pid, false)?;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if stat_fields(child).and_then(|f| f.get(PPID).copied()) == Some(u64::from(pid)) {
            // Backends are single-threaded processes.
            total += process_cpu_seconds(child, false).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// (busy, total) jiffies of the whole machine from `/proc/stat`, to tell whether a cell was
/// CPU-bound: everything (client, servers, PostgreSQL) shares the same cores.
pub fn host_jiffies() -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// One group of processes (the coordinator replicas, or the agents) followed over a cell.
#[derive(Debug, Clone)]
pub struct Group {
    pids: Vec<u32>,
    cpu_start: BTreeMap<u32, f64>,
    cpu_end: BTreeMap<u32, f64>,
    switches_start: BTreeMap<u32, (u64, u64)>,
    switches_end: BTreeMap<u32, (u64, u64)>,
    peak_rss: BTreeMap<u32, u64>,
}

/// What a group used during the measured window of one cell.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub processes: usize,
    /// Peak resident set (kB) of each process during the window: the largest and the sum.
    pub peak_rss_kb_max: u64,
    pub peak_rss_kb_sum: u64,
    /// `VmHWM` at the end: the peak since the process started (warm-up and earlier cells
    /// included).
    pub lifetime_hwm_kb_max: u64,
    /// CPU seconds used in the window: the busiest process and all together.
    pub cpu_s_max: f64,
    pub cpu_s_sum: f64,
    /// Context switches of all processes in the window: voluntary (wake-ups) and involuntary
    /// (preemptions).
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
}

impl Group {
    pub fn new(pids: Vec<u32>) -> Group {
        Group {
            pids,
            cpu_start: BTreeMap::new(),
            cpu_end: BTreeMap::new(),
            switches_start: BTreeMap::new(),
            switches_end: BTreeMap::new(),
            peak_rss: BTreeMap::new(),
        }
    }

    pub fn start(&mut self) {
        self.switches_start = self.switches_now();
        self.cpu_start = self.cpu_now();
        self.sample_rss();
    }

    pub fn end(&mut self) {
        self.sample_rss();
        self.cpu_end = self.cpu_now();
        self.switches_end = self.switches_now();
    }

    fn switches_now(&self) -> BTreeMap<u32, (u64, u64)> {
        self.pids
            .iter()
            .filter_map(|&p| context_switches(p).map(|c| (p, c)))
            .collect()
    }

    fn cpu_now(&self) -> BTreeMap<u32, f64> {
        self.pids
            .iter()
            .filter_map(|&p| cpu_seconds(p).map(|c| (p, c)))
            .collect()
    }

    pub fn sample_rss(&mut self) {
        for &p in &self.pids {
            if let Some(kb) = rss_kb(p) {
                let peak = self.peak_rss.entry(p).or_insert(0);
                *peak = (*peak).max(kb);
            }
        }
    }

    pub fn usage(&self) -> Usage {
        let cpu: Vec<f64> = self
            .pids
            .iter()
            .filter_map(|p| Some(self.cpu_end.get(p)? - self.cpu_start.get(p)?))
            .collect();
        Usage {
            processes: self.pids.len(),
            peak_rss_kb_max: self.peak_rss.values().copied().max().unwrap_or(0),
            peak_rss_kb_sum: self.peak_rss.values().sum(),
            lifetime_hwm_kb_max: self
                .pids
                .iter()
                .filter_map(|&p| hwm_kb(p))
                .max()
                .unwrap_or(0),
            cpu_s_max: cpu.iter().copied().fold(0.0, f64::max),
            cpu_s_sum: cpu.iter().sum(),
            voluntary_switches: self.switched(|s| s.0),
            involuntary_switches: self.switched(|s| s.1),
        }
    }

    fn switched(&self, which: impl Fn(&(u64, u64)) -> u64) -> u64 {
        self.pids
            .iter()
            .filter_map(|p| {
                Some(
                    which(self.switches_end.get(p)?)
                        .saturating_sub(which(self.switches_start.get(p)?)),
                )
            })
            .sum()
    }
}
