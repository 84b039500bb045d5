"""A witness on a vLLM gRPC engine (`vllm serve MODEL --grpc`), run by the Python that has
grpcio and PyPI `smg-grpc-proto` (the real-vLLM venv: `$VLLM_ROOT/venv/bin/python`; the test
runner's own Python need not have them).

Reads one command per line on stdin, answers one JSON object per line on stdout:

    info    -> GetModelInfo (served_model_name, max_context_length, ...)
    loads   -> GetLoads summed over DP ranks: {"running": N, "waiting": N} plus
               GetServerInfo's active_requests (requests the servicer holds a Generate for)
    health  -> HealthCheck
    server  -> GetServerInfo (block_size, data_parallel_size, ...)

    python grpc_probe.py 127.0.0.1:8502 [command]   (one command and exit, for a look by hand)
"""

from __future__ import annotations

import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pbg


def main() -> int:
    target = sys.argv[1].removeprefix("grpc://")
    stub = pbg.VllmEngineStub(grpc.insecure_channel(target))

    def answer(cmd: str) -> dict:
        if cmd == "info":
            return MessageToDict(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10),
                                 preserving_proto_field_name=True)
        if cmd == "loads":
            loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=10)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            return {"running": sum(l.num_running_reqs for l in loads.loads),
                    "waiting": sum(l.num_waiting_reqs for l in loads.loads),
                    "active": info.active_requests}
        if cmd == "server":
            return MessageToDict(stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10),
                                 preserving_proto_field_name=True)
        if cmd == "health":
            return MessageToDict(stub.HealthCheck(pb.HealthCheckRequest(), timeout=10),
                                 preserving_proto_field_name=True)
        return {"error": f"unknown command {cmd!r}"}

    cmds = sys.argv[2:] or None
    for line in (cmds or sys.stdin):
        cmd = line.strip()
        if not cmd:
            continue
        try:
            out = answer(cmd)
        except grpc.RpcError as e:
            out = {"error": f"{e.code().name}: {e.details()}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
