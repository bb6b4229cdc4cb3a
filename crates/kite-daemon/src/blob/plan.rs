//! The fetch planner: which chunks a kernel request, a sequential reader
//! or the prefetcher starts fetching, grouped into the runs one range
//! request each fetches.
//!
//! Everything here is a pure function of the chunk table and a snapshot of
//! the blob's state (what is on disk, what is busy, the recent miss
//! history), so the rules are tested by tables of cases, without a kernel,
//! a backend or a clock. [`BlobState`](super::BlobState) takes the
//! snapshot under its lock, calls [`plan`], and starts the runs.
//!
//! The rules, for a [`Reason::Demand`] miss on chunks `wanted`:
//! - every wanted chunk that is not busy is fetched (even if the map says
//!   it is on disk: the kernel asked, so its cache does not have it);
//! - *sequential readahead*: when the chunk before the first wanted one is
//!   on disk or busy, the window after the last one is fetched too; the
//!   window is the configured readahead, growing with the run of present
//!   chunks behind the reader up to [`READAHEAD_GROWTH`] times, and spans
//!   at least as many bytes as that many full-size chunks (at most
//!   [`WINDOW_MAX_CHUNKS`] chunks);
//! - *small-file burst*: otherwise, a miss on a small chunk near another
//!   recent small miss (an interpreter importing a package) also fetches
//!   the small chunks that follow, up to [`BURST_MAX_CHUNKS`] /
//!   [`BURST_MAX_BYTES`]; one isolated small miss fetches just its chunk;
//! - *rest of a large file*: otherwise, a miss on a full-size chunk (a
//!   page fault in a mapped library) also fetches the next chunks of that
//!   file, up to the readahead and up to its first short chunk.
//!
//! *Fine* chunks (the image's fine chunk size: ELF files cut finer, see
//! `kite convert --elf-chunk-size`) are pages of mapped programs, read
//! scattered: a miss on one fetches the next fine chunks of the file up
//! to the readahead (so a fault costs one round trip for a few hundred
//! KiB, not for one chunk), and a sequential window counts fine chunks
//! (readahead x fine size), not full-size bytes. Bursts neither start at
//! nor run over them.
//!
//! Runs are adjacent chunks whose stored bytes are contiguous and span at
//! most the merge bound ([`split_runs`], the one place that splits).

use kite_format::ChunkRecord;

/// Small-file misses this close in chunk index form a burst (the caller
/// decides "this close in time": see [`History`]).
pub const BURST_DISTANCE: usize = 256;
/// What a burst miss fetches along: following small chunks, up to these.
pub const BURST_MAX_CHUNKS: usize = 64;
pub const BURST_MAX_BYTES: u64 = 512 << 10;
/// Most chunks one readahead window spans (small files).
pub const WINDOW_MAX_CHUNKS: usize = 256;
/// How far the readahead window of a long sequential scan may grow, as a
/// multiple of the configured readahead.
pub const READAHEAD_GROWTH: usize = 8;
/// Chunks at least this large count as full-size (so most likely not the
/// last chunk of their file); below it every chunk counts as small.
const FULL_CHUNK_MIN: u32 = 64 << 10;

/// Why chunks are planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A reader waits for the wanted chunks; `speculate` allows the rules
    /// above to add more (off when a profile lists the chunk: the
    /// prefetcher brings what comes next).
    Demand { speculate: bool },
    /// A reader is at the (present) chunk `wanted[0]`: keep its readahead
    /// window full. Nothing waits on these fetches.
    Readahead,
    /// Exactly the wanted chunks that are neither on disk nor busy
    /// (prefetch, pull): nothing is added.
    Prefetch,
}

/// The part of the past the rules look at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The last non-sequential small-chunk miss, if it was recent enough
    /// to start a burst.
    pub recent_small_miss: Option<usize>,
}

/// Fixed parameters of a blob's planning.
#[derive(Clone, Copy, Debug)]
pub struct PlanConfig {
    /// Chunks to fetch ahead of a sequential reader (0: no speculation).
    pub readahead: usize,
    /// Most stored bytes one run may span.
    pub merge_bound: u64,
    /// The blob's largest chunk (its image's chunk size, in practice).
    pub full_chunk: u32,
    /// The image's fine chunk size (0: none).
    pub fine_chunk: u32,
}

/// What to fetch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Runs of chunk indexes, each fetched with one range request, in
    /// ascending order.
    pub runs: Vec<Vec<usize>>,
    /// A non-sequential small-chunk miss this plan saw (the caller keeps
    /// it as the next [`History::recent_small_miss`], with its time).
    pub small_miss: Option<usize>,
}

/// Plan the fetches for `wanted` (indexes must be in the table). `busy(i)`:
/// chunk `i` is being fetched into the same cache file, or failed so
/// recently that it is not tried again yet.
pub fn plan(
    table: &[ChunkRecord],
    fetched: &[bool],
    busy: impl Fn(usize) -> bool,
    history: &History,
    wanted: &[usize],
    reason: Reason,
    cfg: &PlanConfig,
) -> Plan {
    let mut want: Vec<usize> = wanted
        .iter()
        .copied()
        .filter(|&i| i < table.len())
        .collect();
    want.sort_unstable();
    want.dedup();
    let (Some(&first), Some(&last)) = (want.first(), want.last()) else {
        return Plan::default();
    };
    let present = |i: usize| fetched.get(i) == Some(&true);
    let free = |i: usize| !present(i) && !busy(i);
    let mut out = Plan::default();
    let mut take: Vec<usize> = Vec::new();
    match reason {
        Reason::Prefetch => take.extend(want.iter().copied().filter(|&i| free(i))),
        Reason::Readahead => {
            if cfg.readahead > 0 {
                let end = window_end(table, fetched, cfg, first, first);
                take.extend((first + 1..end).filter(|&i| free(i)));
            }
        }
        Reason::Demand { speculate } => {
            take.extend(want.iter().copied().filter(|&i| !busy(i)));
            if speculate && cfg.readahead > 0 {
                let sequential = first > 0 && (present(first - 1) || busy(first - 1));
                let full = |i: usize| is_full(table, cfg, i);
                let fine = |i: usize| is_fine(table, cfg, i);
                if sequential {
                    let end = window_end(table, fetched, cfg, last, first);
                    take.extend((last + 1..end).filter(|&i| free(i)));
                } else if fine(last) {
                    // A scattered page of a mapped program: its next few
                    // fine chunks, not the rest of the file.
                    take.extend(
                        (last + 1..table.len())
                            .take_while(|&i| fine(i))
                            .take(cfg.readahead)
                            .filter(|&i| free(i)),
                    );
                } else if !full(last) {
                    out.small_miss = Some(last);
                    let burst = history
                        .recent_small_miss
                        .is_some_and(|c| last.abs_diff(c) <= BURST_DISTANCE);
                    if burst {
                        let mut bytes = 0u64;
                        let mut i = last + 1;
                        while i < table.len()
                            && i <= last + BURST_MAX_CHUNKS
                            && bytes < BURST_MAX_BYTES
                            && !full(i)
                            && !fine(i)
                        {
                            if free(i) {
                                take.push(i);
                                bytes += u64::from(table[i].compressed_size);
                            }
                            i += 1;
                        }
                    }
                } else {
                    let mut i = last + 1;
                    let mut added = 0;
                    while i < table.len() && added < cfg.readahead {
                        if free(i) {
                            take.push(i);
                            added += 1;
                        }
                        if !full(i) {
                            break;
                        }
                        i += 1;
                    }
                }
            }
        }
    }
    take.sort_unstable();
    take.dedup();
    out.runs = split_runs(table, &take, cfg.merge_bound);
    out
}

/// Whether chunk `i` is a full-size chunk. Small files' chunks never are.
fn is_full(table: &[ChunkRecord], cfg: &PlanConfig, i: usize) -> bool {
    cfg.full_chunk >= FULL_CHUNK_MIN
        && table.get(i).map(|c| c.uncompressed_size) == Some(cfg.full_chunk)
}

/// Whether chunk `i` is a fine chunk: exactly the image's fine chunk size
/// (a file cut finer; a small file of exactly that size counts too, and
/// is then fetched without a burst).
fn is_fine(table: &[ChunkRecord], cfg: &PlanConfig, i: usize) -> bool {
    cfg.fine_chunk != 0 && table.get(i).map(|c| c.uncompressed_size) == Some(cfg.fine_chunk)
}

/// The readahead window for a reader whose run of present chunks ends
/// just before `run_at`: the configured readahead, or that run's length up
/// to [`READAHEAD_GROWTH`] times it (a long scan gets a deeper pipeline;
/// random readers never build a run).
fn window(fetched: &[bool], readahead: usize, run_at: usize) -> usize {
    let cap = readahead * READAHEAD_GROWTH;
    let run = (0..cap.min(run_at))
        .take_while(|k| fetched.get(run_at - 1 - k) == Some(&true))
        .count();
    readahead.max(run)
}

/// The (exclusive) end of the readahead window after chunk `last`.
fn window_end(
    table: &[ChunkRecord],
    fetched: &[bool],
    cfg: &PlanConfig,
    last: usize,
    run_at: usize,
) -> usize {
    let n = window(fetched, cfg.readahead, run_at);
    // A window of full-size chunks' bytes, so a scan over small files
    // keeps as deep a pipeline as one over a large file; fine chunks
    // (mapped programs) count as what they are.
    let unit = if is_fine(table, cfg, last) {
        cfg.fine_chunk
    } else {
        cfg.full_chunk
    };
    let want_bytes = n as u64 * u64::from(unit);
    let (mut i, mut count, mut bytes) = (last + 1, 0usize, 0u64);
    while i < table.len() && count < WINDOW_MAX_CHUNKS && (count < n || bytes < want_bytes) {
        bytes += u64::from(table[i].uncompressed_size);
        count += 1;
        i += 1;
    }
    i
}

/// Split ascending chunk indexes into runs one range request can fetch:
/// adjacent indexes whose stored bytes are contiguous, spanning at most
/// `merge_bound` stored bytes (a single chunk larger than that is a run
/// of its own).
pub fn split_runs(table: &[ChunkRecord], sorted: &[usize], merge_bound: u64) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for &i in sorted {
        let Some(c) = table.get(i) else { continue };
        let joins = out.last().is_some_and(|run: &Vec<usize>| {
            let (first, prev) = (&table[run[0]], &table[run[run.len() - 1]]);
            run[run.len() - 1] + 1 == i
                && prev.compressed_offset + u64::from(prev.compressed_size) == c.compressed_offset
                && c.compressed_offset + u64::from(c.compressed_size) - first.compressed_offset
                    <= merge_bound
        });
        match out.last_mut() {
            Some(run) if joins => run.push(i),
            _ => out.push(vec![i]),
        }
    }
    out
}

/// Sort and dedup `window`, and add the chunks not on disk lying in gaps
/// of at most `gap_bytes` stored bytes between two of its chunks: a few
/// bytes more on the wire instead of one more request (the prefetcher).
pub fn fill_small_gaps(
    table: &[ChunkRecord],
    fetched: &[bool],
    mut window: Vec<usize>,
    gap_bytes: u64,
) -> Vec<usize> {
    window.retain(|&i| i < table.len());
    window.sort_unstable();
    window.dedup();
    let mut out: Vec<usize> = Vec::with_capacity(window.len());
    for &i in &window {
        if let Some(&prev) = out.last() {
            let (p, c) = (&table[prev], &table[i]);
            let gap = c
                .compressed_offset
                .saturating_sub(p.compressed_offset + u64::from(p.compressed_size));
            if i > prev + 1 && gap <= gap_bytes {
                out.extend((prev + 1..i).filter(|&j| fetched.get(j) != Some(&true)));
            }
        }
        out.push(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kite_format::Digest;

    const K: u32 = 1024;
    const M: u32 = 1 << 20;

    /// A table of chunks of the given uncompressed sizes, each stored in
    /// half its size, contiguous (unless `gap` bytes are put between
    /// stored chunks at the indexes listed in `gaps_before`).
    fn table(sizes: &[u32], gaps_before: &[usize]) -> Vec<ChunkRecord> {
        let (mut u, mut c) = (0u64, 0u64);
        sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                if gaps_before.contains(&i) {
                    c += 4096;
                }
                let r = ChunkRecord {
                    digest: Digest([i as u8; 32]),
                    uncompressed_offset: u,
                    compressed_offset: c,
                    uncompressed_size: s,
                    compressed_size: s / 2,
                    flags: 0,
                };
                u += kite_format::align4k(u64::from(s));
                c += u64::from(s / 2);
                r
            })
            .collect()
    }

    fn cfg(readahead: usize) -> PlanConfig {
        PlanConfig {
            readahead,
            merge_bound: 8 << 20,
            full_chunk: M,
            fine_chunk: 128 * K,
        }
    }

    fn bits(n: usize, set: &[usize]) -> Vec<bool> {
        (0..n).map(|i| set.contains(&i)).collect()
    }

    struct Case {
        name: &'static str,
        sizes: Vec<u32>,
        fetched: Vec<usize>,
        busy: Vec<usize>,
        recent_small_miss: Option<usize>,
        wanted: Vec<usize>,
        reason: Reason,
        readahead: usize,
        runs: Vec<Vec<usize>>,
        small_miss: Option<usize>,
    }

    const DEMAND: Reason = Reason::Demand { speculate: true };

    fn run(c: &Case) {
        let t = table(&c.sizes, &[]);
        let fetched = bits(t.len(), &c.fetched);
        let got = plan(
            &t,
            &fetched,
            |i| c.busy.contains(&i),
            &History {
                recent_small_miss: c.recent_small_miss,
            },
            &c.wanted,
            c.reason,
            &cfg(c.readahead),
        );
        assert_eq!(got.runs, c.runs, "case '{}': runs", c.name);
        assert_eq!(
            got.small_miss, c.small_miss,
            "case '{}': small miss",
            c.name
        );
    }

    #[test]
    fn demand_rules() {
        let big = || vec![M; 40];
        let small = || vec![8 * K; 100];
        // A large file (chunks 0..9) then small files (10..).
        let mixed = || {
            let mut v = vec![M; 9];
            v.push(300 * K);
            v.extend(vec![8 * K; 30]);
            v
        };
        // An ELF file cut in fine chunks of 128 KiB (0..19, tail 20), then
        // small files.
        let elf = || {
            let mut v = vec![128 * K; 20];
            v.push(5 * K);
            v.extend(vec![8 * K; 30]);
            v
        };
        let cases = vec![
            Case {
                name: "scattered miss on a fine chunk fetches the next readahead fine chunks",
                sizes: elf(),
                fetched: vec![2, 9],
                busy: vec![],
                recent_small_miss: Some(3),
                wanted: vec![7],
                reason: DEMAND,
                readahead: 4,
                runs: vec![vec![7, 8], vec![10, 11]],
                small_miss: None,
            },
            Case {
                name: "a scattered fine miss stops before the file's short tail",
                sizes: elf(),
                fetched: vec![],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![18],
                reason: DEMAND,
                readahead: 4,
                runs: vec![vec![18, 19]],
                small_miss: None,
            },
            Case {
                name: "sequential miss on fine chunks: a window of readahead fine chunks",
                sizes: elf(),
                fetched: vec![6],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![7],
                reason: DEMAND,
                readahead: 4,
                runs: vec![vec![7, 8, 9, 10, 11]],
                small_miss: None,
            },
            Case {
                name: "a small-file burst stops at fine chunks",
                sizes: {
                    let mut v = vec![8 * K; 4];
                    v.extend(vec![128 * K; 10]);
                    v
                },
                fetched: vec![],
                busy: vec![],
                recent_small_miss: Some(0),
                wanted: vec![1],
                reason: DEMAND,
                readahead: 4,
                runs: vec![vec![1, 2, 3]],
                small_miss: Some(1),
            },
            Case {
                name: "cold miss on a large file fetches the rest of the file up to the readahead",
                sizes: mixed(),
                fetched: vec![],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![2],
                reason: DEMAND,
                readahead: 4,
                runs: vec![vec![2, 3, 4, 5, 6]],
                small_miss: None,
            },
            Case {
                name: "rest of a large file stops at its short tail chunk",
                sizes: mixed(),
                fetched: vec![],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![7],
                reason: DEMAND,
                readahead: 8,
                runs: vec![vec![7, 8, 9]],
                small_miss: None,
            },
            Case {
                name: "no readahead, no speculation",
                sizes: big(),
                fetched: vec![0, 1, 2],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![3],
                reason: DEMAND,
                readahead: 0,
                runs: vec![vec![3]],
                small_miss: None,
            },
            Case {
                name: "speculation off (profiled chunk): only what is wanted",
                sizes: big(),
                fetched: vec![0, 1, 2],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![3],
                reason: Reason::Demand { speculate: false },
                readahead: 4,
                runs: vec![vec![3]],
                small_miss: None,
            },
            Case {
                name: "sequential miss after one present chunk: the readahead window",
                sizes: big(),
                fetched: vec![0],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![1],
                reason: DEMAND,
                readahead: 2,
                runs: vec![vec![1, 2, 3]],
                small_miss: None,
            },
            Case {
                name: "a long run behind the reader grows the window (run of 6 > readahead 2)",
                sizes: big(),
                fetched: vec![0, 1, 2, 3, 4, 5],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![6],
                reason: DEMAND,
                readahead: 2,
                runs: vec![(6..=12).collect()],
                small_miss: None,
            },
            Case {
                name: "growth is capped at 8x the readahead",
                sizes: big(),
                fetched: (0..30).collect(),
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![30],
                reason: DEMAND,
                readahead: 1,
                runs: vec![(30..=38).collect()],
                small_miss: None,
            },
            Case {
                name: "sequential behind a chunk in flight; window skips busy and present chunks",
                sizes: big(),
                fetched: vec![7],
                busy: vec![4, 6],
                recent_small_miss: None,
                wanted: vec![5],
                reason: DEMAND,
                readahead: 4,
                runs: vec![vec![5], vec![8, 9]],
                small_miss: None,
            },
            Case {
                name: "a wanted chunk in flight is not started again",
                sizes: big(),
                fetched: vec![],
                busy: vec![3],
                recent_small_miss: None,
                wanted: vec![3],
                reason: Reason::Demand { speculate: false },
                readahead: 4,
                runs: vec![],
                small_miss: None,
            },
            Case {
                name: "a wanted chunk the map says is present is fetched again (the kernel asked)",
                sizes: big(),
                fetched: vec![3],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![3],
                reason: Reason::Demand { speculate: false },
                readahead: 4,
                runs: vec![vec![3]],
                small_miss: None,
            },
            Case {
                name: "sequential over small files: window spans as many bytes as full chunks",
                sizes: mixed(),
                fetched: vec![10],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![11],
                reason: DEMAND,
                readahead: 1,
                // One full chunk's bytes is more than is left: all 28
                // remaining 8 KiB chunks come along.
                runs: vec![(11..40).collect()],
                small_miss: None,
            },
            Case {
                name: "isolated small miss: just its chunk, remembered",
                sizes: small(),
                fetched: vec![],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![50],
                reason: DEMAND,
                readahead: 4,
                runs: vec![vec![50]],
                small_miss: Some(50),
            },
            Case {
                name: "small miss near a recent one: a burst fetches following small chunks",
                sizes: small(),
                fetched: vec![],
                busy: vec![],
                recent_small_miss: Some(20),
                wanted: vec![50],
                reason: DEMAND,
                readahead: 4,
                runs: vec![(50..=99).collect()],
                small_miss: Some(50),
            },
            Case {
                name: "burst is capped at 64 chunks",
                sizes: vec![4 * K; 300],
                fetched: vec![],
                busy: vec![],
                recent_small_miss: Some(0),
                wanted: vec![100],
                reason: DEMAND,
                readahead: 4,
                runs: vec![(100..=164).collect()],
                small_miss: Some(100),
            },
            Case {
                name: "burst is capped at 512 KiB stored",
                sizes: vec![64 * K; 100],
                fetched: vec![],
                busy: vec![],
                recent_small_miss: Some(0),
                wanted: vec![10],
                reason: DEMAND,
                readahead: 4,
                // 32 KiB stored each: 16 chunks reach 512 KiB.
                runs: vec![(10..=26).collect()],
                small_miss: Some(10),
            },
            Case {
                name: "a small miss far from the recent one is no burst",
                sizes: vec![8 * K; 600],
                fetched: vec![],
                busy: vec![],
                recent_small_miss: Some(10),
                wanted: vec![500],
                reason: DEMAND,
                readahead: 4,
                runs: vec![vec![500]],
                small_miss: Some(500),
            },
            Case {
                name: "burst stops at a full-size chunk",
                sizes: {
                    let mut v = vec![8 * K; 10];
                    v.extend(vec![M; 5]);
                    v
                },
                fetched: vec![],
                busy: vec![],
                recent_small_miss: Some(0),
                wanted: vec![5],
                reason: DEMAND,
                readahead: 4,
                runs: vec![(5..10).collect()],
                small_miss: Some(5),
            },
            Case {
                name: "readahead from a present chunk: the window after it, minus present and busy",
                sizes: big(),
                fetched: vec![9, 10, 12],
                busy: vec![13],
                recent_small_miss: None,
                wanted: vec![10],
                reason: Reason::Readahead,
                readahead: 4,
                runs: vec![vec![11], vec![14]],
                small_miss: None,
            },
            Case {
                name: "readahead with readahead 0 does nothing",
                sizes: big(),
                fetched: vec![1],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![1],
                reason: Reason::Readahead,
                readahead: 0,
                runs: vec![],
                small_miss: None,
            },
            Case {
                name: "prefetch: exactly the missing, idle chunks",
                sizes: big(),
                fetched: vec![2],
                busy: vec![4],
                recent_small_miss: None,
                wanted: vec![5, 1, 2, 3, 4, 9],
                reason: Reason::Prefetch,
                readahead: 4,
                runs: vec![vec![1], vec![3], vec![5], vec![9]],
                small_miss: None,
            },
            Case {
                name: "indexes outside the table are ignored",
                sizes: big(),
                fetched: vec![],
                busy: vec![],
                recent_small_miss: None,
                wanted: vec![39, 40, 1000],
                reason: Reason::Demand { speculate: false },
                readahead: 4,
                runs: vec![vec![39]],
                small_miss: None,
            },
        ];
        for c in &cases {
            run(c);
        }
    }

    #[test]
    fn runs_split_at_gaps_non_adjacency_and_the_merge_bound() {
        // Stored sizes: 512 KiB each; a stored gap before chunk 5.
        let t = table(&[M; 10], &[5]);
        let cases: Vec<(&str, Vec<usize>, u64, Vec<Vec<usize>>)> = vec![
            (
                "adjacent and contiguous: one run",
                vec![0, 1, 2],
                8 << 20,
                vec![vec![0, 1, 2]],
            ),
            (
                "index gap splits",
                vec![0, 1, 3],
                8 << 20,
                vec![vec![0, 1], vec![3]],
            ),
            (
                "stored gap splits",
                vec![3, 4, 5, 6],
                8 << 20,
                vec![vec![3, 4], vec![5, 6]],
            ),
            (
                "merge bound splits (1 MiB = two stored chunks)",
                vec![0, 1, 2, 3],
                1 << 20,
                vec![vec![0, 1], vec![2, 3]],
            ),
            (
                "a chunk above the bound is its own run",
                vec![0, 1],
                1000,
                vec![vec![0], vec![1]],
            ),
            ("empty", vec![], 1 << 20, vec![]),
        ];
        for (name, sorted, bound, want) in cases {
            assert_eq!(split_runs(&t, &sorted, bound), want, "case '{name}'");
        }
    }

    #[test]
    fn small_gaps_are_filled_with_missing_chunks_only() {
        // 8 KiB chunks stored in 4 KiB: gaps of a few chunks are small.
        let t = table(&[8 * K; 40], &[]);
        let fetched = bits(40, &[3]);
        // Gap 0..5 is 4 chunks (16 KiB stored): filled except present 3.
        // Gap 5..30 is 24 chunks (96 KiB): left alone at 32 KiB.
        let got = fill_small_gaps(&t, &fetched, vec![30, 5, 0, 5], 32 << 10);
        assert_eq!(got, vec![0, 1, 2, 4, 5, 30]);
        let got = fill_small_gaps(&t, &fetched, vec![0, 30], 1 << 20);
        let mut want: Vec<usize> = (0..=30).collect();
        want.retain(|&i| i != 3);
        assert_eq!(got, want);
    }
}
