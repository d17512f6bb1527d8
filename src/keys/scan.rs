//! Finding keys in text, for `keygate keys scan`: every `<prefix>_` followed by a body
//! whose checksum is right. The checksum is what keeps the false positives out: a random
//! 49-character base62 string after the prefix passes it about once in 56 billion.

use memchr::memmem::Finder;

use super::KeyFormat;

/// A key found: the 1-based line it is on and its preview (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub line: usize,
    pub preview: String,
}

/// Looks for one deployment's keys; build it once and reuse it for every file.
pub struct Scanner {
    format: KeyFormat,
    finder: Finder<'static>,
}

/// How much of a file's start is read to tell binary from text (git's heuristic).
const BINARY_SNIFF: usize = 8000;

impl Scanner {
    pub fn new(prefix: &str) -> Self {
        let lead = format!("{prefix}_");
        Scanner {
            format: KeyFormat::new(prefix),
            finder: Finder::new(lead.as_bytes()).into_owned(),
        }
    }

    /// Whether `data` looks binary: a NUL byte near its start.
    pub fn is_binary(data: &[u8]) -> bool {
        memchr::memchr(0, &data[..data.len().min(BINARY_SNIFF)]).is_some()
    }

    /// Every well-formed key in `data` with a valid checksum, in order.
    pub fn scan(&self, data: &[u8]) -> Vec<Found> {
        let key_len = self.format.key_len();
        let mut found = Vec::new();
        let (mut line, mut counted_to) = (1, 0);
        for at in self.finder.find_iter(data) {
            let Some(candidate) = data.get(at..at + key_len) else {
                break;
            };
            // A longer base62 run is some other token that merely contains a key's shape.
            let runs_on = data
                .get(at + key_len)
                .is_some_and(u8::is_ascii_alphanumeric);
            if runs_on || self.format.check(candidate).is_err() {
                continue;
            }
            line += memchr::memchr_iter(b'\n', &data[counted_to..at]).count();
            counted_to = at;
            // Valid keys are ASCII, so this is the key's text.
            let text = String::from_utf8_lossy(candidate);
            found.push(Found {
                line,
                preview: self.format.preview(&text),
            });
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_valid_keys_with_their_lines_and_nothing_else() {
        let format = KeyFormat::new("kg");
        let key = format.generate().expect("rng");
        let mut broken = key.clone().into_bytes();
        let last = broken.len() - 1;
        broken[last] = if broken[last] == b'a' { b'b' } else { b'a' };
        let broken = String::from_utf8(broken).expect("ASCII");
        let text = format!("first\nTOKEN={key}\n{broken}\nx{key}y\nkg_short\n  \"{key}\",\n");
        let found = Scanner::new("kg").scan(text.as_bytes());
        let lines: Vec<usize> = found.iter().map(|f| f.line).collect();
        assert_eq!(lines, [2, 6], "{found:?}");
        assert!(found.iter().all(|f| f.preview == format.preview(&key)));
        assert!(found.iter().all(|f| !f.preview.contains(&key[3..40])));
    }

    #[test]
    fn another_prefix_is_not_ours_and_nul_means_binary() {
        let key = KeyFormat::new("acme").generate().expect("rng");
        assert!(Scanner::new("kg").scan(key.as_bytes()).is_empty());
        assert_eq!(Scanner::new("acme").scan(key.as_bytes()).len(), 1);
        assert!(Scanner::is_binary(b"abc\0def"));
        assert!(!Scanner::is_binary(b"plain text"));
    }
}
