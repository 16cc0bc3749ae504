"""Bad input: random, malformed and hostile packets over UDP and TCP, and directly.

No packet may crash the server, raise inside it, or make its memory grow
without bound; afterwards it still answers correctly.
"""

from __future__ import annotations

import random
import resource
import socket
import struct
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import pytest_twisted
from twisted.internet import threads

from dcrouter.dns.server import CACHE_ENTRIES, MalformedQuery, parse_query
from tests.dns.conftest import ask

NAMES = [b"www.example.test", b"example.test", b"long.example.test", b"a.wild.example.test",
         b"chain.example.test", b"nope.example.test", b"example.org", b""]


def encode_name(name: bytes) -> bytes:
    return b"".join(bytes([len(p)]) + p for p in name.split(b".") if p) + b"\x00"


def valid_query(rng: random.Random) -> bytes:
    name = rng.choice(NAMES)
    qtype = rng.choice([1, 2, 5, 6, 12, 15, 16, 28, 33, 255, 257, 252, 41, 0, 65535])
    opt = b""
    arcount = 0
    if rng.random() < 0.5:
        arcount = 1
        opt = b"\x00" + struct.pack("!HHBBHH", 41, rng.choice([0, 512, 1232, 4096, 65535]),
                                    0, rng.choice([0, 0, 1]), rng.choice([0, 0x8000]), 0)
    return (struct.pack("!HHHHHH", rng.getrandbits(16), 0x0100, 1, 0, 0, arcount) +
            encode_name(name) + struct.pack("!HH", qtype, rng.choice([1, 1, 3, 255])) + opt)


def hostile(rng: random.Random) -> bytes:
    """One packet of a random kind: noise, mutation, truncation, loops, floods of sections."""
    kind = rng.randrange(9)
    header = struct.pack("!HHHHHH", rng.getrandbits(16), 0x0100, 1, 0, 0, 0)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 700))
    if kind == 1:
        q = bytearray(valid_query(rng))
        for _ in range(rng.randrange(1, 6)):
            q[rng.randrange(len(q))] = rng.getrandbits(8)
        return bytes(q)
    if kind == 2:
        q = valid_query(rng)
        return q[:rng.randrange(len(q))]
    if kind == 3:  # compression-pointer loops in the question and in the additional section
        loop = b"\xc0\x0c" if rng.random() < 0.5 else b"\x01a\xc0\x0c"
        return header + loop + b"\x00\x01\x00\x01"
    if kind == 4:
        body = encode_name(b"www.example.test") + b"\x00\x01\x00\x01"
        extra = b"\xc0\x1e" + struct.pack("!HHIH", 41, 512, 0, 0)  # OPT named by a pointer
        return (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 60) + body + extra * 60)
    if kind == 5:  # many questions
        count = rng.choice([2, 100, 65535])
        q = encode_name(b"www.example.test") + b"\x00\x01\x00\x01"
        return struct.pack("!HHHHHH", 1, 0x0100, count, 0, 0, 0) + q * min(count, 300)
    if kind == 6:  # huge section counts, little data
        return struct.pack("!HHHHHH", 2, 0x0100, 1, 0xFFFF, 0xFFFF, 0xFFFF) + \
            encode_name(b"example.test") + b"\x00\x01\x00\x01" + rng.randbytes(20)
    if kind == 7:  # overlong labels and names
        label = bytes([rng.choice([63, 64, 127, 191, 255])]) + b"a" * rng.randrange(0, 300)
        return header + label * rng.randrange(1, 6) + b"\x00\x00\x01\x00\x01"
    return struct.pack("!HHHHHH", 3, rng.getrandbits(16), 1, 0, 0, 2) + \
        encode_name(rng.choice(NAMES)) + b"\x00\x01\x00\x01" + \
        (b"\x00" + struct.pack("!HHIH", 41, 4096, 0, 0)) * 2  # two OPTs


def test_parser_never_raises_anything_but_malformed() -> None:
    rng = random.Random(6)
    for _ in range(20000):
        packet = hostile(rng)
        if len(packet) < 12:
            continue
        try:
            parse_query(packet)
        except (MalformedQuery, struct.error):
            pass


@pytest_twisted.ensureDeferred
async def test_ten_thousand_hostile_packets_over_udp_and_tcp(server: Any) -> None:
    service = server.service
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def blast_udp() -> tuple[int, int, list[bytes]]:
        rng = random.Random(1234)
        sent = replies = 0
        unparseable: list[bytes] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.settimeout(3)
            for batch in range(100):
                for _ in range(110):
                    s.sendto(hostile(rng), ("127.0.0.1", server.udp_port))
                    sent += 1
                # a marker query last: its reply means the batch has been read
                marker = b"marker%d" % batch
                s.sendto(struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) +
                         encode_name(marker + b".example.test") + b"\x00\x01\x00\x01",
                         ("127.0.0.1", server.udp_port))
                while True:
                    reply = s.recv(65535)
                    if marker + b"\x07example" in reply:
                        break
                    replies += 1
                    try:  # every reply is well-formed DNS
                        dns.message.from_wire(reply)
                    except Exception:
                        unparseable.append(reply)
        return sent, replies, unparseable

    def blast_tcp() -> int:
        rng = random.Random(99)
        closed = 0
        for i in range(60):
            with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=2) as s:
                try:
                    if i % 4 == 0:
                        s.sendall(b"\xff\xff" + rng.randbytes(rng.randrange(0, 3000)))
                    elif i % 4 == 1:
                        s.sendall(struct.pack("!H", 0) + b"junk")
                    else:
                        for _ in range(20):
                            p = hostile(rng)
                            s.sendall(struct.pack("!H", len(p)) + p if p else b"\x00\x00")
                        s.sendall(b"\x00\x30" + b"half a frame")
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65535):
                        pass
                except (socket.timeout, ConnectionResetError, BrokenPipeError):
                    pass  # the server closes connections that send nonsense
                closed += 1
        return closed

    sent, replies, unparseable = await threads.deferToThread(blast_udp)
    assert sent >= 10000
    assert unparseable == []
    assert replies > sent // 3  # most packets were read and answered or refused
    assert await threads.deferToThread(blast_tcp) == 60

    stats = service.get_stats()
    assert stats["internal_errors"] == 0
    assert stats["queries"] + stats["dropped"] >= replies
    assert stats["malformed"] > 1000
    assert len(service.responder.cache) <= CACHE_ENTRIES
    assert stats["tcp_connections"] == 0  # every fuzzing connection was closed
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss_after - rss_before < 100 * 1024  # KiB: no unbounded growth

    still = await ask(server.udp_port, "www.example.test", "A")
    assert still.rcode() == dns.rcode.NOERROR
    assert still.answer[0][0].address == "192.0.2.10"
    over_tcp = await ask(server.tcp_port, "long.example.test", "TXT", tcp=True)
    assert b"".join(over_tcp.answer[0][0].strings) == b"x" * 600


def _random_label(rng: random.Random) -> bytes:
    """A label of any bytes, often with dots, NULs and upper case in it."""
    alphabet = b"aAbBzZ09-_.\\\x00\xff *"
    return bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))


def test_every_generated_query_gets_a_well_formed_answer_within_the_limit() -> None:
    """The differential generator's queries plus names of random bytes over the rich zone
    set, through the responder directly: no exception, a parseable response to the same ID
    and question, and never more than the UDP limit (512, or the EDNS size up to 1232)."""
    from dcrouter.dns.authority import Authority
    from dcrouter.dns.server import Responder
    from tests.dns import differential
    from tests.dns.richzones import zone_set

    zones = zone_set()
    responder = Responder(Authority(zones), max_udp_payload=1232)
    rng = random.Random(13)
    probes = differential.generate(zones, seed=77, extra=2000)
    suffixes = [z.origin for z in zones] + ["wild.example.test", "deleg.example.test", ""]
    for i in range(2000):
        labels = b".".join(_random_label(rng).replace(b".", b"\\.").replace(b"\\\\.", b"\\.")
                           for _ in range(rng.randrange(1, 4)))
        name = labels.decode("latin-1") + "." + rng.choice(suffixes)
        try:
            dns.name.from_text(name)
        except Exception:
            continue
        probes.append(differential.Probe(name, rng.choice([1, 5, 15, 16, 43, 255]),
                                         rng.choice([1, 1, 255]), rng.choice([-1, 0]),
                                         rng.choice([0, 512, 1232, 4096]), False, True,
                                         False, i % 5 == 0))
    for i, probe in enumerate(probes):
        query = probe.wire(i & 0xFFFF)
        if probe.tcp:
            reply = responder.handle_tcp(query)
            limit = 65535
        else:
            reply = responder.handle_udp(query)
            limit = 512 if probe.edns != 0 else min(max(probe.payload, 512), 1232)
        assert reply is not None, probe
        assert len(reply) <= limit, (str(probe), len(reply))
        msg = dns.message.from_wire(reply, ignore_trailing=False)
        assert msg.id == i & 0xFFFF and msg.flags & dns.flags.QR
        end = 12
        while query[end]:
            end += 1 + query[end]
        question = query[12:end + 5]
        assert reply[4:6] == b"\x00\x01" and reply[12:end + 5] == question, str(probe)
    assert responder.malformed == 0
