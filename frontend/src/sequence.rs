//! One generated sequence's text, as vLLM's output processor keeps it (`BaseIncrementalDetokenizer`
//! in vllm/v1/engine/detokenizer.py): ids arrive from the engine in chunks; each is decoded, the
//! text is searched for stop strings, and a streaming client is sent what is safe to send.
//!
//! What vLLM does, and so this does:
//! - a stop string ends the sequence with `finish_reason: "stop"` and `stop_reason` = the
//!   string; the text is cut before it (or after it with `include_stop_str_in_output`), and
//!   ids generated after the one that completed it are dropped (they do not count as usage);
//! - an engine-side stop (EOS, `stop_token_ids`) is not decoded into the text unless
//!   `include_stop_str_in_output`, but its id still counts;
//! - stop strings are looked for only once more than `min_tokens` ids were generated;
//! - while streaming, the last `longest stop string - 1` characters are held back, so a delta
//!   never carries the start of a stop string that the next token completes. When the sequence
//!   finishes the rest is sent.

use crate::detokenize::DecodeStream;
use crate::stop::{back_chars, find_stop_string};
use crate::Tokenizer;

/// The sampling fields that shape the text (not the ids) of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopParams {
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub min_tokens: usize,
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
}

impl Default for StopParams {
    /// OpenAI's and vLLM's defaults.
    fn default() -> Self {
        Self {
            stop: Vec::new(),
            include_stop_str_in_output: false,
            min_tokens: 0,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SequenceText {
    decoder: DecodeStream,
    stop: Vec<String>,
    include_stop_str_in_output: bool,
    min_tokens: usize,
    /// Characters held back from a streamed delta while the sequence runs.
    held_back_chars: usize,
    token_ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already handed out as deltas.
    streamed: usize,
}

impl SequenceText {
    pub fn new(tokenizer: &Tokenizer, prompt_ids: &[u32], params: &StopParams) -> Self {
        let held_back_chars = match params.stop.iter().map(|s| s.chars().count()).max() {
            Some(longest) if !params.include_stop_str_in_output => longest.saturating_sub(1),
            _ => 0,
        };
        Self {
            decoder: DecodeStream::new(
                tokenizer,
                prompt_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
            ),
            stop: params.stop.clone(),
            include_stop_str_in_output: params.include_stop_str_in_output,
            min_tokens: params.min_tokens,
            held_back_chars,
            token_ids: Vec::new(),
            text: String::new(),
            streamed: 0,
        }
    }

    /// Takes the next ids from the engine. `stop_terminated`: the engine finished the sequence
    /// with reason stop on the last of these ids (EOS or a stop token id). Returns the stop
    /// string that ends the sequence, if one completed; the caller then finishes it with
    /// `finish_reason: "stop"` and aborts the engine's request.
    pub fn update(
        &mut self,
        tokenizer: &Tokenizer,
        new_token_ids: &[u32],
        stop_terminated: bool,
    ) -> Option<&str> {
        let (decoded, skipped_stop_id) = match new_token_ids.split_last() {
            None => return None,
            Some((&last, rest)) if stop_terminated && !self.include_stop_str_in_output => {
                (rest, Some(last))
            }
            _ => (new_token_ids, None),
        };

        let prev_tokens = self.token_ids.len();
        let checking = !self.stop.is_empty();
        // Text length after each new token, starting with the length before them.
        let mut token_ends = Vec::with_capacity(if checking { new_token_ids.len() + 1 } else { 0 });
        if checking {
            token_ends.push(self.text.len());
        }
        for &id in decoded {
            self.token_ids.push(id);
            let piece = self.decoder.step(tokenizer, id);
            self.text.push_str(&piece);
            if checking {
                token_ends.push(self.text.len());
            }
        }
        if let Some(id) = skipped_stop_id {
            self.token_ids.push(id);
            if checking {
                token_ends.push(self.text.len());
            }
        }

        if !checking || self.token_ids.len() <= self.min_tokens {
            return None;
        }
        let checked = token_ends[self.min_tokens.saturating_sub(prev_tokens)];
        let found = find_stop_string(&self.text, checked, &self.stop)?;

        let (cut_to, stop_end) = if self.include_stop_str_in_output {
            (found.end, found.end)
        } else {
            (found.start, found.end)
        };
        // Ids after the one whose text completed the stop string are dropped.
        let kept = 1 + token_ends[1..].partition_point(|&end| end < stop_end);
        self.token_ids.truncate(prev_tokens + kept);
        self.text.truncate(cut_to);
        Some(&self.stop[found.stop_index])
    }

    /// The text not yet streamed that is safe to stream: all of it once `finished`, else all
    /// but the held-back tail.
    pub fn next_delta(&mut self, finished: bool) -> &str {
        let end = self.safe_end(finished);
        if self.streamed >= end {
            return "";
        }
        let start = std::mem::replace(&mut self.streamed, end);
        &self.text[start..end]
    }

    /// The whole text so far that is safe to show (vLLM's non-streamed view; complete once
    /// `finished`).
    pub fn text(&self, finished: bool) -> &str {
        &self.text[..self.safe_end(finished)]
    }

    /// The generated ids that count: after a stop string, those up to the one completing it.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    fn safe_end(&self, finished: bool) -> usize {
        if finished || self.held_back_chars == 0 {
            return self.text.len();
        }
        // Shorter than the held-back tail: nothing is safe yet.
        back_chars(&self.text, self.text.len(), self.held_back_chars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_llama() -> Tokenizer {
        Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama")).unwrap()
    }

    fn params(stop: &[&str], include: bool) -> StopParams {
        StopParams {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            include_stop_str_in_output: include,
            ..StopParams::default()
        }
    }

    /// Streams `output` one id at a time; returns the deltas, the stop string and the final text.
    fn stream(
        t: &Tokenizer,
        output: &str,
        p: &StopParams,
    ) -> (Vec<String>, Option<String>, String, usize) {
        let prompt = t.encode("Q:", true).unwrap();
        let ids = t.encode(output, false).unwrap();
        let mut seq = SequenceText::new(t, &prompt, p);
        let mut deltas = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let stop = seq.update(t, &[id], false).map(str::to_string);
            let finished = stop.is_some() || i + 1 == ids.len();
            deltas.push(seq.next_delta(finished).to_string());
            if finished {
                let text = seq.text(true).to_string();
                return (deltas, stop, text, seq.token_ids().len());
            }
        }
        unreachable!()
    }

    #[test]
    fn a_stop_string_spanning_tokens_cuts_the_text_before_it() {
        let t = tiny_llama();
        let (deltas, stop, text, _) = stream(
            &t,
            " The answer is 42. END of story",
            &params(&["END"], false),
        );
        assert_eq!(stop.as_deref(), Some("END"));
        assert_eq!(text, " The answer is 42. ");
        assert_eq!(deltas.concat(), text);
        assert!(deltas.iter().all(|d| !d.contains('E')), "{deltas:?}");
    }

    #[test]
    fn include_stop_str_in_output_keeps_it() {
        let t = tiny_llama();
        let (deltas, stop, text, _) = stream(&t, " one two three four", &params(&["two th"], true));
        assert_eq!(stop.as_deref(), Some("two th"));
        assert_eq!(text, " one two th");
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn a_delta_never_shows_the_start_of_a_stop_string_that_then_completes() {
        let t = tiny_llama();
        let (deltas, _, _, _) = stream(&t, " abc <|stop|> more", &params(&["<|stop|>"], false));
        for d in &deltas {
            assert!(!d.contains('<'), "{deltas:?}");
        }
    }

    #[test]
    fn the_held_back_tail_is_sent_when_the_sequence_ends_without_a_stop() {
        let t = tiny_llama();
        let (deltas, stop, text, n) = stream(&t, " no stop here", &params(&["zzzz"], false));
        assert_eq!(stop, None);
        assert_eq!(text, " no stop here");
        assert_eq!(deltas.concat(), text);
        assert_eq!(n, t.encode(" no stop here", false).unwrap().len());
    }

    #[test]
    fn ids_after_the_stop_string_in_the_same_chunk_are_dropped() {
        let t = tiny_llama();
        let ids = t.encode(" x STOP y z", false).unwrap();
        let mut seq = SequenceText::new(&t, &[1], &params(&["STOP"], false));
        assert_eq!(seq.update(&t, &ids, false), Some("STOP"));
        assert_eq!(seq.text(true), " x ");
        let through_stop = t.encode(" x STOP", false).unwrap().len();
        assert_eq!(seq.token_ids().len(), through_stop);
    }

    #[test]
    fn an_eos_ends_the_sequence_without_text_but_counts() {
        let t = tiny_llama();
        let ids = t.encode(" done", false).unwrap();
        let mut seq = SequenceText::new(&t, &[1], &StopParams::default());
        seq.update(&t, &ids, false);
        assert_eq!(seq.update(&t, &[2], true), None);
        assert_eq!(seq.text(true), " done");
        assert_eq!(seq.token_ids().len(), ids.len() + 1);
    }

    #[test]
    fn min_tokens_defers_the_stop_check() {
        let t = tiny_llama();
        let ids = t.encode("ab ab ab", false).unwrap();
        let p = StopParams {
            min_tokens: 2,
            ..params(&["ab"], false)
        };
        let mut seq = SequenceText::new(&t, &[1], &p);
        let mut stopped_at = None;
        for (i, &id) in ids.iter().enumerate() {
            if seq.update(&t, &[id], false).is_some() {
                stopped_at = Some(i);
                break;
            }
        }
        // The first "ab" ends within the first 2 ids, which are not checked.
        assert!(stopped_at.unwrap() >= 2);
        assert!(seq.text(true).starts_with("ab"));
    }
}
