#!/usr/bin/env python3
"""A small CRI v1 client (a crictl subset) for the tests, on Debian's python3-grpcio and stubs
generated from the CRI api.proto. Every answer is one JSON document on stdout.

usage: crictl.py SOCKET version|runp CONFIG_JSON|inspectp ID|stopp ID|rmp ID|pods
       crictl.py SOCKET create POD_ID CONTAINER_CONFIG_JSON SANDBOX_CONFIG_JSON|start ID
       crictl.py SOCKET stop ID TIMEOUT_S|rm ID|inspect ID|ps|exec ID TIMEOUT_S CMD_JSON
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
    elif cmd == "create":
        config = json_format.ParseDict(json.loads(args[1]), api_pb2.ContainerConfig())
        sandbox = json_format.ParseDict(json.loads(args[2]), api_pb2.PodSandboxConfig())
        r = rt.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=args[0], config=config, sandbox_config=sandbox),
            timeout=timeout,
        )
        out = {"id": r.container_id}
    elif cmd == "start":
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=args[0]), timeout=timeout)
        out = {}
    elif cmd == "stop":
        # timeout 0: SIGKILL at once; else the stop signal (SIGTERM), SIGKILL after TIMEOUT_S
        grace = int(args[1])
        rt.StopContainer(
            api_pb2.StopContainerRequest(container_id=args[0], timeout=grace), timeout=timeout + grace
        )
        out = {}
    elif cmd == "rm":
        rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=args[0]), timeout=timeout)
        out = {}
    elif cmd == "inspect":
        r = rt.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=args[0], verbose=True), timeout=timeout
        )
        out = json_format.MessageToDict(r.status)
        out["state"] = api_pb2.ContainerState.Name(r.status.state)
        out["exitCode"] = r.status.exit_code
        out["pid"] = json.loads(r.info.get("info", "{}")).get("pid", 0)
    elif cmd == "ps":
        r = rt.ListContainers(api_pb2.ListContainersRequest(), timeout=timeout)
        out = [json_format.MessageToDict(c) for c in r.containers]
    elif cmd == "exec":
        grace = int(args[1])
        r = rt.ExecSync(
            api_pb2.ExecSyncRequest(container_id=args[0], cmd=json.loads(args[2]), timeout=grace),
            timeout=timeout + grace,
        )
        out = {
            "stdout": r.stdout.decode(errors="replace"),
            "stderr": r.stderr.decode(errors="replace"),
            "exitCode": r.exit_code,
        }
    else:
        sys.exit(f"unknown command {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "details": e.details()}))
        sys.exit(1)
