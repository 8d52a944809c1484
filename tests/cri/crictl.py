#!/usr/bin/env python3
"""A small CRI v1 client (a crictl subset) for the tests, on Debian's python3-grpcio and stubs
generated from the CRI api.proto. Every answer is one JSON document on stdout.

usage: crictl.py SOCKET version|runp CONFIG_JSON|inspectp ID|stopp ID|rmp ID|pods
"""
import json
import sys

import grpc
from google.protobuf import json_format

import api_pb2
import api_pb2_grpc


def main():
    sock, cmd, *args = sys.argv[1:]
    channel = grpc.insecure_channel("unix://" + sock)
    rt = api_pb2_grpc.RuntimeServiceStub(channel)
    timeout = 60
    if cmd == "version":
        r = rt.Version(api_pb2.VersionRequest(), timeout=timeout)
        out = json_format.MessageToDict(r)
    elif cmd == "runp":
        config = json_format.ParseDict(json.loads(args[0]), api_pb2.PodSandboxConfig())
        r = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=timeout)
        out = {"id": r.pod_sandbox_id}
    elif cmd == "inspectp":
        r = rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=args[0], verbose=True), timeout=timeout
        )
        out = json_format.MessageToDict(r.status)
        # proto3 leaves default values (SANDBOX_READY is 0) out of the dict
        out["state"] = api_pb2.PodSandboxState.Name(r.status.state)
        info = json.loads(r.info.get("info", "{}"))
        namespaces = info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
        out["netnsPath"] = next((n.get("path", "") for n in namespaces if n.get("type") == "network"), "")
    elif cmd == "stopp":
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=args[0]), timeout=timeout)
        out = {}
    elif cmd == "rmp":
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=args[0]), timeout=timeout)
        out = {}
    elif cmd == "pods":
        r = rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=timeout)
        out = [json_format.MessageToDict(p) for p in r.items]
    else:
        sys.exit(f"unknown command {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "details": e.details()}))
        sys.exit(1)
