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

import copy
import json
import os
import random
from types import SimpleNamespace

from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer

import vllm

from vllm.renderers.chat_utils import _parse_chat_message_content, _postprocess_messages
from vllm.renderers.hf import (
    _consolidate_system_messages,
    _convert_developer_to_system,
    _detect_content_format,
    _detect_developer_role_support,
)
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
    ("long prompt", LONG, " Ünïcödé 😀 and 日本語", [], None, False, 0, True, True, 1, False),
    ("long prompt ending in specials", LONG + "SPECIALS", " word 😀", [], None, False, 0, True, True, 1, False),
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


class _TextOnlyParser:
    model_config = SimpleNamespace(enable_prompt_embeds=False)

    def mm_placeholder_storage(self):
        return {}


class _TextOnlyTracker:
    def create_parser(self, **_):
        return _TextOnlyParser()


def vllm_conversation(messages, template):
    """The conversation vLLM hands to apply_chat_template for `messages` (text only)."""
    content_format = _detect_content_format(template, default="string")
    messages = copy.deepcopy(messages)  # vLLM parses tool call arguments in place
    conversation = []
    for m in messages:
        conversation.extend(_parse_chat_message_content(m, _TextOnlyTracker(), content_format, False))
    _postprocess_messages(conversation)
    if any(m["role"] == "developer" for m in conversation) and not _detect_developer_role_support(template):
        conversation = _consolidate_system_messages(_convert_developer_to_system(conversation))
    return content_format, conversation


def vllm_content(messages, template):
    return vllm_conversation(messages, template)[1]


def corpus_for(name, tok, chats):
    cases = {"encode": [], "chat": [], "streams": []}
    for text in PROMPTS:
        for add in (True, False):
            ids = tok(text, add_special_tokens=add)["input_ids"]
            cases["encode"].append({"text": text, "add_special_tokens": add, "ids": ids})
    for messages in chats:
        for gen in (True, False):
            prompt = tok.apply_chat_template(
                vllm_content(messages, tok.chat_template), tokenize=False, add_generation_prompt=gen
            )
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            cases["chat"].append({"messages": messages, "add_generation_prompt": gen, "prompt": prompt, "ids": ids})
    for (case, prompt, output, extra, stop, include, min_tokens, skip, spaces, chunk, stop_terminated) in STREAMS:
        if prompt.endswith("SPECIALS"):
            prompt_ids = tok(prompt[: -len("SPECIALS")], add_special_tokens=True)["input_ids"] + special_ids(tok) * 5
        else:
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
    for i in range(24):
        prompt_ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
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


QWEN_LIKE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Loops over content parts (vLLM's "openai" content format), namespace(), filters, slicing.
PARTS_LIKE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] | map(attribute='text') | join(' ') %}
    {%- endif %}
{%- endfor %}
{%- if ns.system %}{{ '[SYS]' + ns.system | trim + '[/SYS]\\n' }}{% endif %}
{%- for message in messages if message['role'] != 'system' %}
    {{- message['role'] | upper }}:
    {%- for part in message['content'] %}
        {%- if part['type'] == 'text' %} {{ part['text'].strip() }}{% endif %}
    {%- endfor %}
    {%- if message.tool_calls is defined %} calls={{ message.tool_calls | length }}{% endif %}
    {{- '\\n' if not loop.last else '' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '\\nASSISTANT:' }}{% endif %}
{{- eos_token if messages[-1]['role'] == 'assistant' else '' }}
"""

TEMPLATE_CHATS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What's the weather in Paris? ☔"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "°C", "days": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "12°C, rain"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "tomorrow: 14°C"},
        {"role": "assistant", "content": "Rainy, 12°C.", "reasoning": "looked it up"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}, {"type": "text", "text": "日本は？"}]},
    ],
    [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hello", "name": "bob"},
        {"role": "system", "content": "Be polite."},
        {"role": "assistant", "content": "Bonjour", "tool_calls": []},
        {"role": "user", "content": "  and goodbye?  "},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <b>now</b> & later",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["°C", "°F"]}},
                "required": ["city"],
            },
        },
    }
]


def template_cases(tok):
    chat_templates = os.path.join(os.path.dirname(vllm.__file__), "transformers_utils", "chat_templates")
    sources = {
        "vllm chatml": open(os.path.join(chat_templates, "template_chatml.jinja")).read(),
        "vllm basic": open(os.path.join(chat_templates, "template_basic.jinja")).read(),
        "qwen-like tools": QWEN_LIKE,
        "content parts": PARTS_LIKE,
    }
    cases = []
    for name, source in sources.items():
        for i, messages in enumerate(TEMPLATE_CHATS):
            for tools in (None, TOOLS) if name == "qwen-like tools" else (None,):
                content_format, conversation = vllm_conversation(messages, source)
                prompt = tok.apply_chat_template(
                    conversation, tools=tools, chat_template=source, tokenize=False, add_generation_prompt=True
                )
                cases.append(
                    {
                        "name": f"{name} / chat {i} / tools {tools is not None}",
                        "template": source,
                        "content_format": content_format,
                        "messages": messages,
                        "tools": tools,
                        "prompt": prompt,
                    }
                )
    return cases


def main():
    build_byte_fallback(os.path.join(HERE, "byte-fallback"))
    corpus = {}
    tiny = AutoTokenizer.from_pretrained(os.path.join(HERE, "tiny-llama"))
    corpus["tiny-llama"] = corpus_for("tiny-llama", tiny, CHATS + [SYSTEM_CHAT])
    corpus["tiny-llama"]["templates"] = template_cases(tiny)
    bf = AutoTokenizer.from_pretrained(os.path.join(HERE, "byte-fallback"))
    corpus["byte-fallback"] = corpus_for("byte-fallback", bf, CHATS)
    # The Llama-2 template refuses a conversation that does not alternate.
    try:
        bf.apply_chat_template(SYSTEM_CHAT, tokenize=False)
        raise SystemExit("expected the byte-fallback template to raise")
    except Exception as e:  # jinja2 TemplateError
        corpus["byte-fallback"]["chat_errors"] = [{"messages": SYSTEM_CHAT, "message": str(e)}]
    # One case a line: small, and a regenerated corpus diffs case by case.
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        tokenizers = []
        for name, sections in corpus.items():
            lines = []
            for section, cases in sections.items():
                body = ",\n".join("   " + json.dumps(c, ensure_ascii=False) for c in cases)
                lines.append(f"  {json.dumps(section)}: [\n{body}\n  ]")
            tokenizers.append(f" {json.dumps(name)}: {{\n" + ",\n".join(lines) + "\n }")
        f.write("{\n" + ",\n".join(tokenizers) + "\n}\n")


if __name__ == "__main__":
    main()
