//! Decided outcomes, remembered compactly for days after the acceptor state is gone.
//!
//! The core keeps a finished transaction's full state only for `retention_ms` (a minute by
//! default) and compaction then drops its records: a client that was cut off for longer
//! could never learn whether its transfer committed. This archive keeps just the outcome:
//! 9 bytes per transaction on disk, one file per UTC day (`outcomes-<day>.bin`, entries of
//! `[u64 LE txid][u8 outcome]`), files older than `outcome_retention_days` deleted, and an
//! in-memory index for GetStatus of 8 bytes per transaction: per day and outcome, the txids
//! in a few sorted runs (txids are random, so no denser form exists without losing
//! exactness; a hash table would cost three to four times as much).
//!
//! It is a learner's memory, never acceptor state: an outcome enters it only once decided,
//! so nothing in it can contradict the protocol. It is not synced with every batch (that
//! would double the fsyncs): an entry lost in a crash is still in the acceptor log, which
//! keeps it for the retention window, far longer than the archive's sync interval.

use crate::log::{io_err, LogError};
use paxos_commit_core::{Outcome, TxnId};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ENTRY: usize = 9;
const PREFIX: &str = "outcomes-";
const SUFFIX: &str = ".bin";
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

fn today() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        / DAY_MS
}

/// Sorted runs of txids, largest first, each at least twice the next: an insert is
/// amortised O(log n) and a lookup a binary search per run, with 8 bytes per txid.
#[derive(Debug, Default)]
struct Runs {
    runs: Vec<Vec<u64>>,
    /// The newest txids, unsorted, until there are [`TAIL`] of them.
    tail: Vec<u64>,
}

/// Txids gathered before they are sorted into a run.
const TAIL: usize = 1024;

impl Runs {
    fn insert(&mut self, id: u64) {
        self.tail.push(id);
        if self.tail.len() < TAIL {
            return;
        }
        let mut run = std::mem::take(&mut self.tail);
        run.sort_unstable();
        self.runs.push(run);
        while self.runs.len() >= 2 {
            let n = self.runs.len();
            if self.runs[n - 2].len() > 2 * self.runs[n - 1].len() {
                break;
            }
            let (Some(b), Some(a)) = (self.runs.pop(), self.runs.pop()) else {
                break;
            };
            self.runs.push(merge(&a, &b));
        }
    }

    fn contains(&self, id: u64) -> bool {
        self.tail.contains(&id) || self.runs.iter().any(|r| r.binary_search(&id).is_ok())
    }

    fn len(&self) -> usize {
        self.tail.len() + self.runs.iter().map(Vec::len).sum::<usize>()
    }

    fn bytes(&self) -> usize {
        8 * (self.tail.capacity() + self.runs.iter().map(Vec::capacity).sum::<usize>())
    }
}

fn merge(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// The in-memory index: per day, the txids that committed and those that aborted.
#[derive(Debug, Default)]
pub struct Index {
    days: std::collections::BTreeMap<u64, [Runs; 2]>,
    keep_days: u64,
}

fn slot(outcome: Outcome) -> usize {
    usize::from(outcome == Outcome::Committed)
}

impl Index {
    pub fn get(&self, txn: TxnId) -> Option<Outcome> {
        // Newest first: that is where a client that was cut off looks.
        self.days.values().rev().find_map(|[aborted, committed]| {
            if committed.contains(txn.0) {
                Some(Outcome::Committed)
            } else if aborted.contains(txn.0) {
                Some(Outcome::Aborted)
            } else {
                None
            }
        })
    }

    pub fn len(&self) -> usize {
        self.days
            .values()
            .map(|d| d.iter().map(Runs::len).sum::<usize>())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory held by the index, in bytes.
    pub fn bytes(&self) -> usize {
        self.days
            .values()
            .map(|d| d.iter().map(Runs::bytes).sum::<usize>())
            .sum()
    }

    pub fn insert(&mut self, txn: TxnId, outcome: Outcome) {
        self.insert_on(today(), txn, outcome);
    }

    fn insert_on(&mut self, day: u64, txn: TxnId, outcome: Outcome) {
        self.days.entry(day).or_default()[slot(outcome)].insert(txn.0);
    }

    /// Drops what is older than the retention (called when the day changes).
    pub fn prune(&mut self) {
        let oldest = today().saturating_sub(self.keep_days);
        self.days.retain(|day, _| *day >= oldest);
    }
}

/// The writing side, used from the blocking task that writes the acceptor log.
#[derive(Debug)]
pub struct Archive {
    dir: PathBuf,
    keep_days: u64,
    day: u64,
    file: File,
    unsynced: bool,
    last_sync: std::time::Instant,
}

/// How often appended outcomes are made durable.
const SYNC_EVERY: Duration = Duration::from_secs(1);

impl Archive {
    /// Opens the archive in `dir`, deleting days older than `keep`, and returns it with the
    /// index of every outcome it still holds.
    pub fn open(dir: &Path, keep: Duration) -> Result<(Archive, Index), LogError> {
        let keep_days = (keep.as_millis() as u64).div_ceil(DAY_MS).max(1);
        let today = today();
        let mut index = Index {
            days: Default::default(),
            keep_days,
        };
        for (day, path) in day_files(dir)? {
            if day + keep_days < today {
                fs::remove_file(&path).map_err(io_err("remove expired", &path))?;
                continue;
            }
            let bytes = fs::read(&path).map_err(io_err("read", &path))?;
            // A torn last entry (a crash mid-write) is ignored; it is still in the log.
            for e in bytes.chunks_exact(ENTRY) {
                let mut id = [0u8; 8];
                id.copy_from_slice(&e[..8]);
                let outcome = match e[8] {
                    1 => Outcome::Committed,
                    _ => Outcome::Aborted,
                };
                index.insert_on(day, TxnId(u64::from_le_bytes(id)), outcome);
            }
        }
        let file = Self::day_file(dir, today)?;
        Ok((
            Archive {
                dir: dir.to_path_buf(),
                keep_days,
                day: today,
                file,
                unsynced: false,
                last_sync: std::time::Instant::now(),
            },
            index,
        ))
    }

    fn day_file(dir: &Path, day: u64) -> Result<File, LogError> {
        let path = day_path(dir, day);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))
    }

    /// Appends outcomes (one write). Returns whether the day changed (the index should be
    /// pruned).
    pub fn append(&mut self, outcomes: &[(TxnId, Outcome)]) -> Result<bool, LogError> {
        if outcomes.is_empty() {
            return Ok(false);
        }
        let today = today();
        let rolled = today != self.day;
        if rolled {
            self.sync()?;
            self.file = Self::day_file(&self.dir, today)?;
            self.day = today;
            self.remove_expired()?;
        }
        let mut buf = Vec::with_capacity(outcomes.len() * ENTRY);
        for (txn, outcome) in outcomes {
            buf.extend_from_slice(&txn.0.to_le_bytes());
            buf.push(u8::from(*outcome == Outcome::Committed));
        }
        let path = day_path(&self.dir, self.day);
        self.file
            .write_all(&buf)
            .map_err(io_err("append to", &path))?;
        self.unsynced = true;
        Ok(rolled)
    }

    /// [`Archive::sync`] at most every [`SYNC_EVERY`].
    pub fn sync_now_and_then(&mut self) -> Result<(), LogError> {
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.last_sync = std::time::Instant::now();
            self.sync()?;
        }
        Ok(())
    }

    /// Makes what was appended durable (called now and then, not per batch).
    pub fn sync(&mut self) -> Result<(), LogError> {
        if std::mem::take(&mut self.unsynced) {
            let path = day_path(&self.dir, self.day);
            self.file.sync_data().map_err(io_err("fdatasync", &path))?;
        }
        Ok(())
    }

    fn remove_expired(&self) -> Result<(), LogError> {
        for (day, path) in day_files(&self.dir)? {
            if day + self.keep_days < self.day {
                fs::remove_file(&path).map_err(io_err("remove expired", &path))?;
            }
        }
        Ok(())
    }
}

fn day_path(dir: &Path, day: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{day}{SUFFIX}"))
}

/// The archive's day files in `dir`, with their days.
fn day_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(day) = name
            .strip_prefix(PREFIX)
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|d| d.parse::<u64>().ok())
        {
            files.push((day, entry.path()));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_survive_a_reopen_and_old_days_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let week = Duration::from_secs(7 * 24 * 3600);
        let (mut archive, index) = Archive::open(dir.path(), week).unwrap();
        assert!(index.is_empty());
        let a = TxnId::new(0, 1);
        let b = TxnId::new(2, 7);
        archive
            .append(&[(a, Outcome::Committed), (b, Outcome::Aborted)])
            .unwrap();
        archive.sync().unwrap();
        // A day long gone, and a torn entry at the end of today's file.
        fs::write(dir.path().join(format!("{PREFIX}3{SUFFIX}")), [0u8; 9]).unwrap();
        OpenOptions::new()
            .append(true)
            .open(dir.path().join(format!("{PREFIX}{}{SUFFIX}", today())))
            .unwrap()
            .write_all(&[1, 2, 3])
            .unwrap();
        drop(archive);

        let (_, index) = Archive::open(dir.path(), week).unwrap();
        assert_eq!(index.get(a), Some(Outcome::Committed));
        assert_eq!(index.get(b), Some(Outcome::Aborted));
        assert_eq!(index.get(TxnId::new(0, 2)), None);
        assert_eq!(index.len(), 2);
        assert!(!dir.path().join(format!("{PREFIX}3{SUFFIX}")).exists());
    }

    #[test]
    fn the_index_finds_every_outcome_in_its_runs() {
        let mut index = Index::default();
        let ids: Vec<u64> = (0..10_000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 1)
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let o = if i % 3 == 0 {
                Outcome::Aborted
            } else {
                Outcome::Committed
            };
            index.insert_on(5 + (i as u64 / 4000), TxnId(*id), o);
        }
        for (i, id) in ids.iter().enumerate() {
            let want = if i % 3 == 0 {
                Outcome::Aborted
            } else {
                Outcome::Committed
            };
            assert_eq!(index.get(TxnId(*id)), Some(want), "{i}");
        }
        assert_eq!(index.get(TxnId(1)), None);
        assert_eq!(index.len(), ids.len());
        let runs = &index.days[&5][1].runs;
        assert!(runs.len() <= 4, "runs are merged: {}", runs.len());
        assert!(runs.iter().all(|r| r.windows(2).all(|w| w[0] <= w[1])));
    }

    /// The cost per million outcomes, for BENCHMARKS.md:
    /// `cargo test -p paxos-commit-coordinator --lib outcomes::tests::cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn cost_per_million_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut archive, mut index) =
            Archive::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let batch: Vec<(TxnId, Outcome)> = (0..1_000_000u64)
            .map(|i| {
                (
                    TxnId::new((i % 3) as u32, i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    Outcome::Committed,
                )
            })
            .collect();
        let started = std::time::Instant::now();
        for chunk in batch.chunks(1000) {
            archive.append(chunk).unwrap();
            for (t, o) in chunk {
                index.insert(*t, *o);
            }
        }
        archive.sync().unwrap();
        let written = started.elapsed();
        let disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        let memory = index.bytes();
        let started = std::time::Instant::now();
        let (_, reloaded) = Archive::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let load = started.elapsed();
        assert_eq!(reloaded.len(), 1_000_000);
        let started = std::time::Instant::now();
        for (t, _) in batch.iter().step_by(1000) {
            assert_eq!(reloaded.get(*t), Some(Outcome::Committed));
        }
        let lookup = started.elapsed() / 1000;
        println!(
            "per million outcomes: disk {disk} bytes, index {memory} bytes (reloaded: {} \
             bytes), archive+index {written:?}, reload {load:?}, lookup {lookup:?}",
            reloaded.bytes()
        );
    }
}
