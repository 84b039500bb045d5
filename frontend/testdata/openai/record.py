"""Records the fixtures of frontend/tests/openai_fixtures.rs: for each case, what vLLM's own
OpenAI HTTP server answers (raw body bytes) and what vLLM's gRPC engine streams for the same
prompt (GenerateResponse messages as JSON lines), plus the GenerateRequest sent.

Run with the venv that has vLLM, grpcio and smg_grpc_proto, both servers serving the same model:
  /tmp/vllmcpu/venv/bin/python record.py [--http 127.0.0.1:8501] [--grpc 127.0.0.1:8502]
Requests are small (max_tokens <= 64, temperature 0). The HTTP server's /tokenize gives the
prompt ids, so the engine sees what vLLM's front end would have sent it.
"""
import argparse
import http.client
import json
import os
import sys

import grpc
from google.protobuf import json_format
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pbg

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "tiny"
MAX_MODEL_LEN = 8192

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours, in French and Japanese."},
]


def cases(stop_word):
    c = {}
    base = {"model": MODEL, "prompt": "Hello, my name is", "temperature": 0, "max_tokens": 16}
    c["cmpl"] = ("completions", dict(base))
    c["cmpl_stream"] = ("completions", dict(base, stream=True))
    c["cmpl_stream_usage"] = (
        "completions", dict(base, stream=True, stream_options={"include_usage": True}))
    # n > 1 needs sampling; a seed makes it repeatable across the two servers.
    sampled = dict(base, temperature=1.0, seed=7, n=2)
    c["cmpl_n2"] = ("completions", dict(sampled))
    c["cmpl_n2_stream"] = ("completions", dict(sampled, stream=True,
                                               stream_options={"include_usage": True}))
    c["cmpl_two_prompts"] = ("completions", dict(base, prompt=["Hello, my name is", "The sky"]))
    c["cmpl_two_prompts_stream"] = (
        "completions", dict(base, prompt=["Hello, my name is", "The sky"], stream=True,
                            stream_options={"include_usage": True}))
    c["cmpl_token_ids"] = ("completions", dict(base, prompt=[1, 100, 200, 300]))
    c["cmpl_stop"] = ("completions", dict(base, max_tokens=32, stop=[stop_word, "zzzz"]))
    c["cmpl_stop_stream"] = ("completions", dict(base, max_tokens=32, stop=stop_word,
                                                 stream=True))
    c["cmpl_stop_include"] = ("completions", dict(base, max_tokens=32, stop=[stop_word],
                                                  include_stop_str_in_output=True))
    cbase = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 16}
    c["chat"] = ("chat/completions", dict(cbase))
    c["chat_stream"] = ("chat/completions", dict(cbase, stream=True))
    c["chat_stream_usage"] = (
        "chat/completions", dict(cbase, stream=True, stream_options={"include_usage": True}))
    c["chat_n2"] = ("chat/completions", dict(cbase, temperature=1.0, seed=7, n=2))
    c["chat_n2_stream"] = ("chat/completions", dict(cbase, temperature=1.0, seed=7, n=2,
                                                    stream=True))
    c["chat_stop_stream"] = ("chat/completions", dict(cbase, max_tokens=32, stop=["story6"],
                                                      stream=True))
    c["chat_max_completion_tokens"] = (
        "chat/completions", dict(cbase, max_tokens=None, max_completion_tokens=5))
    # Logprobs.
    lp = dict(base, logprobs=2)
    c["cmpl_logprobs"] = ("completions", dict(lp))
    c["cmpl_logprobs_stream"] = ("completions", dict(lp, stream=True,
                                                     stream_options={"include_usage": True}))
    c["cmpl_logprobs0"] = ("completions", dict(base, logprobs=0))
    c["cmpl_logprobs_stop"] = ("completions", dict(lp, stop=[stop_word]))
    c["cmpl_logprobs_stop_stream"] = ("completions", dict(lp, stop=[stop_word], stream=True))
    c["cmpl_logprobs_n2_stream"] = ("completions", dict(sampled, logprobs=1, stream=True))
    c["cmpl_logprobs_n2"] = ("completions", dict(sampled, logprobs=1))
    c["cmpl_logprobs_two_prompts_stream"] = (
        "completions", dict(lp, prompt=["Hello, my name is", "The sky"], stream=True))
    c["cmpl_logprobs_token_ids"] = ("completions", dict(lp, return_tokens_as_token_ids=True))
    c["cmpl_logprobs_token_ids_stream"] = (
        "completions", dict(lp, return_tokens_as_token_ids=True, stream=True))
    c["cmpl_prompt_logprobs"] = ("completions", dict(base, max_tokens=4, logprobs=1,
                                                     prompt_logprobs=2))
    c["cmpl_prompt_logprobs0"] = ("completions", dict(base, max_tokens=4, prompt_logprobs=0))
    # 840 is "21", sampled greedily after nine " 15": the stop id ends it, not in the text.
    c["cmpl_logprobs_stop_token"] = ("completions", dict(lp, stop_token_ids=[840]))
    c["cmpl_logprobs_stop_token_stream"] = ("completions", dict(lp, stop_token_ids=[840],
                                                                stream=True))
    c["cmpl_logprobs_stop_include_stream"] = (
        "completions", dict(lp, stop=[stop_word], include_stop_str_in_output=True, stream=True))
    clp = dict(cbase, logprobs=True, top_logprobs=2)
    c["chat_logprobs"] = ("chat/completions", dict(clp))
    c["chat_logprobs_stream"] = ("chat/completions", dict(clp, stream=True,
                                                          stream_options={"include_usage": True}))
    c["chat_logprobs0"] = ("chat/completions", dict(cbase, logprobs=True))
    c["chat_logprobs_stop"] = ("chat/completions", dict(clp, stop=["story6"]))
    c["chat_logprobs_stop_stream"] = ("chat/completions", dict(clp, stop=["story6"],
                                                               stream=True))
    c["chat_logprobs_n2_stream"] = ("chat/completions", dict(clp, temperature=1.0, seed=7, n=2,
                                                             stream=True))
    c["chat_logprobs_token_ids"] = ("chat/completions", dict(clp, return_tokens_as_token_ids=True))
    c["chat_logprobs_token_ids_stream"] = (
        "chat/completions", dict(clp, return_tokens_as_token_ids=True, stream=True))
    c["chat_prompt_logprobs"] = ("chat/completions", dict(cbase, max_tokens=4, logprobs=True,
                                                          prompt_logprobs=1))
    return c


def post(http_addr, path, body):
    host, port = http_addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def prompt_ids(http_addr, endpoint, body):
    if endpoint == "completions":
        prompts = body["prompt"]
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            return [(None, prompts)]
        out = []
        for p in prompts:
            status, data = post(http_addr, "/tokenize", {"model": MODEL, "prompt": p})
            assert status == 200, data
            out.append((p, json.loads(data)["tokens"]))
        return out
    status, data = post(http_addr, "/tokenize", {
        "model": MODEL, "messages": body["messages"], "add_generation_prompt": True})
    assert status == 200, data
    return [("", json.loads(data)["tokens"])]


def sampling(body, prompt_len):
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is None:
        max_tokens = MAX_MODEL_LEN - prompt_len
    if "messages" in body:
        logprobs = body.get("top_logprobs", 0) if body.get("logprobs") else None
    else:
        logprobs = body.get("logprobs")
    return pb.SamplingParams(
        logprobs=logprobs,
        prompt_logprobs=body.get("prompt_logprobs"),
        temperature=body.get("temperature", 1.0),
        seed=body.get("seed"),
        max_tokens=max_tokens,
        stop=stop,
        stop_token_ids=body.get("stop_token_ids") or [],
        n=body.get("n", 1),
        skip_special_tokens=True,
        spaces_between_special_tokens=True,
        include_stop_str_in_output=body.get("include_stop_str_in_output", False),
    )


def record(name, endpoint, body, http_addr, stub):
    body = {k: v for k, v in body.items() if v is not None}
    status, data = post(http_addr, f"/v1/{endpoint}", body)
    with open(os.path.join(HERE, f"{name}.request.json"), "w") as f:
        json.dump({"endpoint": endpoint, "body": body}, f, indent=1)
        f.write("\n")
    with open(os.path.join(HERE, f"{name}.http"), "wb") as f:
        f.write(data)
    if status != 200:
        print(name, status, data[:200])
        return data
    lines = []
    for i, (text, ids) in enumerate(prompt_ids(http_addr, endpoint, body)):
        req = pb.GenerateRequest(
            request_id=f"record-{name}-{i}",
            tokenized=pb.TokenizedInput(original_text=text or "", input_ids=ids),
            sampling_params=sampling(body, len(ids)),
            stream=bool(body.get("stream")),
        )
        for resp in stub.Generate(req, timeout=120):
            lines.append(json.dumps({
                "prompt_index": i,
                "response": json_format.MessageToDict(resp, preserving_proto_field_name=True),
            }))
    with open(os.path.join(HERE, f"{name}.engine.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(name, status, len(data), "bytes,", len(lines), "engine messages")
    return data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", default="127.0.0.1:8501")
    ap.add_argument("--grpc", default="127.0.0.1:8502")
    ap.add_argument("only", nargs="*")
    args = ap.parse_args()
    stub = pbg.VllmEngineStub(grpc.insecure_channel(args.grpc))
    # A stop word the greedy output of the stop cases really contains: a word from the middle
    # of the unstopped completion.
    _, plain = post(args.http, "/v1/completions", {
        "model": MODEL, "prompt": "Hello, my name is", "temperature": 0, "max_tokens": 32})
    text = json.loads(plain)["choices"][0]["text"]
    # " 15 15 ... 1521?122..." greedily: "21?" spans tokens and comes after held-back text.
    stop_word = "21?"
    print("stop word", repr(stop_word), "in", repr(text))
    for name, (endpoint, body) in cases(stop_word).items():
        if args.only and name not in args.only:
            continue
        record(name, endpoint, body, args.http, stub)
    # Errors: the HTTP body only.
    errors = {
        "err_prompt_too_long": ("completions", {
            "model": MODEL, "prompt": [5] * (MAX_MODEL_LEN + 1), "max_tokens": 4}),
        "err_n2_greedy": ("completions", {
            "model": MODEL, "prompt": "Hello", "temperature": 0, "n": 2, "max_tokens": 4}),
        "err_bad_temperature": ("completions", {
            "model": MODEL, "prompt": "Hello", "temperature": -1, "max_tokens": 4}),
        "err_logprobs_too_many": ("completions", {
            "model": MODEL, "prompt": "Hello", "logprobs": 21, "max_tokens": 4}),
        "err_prompt_logprobs_stream": ("completions", {
            "model": MODEL, "prompt": "Hello", "prompt_logprobs": 1, "max_tokens": 4,
            "stream": True}),
        "err_chat_top_logprobs_too_many": ("chat/completions", {
            "model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 21,
            "max_tokens": 4}),
        "err_chat_top_logprobs_negative": ("chat/completions", {
            "model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": -1,
            "max_tokens": 4}),
    }
    for name, (endpoint, body) in errors.items():
        if args.only and name not in args.only:
            continue
        status, data = post(args.http, f"/v1/{endpoint}", body)
        with open(os.path.join(HERE, f"{name}.http"), "wb") as f:
            f.write(data)
        with open(os.path.join(HERE, f"{name}.request.json"), "w") as f:
            json.dump({"endpoint": endpoint, "body": body, "status": status}, f)
            f.write("\n")
        print(name, status, data[:300])


if __name__ == "__main__":
    sys.exit(main())
