//! Fuzz target: the wire → core conversions (`delivered_from_pb`, `msg_from_pb`), the first
//! code every byte from the network reaches.
//!
//! Inputs, per case: structured `PaxosBatch`es whose every field is drawn to hit the edges
//! (ballots around `MAX_BALLOT` and `u64::MAX`, ids of every length and charset, addresses,
//! unknown enum values, empty and oversized lists, missing bodies, malformed txids), and the
//! same batches encoded by prost and mutated byte by byte, then decoded again (random
//! varints, truncations, duplicated fields).
//!
//! Properties: nothing panics; whatever converts is within the bounds `convert.rs` promises
//! (ballots ≤ `MAX_BALLOT`, at most `MAX_PARTICIPANTS` participants of valid id and address,
//! no duplicates); whatever converts round-trips (core → wire → core gives it back, and
//! `msg_from_pb` agrees with `delivered_from_pb`); and every converted message can be fed to
//! a real `Replica` without a panic (the rest of the network → core path).
//!
//! Knobs: see the fuzz kit (`PXC_FUZZ_SECS`, `PXC_FUZZ_SEED`, `PXC_FUZZ_CASE`).

#[path = "../../coordinator/core/tests/fuzzkit/mod.rs"]
mod fuzzkit;

use fuzzkit::{mutate, Rng};
use paxos_commit_core::types::{
    is_valid_address, is_valid_participant_id, MAX_BALLOT, MAX_PARTICIPANTS,
};
use paxos_commit_core::{Config, Msg, Participant, Replica, TxnId};
use paxos_commit_proto::convert::{
    applied_to_pb, delivered_from_pb, enlist_to_pb, enlisted_to_pb, msg_from_pb, msg_to_pb,
    Delivered,
};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::paxos_message::Body;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// What the run exercised (accepted vs refused, by route), printed at the end: a target whose
/// inputs are all refused at the first check proves little.
static STATS: Mutex<BTreeMap<&str, u64>> = Mutex::new(BTreeMap::new());

fn count(what: &'static str) {
    if let Ok(mut stats) = STATS.lock() {
        *stats.entry(what).or_default() += 1;
    }
}

fn txid(rng: &mut Rng) -> String {
    match rng.below(10) {
        0..6 => TxnId(rng.interesting_u64()).to_string(),
        6 => format!("{:016X}", rng.next_u64()),
        7 => {
            let mut s = TxnId(rng.next_u64()).to_string();
            let i = rng.index(s.len());
            let odd = ["+", "-", "g", " ", "é"][rng.index(5)];
            s.replace_range(i..=i, odd);
            s
        }
        8 => "0".repeat(rng.index(20)),
        _ => String::from_utf8_lossy(&rng.some_bytes(20)).into_owned(),
    }
}

fn id(rng: &mut Rng) -> String {
    match rng.below(12) {
        0..6 => rng.pick(&["a", "b", "bank_a", "bank-b", "C9"]).to_string(),
        6 => String::new(),
        7 => "x".repeat(60 + rng.index(10)),
        8 => "y".repeat(rng.index(3000)),
        9 => rng
            .pick(&["a:b", "a b", "é", "a\n", "\0", "../x"])
            .to_string(),
        _ => String::from_utf8_lossy(&rng.some_bytes(70)).into_owned(),
    }
}

fn address(rng: &mut Rng) -> String {
    match rng.below(8) {
        0..5 => format!("10.0.0.{}:{}", rng.below(256), rng.below(65536)),
        5 => String::new(),
        6 => "h".repeat(250 + rng.index(10)),
        _ => String::from_utf8_lossy(&rng.some_bytes(300)).into_owned(),
    }
}

fn participants(rng: &mut Rng) -> Vec<pb::Participant> {
    let n = match rng.below(40) {
        0 => MAX_PARTICIPANTS + rng.index(3) - 1, // around the bound
        1..12 => 0,
        _ => 1 + rng.index(4),
    };
    let plain = n > 8;
    (0..n)
        .map(|i| {
            if plain {
                pb::Participant {
                    id: format!("p{i}"),
                    address: "x:1".into(),
                }
            } else {
                pb::Participant {
                    id: id(rng),
                    address: address(rng),
                }
            }
        })
        .collect()
}

fn ballot(rng: &mut Rng) -> u64 {
    match rng.below(6) {
        0 => MAX_BALLOT - 1 + rng.below(3),
        1 | 2 => rng.interesting_u64(),
        _ => rng.below(30),
    }
}

fn enum_value(rng: &mut Rng) -> i32 {
    match rng.below(6) {
        0..4 => 1 + rng.below(2) as i32,
        4 => 0,
        _ => rng.next_u64() as i32,
    }
}

fn body(rng: &mut Rng) -> Option<Body> {
    Some(match rng.below(13) {
        0 => Body::Phase1a(pb::Phase1a {
            ballot: ballot(rng),
            participants: participants(rng),
        }),
        1 => Body::Phase1b(pb::Phase1b {
            ballot: ballot(rng),
            accepted: {
                let n = if rng.chance(1, 40) {
                    MAX_PARTICIPANTS + rng.index(3) - 1
                } else {
                    rng.index(4)
                };
                (0..n)
                    .map(|i| pb::Accepted {
                        participant: if n > 8 { format!("p{i}") } else { id(rng) },
                        ballot: ballot(rng),
                        vote: enum_value(rng),
                    })
                    .collect()
            },
            participants: participants(rng),
        }),
        2 => Body::Phase2a(pb::Phase2a {
            participant: id(rng),
            ballot: ballot(rng),
            vote: enum_value(rng),
            participants: participants(rng),
            cause: None,
        }),
        3 => Body::Phase2b(pb::Phase2b {
            participant: id(rng),
            ballot: ballot(rng),
            vote: enum_value(rng),
        }),
        4 => Body::Nack(pb::Nack {
            ballot: ballot(rng),
            promised: ballot(rng),
        }),
        5 => Body::Decided(pb::Decided {
            outcome: enum_value(rng),
            participants: participants(rng),
        }),
        6 => Body::Finished(pb::Finished {
            outcome: enum_value(rng),
        }),
        7 => Body::Enlist(pb::Enlist {
            participant: rng.chance(7, 8).then(|| pb::Participant {
                id: id(rng),
                address: address(rng),
            }),
        }),
        8 => Body::Enlisted(pb::Enlisted {
            code: enum_value(rng),
            message: if rng.chance(1, 10) {
                "m".repeat(4000 + rng.index(200))
            } else {
                id(rng)
            },
        }),
        9 => Body::Prepare(pb::Prepare {
            participants: participants(rng),
        }),
        10 => Body::Decide(pb::Decide {
            outcome: enum_value(rng),
        }),
        11 => Body::Applied(pb::Applied {
            participant: id(rng),
        }),
        _ => return None,
    })
}

fn message(rng: &mut Rng) -> pb::PaxosMessage {
    pb::PaxosMessage {
        txid: txid(rng),
        from_replica: if rng.bool() {
            rng.below(4) as u32
        } else {
            rng.next_u64() as u32
        },
        body: body(rng),
        // Never more than a hint: whatever it holds, the message converts the same.
        traceparent: "0f-".repeat(rng.index(60)),
    }
}

fn batch(rng: &mut Rng) -> pb::PaxosBatch {
    pb::PaxosBatch {
        messages: (0..rng.index(6)).map(|_| message(rng)).collect(),
    }
}

fn check_participants(ps: &[Participant], m: &pb::PaxosMessage) {
    assert!(ps.len() <= MAX_PARTICIPANTS, "{} participants", ps.len());
    let ids: BTreeSet<&str> = ps.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids.len(), ps.len(), "duplicate participant in {m:?}");
    for p in ps {
        assert!(is_valid_participant_id(&p.id), "id {:?} passed", p.id);
        assert!(
            is_valid_address(&p.address),
            "address {:?} passed",
            p.address
        );
    }
}

/// Whatever converted is within the promised bounds.
fn check_bounds(msg: &Msg, m: &pb::PaxosMessage) {
    let ok = |b: u64| assert!(b <= MAX_BALLOT, "ballot {b} passed in {m:?}");
    match msg {
        Msg::Phase1a {
            ballot,
            participants,
            ..
        } => {
            ok(*ballot);
            check_participants(participants, m);
        }
        Msg::Phase1b {
            ballot,
            accepted,
            participants,
            ..
        } => {
            ok(*ballot);
            assert!(accepted.len() <= MAX_PARTICIPANTS);
            let ids: BTreeSet<&str> = accepted.iter().map(|(p, _, _)| p.as_str()).collect();
            assert_eq!(
                ids.len(),
                accepted.len(),
                "duplicate accepted value in {m:?}"
            );
            for (p, b, _) in accepted {
                ok(*b);
                assert!(is_valid_participant_id(p));
            }
            check_participants(participants, m);
        }
        Msg::Phase2a {
            participant,
            ballot,
            participants,
            ..
        } => {
            ok(*ballot);
            assert!(is_valid_participant_id(participant));
            check_participants(participants, m);
        }
        Msg::Phase2b {
            participant,
            ballot,
            ..
        } => {
            ok(*ballot);
            assert!(is_valid_participant_id(participant));
        }
        Msg::Nack {
            ballot, promised, ..
        } => {
            ok(*ballot);
            ok(*promised);
        }
        Msg::Decided { participants, .. } | Msg::Prepare { participants, .. } => {
            check_participants(participants, m)
        }
        Msg::Finished { .. } | Msg::Decide { .. } => {}
    }
}

/// One wire message through every conversion; returns the core message, if it is one.
fn convert(m: &pb::PaxosMessage) -> Option<(u32, Msg)> {
    let delivered = delivered_from_pb(m);
    let direct = msg_from_pb(m);
    let Ok(d) = delivered else {
        count("refused");
        // Refused: `msg_from_pb` must not accept what `delivered_from_pb` refuses as a Paxos
        // message (it refuses the enlistment messages on its own).
        if let Ok(ok) = &direct {
            panic!("msg_from_pb took {m:?} ({ok:?}) that delivered_from_pb refused");
        }
        return None;
    };
    count(match &d {
        Delivered::Msg(..) => "converted: Paxos messages",
        _ => "converted: enlistment messages",
    });
    let again = match &d {
        Delivered::Msg(from, msg) => {
            assert_eq!(direct.as_ref(), Ok(&(*from, msg.clone())), "{m:?}");
            check_bounds(msg, m);
            msg_to_pb(*from, msg)
        }
        Delivered::Enlist { txn, participant } => {
            assert!(direct.is_err());
            check_participants(std::slice::from_ref(participant), m);
            enlist_to_pb(*txn, participant)
        }
        Delivered::Enlisted { txn, code, message } => {
            assert!(direct.is_err());
            enlisted_to_pb(*txn, 0, *code, message.clone())
        }
        Delivered::Applied { txn, participant } => {
            assert!(direct.is_err());
            assert!(is_valid_participant_id(participant));
            applied_to_pb(*txn, participant)
        }
    };
    // Core → wire → bytes → wire → core gives back the same thing.
    let bytes = again.encode_to_vec();
    let decoded = pb::PaxosMessage::decode(bytes.as_slice()).expect("our own encoding decodes");
    assert_eq!(decoded, again);
    assert_eq!(
        delivered_from_pb(&decoded),
        Ok(d.clone()),
        "round trip of {m:?}"
    );
    match d {
        Delivered::Msg(from, msg) => Some((from, msg)),
        _ => None,
    }
}

fn one_case(rng: &mut Rng, replica: &mut Replica) {
    let structured = batch(rng);
    let mut msgs: Vec<(u32, Msg)> = structured.messages.iter().filter_map(convert).collect();

    // The same batch as bytes, mutated, decoded again.
    let mut bytes = structured.encode_to_vec();
    if bytes.is_empty() || rng.chance(1, 8) {
        bytes = rng.some_bytes(64);
    }
    for _ in 0..4 {
        let mut mutant = bytes.clone();
        mutate(rng, &mut mutant);
        if let Ok(decoded) = pb::PaxosBatch::decode(mutant.as_slice()) {
            count("mutated batches that decoded");
            msgs.extend(decoded.messages.iter().filter_map(convert));
        }
        if let Ok(one) = pb::PaxosMessage::decode(mutant.as_slice()) {
            msgs.extend(convert(&one));
        }
    }

    // Whatever converted goes on to a replica, as the server would hand it over.
    for (from, msg) in msgs {
        replica.on_message(rng.below(100_000), from, msg);
        if rng.chance(1, 8) {
            replica.on_tick(rng.below(1 << 40));
        }
        replica.drain();
    }
}

#[test]
fn fuzz_convert() {
    let mut replica = Replica::new(Config::new(1, 3), 1);
    let mut since_fresh = 0u32;
    fuzzkit::run("convert", |rng| {
        since_fresh += 1;
        if since_fresh == 1_000 {
            // Keep the replica's state (and each case's cost) bounded.
            since_fresh = 0;
            replica = Replica::new(Config::new(rng.below(3) as u32, 3), rng.next_u64());
        }
        one_case(rng, &mut replica)
    });
    if let Ok(stats) = STATS.lock() {
        println!("fuzz convert: {stats:?}");
    }
}
