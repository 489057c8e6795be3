"""WebSocket and proxy checks: Microsoft's azure-eventhub over TransportType.AmqpOverWebsocket
against hubsend-testhub's WebSocket listener, directly and through a real CONNECT proxy
(proxy.py with Basic auth), plus the upgrade rules checked with websocket-client itself.

Usage: websockets.py --connection-string CS --listen-connection-string LCS --ws-url URL
                     --ca CA_PEM --proxy-port PORT --proxy-user USER --proxy-password PASS

CS/LCS are the TLS hub's send-only and manage connection strings, URL its `WebSocket:` line
(wss://localhost:PORT/$servicebus/websocket/), CA_PEM its CA certificate. The SDK dials the
WebSocket listener through `custom_endpoint_address`, as it would a private endpoint, and
trusts the CA through `connection_verify`.

Prints one line per check and, last, `websockets: N passed, M failed`; exits non-zero on
failure.
"""

import argparse
import os
import ssl
import sys
import time
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# interop.py also patches pyamqp's TCP options for loopback; importing it applies that here.
from interop import RUN, check, expect, receive, summary, tagged  # noqa: E402

import websocket  # noqa: E402  (websocket-client, the SDK's own WebSocket dependency)
from azure.eventhub import EventData, EventHubProducerClient, TransportType  # noqa: E402

# The AMQP SASL protocol header: the first bytes each side sends inside the WebSocket.
SASL_HEADER = b"AMQP\x03\x01\x00\x00"


def client_kwargs(args, proxy=None):
    """Keyword arguments that point the SDK at the WebSocket listener."""
    url = urlparse(args.ws_url)
    kwargs = dict(
        transport_type=TransportType.AmqpOverWebsocket,
        custom_endpoint_address=f"sb://{url.hostname}:{url.port}",
        connection_verify=args.ca,
        retry_total=1,
    )
    if proxy is not None:
        kwargs["http_proxy"] = proxy
    return kwargs


def proxy_settings(args, password=None):
    return {
        "proxy_hostname": "127.0.0.1",
        "proxy_port": args.proxy_port,
        "username": args.proxy_user,
        "password": password if password is not None else args.proxy_password,
    }


def read_back(cs, partition, want, tag, kwargs, timeout=30):
    """The events tagged `tag` on `partition`, read from the start over the same transport."""
    return receive(cs, partition, "-1", want, timeout=timeout, settle=0, match=tagged(tag),
                   client_options=kwargs)


def send_and_read_back(args, tag, proxy=None):
    kwargs = client_kwargs(args, proxy)
    with EventHubProducerClient.from_connection_string(args.connection_string, **kwargs) as p:
        batch = p.create_batch(partition_id="1")
        for i in range(20):
            ev = EventData(f"{tag} {i}")
            ev.properties = {"tag": tag, "i": i}
            batch.add(ev)
        p.send_batch(batch)
        keyed = p.create_batch(partition_key="7")  # the service puts "7" in partition 3
        ev = EventData(f"{tag} keyed")
        ev.properties = {"tag": tag}
        keyed.add(ev)
        p.send_batch(keyed)
        expect(p.get_partition_ids() == ["0", "1", "2", "3"], "partition ids over WebSockets")
    got = read_back(args.listen_connection_string, "1", 20, tag, kwargs)
    expect(len(got) == 20, f"expected 20 events back on partition 1, got {len(got)}")
    expect([e.body_as_str() for e in got] == [f"{tag} {i}" for i in range(20)], "bodies differ")
    got = read_back(args.listen_connection_string, "3", 1, tag, kwargs)
    expect(len(got) == 1 and got[0].partition_key == b"7", "keyed event not on partition 3")


@check("websockets: producer and consumer over wss (AMQPWSB10), batch, partition id and key")
def direct(args):
    send_and_read_back(args, f"ws-{RUN}")


@check("websockets: through proxy.py (CONNECT, Basic auth) with http_proxy")
def through_proxy(args):
    send_and_read_back(args, f"proxy-{RUN}", proxy_settings(args))


@check("websockets: a wrong proxy password is refused")
def wrong_proxy_password(args):
    tag = f"badproxy-{RUN}"
    kwargs = client_kwargs(args, proxy_settings(args, password="not-the-password"))
    kwargs["retry_total"] = 0
    started = time.monotonic()
    try:
        with EventHubProducerClient.from_connection_string(
            args.connection_string, **kwargs
        ) as p:
            batch = p.create_batch(partition_id="0")
            ev = EventData(tag)
            ev.properties = {"tag": tag}
            batch.add(ev)
            p.send_batch(batch)
    except Exception as exc:  # noqa: BLE001
        text = repr(exc)
        print(f"  refused after {time.monotonic() - started:.1f}s: {text[:200]}", flush=True)
        got = read_back(args.listen_connection_string, "0", 1, tag, client_kwargs(args),
                        timeout=3)
        expect(not got, "the event was stored although the proxy refused the tunnel")
        return
    raise AssertionError("the send went through with a wrong proxy password")


def upgrade(args, **options):
    """Opens the WebSocket with websocket-client (TLS trusting the hub's CA)."""
    return websocket.create_connection(
        args.ws_url,
        sslopt={"ca_certs": args.ca, "cert_reqs": ssl.CERT_REQUIRED},
        timeout=10,
        **options,
    )


@check("websockets: subprotocols AMQPWSB10 and amqp are echoed; SASL header comes back")
def subprotocols(args):
    for offered in (["AMQPWSB10"], ["amqp"], ["mqtt", "amqp"]):
        ws = upgrade(args, subprotocols=offered)
        try:
            # websocket-client lower-cases the header it read back.
            chosen = ws.getsubprotocol()
            want = [p for p in offered if p in ("AMQPWSB10", "amqp")][0]
            expect(chosen == want.lower(), f"offered {offered}, the hub chose {chosen!r}")
            # Message boundaries mean nothing: the header in two messages.
            ws.send_binary(SASL_HEADER[:3])
            ws.send_binary(SASL_HEADER[3:])
            head = b""
            while len(head) < 8:
                opcode, data = ws.recv_data()
                expect(opcode == websocket.ABNF.OPCODE_BINARY, f"opcode {opcode}, not binary")
                head += data
            expect(head[:8] == SASL_HEADER, f"the hub answered {head[:8]!r}")
        finally:
            ws.close()


@check("websockets: no acceptable subprotocol -> 400; wrong path -> 404")
def refusals(args):
    for options, status in (
        (dict(subprotocols=["mqtt"]), 400),
        (dict(), 400),
    ):
        try:
            upgrade(args, **options).close()
        except websocket.WebSocketBadStatusException as exc:
            expect(exc.status_code == status, f"{options}: status {exc.status_code}")
        else:
            raise AssertionError(f"{options}: the upgrade was accepted")
    wrong = args.ws_url.replace("/$servicebus/websocket/", "/$iothub/websocket")
    try:
        websocket.create_connection(
            wrong, subprotocols=["AMQPWSB10"], timeout=10,
            sslopt={"ca_certs": args.ca, "cert_reqs": ssl.CERT_REQUIRED},
        ).close()
    except websocket.WebSocketBadStatusException as exc:
        expect(exc.status_code == 404, f"wrong path: status {exc.status_code}")
    else:
        raise AssertionError("the upgrade at the wrong path was accepted")


@check("websockets: ping answered; a text message closes the WebSocket with 1003")
def ping_and_text(args):
    ws = upgrade(args, subprotocols=["AMQPWSB10"])
    try:
        ws.ping(b"are you there")
        opcode, data = ws.recv_data(control_frame=True)
        expect(opcode == websocket.ABNF.OPCODE_PONG and data == b"are you there",
               f"no pong: opcode {opcode}, {data!r}")
        ws.send("AMQP as text")
        opcode, data = ws.recv_data(control_frame=True)
        expect(opcode == websocket.ABNF.OPCODE_CLOSE, f"opcode {opcode}, not a close")
        code = int.from_bytes(data[:2], "big")
        expect(code == 1003, f"close code {code}, not 1003")
    finally:
        ws.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--connection-string", required=True)
    parser.add_argument("--listen-connection-string", required=True)
    parser.add_argument("--ws-url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--proxy-port", type=int, required=True)
    parser.add_argument("--proxy-user", required=True)
    parser.add_argument("--proxy-password", required=True)
    args = parser.parse_args()

    direct(args)
    through_proxy(args)
    wrong_proxy_password(args)
    subprotocols(args)
    refusals(args)
    ping_and_text(args)

    return summary("websockets")


if __name__ == "__main__":
    sys.exit(main())
