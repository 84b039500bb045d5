//! Generated ids to text, one token at a time, as vLLM 0.32's `FastIncrementalDetokenizer`
//! does for every model with a `tokenizer.json` (it steps `tokenizers`' `DecodeStream`, primed
//! with the prompt's ids).
//!
//! The algorithm is the prefix / read offset one: keep a short window of ids whose decoded
//! text (the prefix) was already emitted; decode the window plus the new id; emit what follows
//! the prefix. Decoding a window instead of each token alone is what makes it right where
//! tokens do not decode alone:
//!
//! - a character split across byte-level or byte-fallback tokens decodes to U+FFFD until its
//!   last byte arrives, so while the decoded window ends in U+FFFD nothing is emitted;
//! - decoders that strip or add a space by position (SentencePiece's leading `▁`) see the
//!   token in context, so the space a token carries is kept mid-text.
//!
//! vLLM primes with every prompt id; this primes with the prompt's last 16 when that provably
//! gives the same text (see `prompt_context`), so a long prompt does not cost a decode of
//! all of it on the first token.
//!
//! One quirk is kept because vLLM has it: a prompt given as ids that ends inside a UTF-8
//! sequence decodes to U+FFFD, so no prefix is taken from it, and the first emitted text then
//! includes the whole prompt's text.

use crate::Tokenizer;

/// The incremental decoding state of one sequence.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    skip_special_tokens: bool,
    /// vLLM: `skip_special_tokens or spaces_between_special_tokens`, and true when the
    /// tokenizer has no added tokens.
    spaces_between_special_tokens: bool,
    last_was_added_token: bool,
    /// The window: ids around the prefix, then ids not yet emitted.
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl DecodeStream {
    /// A stream for a sequence whose prompt was `prompt_ids` (the prompt supplies the context
    /// of the first generated token).
    pub fn new(
        tokenizer: &Tokenizer,
        prompt_ids: &[u32],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
    ) -> Self {
        Self {
            skip_special_tokens,
            spaces_between_special_tokens: skip_special_tokens
                || spaces_between_special_tokens
                || !tokenizer.has_added_tokens(),
            last_was_added_token: false,
            ids: prompt_context(tokenizer, prompt_ids, skip_special_tokens, PROMPT_CONTEXT)
                .to_vec(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Primed with the prompt's last `context` ids (as chosen by [`prompt_context`]), or with
    /// every id as vLLM primes it when `context` is `None`.
    #[cfg(test)]
    fn with_context(
        tokenizer: &Tokenizer,
        prompt_ids: &[u32],
        skip_special_tokens: bool,
        context: Option<usize>,
    ) -> Self {
        let mut stream = Self::new(tokenizer, &[], skip_special_tokens, true);
        stream.ids = match context {
            Some(n) => prompt_context(tokenizer, prompt_ids, skip_special_tokens, n).to_vec(),
            None => prompt_ids.to_vec(),
        };
        stream
    }

    /// The text `id` adds, possibly empty (the token ends mid-character, or is a skipped
    /// special token); text held back for a partial character comes out with a later token.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        let mut text = match self.decode_step(tokenizer, id) {
            Ok(text) => text,
            Err(StepError::InvalidPrefix) => {
                // vLLM (issue 17448): the window decoded to text that does not extend what was
                // already emitted; it restarts an empty stream and steps the id again.
                self.ids.clear();
                self.prefix.clear();
                self.prefix_index = 0;
                self.decode_step(tokenizer, id).unwrap_or_default()
            }
            Err(StepError::Decode) => String::new(),
        };
        if !self.spaces_between_special_tokens {
            let added = tokenizer.added_token(id);
            if let (Some(content), true) = (added, self.last_was_added_token) {
                text = content.to_string();
            }
            self.last_was_added_token = added.is_some();
        }
        text
    }

    /// `tokenizers::tokenizer::step_decode_stream`, without its allocations for the error.
    fn decode_step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, StepError> {
        let decode = |ids: &[u32]| {
            tokenizer
                .inner()
                .decode(ids, self.skip_special_tokens)
                .map_err(|_| StepError::Decode)
        };
        if self.prefix.is_empty() && !self.ids.is_empty() {
            // First step after priming with the prompt.
            let prefix = decode(&self.ids)?;
            if !prefix.ends_with(char::REPLACEMENT_CHARACTER) {
                self.prefix = prefix;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let window = decode(&self.ids)?;
        if window.len() <= self.prefix.len() || window.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        let Some(new_text) = window.strip_prefix(self.prefix.as_str()) else {
            return Err(StepError::InvalidPrefix);
        };
        let new_text = new_text.to_string();
        let new_prefix_index = self.ids.len() - self.prefix_index;
        self.ids.drain(..self.prefix_index);
        self.prefix = decode(&self.ids)?;
        self.prefix_index = new_prefix_index;
        Ok(new_text)
    }
}

/// Prompt ids kept as context for the first generated token.
const PROMPT_CONTEXT: usize = 16;

/// vLLM primes the stream with the whole prompt, and so decodes all of it on the first token
/// (1.4 ms for a 16 KB prompt here). Decoders are local away from the start of the text (bytes
/// to characters, `▁` to space; the one strip is at the very start, and applies to the prefix
/// and the window alike), so the prompt's last ids give the first token the same text, as long
/// as the cut is clean:
/// - not inside a run of byte-fallback tokens (`<0xE6>`), which decodes as a unit: one invalid
///   byte turns the whole run into U+FFFD (and skipped special tokens do not end a run);
/// - the tail's text is not empty (a stripped leading space would land on the new token) and
///   has no U+FFFD (stray bytes may combine across the cut, and a prompt ending inside a
///   character makes vLLM emit the prompt's own text).
///
/// Otherwise the whole prompt, as vLLM. `the_prompt_tail_decodes_like_the_whole_prompt` holds
/// this to the whole-prompt stream with a tail of one id.
fn prompt_context<'p>(
    tokenizer: &Tokenizer,
    prompt_ids: &'p [u32],
    skip_special_tokens: bool,
    context: usize,
) -> &'p [u32] {
    if prompt_ids.len() <= context {
        return prompt_ids;
    }
    // Walk the cut back over tokens it may not fall before, and over tails whose text starts
    // inside a character (byte-level tokens split characters too).
    let first_cut = prompt_ids.len() - context;
    let last_cut = first_cut.saturating_sub(PROMPT_CONTEXT_SEARCH);
    for cut in (last_cut..=first_cut).rev() {
        if !cuts_cleanly(tokenizer, prompt_ids[cut]) {
            continue;
        }
        let tail = &prompt_ids[cut..];
        match tokenizer.inner().decode(tail, skip_special_tokens) {
            Ok(text) if !text.is_empty() && !text.contains(char::REPLACEMENT_CHARACTER) => {
                return tail
            }
            _ => {}
        }
    }
    prompt_ids
}

/// How much further back than the tail's length to look for a clean cut.
const PROMPT_CONTEXT_SEARCH: usize = 64;

/// Whether the tail may start at `id`: an ordinary vocabulary token, neither a byte-fallback
/// one (`<0xNN>`) nor an added one (a skipped special token would let the runs on either side
/// of it join).
fn cuts_cleanly(tokenizer: &Tokenizer, id: u32) -> bool {
    if tokenizer.added_token(id).is_some() {
        return false;
    }
    tokenizer.inner().id_to_token(id).is_some_and(|token| {
        let b = token.as_bytes();
        let byte_token = b.len() == 6
            && b.starts_with(b"<0x")
            && b[5] == b'>'
            && b[3..5].iter().all(u8::is_ascii_hexdigit);
        !byte_token
    })
}

enum StepError {
    InvalidPrefix,
    Decode,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_llama() -> Tokenizer {
        Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama")).unwrap()
    }

    fn stream_pieces(t: &Tokenizer, prompt: &[u32], output: &[u32]) -> Vec<String> {
        let mut stream = DecodeStream::new(t, prompt, true, true);
        output.iter().map(|&id| stream.step(t, id)).collect()
    }

    #[test]
    fn an_emoji_split_over_byte_tokens_comes_out_whole_with_its_last_byte() {
        let t = tiny_llama();
        let prompt = t.encode("Say:", true).unwrap();
        let output = t.encode(" 😀!", false).unwrap();
        let pieces = stream_pieces(&t, &prompt, &output);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), " 😀!");
        let emoji = pieces.iter().position(|p| p.contains('😀')).unwrap();
        assert!(
            pieces[..emoji].iter().all(|p| p.trim().is_empty()),
            "{pieces:?}"
        );
    }

    #[test]
    fn cjk_streams_to_the_same_text_as_one_decode() {
        let t = tiny_llama();
        let prompt = t.encode("Translate:", true).unwrap();
        let output = t.encode(" 世界你好, héllo wörld", false).unwrap();
        let pieces = stream_pieces(&t, &prompt, &output);
        assert_eq!(pieces.concat(), t.decode(&output, true).unwrap());
    }

    #[test]
    fn special_tokens_are_skipped_or_kept() {
        let t = tiny_llama();
        let output = [4, 5, 2];
        let mut skip = DecodeStream::new(&t, &[1], true, true);
        let skipped: String = output.iter().map(|&id| skip.step(&t, id)).collect();
        assert_eq!(skipped, "");
        let mut keep = DecodeStream::new(&t, &[1], false, false);
        let kept: String = output.iter().map(|&id| keep.step(&t, id)).collect();
        assert_eq!(kept, "<|im_start|><|im_end|></s>");
    }

    /// The prompt's last ids give every generated token the text the whole prompt gives it:
    /// random ids (bytes split anywhere, specials, runs of byte tokens) and text cut at random
    /// places, on a byte-level and a byte-fallback tokenizer, with the tail used in production
    /// and with the shortest one, which puts every cut right before the new tokens.
    #[test]
    fn the_prompt_tail_decodes_like_the_whole_prompt() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let text = "The quick brown fox, façade naïve café. 日本語のテキスト 😀🎉 مرحبا ".repeat(8);
        for name in ["tiny-llama", "byte-fallback"] {
            let dir = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
            let t = Tokenizer::from_dir(dir).unwrap();
            let vocab = t.vocab_size();
            let text_ids = t.encode(&text, true).unwrap();
            for round in 0..1200 {
                let prompt: Vec<u32> = if round % 2 == 0 {
                    (0..2 + next(60)).map(|_| next(vocab) as u32).collect()
                } else {
                    text_ids[..2 + next(text_ids.len() - 2)].to_vec()
                };
                let output: Vec<u32> = (0..1 + next(30)).map(|_| next(vocab) as u32).collect();
                let skip = round % 3 != 0;
                let context = if round % 4 < 2 { 1 } else { PROMPT_CONTEXT };
                let mut whole = DecodeStream::with_context(&t, &prompt, skip, None);
                let mut tail = DecodeStream::with_context(&t, &prompt, skip, Some(context));
                for &id in &output {
                    assert_eq!(
                        tail.step(&t, id),
                        whole.step(&t, id),
                        "{name}: prompt {prompt:?} output {output:?} skip {skip} context {context}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_prompt_ending_mid_character_leaks_into_the_first_text_as_in_vllm() {
        let t = tiny_llama();
        let ids = t.encode("a 😀", false).unwrap();
        let (prompt, output) = ids.split_at(ids.len() - 1);
        assert_eq!(stream_pieces(&t, prompt, output), vec!["a 😀"]);
    }
}
