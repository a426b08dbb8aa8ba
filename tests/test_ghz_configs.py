"""The ghz configurations in bench/ghz/ against a real server, as ghz would run them.

ghz cannot be installed here, so each configuration is run the way ghz runs it:
the method and its message types come from the server's reflection service (no
proto files), the call data is the configuration's JSON with ghz's template fields
filled in, and each call must succeed. A field the renderer below does not know
fails the test, as would a call name or a data field the server does not have.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

ROOT = Path(__file__).resolve().parent.parent
GHZ = ROOT / "bench" / "ghz"
CONFIGS = sorted(path.name for path in GHZ.glob("*.json") if "call" in path.read_text())
TEMPLATE_FIELD = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")


def render(text: str, request_number: int) -> str:
    """ghz's call template over JSON text, for the fields the configurations use."""
    now_ns = time.time_ns()
    fields = {
        "RequestNumber": str(request_number),
        "TimestampUnix": str(now_ns // 1_000_000_000),
        "TimestampUnixMilli": str(now_ns // 1_000_000),
        "TimestampUnixNano": str(now_ns),
    }
    return TEMPLATE_FIELD.sub(lambda m: fields[m.group(1)], text)


def call_data(config: dict, request_number: int) -> Iterator[dict]:
    """The messages of one call: the inline data or the data file, rendered once
    per call or, with ``stream-dynamic-messages``, each as it is sent, which is
    ``stream-interval`` after the one before."""
    if "data-file" in config:
        data = json.loads((ROOT / config["data-file"]).read_text())
    else:
        data = config["data"]
    messages = data if isinstance(data, list) else [data]
    if not config.get("stream-dynamic-messages"):
        yield from json.loads(render(json.dumps(messages), request_number))
        return
    interval_s = int(config.get("stream-interval", "0ms").removesuffix("ms")) / 1000
    for n, message in enumerate(messages):
        if n:
            time.sleep(interval_s)
        yield json.loads(render(json.dumps(message), request_number))


def run_config(port: int, config: dict, calls: int) -> list[list]:
    """Make ``calls`` calls of the configuration on a blocking channel, as ghz
    does; the responses of each call as dictionaries."""
    service, method = config["call"].rsplit(".", 1)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        pool = descriptor_pool.DescriptorPool(
            ProtoReflectionDescriptorDatabase(channel)
        )
        found = pool.FindServiceByName(service).FindMethodByName(method)
        request_class = message_factory.GetMessageClass(found.input_type)
        response_class = message_factory.GetMessageClass(found.output_type)
        path = f"/{service}/{method}"
        kwargs = {
            "request_serializer": request_class.SerializeToString,
            "response_deserializer": response_class.FromString,
        }
        answers = []
        for number in range(calls):
            requests = (
                json_format.ParseDict(message, request_class())
                for message in call_data(config, number)
            )
            if found.client_streaming:
                responses = list(channel.stream_stream(path, **kwargs)(requests))
            else:
                responses = [channel.unary_unary(path, **kwargs)(next(requests))]
            answers.append([json_format.MessageToDict(r) for r in responses])
        return answers


@pytest.mark.parametrize("name", CONFIGS)
async def test_ghz_configuration_runs_against_the_server(start_server, name) -> None:
    server = await start_server(max_batch_fixes=100_000)
    config = json.loads((GHZ / name).read_text())
    assert config["insecure"] and config["host"].startswith("127.0.0.1:")

    answers = await asyncio.to_thread(run_config, server.port, config, calls=3)

    assert len(answers) == 3 and all(answers)
    if name == "track_stream.json":
        # Each stream: its session, then the fixes acked up to the last seq sent.
        for responses in answers:
            assert "started" in json.dumps(responses[0])
            acks = [r["ack"] for r in responses if "ack" in r]
            assert [int(a["ackedSeq"]) for a in acks] == [1, 2, 3, 4, 5]
            assert all(a.get("stored") == 1 for a in acks)  # none a duplicate
    if name == "publish_batch.json":
        assert all(int(a[0]["stored"]) == 1000 for a in answers)
