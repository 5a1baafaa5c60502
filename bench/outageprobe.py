"""A paced probe stream to the lab's network guest (run as its own process).

``python -m bench.outageprobe --mode udp --target IP --pps 100 --out FILE``
sends probes at a fixed rate (sleep, then a short busy-wait on a monotonic clock:
``ping -i 0.01`` manages only ~62/s here) until SIGTERM/SIGINT or ``--max-seconds``,
drains the answers for a moment, and writes one JSON file: when each probe was sent,
and when each answer arrived (CLOCK_MONOTONIC, comparable with the caller's
``time.monotonic()``).

* ``udp``: datagrams to the guest's ``udpecho`` (see :mod:`lab.netguest`).
  Each answer carries how many probes of this stream the guest had received; at the
  end a query datagram asks for the final count, so lost probes split into "never
  reached the guest" and "the answer was lost".
* ``icmp``: echo requests on a raw socket (root), answers matched by id and sequence
  (16 bits: streams longer than 65536 probes are not supported).

Probes go only to ``--target``; callers keep it inside their own network namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

from lab.localcluster import poll_until
from lab.netguest import ECHO_PORT, PROBE_MAGIC, QUERY_SEQ

_HDR = struct.Struct("!IIII")  # magic, stream id, sequence, guest's count
_SPIN_S = 0.0005


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def _icmp_echo(ident: int, seq: int, size: int) -> bytes:
    payload = b"\xa5" * max(0, size)
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
    csum = _checksum(head + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, seq & 0xFFFF) + payload


class Prober:
    def __init__(self, mode: str, target: str, pps: float, size: int, stream: int) -> None:
        self.mode = mode
        self.target = target
        self.pps = pps
        self.size = size
        self.stream = stream & 0xFFFFFFFF
        self.ident = os.getpid() & 0xFFFF
        self.sent: list[float] = []
        self.answers: list[tuple[int, float, int]] = []  # seq, arrival, guest count
        self.guest_count: int | None = None
        self.stop = False
        if mode == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.connect((target, ECHO_PORT))
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.setblocking(False)

    def _packet(self, seq: int) -> bytes:
        if self.mode == "udp":
            head = _HDR.pack(PROBE_MAGIC, self.stream, seq, 0)
            return head + b"\0" * max(0, self.size - len(head))
        return _icmp_echo(self.ident, seq, self.size)

    def _send(self, seq: int) -> None:
        try:
            if self.mode == "udp":
                self.sock.send(self._packet(seq))
            else:
                self.sock.sendto(self._packet(seq), (self.target, 0))
        except OSError:
            pass  # e.g. no ARP answer yet (EHOSTUNREACH): the probe counts as lost

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued on the UDP socket
            now = time.monotonic()
            if self.mode == "udp":
                if len(data) < _HDR.size:
                    continue
                magic, stream, seq, count = _HDR.unpack_from(data)
                if magic != PROBE_MAGIC or stream != self.stream:
                    continue
                if seq == QUERY_SEQ:
                    self.guest_count = count
                else:
                    self.answers.append((seq, now, count))
            else:
                ihl = (data[0] & 0x0F) * 4
                if len(data) < ihl + 8:
                    continue
                typ, _code, _csum, ident, seq = struct.unpack_from("!BBHHH", data, ihl)
                if typ == 0 and ident == self.ident:
                    self.answers.append((seq, now, 0))

    def run(self, max_seconds: float) -> None:
        gap = 1.0 / self.pps
        start = time.monotonic()
        next_t = start
        seq = 0
        while not self.stop and time.monotonic() - start < max_seconds:
            now = time.monotonic()
            if now >= next_t:
                self._send(seq)
                self.sent.append(now)
                seq += 1
                next_t += gap
                if next_t < now - 0.05:  # fell far behind (a stall): do not burst
                    next_t = now + gap
                continue
            wait = next_t - now
            if wait > _SPIN_S:
                ready, _, _ = select.select([self.sock], [], [], wait - _SPIN_S)
                if ready:
                    self._drain()
            else:
                self._drain()
        # late answers, then (UDP) the guest's final count
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                self._drain()
        if self.mode == "udp":
            poll_until(self._query_count, 2.0, 0.0)

    def _query_count(self) -> bool:
        """Ask the guest how many probes it received; whether it has answered (within
        0.2 s of one query; a lost query or answer is sent again)."""
        self._send(QUERY_SEQ)
        ready, _, _ = select.select([self.sock], [], [], 0.2)
        if ready:
            self._drain()
        return self.guest_count is not None

    def result(self) -> dict[str, Any]:
        return {"mode": self.mode, "target": self.target, "pps": self.pps, "size": self.size,
                "stream": self.stream, "sent": self.sent, "answers": self.answers,
                "guest_count": self.guest_count}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.outageprobe")
    ap.add_argument("--mode", choices=("udp", "icmp"), default="udp")
    ap.add_argument("--target", required=True)
    ap.add_argument("--pps", type=float, required=True)
    ap.add_argument("--size", type=int, default=16, help="UDP payload / ICMP data bytes")
    ap.add_argument("--stream", type=int, default=os.getpid())
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    prober = Prober(args.mode, args.target, args.pps, args.size, args.stream)

    def stop(_sig: int, _frame: object) -> None:
        prober.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    prober.run(args.max_seconds)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(prober.result(), fh)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
