"""Ground truth for the frontend crate's tests, from vLLM itself.

Run with the Python of a vLLM install (0.32 was used):

    $VLLM_VENV/bin/python frontend/testdata/gen_expected.py

It (re)writes testdata/byte-fallback/ (a tiny Llama-2-style SentencePiece-BPE tokenizer with
byte fallback, built here because the tiny test model's tokenizer is byte-level) and
testdata/expected.json: for each tokenizer, token ids of prompts (transformers, with and without
special tokens), rendered chat prompts (transformers' apply_chat_template, content shaped as
vLLM shapes it), and detokenized streams (vLLM's own FastIncrementalDetokenizer, the class its
HTTP server uses, fed chunk by chunk as the output processor feeds it).
"""

import json
import os
import random
from types import SimpleNamespace

from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer

from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

HERE = os.path.dirname(os.path.abspath(__file__))

LONG = (
    "The quick brown fox jumps over the lazy dog. "
    "Ünïcödé façade, naïve café; 日本語のテキスト、中文文本。 Emoji: 😀🎉👍🏽 "
) * 24


def build_byte_fallback(path):
    os.makedirs(path, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    chars = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'\"-()é世"
    for c in chars:
        vocab.setdefault(c, len(vocab))
    merges = [
        ("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("e", "r"),
        ("o", "n"), ("▁", "s"), ("t", "o"), ("▁s", "to"), ("▁sto", "p"), ("E", "N"),
        ("EN", "D"), ("▁", "w"), ("o", "r"), ("▁w", "or"), ("l", "d"), ("▁wor", "ld"),
    ]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["[INST]"] = len(vocab)
    vocab["[/INST]"] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        "backend": "tokenizers",
        "tokenizer_class": "TokenizersBackend",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": (
            "{{ bos_token }}{% for message in messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
            "{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
            "{% else %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}"
            "{% endfor %}"
        ),
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


PROMPTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\n\ttabbed",
    "héllo wörld, façade",
    "日本語のテキスト",
    "中文文本，世界你好",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷",
    "مرحبا بالعالم",
    "stop END here",
    LONG,
]

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? 日本語 😀"},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "  spaced  "},
        {"role": "assistant", "content": "Sure: ünïcödé"},
        {"role": "user", "content": LONG[:500]},
    ],
]

SYSTEM_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Bye 👋"},
]

# (name, prompt text, output text, extra ids appended, stop, include, min_tokens,
#  skip_special, spaces_between, chunking, stop_terminated)
STREAMS = [
    ("ascii", "Q:", " The answer is 42.", [], None, False, 0, True, True, 1, False),
    ("emoji split over tokens", "Q:", " 😀🎉👍🏽 done", [], None, False, 0, True, True, 1, False),
    ("cjk", "翻訳:", " 日本語のテキスト、中文文本。", [], None, False, 0, True, True, 1, False),
    ("accents in chunks of 3", "Q:", " héllo wörld, façade naïve", [], None, False, 0, True, True, 3, False),
    ("stop string spanning tokens", "Q:", " The story ENDs here and more", [], ["END"], False, 0, True, True, 1, False),
    ("stop string kept", "Q:", " one two three four", [], ["two th"], True, 0, True, True, 1, False),
    ("stop string in a chunk", "Q:", " x STOP y z w", [], ["STOP"], False, 0, True, True, 4, False),
    ("unicode stop string", "Q:", " 世界你好世界 more", [], ["你好"], False, 0, True, True, 1, False),
    ("emoji stop string", "Q:", " go 🎉🎉 party", [], ["🎉🎉"], False, 0, True, True, 1, False),
    ("earliest of several stops", "Q:", " alpha beta gamma", [], ["gamma", "beta", "eta"], False, 0, True, True, 1, False),
    ("stop never completes", "Q:", " ab abc abcd", [], ["abcde"], False, 0, True, True, 1, False),
    ("min_tokens defers stop", "Q:", "ab ab ab ab", [], ["ab"], False, 3, True, True, 1, False),
    ("eos not in text", "Q:", " done", [2], None, False, 0, True, True, 1, True),
    ("eos kept with include", "Q:", " done", [2], None, True, 0, False, True, 1, True),
    ("eos with stop strings", "Q:", " almost do", [2], ["done"], False, 0, True, True, 1, True),
    ("special tokens kept, spaced", "Q:", " a", "SPECIALS", None, False, 0, False, True, 1, False),
    ("special tokens kept, unspaced", "Q:", " a", "SPECIALS", None, False, 0, False, False, 1, False),
    ("special tokens skipped", "Q:", " a", "SPECIALS", None, False, 0, True, False, 1, False),
    ("long", "Q:", LONG, [], None, False, 0, True, True, 7, False),
    ("long with stop", "Q:", LONG, [], ["café; 日本"], False, 0, True, True, 2, False),
]


def special_ids(tok):
    return sorted(tok._tokenizer.get_added_tokens_decoder().keys())[1:]


def run_stream(tok, prompt_ids, output_ids, stop, include, min_tokens, skip, spaces, chunk, stop_terminated):
    params = SimpleNamespace(
        stop=stop,
        min_tokens=min_tokens,
        include_stop_str_in_output=include,
        skip_special_tokens=skip,
        spaces_between_special_tokens=spaces,
    )
    request = SimpleNamespace(request_id="r", sampling_params=params, prompt_token_ids=prompt_ids)
    det = FastIncrementalDetokenizer(tok, request)
    chunks = [output_ids[i : i + chunk] for i in range(0, len(output_ids), chunk)]
    deltas, stop_reason = [], None
    for i, ids in enumerate(chunks):
        last = i == len(chunks) - 1
        stop_reason = det.update(ids, stop_terminated and last)
        finished = last or stop_reason is not None
        deltas.append(det.get_next_output_text(finished, True))
        if finished:
            break
    return {
        "deltas": deltas,
        "stop_reason": stop_reason,
        "text": det.get_next_output_text(True, False),
        "num_output_tokens": len(det.output_token_ids),
    }


def vllm_content(messages):
    """vLLM's 'string' content format: text parts joined with newlines."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        out.append(m)
    return out


def corpus_for(name, tok, chats):
    cases = {"encode": [], "chat": [], "streams": []}
    for text in PROMPTS:
        for add in (True, False):
            ids = tok(text, add_special_tokens=add)["input_ids"]
            cases["encode"].append({"text": text, "add_special_tokens": add, "ids": ids})
    for messages in chats:
        for gen in (True, False):
            prompt = tok.apply_chat_template(vllm_content(messages), tokenize=False, add_generation_prompt=gen)
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            cases["chat"].append({"messages": messages, "add_generation_prompt": gen, "prompt": prompt, "ids": ids})
    for (case, prompt, output, extra, stop, include, min_tokens, skip, spaces, chunk, stop_terminated) in STREAMS:
        prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        output_ids = tok(output, add_special_tokens=False)["input_ids"]
        if extra == "SPECIALS":
            s = special_ids(tok)
            output_ids = output_ids + s[:2] + output_ids + s[:1]
        else:
            output_ids = output_ids + extra
        got = run_stream(tok, prompt_ids, output_ids, stop, include, min_tokens, skip, spaces, chunk, stop_terminated)
        cases["streams"].append(
            {
                "name": case,
                "prompt_ids": prompt_ids,
                "output_ids": output_ids,
                "stop": stop or [],
                "include_stop_str_in_output": include,
                "min_tokens": min_tokens,
                "skip_special_tokens": skip,
                "spaces_between_special_tokens": spaces,
                "chunk": chunk,
                "stop_terminated": stop_terminated,
                **got,
            }
        )
    # Random ids: invalid UTF-8 mid-stream, split sequences, specials, all at once.
    rng = random.Random(f"frontend-{name}")
    vocab = len(tok)
    for i in range(12):
        prompt_ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
        output_ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        skip = i % 2 == 0
        stop = ["e", "th", "\ufffd"] if i % 3 == 0 else None
        got = run_stream(tok, prompt_ids, output_ids, stop, False, 0, skip, True, 1 + i % 3, False)
        cases["streams"].append(
            {
                "name": f"random ids {i}",
                "prompt_ids": prompt_ids,
                "output_ids": output_ids,
                "stop": stop or [],
                "include_stop_str_in_output": False,
                "min_tokens": 0,
                "skip_special_tokens": skip,
                "spaces_between_special_tokens": True,
                "chunk": 1 + i % 3,
                "stop_terminated": False,
                **got,
            }
        )
    return cases


def main():
    build_byte_fallback(os.path.join(HERE, "byte-fallback"))
    corpus = {}
    tiny = AutoTokenizer.from_pretrained(os.path.join(HERE, "tiny-llama"))
    corpus["tiny-llama"] = corpus_for("tiny-llama", tiny, CHATS + [SYSTEM_CHAT])
    bf = AutoTokenizer.from_pretrained(os.path.join(HERE, "byte-fallback"))
    corpus["byte-fallback"] = corpus_for("byte-fallback", bf, CHATS)
    # The Llama-2 template refuses a conversation that does not alternate.
    try:
        bf.apply_chat_template(SYSTEM_CHAT, tokenize=False)
        raise SystemExit("expected the byte-fallback template to raise")
    except Exception as e:  # jinja2 TemplateError
        corpus["byte-fallback"]["chat_errors"] = [{"messages": SYSTEM_CHAT, "message": str(e)}]
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(corpus, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
