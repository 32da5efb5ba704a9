//! Byte-level BPE: counting chunks, learning merges, and encoding with them.
//!
//! Training works on the *unique* chunks of the corpus, each with its count, so repeated words
//! cost nothing extra. Merges are learned with incremental bookkeeping: a map from each adjacent
//! pair to its total count and to the words it occurs in, and a max-heap over pairs. A merge only
//! visits the words that contain the merged pair, so cost grows with the words a merge touches,
//! not with corpus size times number of merges.

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::split::Splitter;

/// Two adjacent token ids.
pub type Pair = (u32, u32);

/// Counts of unique chunks, filled batch by batch from a stream of texts.
#[derive(Default)]
pub struct ChunkCounts {
    pub counts: FxHashMap<String, i64>,
}

impl ChunkCounts {
    /// Splits and counts a batch of texts in parallel (rayon's current pool), then folds the
    /// batch's counts into the running total.
    pub fn add_batch(&mut self, texts: &[String], splitter: &Splitter) {
        let batch: FxHashMap<&str, i64> = texts
            .par_iter()
            .fold(FxHashMap::default, |mut map, text| {
                splitter.for_each_chunk(text, |chunk| *map.entry(chunk).or_insert(0) += 1);
                map
            })
            .reduce(FxHashMap::default, merge_counts);
        for (chunk, n) in batch {
            // Look up by &str first so a chunk seen before costs no allocation.
            match self.counts.get_mut(chunk) {
                Some(total) => *total += n,
                None => {
                    self.counts.insert(chunk.to_owned(), n);
                }
            }
        }
    }
}

/// Adds the smaller map into the larger one.
fn merge_counts<'a>(a: FxHashMap<&'a str, i64>, b: FxHashMap<&'a str, i64>) -> FxHashMap<&'a str, i64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (k, v) in small {
        *big.entry(k).or_insert(0) += v;
    }
    big
}

/// What we know about one pair during training.
#[derive(Default)]
struct PairInfo {
    /// Occurrences in the corpus (word count times occurrences in the word).
    count: i64,
    /// Words that contained the pair when it was recorded. May hold words that no longer
    /// contain it (a later merge consumed it); those are simply found unchanged when visited.
    words: Vec<u32>,
}

/// Learns `num_merges` merges from `(chunk bytes, count)` items. Merge `i` creates token
/// `256 + i`. Ties in count are broken towards the smallest pair `(left, right)`, so the result
/// depends only on the counts, never on the order of the items or the number of threads.
/// Stops early when no pair occurs any more.
pub fn learn_merges<'a>(chunks: impl IntoIterator<Item = (&'a [u8], i64)>, num_merges: usize) -> Vec<Pair> {
    // All words live in one flat buffer; merging shrinks a word in place, so `len` is kept apart.
    let mut symbols: Vec<u32> = Vec::new();
    let mut start: Vec<usize> = Vec::new();
    let mut len: Vec<usize> = Vec::new();
    let mut weight: Vec<i64> = Vec::new();
    for (bytes, n) in chunks {
        if bytes.len() < 2 {
            continue; // a single byte has no pair and can never change
        }
        start.push(symbols.len());
        len.push(bytes.len());
        weight.push(n);
        symbols.extend(bytes.iter().map(|&b| b as u32));
    }

    let mut pairs = initial_pairs(&symbols, &start, &len, &weight);
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
        pairs.iter().map(|(&p, info)| (info.count, Reverse(p))).collect();

    let mut merges = Vec::with_capacity(num_merges);
    // Bytes of every token so far. If two different pairs ever spelled the same bytes (we have
    // not seen it happen, but nothing in BPE forbids it), the second token could not be told
    // apart by its bytes (tiktoken ranks, `tokenizers` vocab), so such a pair is never merged.
    let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut known: FxHashSet<Vec<u8>> = token_bytes.iter().cloned().collect();
    // last_visit[w] == merge index + 1 when word w was already merged in this step
    // (a word can be listed twice for a pair).
    let mut last_visit: Vec<u32> = vec![0; len.len()];
    let mut new_pairs: Vec<Pair> = Vec::new();

    while merges.len() < num_merges {
        let Some(pair) = pop_best(&mut heap, &pairs) else { break };
        let bytes = [token_bytes[pair.0 as usize].as_slice(), token_bytes[pair.1 as usize].as_slice()].concat();
        if !known.insert(bytes.clone()) {
            continue; // dropped from the heap for good: its count can only fall from here
        }
        token_bytes.push(bytes);
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);
        let stamp = merges.len() as u32;
        let words = pairs.remove(&pair).map(|info| info.words).unwrap_or_default();

        new_pairs.clear();
        for w in words {
            let wi = w as usize;
            if last_visit[wi] == stamp {
                continue;
            }
            last_visit[wi] = stamp;
            let word = &mut symbols[start[wi]..start[wi] + len[wi]];
            let n = weight[wi];
            len[wi] = merge_word(word, pair, new_id, |p, delta| {
                if p == pair {
                    return; // the merged pair is gone for good; its entry was removed above
                }
                let info = pairs.entry(p).or_default();
                if delta > 0 {
                    if info.words.is_empty() {
                        new_pairs.push(p); // pairs with `new_id` are all new in this step
                    }
                    if info.words.last() != Some(&w) {
                        info.words.push(w);
                    }
                }
                info.count += delta * n;
            });
        }
        // Counts of old pairs only go down, so their heap entries are upper bounds that
        // `pop_best` refreshes lazily; the new pairs go in once, with their final count.
        for &p in &new_pairs {
            let count = pairs[&p].count;
            if count > 0 {
                heap.push((count, Reverse(p)));
            }
        }
    }
    merges
}

/// Pair counts and word lists for the starting words (bytes only). Built in parallel over
/// slices of words; each slice's word lists are in word order, and slices are joined in order.
fn initial_pairs(symbols: &[u32], start: &[usize], len: &[usize], weight: &[i64]) -> FxHashMap<Pair, PairInfo> {
    let count_range = |lo: usize, hi: usize| {
        let mut map: FxHashMap<Pair, PairInfo> = FxHashMap::default();
        for w in lo..hi {
            let word = &symbols[start[w]..start[w] + len[w]];
            for ab in word.windows(2) {
                let info = map.entry((ab[0], ab[1])).or_default();
                info.count += weight[w];
                if info.words.last() != Some(&(w as u32)) {
                    info.words.push(w as u32);
                }
            }
        }
        map
    };
    let n = len.len();
    let parts = rayon::current_num_threads().max(1);
    let bounds: Vec<(usize, usize)> = (0..parts).map(|i| (n * i / parts, n * (i + 1) / parts)).collect();
    let maps: Vec<FxHashMap<Pair, PairInfo>> = bounds.par_iter().map(|&(lo, hi)| count_range(lo, hi)).collect();
    let mut maps = maps.into_iter();
    let mut total = maps.next().unwrap_or_default();
    for map in maps {
        for (p, info) in map {
            let t = total.entry(p).or_default();
            t.count += info.count;
            t.words.extend(info.words);
        }
    }
    total
}

/// Pops the pair with the highest current count (smallest pair on ties). Heap entries may be
/// stale: a count only ever decreases after its entry was pushed, so a stale entry is pushed
/// back with its true count and the search goes on.
fn pop_best(heap: &mut BinaryHeap<(i64, Reverse<Pair>)>, pairs: &FxHashMap<Pair, PairInfo>) -> Option<Pair> {
    while let Some((count, Reverse(p))) = heap.pop() {
        let current = pairs.get(&p).map_or(0, |info| info.count);
        if current <= 0 {
            continue;
        }
        if current == count {
            return Some(p);
        }
        heap.push((current, Reverse(p)));
    }
    None
}

/// Replaces every occurrence of `pair` in `word` (left to right, non-overlapping) by `new_id`,
/// in place, and reports each change of an adjacent pair as `(pair, +1 or -1)`. Returns the new
/// length. The left neighbour is read from the already-merged output so that runs such as
/// `a b a b` report `(new, new)` and not a pair that never existed.
pub fn merge_word(word: &mut [u32], pair: Pair, new_id: u32, mut on_delta: impl FnMut(Pair, i64)) -> usize {
    let (a, b) = pair;
    let n = word.len();
    let (mut read, mut write) = (0, 0);
    while read < n {
        if read + 1 < n && word[read] == a && word[read + 1] == b {
            if write > 0 {
                let prev = word[write - 1];
                on_delta((prev, a), -1);
                on_delta((prev, new_id), 1);
            }
            on_delta(pair, -1);
            if read + 2 < n {
                let next = word[read + 2];
                on_delta((b, next), -1);
                on_delta((new_id, next), 1);
            }
            word[write] = new_id;
            read += 2;
        } else {
            word[write] = word[read];
            read += 1;
        }
        write += 1;
    }
    n - (read - write)
}

/// Encodes one chunk: repeatedly merges the adjacent pair with the lowest merge rank (the
/// leftmost one on ties), as tiktoken and Hugging Face `tokenizers` do, so ids agree with both.
pub fn encode_chunk(bytes: &[u8], ranks: &FxHashMap<Pair, u32>, out: &mut Vec<u32>) {
    let mut ids: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
    loop {
        let mut best: Option<(u32, usize)> = None;
        for i in 0..ids.len().saturating_sub(1) {
            if let Some(&id) = ranks.get(&(ids[i], ids[i + 1])) {
                if best.map_or(true, |(b, _)| id < b) {
                    best = Some((id, i));
                }
            }
        }
        let Some((id, i)) = best else { break };
        ids[i] = id;
        ids.remove(i + 1);
    }
    out.extend(ids);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward BPE: recount every pair each step. The reference for `learn_merges`.
    fn naive_merges(words: &[(&[u8], i64)], num_merges: usize) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> =
            words.iter().map(|(w, n)| (w.iter().map(|&b| b as u32).collect(), *n)).collect();
        let mut merges = vec![];
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for step in 0..num_merges {
            let mut counts: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (w, n) in &words {
                for ab in w.windows(2) {
                    *counts.entry((ab[0], ab[1])).or_default() += n;
                }
            }
            // highest count, then smallest pair (BTreeMap iterates pairs in increasing order)
            let spelled = |p: &Pair| [token_bytes[p.0 as usize].clone(), token_bytes[p.1 as usize].clone()].concat();
            let Some((&best, _)) = counts
                .iter()
                .filter(|(p, &c)| c > 0 && !token_bytes.contains(&spelled(p)))
                .max_by_key(|(p, &c)| (c, Reverse(**p)))
            else {
                break;
            };
            token_bytes.push(spelled(&best));
            let new_id = 256 + step as u32;
            for (w, _) in words.iter_mut() {
                let l = merge_word(w, best, new_id, |_, _| {});
                w.truncate(l);
            }
            merges.push(best);
        }
        merges
    }

    #[test]
    fn merge_word_reports_exact_pair_changes() {
        // Check the reported deltas against recounting pairs before and after.
        let cases: &[&[u32]] = &[&[1, 2, 1, 2], &[1, 1, 1], &[1, 1, 1, 1], &[3, 1, 2, 3], &[1, 2], &[2, 1, 1, 2, 1]];
        for pair in [(1, 2), (1, 1), (2, 1)] {
            for &case in cases {
                let mut w = case.to_vec();
                let mut delta: FxHashMap<Pair, i64> = FxHashMap::default();
                let count = |w: &[u32]| {
                    let mut m: FxHashMap<Pair, i64> = FxHashMap::default();
                    for ab in w.windows(2) {
                        *m.entry((ab[0], ab[1])).or_default() += 1;
                    }
                    m
                };
                let before = count(&w);
                let l = merge_word(&mut w, pair, 9, |p, d| *delta.entry(p).or_default() += d);
                w.truncate(l);
                let after = count(&w);
                let mut keys: Vec<Pair> = before.keys().chain(after.keys()).chain(delta.keys()).copied().collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let want = after.get(&k).unwrap_or(&0) - before.get(&k).unwrap_or(&0);
                    assert_eq!(delta.get(&k).copied().unwrap_or(0), want, "case {case:?} pair {pair:?} key {k:?}");
                }
            }
        }
    }

    #[test]
    fn learned_merges_match_naive_bpe() {
        let text = "îchiyach yuṯẖach îchiyach îyâ ûne 2024 1999 aaaa abab abab ba ba îchiyach yuṯẖach";
        let mut counts: FxHashMap<&str, i64> = FxHashMap::default();
        for w in text.split(' ') {
            *counts.entry(w).or_default() += 1;
        }
        let mut items: Vec<(&[u8], i64)> = counts.iter().map(|(w, &n)| (w.as_bytes(), n)).collect();
        items.sort();
        let want = naive_merges(&items, 40);
        assert_eq!(learn_merges(items.iter().copied(), 40), want);
        // The order of the input words must not matter.
        items.reverse();
        assert_eq!(learn_merges(items.iter().copied(), 40), want);
        assert!(want.len() > 20);
    }

    #[test]
    fn stops_when_nothing_is_left_to_merge() {
        let merges = learn_merges([("ab".as_bytes(), 3)], 10);
        assert_eq!(merges, vec![(97, 98)]);
    }

    #[test]
    fn encode_applies_merges_by_rank() {
        let merges = vec![(97, 98), (256, 99), (98, 99)];
        let ranks: FxHashMap<Pair, u32> = merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect();
        let mut out = vec![];
        encode_chunk(b"abcbc", &ranks, &mut out);
        assert_eq!(out, vec![257, 258]);
    }
}
