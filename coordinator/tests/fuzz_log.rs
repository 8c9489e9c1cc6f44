//! Fuzz target: the acceptor log's decoder (`DurableLog::open`, which replays the file and
//! truncates a torn tail) and the replica recovery that consumes what it returns.
//!
//! The log file is whatever a crash, a bad disk or an operator's editor may leave: valid
//! frames of `Record`s (with edge values: ballots and rounds near u64::MAX, odd participant
//! strings), then byte-level mutations of the whole file, frames whose JSON payload was
//! mutated or replaced *and whose checksum was recomputed* (so the JSON decoder, not only the
//! checksum, sees garbage: numbers beyond u64, wrong types, deep nesting, bad escapes),
//! absurd length headers, truncations.
//!
//! Properties: `open` never panics and returns records or an error; the records are exactly
//! what an independent reading of the framing (length, crc32, JSON) yields up to the first
//! bad frame; the file is truncated to exactly those frames; a second `open` returns the same
//! records without truncating again; an append after it lands behind them; and
//! `Replica::recover` (with the timers, resolves and compaction that follow a restart) takes
//! any such records without panicking.
//!
//! Knobs: see the fuzz kit (`PXC_FUZZ_SECS`, `PXC_FUZZ_SEED`, `PXC_FUZZ_CASE`);
//! `PXC_FUZZ_TMP` names the directory for the scratch log (default: /dev/shm when present,
//! since each case rewrites and may fsync the file, else the system temp directory).

#[path = "../core/tests/fuzzkit/mod.rs"]
mod fuzzkit;

use fuzzkit::{mutate, Rng};
use paxos_commit_coordinator::log::DurableLog;
use paxos_commit_core::{Config, Outcome, Participant, Record, Replica, TxnId, Vote};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const LOG_FILE: &str = "acceptor.log";

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

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// A log file: valid frames, some of them corrupted in one of several ways.
fn log_bytes(rng: &mut Rng) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..rng.index(12) {
        let mut payload = match serde_json::to_vec(&record(rng)) {
            Ok(p) => p,
            Err(e) => panic!("a Record always encodes: {e}"),
        };
        match rng.below(12) {
            // A payload mutated, or replaced, under a recomputed (valid) checksum.
            0 => mutate(rng, &mut payload),
            1 => payload = odd_json(rng),
            2 => {
                // An absurd length header, then whatever follows.
                bytes.extend_from_slice(&(rng.interesting_u64() as u32).to_le_bytes());
                bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
                bytes.extend_from_slice(&payload);
                continue;
            }
            _ => {}
        }
        frame(&payload, &mut bytes);
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

/// The framing, read independently of log.rs: records up to the first bad frame, and the
/// length of the good prefix.
fn expected(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &bytes[pos..];
        if rest.len() < 8 {
            return (records, pos);
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if rest.len() - 8 < len {
            return (records, pos);
        }
        let payload = &rest[8..8 + len];
        if crc32fast::hash(payload) != crc {
            return (records, pos);
        }
        match serde_json::from_slice::<Record>(payload) {
            Ok(r) => records.push(r),
            Err(_) => return (records, pos),
        }
        pos += 8 + len;
    }
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
            Record::Round { .. } => None,
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
    let bytes = log_bytes(rng);
    let path = dir.join(LOG_FILE);
    std::fs::write(&path, &bytes).expect("write the scratch log");
    let (want, good) = expected(&bytes);

    let (mut log, records) = match DurableLog::<Record>::open(dir) {
        Ok(opened) => opened,
        Err(e) => {
            // Allowed by the contract; on a healthy scratch directory it is not expected.
            println!("fuzz log: open failed: {e}");
            *stats.entry("open failed").or_default() += 1;
            return;
        }
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
    assert_eq!(log.size_bytes(), good as u64);
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).ok(),
        Some(good as u64),
        "the torn tail was not truncated to the last good frame"
    );

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
