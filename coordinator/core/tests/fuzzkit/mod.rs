//! A tiny fuzzing harness for stable Rust, shared by the fuzz targets of the core, the wire
//! conversions and the acceptor log (each includes this file with `#[path]`).
//!
//! Why not cargo-fuzz: it needs nightly and a separate build; these targets are ordinary
//! `#[test]`s that run for a bounded time, so `cargo test` exercises them briefly on every
//! run and `.ci/fuzz` runs them longer. Why no `arbitrary`/`rand` dependency: a seeded
//! generator and a handful of byte mutations are a few dozen lines, and a fixed algorithm
//! keeps a reported seed replayable across dependency upgrades.
//!
//! Knobs (environment):
//! * `PXC_FUZZ_SECS` — how long each target runs (default 2 s);
//! * `PXC_FUZZ_SEED` — the run's seed (default: from the clock), always printed;
//! * `PXC_FUZZ_CASE` — replay exactly one case by the seed a failure printed.
//!
//! Each case gets its own seed drawn from the run's seed, so a failure names the one case to
//! replay instead of the whole run.

#![allow(dead_code)]

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// A small, fast, seedable generator (SplitMix64): every case is a pure function of its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn bool(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    /// Fewer than `max` random bytes.
    pub fn some_bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.index(max);
        self.bytes(len)
    }

    /// A u64 biased towards the values that break arithmetic and bounds: 0, 1, small ones,
    /// powers of two and their neighbours, and the top of the range.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(8) {
            0 => self.below(4),
            1 => self.below(1_000),
            2 => u64::MAX - self.below(4),
            3 => {
                let p = 1u64 << self.below(64);
                match self.below(3) {
                    0 => p.wrapping_sub(1),
                    1 => p,
                    _ => p.wrapping_add(1),
                }
            }
            4 => u64::from(u32::MAX) - self.below(4),
            _ => self.next_u64(),
        }
    }
}

/// Random byte-level mutations of `data`, as a coverage-blind fuzzer does: flips, random and
/// boundary bytes, inserted, deleted, duplicated and overwritten runs, truncation.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.index(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.index(len);
                data[i] = *rng.pick(&[0x00, 0x01, 0x7f, 0x80, 0xff, b'"', b'{', b'9', b'-']);
            }
            2 => {
                let at = rng.index(len + 1);
                let n = 1 + rng.index(16);
                let bytes = rng.bytes(n);
                data.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.index(len);
                let n = 1 + rng.index((len - at).min(32));
                data.drain(at..at + n);
            }
            4 if len > 0 => {
                // Duplicate a run somewhere else (repeated fields, repeated frames).
                let at = rng.index(len);
                let n = 1 + rng.index((len - at).min(64));
                let run: Vec<u8> = data[at..at + n].to_vec();
                let to = rng.index(len + 1);
                data.splice(to..to, run);
            }
            5 if len > 0 => {
                data.truncate(rng.index(len));
            }
            6 if len >= 4 => {
                // Overwrite four bytes with a boundary integer (lengths, varints, ballots).
                let at = rng.index(len - 3);
                let v = rng.interesting_u64() as u32;
                data[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            7 if len >= 8 => {
                let at = rng.index(len - 7);
                let v = rng.interesting_u64();
                data[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let n = rng.index(8);
                let bytes = rng.bytes(n);
                data.extend(bytes);
            }
        }
    }
}

fn env_u64(key: &str) -> Option<u64> {
    let v = std::env::var(key).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// How long each target runs: `PXC_FUZZ_SECS` (fractions allowed), default 2 s.
pub fn budget() -> Duration {
    std::env::var("PXC_FUZZ_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(2), Duration::from_secs_f64)
}

fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Rng::new(nanos ^ (u64::from(std::process::id()) << 32)).next_u64()
}

/// Runs `case` with fresh per-case seeds until the budget is spent (at least once), and
/// prints the run's seed and how many cases ran. A panicking case is reported with its own
/// seed before the panic continues, so `PXC_FUZZ_CASE=<seed>` replays just that case.
pub fn run(target: &str, mut case: impl FnMut(&mut Rng)) {
    if let Some(seed) = env_u64("PXC_FUZZ_CASE") {
        println!("fuzz {target}: replaying case {seed:#018x}");
        case(&mut Rng::new(seed));
        return;
    }
    let seed = env_u64("PXC_FUZZ_SEED").unwrap_or_else(clock_seed);
    let budget = budget();
    println!(
        "fuzz {target}: seed {seed:#018x} (PXC_FUZZ_SEED), budget {:.1} s",
        budget.as_secs_f64()
    );
    let mut seeds = Rng::new(seed);
    let start = Instant::now();
    let mut cases = 0u64;
    loop {
        let case_seed = seeds.next_u64();
        let result = catch_unwind(AssertUnwindSafe(|| case(&mut Rng::new(case_seed))));
        if let Err(panic) = result {
            println!(
                "fuzz {target}: FAILED in case {} of run seed {seed:#018x}; replay it with \
                 PXC_FUZZ_CASE={case_seed:#018x}",
                cases + 1
            );
            resume_unwind(panic);
        }
        cases += 1;
        if start.elapsed() >= budget {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    println!(
        "fuzz {target}: {cases} cases in {secs:.1} s ({:.0}/s), seed {seed:#018x}",
        cases as f64 / secs
    );
}
