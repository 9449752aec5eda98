"""Third-party SignalR clients from PyPI against a Switchboard URL.

Run by tests/tests/python_clients.rs with the interpreter of the virtual
environment scripts/test.sh prepares (signalrcore and pysignalr, pinned in
tests/python/requirements.txt). For every transport and protocol a client
supports it connects to `--url` (a node or the balancer), invokes Echo with
a 20 KB string, broadcasts a message of its own and waits for it to come
back, then disconnects. Both clients negotiate without `negotiateVersion`,
so they get negotiate version 0, and signalrcore then sends handshake
version 0. Prints one JSON line per case and exits non-zero if any failed.
Every wait is bounded.
"""

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid

WAIT = 20.0
BIG = "x" * 19_990 + "é€ <b>"


def signalrcore_case(url, transport_name, binary):
    from signalrcore.hub_connection_builder import HubConnectionBuilder
    from signalrcore.types import HttpTransportType, HubProtocolEncoding

    transport = HttpTransportType(transport_name)
    builder = HubConnectionBuilder().with_url(url, options={"transport": transport})
    builder.with_hub_protocol(HubProtocolEncoding.binary if binary else HubProtocolEncoding.text)
    hub = builder.build()
    opened, echoed, heard = threading.Event(), threading.Event(), threading.Event()
    result = {}
    token = f"signalrcore-{uuid.uuid4()}"

    def on_receive(args):
        if len(args) >= 2 and args[1] == token:
            heard.set()

    def on_echo(message):
        result["echo"] = getattr(message, "result", None)
        echoed.set()

    hub.on("ReceiveMessage", on_receive)
    hub.on_open(opened.set)
    try:
        hub.start()
        if not opened.wait(WAIT):
            return "did not open"
        hub.send("Echo", [BIG], on_invocation=on_echo)
        if not echoed.wait(WAIT):
            return "no Echo completion"
        if result.get("echo") != BIG:
            return f"Echo returned {str(result.get('echo'))[:80]!r}"
        hub.send("SendMessage", ["py", token])
        if not heard.wait(WAIT):
            return "own broadcast never arrived"
        return None
    finally:
        try:
            hub.stop()
        except Exception:  # noqa: BLE001 - stopping is best effort
            pass


async def pysignalr_case_async(url, binary):
    from pysignalr.client import SignalRClient
    from pysignalr.protocol.json import JSONProtocol
    from pysignalr.protocol.messagepack import MessagepackProtocol

    client = SignalRClient(url, protocol=MessagepackProtocol() if binary else JSONProtocol())
    opened, echoed, heard = asyncio.Event(), asyncio.Event(), asyncio.Event()
    result = {}
    token = f"pysignalr-{uuid.uuid4()}"

    async def on_open():
        opened.set()

    async def on_receive(args):
        if len(args) >= 2 and args[1] == token:
            heard.set()

    async def on_echo(message):
        result["echo"] = getattr(message, "result", None)
        echoed.set()

    client.on_open(on_open)
    client.on("ReceiveMessage", on_receive)
    runner = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(opened.wait(), WAIT)
        await client.send("Echo", [BIG], on_invocation=on_echo)
        await asyncio.wait_for(echoed.wait(), WAIT)
        if result.get("echo") != BIG:
            return f"Echo returned {str(result.get('echo'))[:80]!r}"
        await client.send("SendMessage", ["py", token])
        await asyncio.wait_for(heard.wait(), WAIT)
        return None
    except asyncio.TimeoutError:
        return "timed out: " + ("no open" if not opened.is_set() else "no Echo" if not echoed.is_set() else "own broadcast never arrived")
    finally:
        runner.cancel()
        try:
            await runner
        except BaseException:  # noqa: BLE001 - the cancelled run loop
            pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="hub URL, e.g. http://127.0.0.1:8888/chathub")
    parser.add_argument("--label", default="", help="printed with each case, e.g. 'direct'")
    args = parser.parse_args()

    cases = []
    for transport in ("WebSockets", "ServerSentEvents", "LongPolling"):
        for binary in (False, True):
            if transport == "ServerSentEvents" and binary:
                continue  # text-only transport
            if transport == "LongPolling" and binary:
                # signalrcore 1.0.2's LongPollingBinaryClient cannot be built
                # (its __init__ calls super(LongPollingTextClient, self)), and
                # it would split binary bodies on 0x1E: not supported by the client.
                continue
            cases.append(("signalrcore", transport, binary))
    for binary in (False, True):
        cases.append(("pysignalr", "WebSockets", binary))

    failed = 0
    for client, transport, binary in cases:
        started = time.monotonic()
        try:
            if client == "signalrcore":
                error = signalrcore_case(args.url, transport, binary)
            else:
                error = asyncio.run(pysignalr_case_async(args.url, binary))
        except Exception as e:  # noqa: BLE001 - report every failure as a case result
            error = f"{type(e).__name__}: {e}"
        failed += error is not None
        print(json.dumps({
            "label": args.label,
            "client": client,
            "transport": transport,
            "protocol": "messagepack" if binary else "json",
            "ok": error is None,
            "error": error,
            "seconds": round(time.monotonic() - started, 2),
        }), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
