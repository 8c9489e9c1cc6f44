//! The coordinator replica's embedded durable log.
//!
//! A Paxos acceptor may only send a phase 1b (promise) or phase 2b (acceptance) after the
//! state it promises is on stable storage: if a replica forgot a promise or an acceptance
//! after a crash, two different values could be chosen for the same transaction, i.e. one
//! participant could commit while another aborts. This module is that stable storage: an
//! append-only file of records that is `fdatasync`'d before [`DurableLog::append_batch`]
//! returns.
//!
//! An fsync costs far more than the write it protects, so the caller collects the records of
//! many transactions and hands them over in one batch; the whole batch shares one fsync
//! (group commit). Compaction ([`DurableLog::rewrite`]) keeps the file from growing forever.
//!
//! On-disk format: an 8-byte file header (`PXCLOG\0\x02`), then one frame per batch (one
//! fsync), repeated until end of file:
//!
//! ```text
//! batch:  ["PXCB"][u32 LE body length][u32 LE crc32 of body][body]
//! body:   ([u32 LE record length][record: serde_json bytes])*
//! ```
//!
//! JSON keeps the file readable by an operator with ordinary tools. The batch checksum tells
//! a complete batch from one a crash tore while it was being written; and since a batch is
//! the unit of one fsync, only the *last* batch can be torn. A bad batch with a valid batch
//! after it is therefore not a crash but damage (a flipped bit, a bad block, a stray write)
//! to records that were acknowledged: [`DurableLog::open`] refuses such a log
//! ([`LogError::Damaged`]) instead of cutting it short, because an acceptor that forgot its
//! promises could let two outcomes be chosen. The runbook's way out is `--rejoin`.
//!
//! Logs written before this format (no header: `[len][crc][json]` per record) are read and
//! rewritten in it on open.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

const LOG_FILE: &str = "acceptor.log";
const TMP_FILE: &str = "acceptor.log.tmp";
const FILE_MAGIC: &[u8; 8] = b"PXCLOG\x00\x02";
const BATCH_MAGIC: &[u8; 4] = b"PXCB";
const BATCH_HEADER: usize = 12;
/// Compaction writes the live state in batches of at most this many records: damage in one
/// part of a compacted log then still has valid batches after it and is told from a tear.
const REWRITE_BATCH: usize = 1024;
/// Record frames of the format before batches: `[u32 len][u32 crc][json]`.
const V1_HEADER: usize = 8;

/// Errors of the durable log. Every I/O error names the operation and the path involved, so
/// an operator can tell a full disk from a permission problem from a missing directory.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("durable log: {op} failed on {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("durable log: cannot encode a record as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// An earlier write or sync failed, so what is on disk is unknown (after a failed fsync
    /// Linux may already have dropped the dirty pages). Appending more would risk
    /// acknowledging records that sit behind a torn frame and are lost on replay, so the log
    /// refuses all further writes; reopening it recovers from what is really on disk.
    #[error(
        "durable log {} is unusable after an earlier write or sync failure; \
         reopen it to recover from the on-disk state",
        path.display()
    )]
    Poisoned { path: PathBuf },
    /// Records that were acknowledged are unreadable, with valid ones after them: not the
    /// torn tail of a crash. Replaying around the hole would make the acceptor forget
    /// promises and acceptances it gave, so the log is refused.
    #[error(
        "the acceptor log {} is damaged at byte offset {offset} ({reason}), and valid records \
         follow from byte offset {valid_from} ({valid_bytes} bytes): this is not the torn \
         tail of a crash, and replaying around it would make this replica forget promises it \
         made. Keep the file for analysis and bring the replica back with --rejoin (README, \
         runbook \"A damaged acceptor log\"): it moves the log aside and rejoins as an \
         acceptor that answers only for transactions begun after it",
        path.display()
    )]
    Damaged {
        path: PathBuf,
        offset: u64,
        reason: String,
        valid_from: u64,
        valid_bytes: u64,
    },
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// An append-only, crash-safe log of records of type `R`.
///
/// Only one `DurableLog` may have a directory open at a time; the replica owns its directory.
pub struct DurableLog<R> {
    dir: PathBuf,
    path: PathBuf,
    /// Opened in append mode, so every write lands at the current end of the file even after
    /// `open` truncated a torn tail.
    file: File,
    size: u64,
    records_since_rewrite: u64,
    poisoned: bool,
    // `fn() -> R` keeps the log Send + Sync whatever R is: no R is ever stored.
    _records: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for DurableLog<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableLog")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("records_since_rewrite", &self.records_since_rewrite)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl<R: Serialize + DeserializeOwned> DurableLog<R> {
    /// Opens (creating if needed) `dir/acceptor.log` and returns the log together with every
    /// record that was durably appended before, in order.
    ///
    /// A crash can leave a partly written last batch. Replay stops at the first frame that is
    /// incomplete, fails its checksum or does not decode, and truncates the file there: such
    /// a frame was never acknowledged (its fsync had not returned), so dropping it loses
    /// nothing anyone relied on, and later appends must not sit behind garbage.
    pub fn open(dir: &Path) -> Result<(DurableLog<R>, Vec<R>), LogError> {
        let dir_existed = dir.is_dir();
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        if !dir_existed {
            // The new directory entry itself must survive a crash, or the log vanishes with it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }

        // Left over by a crash during `rewrite` before its rename: the old log is still
        // complete and authoritative, the temporary file is garbage.
        let tmp = dir.join(TMP_FILE);
        remove_if_exists(&tmp)?;

        let path = dir.join(LOG_FILE);
        let (mut file, created) = match OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => (file, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                OpenOptions::new()
                    .read(true)
                    .append(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?,
                false,
            ),
            Err(e) => return Err(io_err("create", &path)(e)),
        };
        if created {
            sync_dir(dir)?;
        }

        // The log is kept small by compaction, so reading it whole is simpler than streaming.
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_err("read", &path))?;

        let legacy = !bytes.is_empty() && !bytes.starts_with(&FILE_MAGIC[..bytes.len().min(8)]);
        let replayed = if legacy {
            replay_v1::<R>(&bytes)
        } else if bytes.len() < FILE_MAGIC.len() {
            // New, or a crash tore the header itself: nothing was ever acknowledged.
            Replayed {
                records: Vec::new(),
                stop: (!bytes.is_empty()).then(|| Stop::Torn {
                    offset: 0,
                    reason: "incomplete file header".into(),
                }),
            }
        } else {
            replay_v2::<R>(&bytes)
        };
        let records = replayed.records;
        let mut size = bytes.len() as u64;
        match replayed.stop {
            None => {}
            Some(Stop::Damaged {
                offset,
                reason,
                valid_from,
            }) => {
                return Err(LogError::Damaged {
                    path,
                    offset,
                    reason,
                    valid_from,
                    valid_bytes: size - valid_from,
                })
            }
            Some(Stop::Torn { offset, reason }) => {
                tracing::warn!(
                    path = %path.display(),
                    offset,
                    dropped_bytes = size - offset,
                    reason = %reason,
                    "durable log: torn tail of the last write ({reason}), truncating at byte \
                     offset {offset}; no valid record follows it, so it was never acknowledged"
                );
                file.set_len(offset)
                    .map_err(io_err("truncate torn tail of", &path))?;
                // Without this sync a second crash could resurrect the garbage behind records
                // appended after this open.
                file.sync_all()
                    .map_err(io_err("sync after truncating", &path))?;
                size = offset;
            }
        }
        if size == 0 {
            file.write_all(FILE_MAGIC)
                .map_err(io_err("write header of", &path))?;
            file.sync_all().map_err(io_err("fsync", &path))?;
            size = FILE_MAGIC.len() as u64;
        }

        let mut log = DurableLog {
            dir: dir.to_path_buf(),
            path,
            file,
            size,
            records_since_rewrite: 0,
            poisoned: false,
            _records: PhantomData,
        };
        if legacy {
            log.rewrite(&records)?;
            tracing::info!(
                path = %log.path.display(),
                records = records.len(),
                "durable log: rewrote a log of the earlier format in the batch format"
            );
        }
        Ok((log, records))
    }

    /// Moves `dir/acceptor.log` aside (to `acceptor.log.damaged-<unix ms>`, kept for analysis)
    /// so that the next [`DurableLog::open`] starts an empty log. Returns the new name, or
    /// `None` when there was no log.
    pub fn set_aside(dir: &Path) -> Result<Option<PathBuf>, LogError> {
        let path = dir.join(LOG_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let aside = dir.join(format!("{LOG_FILE}.damaged-{stamp}"));
        fs::rename(&path, &aside).map_err(io_err("move aside", &path))?;
        sync_dir(dir)?;
        Ok(Some(aside))
    }

    /// Appends all `records` and makes them durable with a single `fdatasync`. When this
    /// returns `Ok`, every record of the batch survives a crash; before that, none may be
    /// acknowledged. An empty batch does nothing (no write, no sync).
    ///
    /// After an error the log is poisoned (see [`LogError::Poisoned`]) unless the error came
    /// from encoding, which happens before the file is touched.
    pub fn append_batch(&mut self, records: &[R]) -> Result<(), LogError> {
        if records.is_empty() {
            return Ok(());
        }
        self.check_poisoned()?;
        let mut buf = Vec::new();
        encode_batch(records, &mut buf)?;
        stall_hook();

        // Poison first and clear only on success: a write that failed halfway may have left a
        // torn frame that later appends would bury.
        self.poisoned = true;
        self.file
            .write_all(&buf)
            .map_err(io_err("append to", &self.path))?;
        self.file
            .sync_data()
            .map_err(io_err("fdatasync", &self.path))?;
        self.poisoned = false;

        self.size += buf.len() as u64;
        self.records_since_rewrite += records.len() as u64;
        Ok(())
    }

    /// Compaction: replaces the log by exactly `live`. Crash-safe at every point: the new
    /// contents are written and synced under a temporary name and then atomically renamed
    /// over the log, so after a crash the directory holds either the complete old log or the
    /// complete new one.
    ///
    /// If it fails before the rename, the old log stays in use and intact. If it fails after
    /// the rename (the directory sync), the log is poisoned, because it is unknown which
    /// file a crash would leave behind.
    pub fn rewrite(&mut self, live: &[R]) -> Result<(), LogError> {
        self.check_poisoned()?;
        let mut buf = FILE_MAGIC.to_vec();
        for chunk in live.chunks(REWRITE_BATCH) {
            encode_batch(chunk, &mut buf)?;
        }

        let tmp = self.dir.join(TMP_FILE);
        let new_file = match write_tmp(&tmp, &buf) {
            Ok(file) => file,
            Err(e) => {
                // Best effort: a leftover temporary file is also removed by the next `open`.
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &self.path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename temporary file over", &self.path)(e));
        }

        // From here on the old handle points at an unlinked inode: appends must go to the new
        // file, whose handle is the one we wrote the temporary file through.
        self.file = new_file;
        self.size = buf.len() as u64;
        self.records_since_rewrite = 0;
        self.poisoned = true;
        sync_dir(&self.dir)?;
        self.poisoned = false;
        Ok(())
    }

    /// Bytes in the log file (all valid frames).
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// Records appended since `open` or the last `rewrite`: a cheap signal of how much
    /// garbage may have piled up, for deciding when to compact.
    pub fn records_since_rewrite(&self) -> u64 {
        self.records_since_rewrite
    }

    /// Path of the log file (`<dir>/acceptor.log`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_poisoned(&self) -> Result<(), LogError> {
        if self.poisoned {
            Err(LogError::Poisoned {
                path: self.path.clone(),
            })
        } else {
            Ok(())
        }
    }
}

/// Fault injection for the stalled-disk tests (where fsfreeze is not available): while the
/// file named by `PAXOS_COMMIT_LOG_STALL_FILE` exists, every append waits, as a write to a
/// frozen filesystem would.
fn stall_hook() {
    use std::sync::OnceLock;
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(file) =
        FILE.get_or_init(|| std::env::var_os("PAXOS_COMMIT_LOG_STALL_FILE").map(PathBuf::from))
    else {
        return;
    };
    while file.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn too_big(what: &str, len: usize) -> LogError {
    LogError::Encode(<serde_json::Error as serde::ser::Error>::custom(format!(
        "{what} of {len} bytes exceeds the 4 GiB frame limit"
    )))
}

/// Appends one batch frame holding `records` to `buf`.
fn encode_batch<R: Serialize>(records: &[R], buf: &mut Vec<u8>) -> Result<(), LogError> {
    let start = buf.len();
    buf.extend_from_slice(BATCH_MAGIC);
    buf.extend_from_slice(&[0; 8]);
    for record in records {
        let payload = serde_json::to_vec(record)?;
        let len = u32::try_from(payload.len()).map_err(|_| too_big("record", payload.len()))?;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&payload);
    }
    let body = &buf[start + BATCH_HEADER..];
    let len = u32::try_from(body.len()).map_err(|_| too_big("batch", body.len()))?;
    let crc = crc32fast::hash(body);
    buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Why replay stopped before the end of the file.
#[derive(Debug)]
enum Stop {
    /// The last write, torn by a crash: nothing valid follows.
    Torn { offset: u64, reason: String },
    /// Unreadable bytes with valid records after them (from `valid_from`).
    Damaged {
        offset: u64,
        reason: String,
        valid_from: u64,
    },
}

struct Replayed<R> {
    records: Vec<R>,
    stop: Option<Stop>,
}

/// A frame that cannot be read: `torn` when the bytes may simply be an unfinished write (too
/// short, checksum mismatch); otherwise the bytes are exactly as written and still unreadable.
struct BadFrame {
    reason: String,
    torn: bool,
}

fn bad(reason: impl Into<String>, torn: bool) -> BadFrame {
    BadFrame {
        reason: reason.into(),
        torn,
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Decodes the batch at `pos`: its records and where the next frame starts.
fn read_batch<R: DeserializeOwned>(bytes: &[u8], pos: usize) -> Result<(Vec<R>, usize), BadFrame> {
    let rest = &bytes[pos..];
    if rest.len() < BATCH_HEADER {
        return Err(bad("incomplete batch header", true));
    }
    if &rest[..4] != BATCH_MAGIC {
        return Err(bad("no batch header", true));
    }
    let len = u32_at(rest, 4).unwrap_or(0);
    let crc = u32_at(rest, 8).unwrap_or(0) as u32;
    let Some(body) = rest.get(BATCH_HEADER..BATCH_HEADER + len) else {
        let have = rest.len() - BATCH_HEADER;
        return Err(bad(
            format!("incomplete batch ({have} of {len} bytes)"),
            true,
        ));
    };
    if crc32fast::hash(body) != crc {
        return Err(bad("batch checksum mismatch", true));
    }
    let mut records = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let n = u32_at(body, at).ok_or_else(|| bad("record header cut short", false))?;
        let payload = body
            .get(at + 4..at + 4 + n)
            .ok_or_else(|| bad("record longer than its batch", false))?;
        let record = serde_json::from_slice::<R>(payload)
            .map_err(|e| bad(format!("undecodable record: {e}"), false))?;
        records.push(record);
        at += 4 + n;
    }
    Ok((records, pos + BATCH_HEADER + len))
}

/// Replays a log in the batch format (`bytes` includes the file header).
fn replay_v2<R: DeserializeOwned>(bytes: &[u8]) -> Replayed<R> {
    replay_frames(
        bytes,
        FILE_MAGIC.len(),
        |pos| read_batch(bytes, pos),
        // Only the last batch can be torn: any valid batch after a bad one means damage.
        |q| bytes[q..].starts_with(BATCH_MAGIC) && read_batch::<R>(bytes, q).is_ok(),
    )
}

/// Reads frames from `start` with `read` until the end or the first bad one; then whether
/// any offset after it holds a valid frame (`valid_at`) tells a torn tail from damage.
fn replay_frames<R>(
    bytes: &[u8],
    start: usize,
    read: impl Fn(usize) -> Result<(Vec<R>, usize), BadFrame>,
    valid_at: impl Fn(usize) -> bool,
) -> Replayed<R> {
    let mut records = Vec::new();
    let mut pos = start;
    while pos < bytes.len() {
        match read(pos) {
            Ok((frame, next)) => {
                records.extend(frame);
                pos = next;
            }
            Err(e) => {
                let valid_after = (pos + 1..bytes.len()).find(|&q| valid_at(q));
                return Replayed {
                    records,
                    stop: Some(stop_at(pos, e, valid_after)),
                };
            }
        }
    }
    Replayed {
        records,
        stop: None,
    }
}

fn stop_at(pos: usize, e: BadFrame, valid_after: Option<usize>) -> Stop {
    match valid_after {
        None if e.torn => Stop::Torn {
            offset: pos as u64,
            reason: e.reason,
        },
        // A frame whose checksum holds but which does not decode is not torn either: the
        // bytes are as they were written (a newer version's record, or a bug).
        found => Stop::Damaged {
            offset: pos as u64,
            reason: e.reason,
            valid_from: found.unwrap_or(pos) as u64,
        },
    }
}

/// Decodes the record frame of the earlier format at `pos`.
fn read_v1<R: DeserializeOwned>(bytes: &[u8], pos: usize) -> Result<(R, usize), BadFrame> {
    let rest = &bytes[pos..];
    let (Some(len), Some(crc)) = (u32_at(rest, 0), u32_at(rest, 4)) else {
        return Err(bad("incomplete frame header", true));
    };
    let Some(payload) = rest.get(V1_HEADER..V1_HEADER + len) else {
        return Err(bad("incomplete payload", true));
    };
    if crc32fast::hash(payload) != crc as u32 {
        return Err(bad("checksum mismatch", true));
    }
    match serde_json::from_slice::<R>(payload) {
        Ok(record) => Ok((record, pos + V1_HEADER + len)),
        // The earlier format treated these as a torn tail (zero-filled blocks decode so).
        Err(e) => Err(bad(format!("undecodable record: {e}"), true)),
    }
}

/// Replays a log of the earlier format, one checksum per record.
fn replay_v1<R: DeserializeOwned>(bytes: &[u8]) -> Replayed<R> {
    replay_frames(
        bytes,
        0,
        |pos| read_v1::<R>(bytes, pos).map(|(record, next)| (vec![record], next)),
        |q| read_v1::<R>(bytes, q).is_ok_and(|(_, next)| next > q + V1_HEADER + 1),
    )
}

fn write_tmp(tmp: &Path, buf: &[u8]) -> Result<File, LogError> {
    remove_if_exists(tmp)?;
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(tmp)
        .map_err(io_err("create", tmp))?;
    file.write_all(buf).map_err(io_err("write", tmp))?;
    // sync_all, not sync_data: the rename must never expose a file whose size is not yet
    // durable.
    file.sync_all().map_err(io_err("fsync", tmp))?;
    Ok(file)
}

fn remove_if_exists(path: &Path) -> Result<(), LogError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove stale", path)(e)),
    }
}

/// Makes creations, renames and removals of entries in `dir` durable; fsync of a file alone
/// does not cover its directory entry.
fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Rec {
        Promise {
            txn: String,
            ballot: u64,
        },
        Accept {
            txn: String,
            ballot: u64,
            prepared: bool,
        },
    }

    fn promise(txn: &str, ballot: u64) -> Rec {
        Rec::Promise {
            txn: txn.to_string(),
            ballot,
        }
    }

    fn accept(txn: &str, ballot: u64, prepared: bool) -> Rec {
        Rec::Accept {
            txn: txn.to_string(),
            ballot,
            prepared,
        }
    }

    fn open(dir: &Path) -> (DurableLog<Rec>, Vec<Rec>) {
        DurableLog::open(dir).unwrap()
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    fn append_raw(path: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn roundtrip_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory that does not exist yet: open must create it.
        let dir = tmp.path().join("replica-1");
        let b1 = vec![promise("t1", 0), accept("t1", 0, true)];
        let b2 = vec![accept("t2", 0, false)];
        let b3 = vec![promise("t3", 7), accept("t3", 7, true), promise("t4", 1)];
        {
            let (mut log, recs) = open(&dir);
            assert!(recs.is_empty());
            assert_eq!(log.path(), dir.join("acceptor.log"));
            log.append_batch(&b1).unwrap();
            log.append_batch(&b2).unwrap();
            assert_eq!(log.records_since_rewrite(), 3);
            assert_eq!(log.size_bytes(), file_len(log.path()));
        }
        {
            let (mut log, recs) = open(&dir);
            assert_eq!(recs, [b1.clone(), b2.clone()].concat());
            assert_eq!(log.records_since_rewrite(), 0);
            log.append_batch(&b3).unwrap();
            assert_eq!(log.size_bytes(), file_len(log.path()));
        }
        let (_, recs) = open(&dir);
        assert_eq!(recs, [b1, b2, b3].concat());
    }

    #[test]
    fn garbage_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t1", 0)]).unwrap();
        let good_len = log.size_bytes();
        let path = log.path().to_path_buf();
        drop(log);

        append_raw(&path, b"\x05\x00\x00\x00garbage that is not a frame");
        let (mut log, recs) = open(dir.path());
        assert_eq!(recs, vec![promise("t1", 0)]);
        assert_eq!(file_len(&path), good_len);
        assert_eq!(log.size_bytes(), good_len);

        log.append_batch(&[accept("t1", 0, true)]).unwrap();
        drop(log);
        let (_, recs) = open(dir.path());
        assert_eq!(recs, vec![promise("t1", 0), accept("t1", 0, true)]);
    }

    #[test]
    fn frame_cut_mid_payload_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t1", 0)]).unwrap();
        let good_len = log.size_bytes();
        log.append_batch(&[accept("t1", 0, true)]).unwrap();
        let path = log.path().to_path_buf();
        drop(log);

        // Cut in the middle of the second frame's payload, then inside its header.
        for cut in [file_len(&path) - 3, good_len + 5] {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            let (log, recs) = open(dir.path());
            assert_eq!(recs, vec![promise("t1", 0)]);
            assert_eq!(file_len(&path), good_len);
            drop(log);
            // Restore a second frame for the next cut.
            let (mut log, _) = open(dir.path());
            log.append_batch(&[accept("t1", 0, true)]).unwrap();
        }

        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t2", 3)]).unwrap();
        drop(log);
        let (_, recs) = open(dir.path());
        assert_eq!(
            recs,
            vec![promise("t1", 0), accept("t1", 0, true), promise("t2", 3)]
        );
    }

    #[test]
    fn bad_crc_in_last_frame_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t1", 0)]).unwrap();
        log.append_batch(&[promise("t2", 0), promise("t2b", 0)])
            .unwrap();
        let path = log.path().to_path_buf();
        drop(log);

        // Flip one bit in the last payload byte: length still fits, checksum does not. The
        // last batch is the one a crash can tear, so this reads as a torn tail.
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&path, &bytes).unwrap();

        let (mut log, recs) = open(dir.path());
        assert_eq!(recs, vec![promise("t1", 0)]);
        log.append_batch(&[promise("t3", 0)]).unwrap();
        drop(log);
        let (_, recs) = open(dir.path());
        assert_eq!(recs, vec![promise("t1", 0), promise("t3", 0)]);
    }

    #[test]
    fn garbage_and_zeros_after_the_last_batch_are_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t1", 0)]).unwrap();
        let good_len = log.size_bytes();
        let path = log.path().to_path_buf();
        drop(log);

        append_raw(&path, b"PXCB\x10\x00\x00\x00");
        // Zero-filled blocks, as some filesystems leave after a crash.
        append_raw(&path, &[0u8; 16]);

        let (_, recs) = open(dir.path());
        assert_eq!(recs, vec![promise("t1", 0)]);
        assert_eq!(file_len(&path), good_len);
    }

    #[test]
    fn a_damaged_batch_with_valid_batches_after_it_is_refused_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t1", 0)]).unwrap();
        let second = log.size_bytes();
        log.append_batch(&[accept("t1", 0, true)]).unwrap();
        log.append_batch(&[promise("t2", 5)]).unwrap();
        let path = log.path().to_path_buf();
        drop(log);
        let original = fs::read(&path).unwrap();

        // One flipped bit in the middle batch's payload, then in its length field.
        for at in [second as usize + 20, second as usize + 5] {
            let mut bytes = original.clone();
            bytes[at] ^= 0x04;
            fs::write(&path, &bytes).unwrap();
            let err = DurableLog::<Rec>::open(dir.path()).unwrap_err();
            match &err {
                LogError::Damaged {
                    offset,
                    valid_from,
                    valid_bytes,
                    ..
                } => {
                    assert_eq!(*offset, second);
                    assert!(*valid_from > second);
                    assert_eq!(*valid_from + *valid_bytes, original.len() as u64);
                }
                other => panic!("expected Damaged, got {other}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(&format!("offset {second}")), "{msg}");
            assert!(msg.contains("--rejoin"), "{msg}");
            // Nothing was cut: the evidence stays for the operator.
            assert_eq!(fs::read(&path).unwrap(), bytes);
        }
    }

    #[test]
    fn a_batch_that_checks_out_but_does_not_decode_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t1", 0)]).unwrap();
        let good_len = log.size_bytes();
        let path = log.path().to_path_buf();
        drop(log);

        // A well-formed batch of a record this version does not know (a newer one's).
        let mut frame = Vec::new();
        encode_batch(&[serde_json::json!({"NotARecord": 1})], &mut frame).unwrap();
        append_raw(&path, &frame);
        let err = DurableLog::<Rec>::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, LogError::Damaged { offset, .. } if offset == good_len),
            "{err}"
        );
    }

    #[test]
    fn a_log_of_the_earlier_format_is_read_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let v1 = |records: &[Rec]| {
            let mut buf = Vec::new();
            for r in records {
                let json = serde_json::to_vec(r).unwrap();
                buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
                buf.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
                buf.extend_from_slice(&json);
            }
            buf
        };
        let recs = vec![promise("t1", 0), accept("t1", 0, true), promise("t2", 3)];
        let mut bytes = v1(&recs);
        bytes.extend_from_slice(b"\x40\x00\x00\x00torn");
        fs::write(&path, &bytes).unwrap();
        let (mut log, got) = open(dir.path());
        assert_eq!(got, recs);
        assert!(fs::read(&path).unwrap().starts_with(FILE_MAGIC));
        log.append_batch(&[promise("t3", 0)]).unwrap();
        drop(log);
        let (_, got) = open(dir.path());
        assert_eq!(got.len(), 4);

        // Damage in the middle of an old log is refused too.
        let mut bytes = v1(&recs);
        bytes[12] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = DurableLog::<Rec>::open(dir.path()).unwrap_err();
        assert!(matches!(err, LogError::Damaged { offset: 0, .. }), "{err}");
    }

    #[test]
    fn rewrite_keeps_exactly_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        for i in 0..10 {
            let txn = format!("t{i}");
            log.append_batch(&[promise(&txn, 0), accept(&txn, 0, true)])
                .unwrap();
        }
        assert_eq!(log.records_since_rewrite(), 20);
        let before = log.size_bytes();

        let live = vec![accept("t8", 0, true), accept("t9", 0, false)];
        log.rewrite(&live).unwrap();
        assert_eq!(log.records_since_rewrite(), 0);
        assert!(log.size_bytes() < before);
        assert_eq!(log.size_bytes(), file_len(log.path()));
        assert!(!dir.path().join(TMP_FILE).exists());

        // Appends after a rewrite go to the new file, not the unlinked old one.
        log.append_batch(&[promise("t10", 2)]).unwrap();
        assert_eq!(log.records_since_rewrite(), 1);
        assert_eq!(log.size_bytes(), file_len(log.path()));
        drop(log);

        let (mut log, recs) = open(dir.path());
        assert_eq!(
            recs,
            vec![
                accept("t8", 0, true),
                accept("t9", 0, false),
                promise("t10", 2)
            ]
        );

        log.rewrite(&[]).unwrap();
        assert_eq!(log.size_bytes(), FILE_MAGIC.len() as u64);
        drop(log);
        let (_, recs) = open(dir.path());
        assert!(recs.is_empty());
    }

    #[test]
    fn stale_tmp_from_crashed_rewrite_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t1", 0)]).unwrap();
        drop(log);
        // A crash before the rename leaves a (possibly partial) temporary file behind.
        fs::write(dir.path().join(TMP_FILE), b"\x01\x02partial").unwrap();

        let (mut log, recs) = open(dir.path());
        assert_eq!(recs, vec![promise("t1", 0)]);
        assert!(!dir.path().join(TMP_FILE).exists());
        log.rewrite(&[accept("t1", 0, true)]).unwrap();
        drop(log);
        let (_, recs) = open(dir.path());
        assert_eq!(recs, vec![accept("t1", 0, true)]);
    }

    #[test]
    fn empty_batch_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        let header = FILE_MAGIC.len() as u64;
        log.append_batch(&[]).unwrap();
        assert_eq!(log.size_bytes(), header);
        assert_eq!(log.records_since_rewrite(), 0);
        assert_eq!(file_len(log.path()), header);

        log.append_batch(&[promise("t1", 0)]).unwrap();
        let len = log.size_bytes();
        log.append_batch(&[]).unwrap();
        assert_eq!(log.size_bytes(), len);
        assert_eq!(file_len(log.path()), len);
        assert_eq!(log.records_since_rewrite(), 1);
    }

    #[test]
    fn batches_are_magic_length_crc_then_length_json_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        let recs = [promise("t1", 4), accept("t1", 4, false)];
        log.append_batch(&recs).unwrap();
        let bytes = fs::read(log.path()).unwrap();
        assert_eq!(&bytes[..8], FILE_MAGIC);
        let batch = &bytes[8..];
        assert_eq!(&batch[..4], BATCH_MAGIC);
        let body = &batch[12..];
        assert_eq!(batch[4..8], (body.len() as u32).to_le_bytes());
        assert_eq!(batch[8..12], crc32fast::hash(body).to_le_bytes());
        let a = serde_json::to_vec(&recs[0]).unwrap();
        assert_eq!(body[..4], (a.len() as u32).to_le_bytes());
        assert_eq!(body[4..4 + a.len()], a[..]);
    }

    #[test]
    fn io_error_names_operation_and_path() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the log directory should be.
        let not_a_dir = dir.path().join("file");
        fs::write(&not_a_dir, b"x").unwrap();
        let err = DurableLog::<Rec>::open(&not_a_dir.join("sub")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("create directory"), "{msg}");
        assert!(msg.contains("sub"), "{msg}");
    }
}
