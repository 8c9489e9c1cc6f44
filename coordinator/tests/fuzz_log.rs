//! Fuzz target: the acceptor log's decoder (`DurableLog::open`, which replays the file,
//! truncates a torn tail and refuses a damaged log) and the replica recovery that consumes
//! what it returns.
//!
//! The log file is whatever a crash, a bad disk or an operator's editor may leave: the file
//! header and batches of `Record`s (with edge values: ballots and rounds near u64::MAX, odd
//! participant strings), then byte-level mutations of the whole file, batches whose JSON
//! payload was mutated or replaced *and whose checksum was recomputed* (so the JSON decoder,
//! not only the checksum, sees garbage: numbers beyond u64, wrong types, deep nesting, bad
//! escapes), absurd length headers, truncations; and, one case in eight, a log of the earlier
//! per-record format.
//!
//! Properties: `open` never panics; an independent reading of the framing (batch magic,
//! length, crc32, JSON) decides what it must do: the records up to the first bad batch, the
//! file truncated to exactly those batches, when nothing valid follows the bad one (a torn
//! tail); `Damaged`, with the file untouched, when a valid batch follows it or the bad batch
//! checks out but does not decode. After a successful open, a second `open` returns the same
//! records without truncating again; an append lands behind them; and `Replica::recover`
//! (with the timers, resolves and compaction that follow a restart) takes any such records
//! without panicking.
//!
//! Knobs: see the fuzz kit (`PXC_FUZZ_SECS`, `PXC_FUZZ_SEED`, `PXC_FUZZ_CASE`);
//! `PXC_FUZZ_TMP` names the directory for the scratch log (default: /dev/shm when present,
//! since each case rewrites and may fsync the file, else the system temp directory).

#[path = "../core/tests/fuzzkit/mod.rs"]
mod fuzzkit;

use fuzzkit::{mutate, Rng};
use paxos_commit_coordinator::log::{DurableLog, LogError};
use paxos_commit_core::{Config, Outcome, Participant, Record, Replica, TxnId, Vote};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const LOG_FILE: &str = "acceptor.log";
const FILE_MAGIC: &[u8; 8] = b"PXCLOG\x00\x02";
const BATCH_MAGIC: &[u8; 4] = b"PXCB";

fn txn(rng: &mut Rng) -> TxnId {
    if rng.chance(3, 4) {
        TxnId::new(rng.below(3) as u32, rng.below(4))
    } else {
        TxnId(rng.interesting_u64())
    }
}

fn text(rng: &mut Rng) -> String {
    match rng.below(6) {
        0..3 => rng.pick(&["a", "b", "bank_a"]).to_string(),
        3 => String::new(),
        4 => "\u{0}\u{1f}\"\\é\u{10ffff}".to_string(),
        _ => "x".repeat(rng.index(300)),
    }
}

fn participants(rng: &mut Rng) -> Vec<Participant> {
    (0..rng.index(4))
        .map(|_| Participant::new(text(rng), text(rng)))
        .collect()
}

fn ballot(rng: &mut Rng) -> u64 {
    if rng.chance(1, 3) {
        rng.interesting_u64()
    } else {
        rng.below(20)
    }
}

fn vote(rng: &mut Rng) -> Vote {
    if rng.bool() {
        Vote::Prepared
    } else {
        Vote::Aborted
    }
}

fn outcome(rng: &mut Rng) -> Outcome {
    if rng.bool() {
        Outcome::Committed
    } else {
        Outcome::Aborted
    }
}

fn record(rng: &mut Rng) -> Record {
    if rng.chance(1, 20) {
        return Record::Rejoined;
    }
    if rng.chance(1, 10) {
        return match rng.below(3) {
            0 => Record::Incarnation {
                incarnation: rng.next_u64(),
            },
            1 => Record::Admitted,
            _ => Record::Fence {
                replica: rng.below(300) as u32,
                incarnation: rng.next_u64(),
            },
        };
    }
    match rng.below(5) {
        0 => Record::Promise {
            txn: txn(rng),
            ballot: ballot(rng),
            participants: participants(rng),
        },
        1 => Record::Accept {
            txn: txn(rng),
            participant: text(rng),
            ballot: ballot(rng),
            vote: vote(rng),
            participants: participants(rng),
        },
        2 => Record::Round { round: ballot(rng) },
        3 => Record::Decided {
            txn: txn(rng),
            outcome: outcome(rng),
            participants: participants(rng),
        },
        _ => Record::Finished {
            txn: txn(rng),
            outcome: outcome(rng),
        },
    }
}

/// JSON that is almost, or not at all, a record: what a corrupted payload with a valid
/// checksum may hold.
fn odd_json(rng: &mut Rng) -> Vec<u8> {
    let number = *rng.pick(&[
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "1e400",
        "0.5",
        "-0",
        "00",
        "99999999999999999999999999999",
    ]);
    let s = match rng.below(9) {
        0 => format!(r#"{{"Round":{{"round":{number}}}}}"#),
        1 => format!(r#"{{"Promise":{{"txn":{number},"ballot":{number},"participants":[]}}}}"#),
        2 => format!(
            r#"{{"Accept":{{"txn":1,"participant":"a","ballot":{number},"vote":"Prepared","participants":[]}}}}"#
        ),
        3 => r#"{"Finished":{"txn":1,"outcome":"Maybe"}}"#.to_string(),
        4 => format!("{}{}", "[".repeat(rng.index(400)), "]".repeat(rng.index(400))),
        5 => r#"{"Decided":{"txn":1,"outcome":"Aborted","participants":[{"id":"\ud800","address":"x"}]}}"#
            .to_string(),
        6 => r#"{"Round":{"round":1},"Round":{"round":2}}"#.to_string(),
        7 => r#"{"Promise":{"txn":1,"ballot":2,"participants":[],"extra":true}}"#.to_string(),
        _ => String::from_utf8_lossy(&rng.some_bytes(40)).into_owned(),
    };
    s.into_bytes()
}

fn v1_frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn batch(payloads: &[Vec<u8>], out: &mut Vec<u8>) {
    let mut body = Vec::new();
    for p in payloads {
        body.extend_from_slice(&(p.len() as u32).to_le_bytes());
        body.extend_from_slice(p);
    }
    out.extend_from_slice(BATCH_MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

fn payload(rng: &mut Rng) -> Vec<u8> {
    let mut payload = match serde_json::to_vec(&record(rng)) {
        Ok(p) => p,
        Err(e) => panic!("a Record always encodes: {e}"),
    };
    match rng.below(24) {
        // A payload mutated, or replaced, under a recomputed (valid) checksum.
        0 => mutate(rng, &mut payload),
        1 => payload = odd_json(rng),
        _ => {}
    }
    payload
}

/// A log file: batches (or, with `v1`, frames of the earlier format), some of them
/// corrupted in one of several ways.
fn log_bytes(rng: &mut Rng, v1: bool) -> Vec<u8> {
    let mut bytes = if v1 { Vec::new() } else { FILE_MAGIC.to_vec() };
    for _ in 0..rng.index(12) {
        if rng.chance(1, 12) {
            // An absurd length header, then whatever follows.
            if !v1 {
                bytes.extend_from_slice(BATCH_MAGIC);
            }
            bytes.extend_from_slice(&(rng.interesting_u64() as u32).to_le_bytes());
            bytes.extend_from_slice(&rng.some_bytes(12));
            continue;
        }
        if v1 {
            v1_frame(&payload(rng), &mut bytes);
        } else {
            let payloads: Vec<Vec<u8>> = (0..1 + rng.index(3)).map(|_| payload(rng)).collect();
            batch(&payloads, &mut bytes);
        }
    }
    match rng.below(4) {
        0 => mutate(rng, &mut bytes),
        1 if !bytes.is_empty() => {
            let cut = rng.index(bytes.len());
            bytes.truncate(cut);
        }
        2 if rng.chance(1, 4) => bytes.extend(std::iter::repeat_n(0u8, rng.index(40))),
        _ => {}
    }
    bytes
}

/// What `open` must do, read independently of log.rs.
#[derive(Debug)]
enum Expect {
    /// These records, the file cut to `good` bytes (or rewritten, for the earlier format).
    Records(Vec<Record>, usize),
    /// Refused, as damaged at this offset.
    Damaged(usize),
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let x = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([x[0], x[1], x[2], x[3]]) as usize)
}

/// One batch at `pos`: Ok(records, next), or Err(torn?) where `torn` means the bytes may be
/// an unfinished write.
fn read_batch(bytes: &[u8], pos: usize) -> Result<(Vec<Record>, usize), bool> {
    let rest = &bytes[pos..];
    if rest.len() < 12 || &rest[..4] != BATCH_MAGIC {
        return Err(true);
    }
    let len = u32_at(rest, 4).ok_or(true)?;
    let crc = u32_at(rest, 8).ok_or(true)? as u32;
    let body = rest.get(12..12 + len).ok_or(true)?;
    if crc32fast::hash(body) != crc {
        return Err(true);
    }
    let mut records = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let n = u32_at(body, at).ok_or(false)?;
        let p = body.get(at + 4..at + 4 + n).ok_or(false)?;
        records.push(serde_json::from_slice::<Record>(p).map_err(|_| false)?);
        at += 4 + n;
    }
    Ok((records, pos + 12 + len))
}

fn read_v1(bytes: &[u8], pos: usize) -> Option<(Record, usize)> {
    let rest = &bytes[pos..];
    let len = u32_at(rest, 0)?;
    let crc = u32_at(rest, 4)? as u32;
    let payload = rest.get(8..8 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let record = serde_json::from_slice::<Record>(payload).ok()?;
    Some((record, pos + 8 + len))
}

fn expected(bytes: &[u8]) -> Expect {
    let legacy = !bytes.is_empty() && !bytes.starts_with(&FILE_MAGIC[..bytes.len().min(8)]);
    let mut records = Vec::new();
    if legacy {
        let mut pos = 0;
        while pos < bytes.len() {
            match read_v1(bytes, pos) {
                Some((r, next)) => {
                    records.push(r);
                    pos = next;
                }
                None => {
                    let later = (pos + 1..bytes.len())
                        .any(|q| read_v1(bytes, q).is_some_and(|(_, next)| next > q + 9));
                    return if later {
                        Expect::Damaged(pos)
                    } else {
                        Expect::Records(records, pos)
                    };
                }
            }
        }
        return Expect::Records(records, bytes.len());
    }
    if bytes.len() < 8 {
        return Expect::Records(records, 0);
    }
    let mut pos = 8;
    while pos < bytes.len() {
        match read_batch(bytes, pos) {
            Ok((batch, next)) => {
                records.extend(batch);
                pos = next;
            }
            Err(torn) => {
                let later = (pos + 1..bytes.len()).any(|q| read_batch(bytes, q).is_ok());
                return if later || !torn {
                    Expect::Damaged(pos)
                } else {
                    Expect::Records(records, pos)
                };
            }
        }
    }
    Expect::Records(records, bytes.len())
}

fn scratch_dir() -> tempfile::TempDir {
    let base: PathBuf = std::env::var_os("PXC_FUZZ_TMP")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("pxc-fuzz-log")
        .tempdir_in(&base)
        .or_else(|_| tempfile::tempdir())
        .expect("a scratch directory")
}

/// What a restarted replica does first with the records: must not panic, whatever they say.
fn recover(records: &[Record], rng: &mut Rng) {
    let replicas = *rng.pick(&[1u32, 3, 5]);
    let id = rng.below(u64::from(replicas)) as u32;
    let now = rng.below(1 << 40);
    let mut replica = Replica::recover(Config::new(id, replicas), rng.next_u64(), records, now);
    let txns: Vec<TxnId> = records
        .iter()
        .filter_map(|r| match r {
            Record::Promise { txn, .. }
            | Record::Accept { txn, .. }
            | Record::Decided { txn, .. }
            | Record::Finished { txn, .. } => Some(*txn),
            Record::Round { .. }
            | Record::Rejoined
            | Record::Incarnation { .. }
            | Record::Admitted
            | Record::Fence { .. } => None,
        })
        .collect();
    for t in &txns {
        let _ = replica.status(*t);
        let _ = replica.resolve(now, *t, Some("a"), &[]);
    }
    replica.on_tick(now.saturating_add(rng.below(1 << 30)));
    replica.on_tick(u64::MAX);
    let _ = replica.stats();
    let compact = replica.durable_records();
    let _ = Replica::recover(Config::new(id, replicas), 1, &compact, now);
    replica.drain();
}

fn one_case(rng: &mut Rng, dir: &Path, stats: &mut BTreeMap<&'static str, u64>) {
    let v1 = rng.chance(1, 8);
    let bytes = log_bytes(rng, v1);
    let path = dir.join(LOG_FILE);
    std::fs::write(&path, &bytes).expect("write the scratch log");
    let want = expected(&bytes);

    let opened = DurableLog::<Record>::open(dir);
    let (mut log, records) = match (opened, &want) {
        (Err(LogError::Damaged { offset, .. }), Expect::Damaged(at)) => {
            assert_eq!(offset, *at as u64, "damage reported at another offset");
            assert_eq!(
                std::fs::read(&path).ok().as_deref(),
                Some(&bytes[..]),
                "a damaged log was modified"
            );
            *stats.entry("damaged logs refused").or_default() += 1;
            return;
        }
        (Err(e), want) => panic!("open failed: {e}; expected {want:?}"),
        (Ok(_), Expect::Damaged(at)) => panic!("a log damaged at {at} was accepted"),
        (Ok(opened), Expect::Records(..)) => opened,
    };
    let Expect::Records(want, good) = want else {
        unreachable!("matched above")
    };
    *stats
        .entry(if good < bytes.len() {
            "torn tails truncated"
        } else {
            "clean logs"
        })
        .or_default() += 1;
    *stats.entry("records replayed").or_default() += records.len() as u64;
    assert_eq!(records, want, "replayed records differ from the framing");
    let on_disk = std::fs::read(&path).expect("read the log back");
    assert!(on_disk.starts_with(FILE_MAGIC), "no file header after open");
    if !v1 {
        // A new log, or one whose header a crash tore, starts over with a header.
        let kept: &[u8] = if good < FILE_MAGIC.len() {
            FILE_MAGIC
        } else {
            &bytes[..good]
        };
        assert_eq!(log.size_bytes(), kept.len() as u64);
        assert_eq!(
            on_disk, kept,
            "the torn tail was not truncated to the last good batch"
        );
    }

    // A second open finds nothing more to cut; an append lands behind the survivors.
    let extra = record(rng);
    let appended = log.append_batch(std::slice::from_ref(&extra)).is_ok();
    drop(log);
    let (_, again) = DurableLog::<Record>::open(dir).expect("reopen");
    let mut want_again = records.clone();
    if appended {
        want_again.push(extra);
    }
    assert_eq!(again, want_again);

    recover(&records, rng);
}

#[test]
fn fuzz_log() {
    let dir = scratch_dir();
    let mut stats = BTreeMap::new();
    fuzzkit::run("log", |rng| one_case(rng, dir.path(), &mut stats));
    println!("fuzz log: {stats:?}");
}
