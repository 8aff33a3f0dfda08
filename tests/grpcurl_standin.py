"""A stand-in for the part of grpcurl the README uses, made of grpcio and protobuf's JSON mapping.

``grpcurl -plaintext [-H "name: value"]... [-d JSON] HOST:PORT package.Service/Method``: the
request from JSON, the call (unary or server-streaming), each response printed as JSON with the
proto field names, as grpcurl prints them; a failed call prints ``ERROR: Code: ... Message: ...``
to stderr and exits non-zero. It finds the method in the descriptors the mesh's generated code
and grpc's health service register, not by reflection (the mesh also serves reflection for the
real grpcurl). Used by tests/test_readme_walkthrough.py where grpcurl itself is not installed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2  # noqa: F401  (registers grpc.health.v1 in the pool)

# Importing the generated modules registers every service of the mesh in the pool.
from svantic_grpc.pb import (  # noqa: F401
    auth_service_pb2,
    message_service_pb2,
    registry_service_pb2,
    session_service_pb2,
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="grpcurl")
    parser.add_argument("-plaintext", action="store_true")
    parser.add_argument("-H", action="append", default=[], dest="headers")
    parser.add_argument("-d", default="{}", dest="data")
    parser.add_argument("address")
    parser.add_argument("method")
    args = parser.parse_args(argv)
    if not args.plaintext:
        print("the stand-in speaks plaintext only", file=sys.stderr)
        return 2
    service_name, _, method_name = args.method.rpartition("/")
    method = descriptor_pool.Default().FindServiceByName(service_name).methods_by_name[method_name]
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    data = sys.stdin.read() if args.data == "@" else args.data
    request = json_format.Parse(data, request_type())
    metadata = tuple(
        (name.strip().lower(), value.strip()) for name, _, value in (h.partition(":") for h in args.headers)
    )
    path = f"/{service_name}/{method_name}"
    with grpc.insecure_channel(args.address) as channel:
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        call: Any = kind(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        try:
            responses = call(request, metadata=metadata, timeout=30)
            for response in responses if method.server_streaming else [responses]:
                print(
                    json_format.MessageToJson(response, preserving_proto_field_name=True, indent=2),
                    flush=True,
                )
        except grpc.RpcError as error:
            print(f"ERROR:\n  Code: {error.code().name}\n  Message: {error.details()}", file=sys.stderr)
            code: int = error.code().value[0]
            return 64 + code  # grpcurl's exit status for a failed call
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
