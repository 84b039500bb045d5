//! Output logprobs as vLLM 0.32 renders them: the completions `logprobs` object
//! (`text_offset`, `token_logprobs`, `tokens`, `top_logprobs`) and the chat `logprobs.content`
//! list, from the engine's `OutputLogProbs` (sampled logprob and the top-k per position).
//!
//! Token strings are vLLM's `decoded_token`s: each id decoded alone (special tokens kept), a
//! Metaspace tokenizer's stripped leading spaces put back, and a piece ending in U+FFFD retried
//! with up to 4 preceding sampled ids as context (vLLM's `_correct_decoded_token`). Floats are
//! written as Python writes them: `repr` in the non-streamed body (`json.dumps`), pydantic's
//! format in streamed chunks (`model_dump_json`); -inf as -9999.0.

use grpc_proto::engine::OutputLogProbs;

use crate::Tokenizer;

/// How the request asked for logprobs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogprobsOpts {
    /// Top logprobs per position (completions `logprobs`, chat `top_logprobs`); -1: all.
    /// Chat shows the first `top` entries of vLLM's dict; completions show all of it
    /// (`top` + 1 when the sampled token is not among the top), of which the engine's
    /// servicer sends the first `top` (the sampled token alone for 0).
    pub top: i32,
    /// `return_tokens_as_token_ids`: tokens as `token_id:{id}`.
    pub as_ids: bool,
    pub chat: bool,
}

/// Which Python serializer the float goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloatStyle {
    /// `json.dumps`, i.e. `float.__repr__`: `1e-05`, `0.0001`, `1e+16`.
    Repr,
    /// pydantic-core's `model_dump_json`: `0.00001`, `1e-6`, `1e+16`.
    Pydantic,
}

/// Per choice: what the next positions need.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChoiceLogprobs {
    /// Completions: the `text_offset` of the next token (code points of the tokens so far).
    offset: usize,
    /// The last (up to 4) sampled ids, for decoding byte-fallback pieces.
    context: Vec<u32>,
}

const CONTEXT: usize = 4;
const REPLACEMENT: char = '\u{fffd}';

fn json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec");
}

/// `v` as Python writes a float, -inf clamped to -9999.0 as vLLM does.
pub(crate) fn write_float(out: &mut Vec<u8>, v: f64, style: FloatStyle) {
    let v = v.max(-9999.0);
    if v.is_nan() {
        out.extend_from_slice(b"NaN");
        return;
    }
    if v.is_infinite() {
        out.extend_from_slice(b"Infinity");
        return;
    }
    if v == 0.0 {
        out.extend_from_slice(if v.is_sign_negative() {
            b"-0.0"
        } else {
            b"0.0"
        });
        return;
    }
    // Shortest round-trip digits and the decimal exponent, from Rust's `{:e}`.
    let s = format!("{v:e}");
    let (mantissa, exp) = s.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let low = match style {
        FloatStyle::Repr => -4,
        FloatStyle::Pydantic => -5,
    };
    if neg {
        out.push(b'-');
    }
    if (low..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', (-point) as usize));
            out.extend_from_slice(digits.as_bytes());
        } else if (point as usize) < digits.len() {
            out.extend_from_slice(&digits.as_bytes()[..point as usize]);
            out.push(b'.');
            out.extend_from_slice(&digits.as_bytes()[point as usize..]);
        } else {
            out.extend_from_slice(digits.as_bytes());
            out.extend(std::iter::repeat_n(b'0', point as usize - digits.len()));
            out.extend_from_slice(b".0");
        }
    } else {
        out.push(digits.as_bytes()[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits.as_bytes()[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let e = exp.unsigned_abs();
        if style == FloatStyle::Repr && e < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(itoa::Buffer::new().format(e).as_bytes());
    }
}

/// vLLM's `decoded_token` of `id` at a position after `context` (the preceding sampled ids).
fn decoded_token(tokenizer: &Tokenizer, id: u32, context: &[u32]) -> String {
    let s = tokenizer.decode_one(id);
    if !s.ends_with(REPLACEMENT) {
        return s;
    }
    // `_correct_decoded_token`: the shortest context after which the piece is complete.
    let max_ctx = context.len().min(CONTEXT);
    for n in 1..=max_ctx {
        let ctx = &context[context.len() - n..];
        let mut ids = ctx.to_vec();
        ids.push(id);
        let full = tokenizer.decode(&ids, false).unwrap_or_default();
        if full.ends_with(REPLACEMENT) {
            continue;
        }
        // Context ids that were themselves incomplete belong to this piece.
        let mut clean_end = ctx.len();
        for j in (0..ctx.len()).rev() {
            if tokenizer
                .decode(&ctx[j..=j], false)
                .unwrap_or_default()
                .ends_with(REPLACEMENT)
            {
                clean_end = j;
            } else {
                break;
            }
        }
        let prefix = if clean_end > 0 {
            tokenizer
                .decode(&ctx[..clean_end], false)
                .unwrap_or_default()
        } else {
            String::new()
        };
        if let Some(rest) = full.strip_prefix(prefix.as_str()) {
            return rest.to_string();
        }
        let common: usize = prefix
            .chars()
            .zip(full.chars())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.len_utf8())
            .sum();
        return full[common..].to_string();
    }
    String::new()
}

/// One position's sampled logprob and top-k, if the engine sent them.
struct Step<'a> {
    logprob: f32,
    top: Option<(&'a [f32], &'a [u32])>,
}

impl ChoiceLogprobs {
    /// Writes the `logprobs` value for `ids` (the new ids of a choice, as kept after stop
    /// strings), with the engine's logprobs for them (`lp` lists the same ids in order, those
    /// the engine had no logprob for left out).
    pub(crate) fn write(
        &mut self,
        out: &mut Vec<u8>,
        tokenizer: &Tokenizer,
        opts: LogprobsOpts,
        style: FloatStyle,
        ids: &[u32],
        lp: Option<&OutputLogProbs>,
    ) {
        let mut steps: Vec<Option<Step>> = Vec::with_capacity(ids.len());
        let mut k = 0;
        for &id in ids {
            match lp {
                Some(lp) if lp.token_ids.get(k) == Some(&id) => {
                    steps.push(Some(Step {
                        logprob: lp.token_logprobs.get(k).copied().unwrap_or(f32::NAN),
                        top: lp
                            .top_logprobs
                            .get(k)
                            .map(|t| (t.values.as_slice(), t.token_ids.as_slice())),
                    }));
                    k += 1;
                }
                _ => steps.push(None),
            }
        }
        if opts.chat {
            self.write_chat(out, tokenizer, opts, style, ids, &steps);
        } else {
            self.write_completion(out, tokenizer, opts, style, ids, &steps);
        }
    }

    fn token(&self, tokenizer: &Tokenizer, opts: LogprobsOpts, id: u32) -> String {
        if opts.as_ids {
            format!("token_id:{id}")
        } else {
            decoded_token(tokenizer, id, &self.context)
        }
    }

    fn advance(&mut self, id: u32) {
        if self.context.len() == CONTEXT {
            self.context.remove(0);
        }
        self.context.push(id);
    }

    fn write_completion(
        &mut self,
        out: &mut Vec<u8>,
        tokenizer: &Tokenizer,
        opts: LogprobsOpts,
        style: FloatStyle,
        ids: &[u32],
        steps: &[Option<Step>],
    ) {
        let mut tokens = Vec::with_capacity(ids.len());
        // Each position's top logprobs as vLLM's dict keyed by token string: a repeated key
        // keeps its place and takes the later value.
        let mut tops: Vec<Option<Vec<(String, f32)>>> = Vec::with_capacity(ids.len());
        for (&id, step) in ids.iter().zip(steps) {
            match step {
                None => {
                    let t = if opts.as_ids {
                        format!("token_id:{id}")
                    } else {
                        tokenizer.decode_one(id)
                    };
                    tokens.push(t);
                    tops.push(None);
                }
                Some(step) => {
                    tokens.push(self.token(tokenizer, opts, id));
                    let mut top: Vec<(String, f32)> = Vec::new();
                    let mut add = |key: String, v: f32| {
                        match top.iter_mut().find(|(k, _)| *k == key) {
                            Some(e) => e.1 = v,
                            None => top.push((key, v)),
                        };
                    };
                    match step.top {
                        Some((values, top_ids)) if !top_ids.is_empty() => {
                            // The engine's first k of the dict; vLLM shows k + 1 (all of it).
                            for (&tid, &v) in top_ids.iter().zip(values) {
                                add(self.token(tokenizer, opts, tid), v);
                            }
                        }
                        _ => add(tokens.last().expect("pushed").clone(), step.logprob),
                    }
                    tops.push(Some(top));
                }
            }
            self.advance(id);
        }
        out.extend_from_slice(b"{\"text_offset\":[");
        for (j, t) in tokens.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(itoa::Buffer::new().format(self.offset).as_bytes());
            self.offset += t.chars().count();
        }
        out.extend_from_slice(b"],\"token_logprobs\":[");
        for (j, step) in steps.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            match step {
                Some(s) => write_float(out, s.logprob as f64, style),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b"],\"tokens\":[");
        for (j, t) in tokens.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            json_str(out, t);
        }
        out.extend_from_slice(b"],\"top_logprobs\":[");
        for (j, top) in tops.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            match top {
                None => out.extend_from_slice(b"null"),
                Some(top) => {
                    out.push(b'{');
                    for (e, (key, v)) in top.iter().enumerate() {
                        if e > 0 {
                            out.push(b',');
                        }
                        json_str(out, key);
                        out.push(b':');
                        write_float(out, *v as f64, style);
                    }
                    out.push(b'}');
                }
            }
        }
        out.extend_from_slice(b"]}");
    }

    fn write_chat(
        &mut self,
        out: &mut Vec<u8>,
        tokenizer: &Tokenizer,
        opts: LogprobsOpts,
        style: FloatStyle,
        ids: &[u32],
        steps: &[Option<Step>],
    ) {
        out.extend_from_slice(b"{\"content\":[");
        for (j, (&id, step)) in ids.iter().zip(steps).enumerate() {
            if j > 0 {
                out.push(b',');
            }
            match step {
                None => {
                    let t = if opts.as_ids {
                        format!("token_id:{id}")
                    } else {
                        tokenizer.decode_one(id)
                    };
                    out.extend_from_slice(b"{\"token\":");
                    json_str(out, &t);
                    if style == FloatStyle::Repr {
                        // Defaults, dumped in full outside streams.
                        out.extend_from_slice(b",\"logprob\":-9999.0");
                    }
                    out.extend_from_slice(b",\"bytes\":");
                    write_bytes(out, &t);
                    if style == FloatStyle::Repr {
                        out.extend_from_slice(b",\"top_logprobs\":[]");
                    }
                    out.push(b'}');
                }
                Some(step) => {
                    let decoded = decoded_token(tokenizer, id, &self.context);
                    out.extend_from_slice(b"{\"token\":");
                    if opts.as_ids {
                        json_str(out, &format!("token_id:{id}"));
                    } else {
                        json_str(out, &decoded);
                    }
                    out.extend_from_slice(b",\"logprob\":");
                    write_float(out, step.logprob as f64, style);
                    out.extend_from_slice(b",\"bytes\":");
                    write_bytes(out, &decoded);
                    out.extend_from_slice(b",\"top_logprobs\":[");
                    if let Some((values, top_ids)) = step.top {
                        let take = if opts.top < 0 {
                            top_ids.len()
                        } else {
                            top_ids.len().min(opts.top as usize)
                        };
                        for (e, (&tid, &v)) in top_ids.iter().zip(values).take(take).enumerate() {
                            if e > 0 {
                                out.push(b',');
                            }
                            let t = self.token(tokenizer, opts, tid);
                            out.extend_from_slice(b"{\"token\":");
                            json_str(out, &t);
                            out.extend_from_slice(b",\"logprob\":");
                            write_float(out, v as f64, style);
                            out.extend_from_slice(b",\"bytes\":");
                            write_bytes(out, &t);
                            out.push(b'}');
                        }
                    }
                    out.extend_from_slice(b"]}");
                }
            }
            self.advance(id);
        }
        out.extend_from_slice(b"]}");
    }
}

fn write_bytes(out: &mut Vec<u8>, s: &str) {
    out.push(b'[');
    for (i, b) in s.bytes().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(itoa::Buffer::new().format(b).as_bytes());
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: f64, style: FloatStyle) -> String {
        let mut out = Vec::new();
        write_float(&mut out, v, style);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn floats_are_pythons() {
        use FloatStyle::*;
        let cases: &[(f64, &str, &str)] = &[
            (1e-5, "1e-05", "0.00001"),
            (2.5e-5, "2.5e-05", "0.000025"),
            (1.5e-7, "1.5e-07", "1.5e-7"),
            (1e-6, "1e-06", "1e-6"),
            (1e16, "1e+16", "1e+16"),
            (1.5e16, "1.5e+16", "1.5e+16"),
            (1e15, "1000000000000000.0", "1000000000000000.0"),
            (1e-4, "0.0001", "0.0001"),
            (-9999.0, "-9999.0", "-9999.0"),
            (f64::NEG_INFINITY, "-9999.0", "-9999.0"),
            (123.0, "123.0", "123.0"),
            (123456789.125, "123456789.125", "123456789.125"),
            (-6.2243332862854, "-6.2243332862854", "-6.2243332862854"),
            (3e-300, "3e-300", "3e-300"),
            (
                1.7976931348623157e308,
                "1.7976931348623157e+308",
                "1.7976931348623157e+308",
            ),
            (5e-324, "5e-324", "5e-324"),
            (0.0, "0.0", "0.0"),
            (-0.0, "-0.0", "-0.0"),
            (0.1, "0.1", "0.1"),
        ];
        for &(v, repr, pydantic) in cases {
            assert_eq!(f(v, Repr), repr, "{v:e}");
            assert_eq!(f(v, Pydantic), pydantic, "{v:e}");
        }
        // A float32 logprob as Python sees it (widened to a double).
        assert_eq!(f(-6.2727866f32 as f64, Repr), "-6.272786617279053");
    }
}
