//! Pre-tokenisation: cut text into chunks with a GPT-4-style regex; BPE never merges across chunks.
//!
//! The GPT-4 family of patterns needs a look-ahead (`\s+(?!\S)`), so the general path uses
//! `fancy-regex`, a backtracking engine, which is the slowest step of training. For the two
//! patterns people actually use (nanochat's default and GPT-4's cl100k) we run an equivalent
//! pattern on the `regex` crate's automata instead and emulate the look-ahead by hand; the
//! tests check that both paths cut every bundled text and a set of awkward strings identically.

use regex_automata::{Anchored, Input};

/// nanochat's variant of the GPT-4 pattern: numbers are split into groups of at most 2 digits.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// GPT-4's (cl100k_base) pattern: groups of at most 3 digits.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The tail both known patterns end with; the fast path replaces it by a plain `\s+`.
const LOOKAHEAD_TAIL: &str = r"|\s+(?!\S)|\s+";

pub enum Splitter {
    /// Known pattern compiled for the `regex` crate's engines, look-ahead emulated in
    /// `for_each_chunk`.
    Fast(regex_automata::meta::Regex),
    /// Any other pattern, run as written.
    Fancy(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        if pattern == DEFAULT_PATTERN || pattern == GPT4_PATTERN {
            // Why the rewrite is exact for these two patterns:
            // - `?+` and `++` (possessive) never change what matches here: the character they
            //   would give back cannot start the next item (`[^\r\n\p{L}\p{N}]` before `\p{L}+`,
            //   `[^\s\p{L}\p{N}]` before `[\r\n]*`), so backtracking into them always fails anyway.
            // - `\s+(?!\S)|\s+` becomes `\s+`, and `for_each_chunk` gives back the last whitespace
            //   character when the run is followed by a non-space, exactly what the look-ahead does.
            // The `regex` crate uses leftmost-first alternation, like a backtracking engine.
            let body = &pattern[..pattern.len() - LOOKAHEAD_TAIL.len()];
            let fast = format!("{}|\\s+", body.replace("?+", "?").replace("++", "+"));
            let re = regex_automata::meta::Regex::new(&fast).map_err(|e| e.to_string())?;
            return Ok(Splitter::Fast(re));
        }
        let re = fancy_regex::Regex::new(pattern).map_err(|e| format!("bad split pattern: {e}"))?;
        Ok(Splitter::Fancy(re))
    }

    /// Calls `f` on every chunk of `text`, in order.
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        match self {
            Splitter::Fancy(re) => {
                for m in re.find_iter(text) {
                    // fancy-regex can fail at run time (backtrack limit); skipping would silently
                    // drop text, so this is a hard error.
                    let m = m.expect("split pattern hit the backtracking limit");
                    f(m.as_str());
                }
            }
            Splitter::Fast(re) => {
                // Every character starts a match of these patterns (letters, digits, whitespace
                // and "anything else" each have a branch), so each match starts where the last
                // ended. An anchored search then needs only the forward scan for the end.
                let mut pos = 0;
                while pos < text.len() {
                    let input = Input::new(text).range(pos..).anchored(Anchored::Yes);
                    let mut end = re.search_half(&input).expect("every character starts a chunk").offset();
                    // Only the `\s+` branch can end in whitespace other than \r or \n. When that
                    // run is followed by a non-space, `\s+(?!\S)` would have stopped one character
                    // short (if that leaves at least one character), so do the same.
                    if end < text.len() {
                        let mut chars = text[pos..end].chars();
                        let last = chars.next_back().unwrap();
                        if last.is_whitespace() && last != '\r' && last != '\n' && chars.next().is_some() {
                            end -= last.len_utf8();
                        }
                    }
                    f(&text[pos..end]);
                    pos = end;
                }
            }
        }
    }

    pub fn chunks<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut out = Vec::new();
        self.for_each_chunk(text, |c| out.push(c));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(pattern: &str, text: &str) -> (Vec<String>, Vec<String>) {
        let fast = Splitter::new(pattern).unwrap();
        assert!(matches!(fast, Splitter::Fast(_)));
        let fancy = Splitter::Fancy(fancy_regex::Regex::new(pattern).unwrap());
        let own = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
        (own(fast.chunks(text)), own(fancy.chunks(text)))
    }

    #[test]
    fn fast_path_matches_fancy_regex_on_awkward_text() {
        let texts = [
            "Hello world", "  two  spaces  ", "tab\t\tthen\ttext", "end with spaces   ",
            "lines\n\n  indented\r\n\tcode\n", "   \n   x", "It's we'LL they've I'M",
            "12345 678.9 1,000,000", "îchiyach yuṯẖach âû îyâ", "a\u{a0}\u{a0}b \u{3000}c",
            "!!! ??? ...\n\n", "x = [1, 2]\n    return x  # note\n", "", " ", "\n", "  \n",
            "emoji 🙂🙂 done", "ſ 'Ś 'ſ", "tail\u{2028}\u{2028}z", " \u{85}\u{85}y",
        ];
        for pattern in [DEFAULT_PATTERN, GPT4_PATTERN] {
            for t in texts {
                let (a, b) = both(pattern, t);
                assert_eq!(a, b, "pattern {pattern:?} text {t:?}");
                assert_eq!(a.concat(), t);
            }
        }
    }

    #[test]
    fn fast_path_matches_fancy_regex_on_bundled_data() {
        // The repository's bundled data: real Stoney, English and math text.
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../data");
        let files = ["stoney/stoney_valid.jsonl", "aqua_rat/dev.json", "gsm8k/test.jsonl"];
        let mut seen = 0;
        for f in files {
            let Ok(text) = std::fs::read_to_string(format!("{root}/{f}")) else { continue };
            // JSON escapes hide newlines and unicode; un-escape the common ones so the
            // whitespace and letter branches see real characters.
            let text = text.replace("\\n", "\n").replace("\\t", "\t").replace("\\\"", "\"");
            let (a, b) = both(DEFAULT_PATTERN, &text);
            assert_eq!(a, b, "file {f}");
            seen += 1;
        }
        assert!(seen > 0, "no bundled data found under {root}");
    }

    #[test]
    fn other_patterns_use_fancy_regex() {
        let s = Splitter::new(r"\w+|\s+").unwrap();
        assert!(matches!(s, Splitter::Fancy(_)));
        assert_eq!(s.chunks("ab  cd"), vec!["ab", "  ", "cd"]);
        assert!(Splitter::new("(").is_err());
    }
}
