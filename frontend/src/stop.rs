//! Finding a stop string in generated text, as vLLM's `check_stop_strings` does. Text grows a
//! token at a time and a stop string may span several tokens, so each check looks at the new
//! text plus enough of the old to complete a stop string that began earlier, and no further.
//!
//! Offsets here are byte offsets into the text; vLLM counts characters, which picks the same
//! places because both count along the same string.

/// A stop string found in the text, and where vLLM cuts the text for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopMatch {
    /// Index into the request's `stop` list.
    pub stop_index: usize,
    /// Byte offset where the stop string starts.
    pub start: usize,
    /// Byte offset where it ends.
    pub end: usize,
}

/// The stop string that completes earliest in `text`, looking only at matches that end in the
/// text after `checked` (bytes before it were searched on earlier tokens). Ties go to the
/// earlier entry of `stop`, as in vLLM.
pub fn find_stop_string(text: &str, checked: usize, stop: &[String]) -> Option<StopMatch> {
    if checked >= text.len() {
        return None;
    }
    let mut best: Option<StopMatch> = None;
    for (stop_index, stop_str) in stop.iter().enumerate() {
        // Back up over all but one of the stop string's characters: a match must end in the
        // new text.
        let from = back_chars(text, checked, stop_str.chars().count().saturating_sub(1));
        let Some(found) = text[from..].find(stop_str.as_str()) else {
            continue;
        };
        let start = from + found;
        let end = start + stop_str.len();
        if best.as_ref().is_none_or(|b| end < b.end) {
            best = Some(StopMatch {
                stop_index,
                start,
                end,
            });
        }
    }
    best
}

/// The byte offset `n` characters before `at` (or 0).
pub(crate) fn back_chars(text: &str, at: usize, n: usize) -> usize {
    if n == 0 {
        return at;
    }
    text[..at]
        .char_indices()
        .rev()
        .nth(n - 1)
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_stop_string_begun_in_old_text_and_completed_in_new_text_is_found() {
        // "Hel" was checked already; "lo" arrived.
        let m = find_stop_string("Hello", 3, &stops(&["llo"])).unwrap();
        assert_eq!((m.start, m.end), (2, 5));
    }

    #[test]
    fn a_match_wholly_in_old_text_is_not_found_again() {
        assert_eq!(
            find_stop_string("stop and more", 8, &stops(&["stop"])),
            None
        );
    }

    #[test]
    fn the_earliest_completing_stop_string_wins_ties_go_to_list_order() {
        let m = find_stop_string("abcdef", 0, &stops(&["def", "bc", "abc"])).unwrap();
        assert_eq!(m.stop_index, 1);
        let m = find_stop_string("abcdef", 0, &stops(&["bc", "c"])).unwrap();
        assert_eq!(m.stop_index, 0);
    }

    #[test]
    fn offsets_back_up_by_characters_not_bytes() {
        // "世界" is 6 bytes; "界!" is one character back from the new "!".
        let m = find_stop_string("世界!", 6, &stops(&["界!"])).unwrap();
        assert_eq!((m.start, m.end), (3, 7));
        assert_eq!(back_chars("a世界", 7, 1), 4);
        assert_eq!(back_chars("a世界", 7, 5), 0);
    }
}
