//! nanostoney_rustbpe: train a byte-level BPE tokenizer from Python, fast and deterministically.
//!
//! ```python
//! from nanostoney_rustbpe import Tokenizer
//! tok = Tokenizer()
//! tok.train_from_iterator(iter(texts), vocab_size=4096)
//! tok.get_mergeable_ranks()   # [(token bytes, id), ...], ids 0..255 are the raw bytes
//! tok.encode("îchiyach")      # [ids]
//! ```
//! Encoding here is for checking; fast batched encoding is done by Hugging Face `tokenizers`
//! built from the same merges (see nanostoney/tokenizer.py).

pub mod bpe;
pub mod split;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rustc_hash::FxHashMap;

use bpe::{ChunkCounts, Pair};
use split::{Splitter, DEFAULT_PATTERN};

#[pyclass(module = "nanostoney_rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    /// merges[i] = the pair that token 256 + i stands for
    merges: Vec<Pair>,
    /// pair -> id of the merged token; the id doubles as the merge's rank
    ranks: FxHashMap<Pair, u32>,
}

/// A private pool of `n` threads if asked for, else None (rayon's global pool).
fn thread_pool(num_threads: Option<usize>) -> PyResult<Option<rayon::ThreadPool>> {
    num_threads
        .map(|n| rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build())
        .transpose()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Runs `f` with its rayon work on `pool`, or on the global pool.
fn install<R: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer {
            pattern: DEFAULT_PATTERN.to_string(),
            splitter: Splitter::new(DEFAULT_PATTERN).expect("default pattern compiles"),
            merges: Vec::new(),
            ranks: FxHashMap::default(),
        }
    }

    /// Learns `vocab_size - 256` merges from an iterator of strings. Texts are read in batches
    /// of `buffer_size` while holding the GIL, then split and counted in parallel without it.
    /// `pattern` defaults to nanochat's GPT-4-style split pattern. `num_threads` runs the work on
    /// a private pool of that many threads (the result is the same for any thread count).
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None, num_threads=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: usize,
        buffer_size: usize,
        pattern: Option<String>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!("vocab_size must be at least 256, got {vocab_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;
        let pool = thread_pool(num_threads)?;

        let mut counts = ChunkCounts::default();
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size.max(1));
        let mut items = iterator.try_iter()?;
        loop {
            buffer.clear();
            let mut exhausted = false;
            while buffer.len() < buffer_size.max(1) {
                match items.next() {
                    Some(item) => buffer.push(item?.extract::<String>()?),
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            py.allow_threads(|| install(pool.as_ref(), || counts.add_batch(&buffer, &splitter)));
            if exhausted {
                break;
            }
        }

        let num_merges = vocab_size - 256;
        let merges = py.allow_threads(|| {
            install(pool.as_ref(), || bpe::learn_merges(counts.counts.iter().map(|(k, &v)| (k.as_bytes(), v)), num_merges))
        });
        self.ranks = merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect();
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = splitter;
        Ok(())
    }

    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Number of tokens: 256 bytes plus one per merge.
    #[getter]
    fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }

    /// The merges in order, as (left id, right id); merge i made token 256 + i.
    fn get_merges(&self) -> Vec<Pair> {
        self.merges.clone()
    }

    /// Every token's bytes with its id (tiktoken's "mergeable ranks"), sorted by id.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &self.merges {
            let joined = [token_bytes[a as usize].as_slice(), token_bytes[b as usize].as_slice()].concat();
            token_bytes.push(joined);
        }
        token_bytes.iter().enumerate().map(|(i, t)| (PyBytes::new(py, t), i as u32)).collect()
    }

    /// Encodes text with the learned merges (no special tokens).
    fn encode(&self, py: Python<'_>, text: &str) -> Vec<u32> {
        py.allow_threads(|| {
            let mut out = Vec::new();
            self.splitter.for_each_chunk(text, |chunk| bpe::encode_chunk(chunk.as_bytes(), &self.ranks, &mut out));
            out
        })
    }
}

#[pymodule]
fn nanostoney_rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
