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
//! On-disk framing, repeated until end of file:
//!
//! ```text
//! [u32 LE payload length][u32 LE crc32 of payload][payload: serde_json bytes]
//! ```
//!
//! JSON keeps the file readable by an operator with ordinary tools; the length and checksum
//! let replay tell a complete record from one torn by a crash in the middle of a write.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

const LOG_FILE: &str = "acceptor.log";
const TMP_FILE: &str = "acceptor.log.tmp";
const HEADER_LEN: usize = 8;

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
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
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

        let (records, torn) = replay::<R>(&bytes);
        let mut size = bytes.len() as u64;
        if let Some(TornTail { offset, reason }) = torn {
            tracing::warn!(
                path = %path.display(),
                offset,
                dropped_bytes = size - offset,
                reason = %reason,
                "durable log: torn or corrupt tail ({reason}), truncating at byte offset {offset}"
            );
            file.set_len(offset)
                .map_err(io_err("truncate torn tail of", &path))?;
            // Without this sync a second crash could resurrect the garbage behind records
            // appended after this open.
            file.sync_all()
                .map_err(io_err("sync after truncating", &path))?;
            size = offset;
        }

        let log = DurableLog {
            dir: dir.to_path_buf(),
            path,
            file,
            size,
            records_since_rewrite: 0,
            poisoned: false,
            _records: PhantomData,
        };
        Ok((log, records))
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
        for record in records {
            encode_frame(record, &mut buf)?;
        }

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
        let mut buf = Vec::new();
        for record in live {
            encode_frame(record, &mut buf)?;
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

fn encode_frame<R: Serialize>(record: &R, buf: &mut Vec<u8>) -> Result<(), LogError> {
    let payload = serde_json::to_vec(record)?;
    let len = u32::try_from(payload.len()).map_err(|_| {
        <serde_json::Error as serde::ser::Error>::custom(format!(
            "record of {} bytes exceeds the 4 GiB frame limit",
            payload.len()
        ))
    })?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    Ok(())
}

/// Where and why replay stopped before the end of the file.
struct TornTail {
    offset: u64,
    reason: String,
}

/// Decodes frames from the start of `bytes` and returns the records and, if replay did not
/// reach the end, the first bad frame: everything from there on is treated as torn.
fn replay<R: DeserializeOwned>(bytes: &[u8]) -> (Vec<R>, Option<TornTail>) {
    let mut records = Vec::new();
    let mut pos = 0usize;
    let torn = |pos: usize, reason: String| {
        Some(TornTail {
            offset: pos as u64,
            reason,
        })
    };
    while pos < bytes.len() {
        let Some((header, body)) = bytes[pos..].split_at_checked(HEADER_LEN) else {
            return (records, torn(pos, "incomplete frame header".into()));
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(payload) = body.get(..len) else {
            let reason = format!("incomplete payload ({} of {len} bytes)", body.len());
            return (records, torn(pos, reason));
        };
        if crc32fast::hash(payload) != crc {
            return (records, torn(pos, "checksum mismatch".into()));
        }
        match serde_json::from_slice::<R>(payload) {
            Ok(record) => records.push(record),
            Err(e) => return (records, torn(pos, format!("undecodable record: {e}"))),
        }
        pos += HEADER_LEN + len;
    }
    (records, None)
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
        log.append_batch(&[promise("t1", 0), promise("t2", 0)])
            .unwrap();
        let path = log.path().to_path_buf();
        drop(log);

        // Flip one bit in the last payload byte: length still fits, checksum does not.
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
    fn valid_crc_but_undecodable_json_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        log.append_batch(&[promise("t1", 0)]).unwrap();
        let good_len = log.size_bytes();
        let path = log.path().to_path_buf();
        drop(log);

        let payload = br#"{"NotARecord":1}"#;
        let mut frame = Vec::new();
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);
        append_raw(&path, &frame);
        // Zero-filled tail, as some filesystems leave after a crash: len 0 has crc 0.
        append_raw(&path, &[0u8; 16]);

        let (_, recs) = open(dir.path());
        assert_eq!(recs, vec![promise("t1", 0)]);
        assert_eq!(file_len(&path), good_len);
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
        assert_eq!(log.size_bytes(), 0);
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
        log.append_batch(&[]).unwrap();
        assert_eq!(log.size_bytes(), 0);
        assert_eq!(log.records_since_rewrite(), 0);
        assert_eq!(file_len(log.path()), 0);

        log.append_batch(&[promise("t1", 0)]).unwrap();
        let len = log.size_bytes();
        log.append_batch(&[]).unwrap();
        assert_eq!(log.size_bytes(), len);
        assert_eq!(file_len(log.path()), len);
        assert_eq!(log.records_since_rewrite(), 1);
    }

    #[test]
    fn frames_are_length_crc_json() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path());
        let rec = promise("t1", 4);
        log.append_batch(std::slice::from_ref(&rec)).unwrap();
        let bytes = fs::read(log.path()).unwrap();
        let json = serde_json::to_vec(&rec).unwrap();
        assert_eq!(bytes[..4], (json.len() as u32).to_le_bytes());
        assert_eq!(bytes[4..8], crc32fast::hash(&json).to_le_bytes());
        assert_eq!(bytes[8..], json[..]);
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
