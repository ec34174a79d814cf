"""The control channel's codec on the hot path: typed messages (msgspec, MessagePack) against the plain
dicts as JSON (orjson) that they replaced, for one request's round trip.

A 1-row score crosses the channel as a ``run`` message (front-end → executor) and a ``done`` answer;
each side encodes what it sends and decodes (and, for the typed codec, validates) what it receives.
Both codecs are timed in interleaved rounds on the same messages, and the ratio is printed::

    python bench/messages.py [--rounds 7] [--n 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.ipc.messages import Codec, Done, Run, ToExecutor, ToFrontend  # noqa: E402


def typed_round_trip(n: int) -> float:
    """Seconds per round trip: encode a Run, decode it, encode a Done, decode it (typed, validated)."""
    to_executor, to_frontend = Codec(ToExecutor), Codec(ToFrontend)
    t0 = time.perf_counter()
    for i in range(n):
        frame = to_executor.encode([Run(id=i, model="digits", version="1", task="score", timeout_s=30.0,
                                        shm="/dev/shm/flowserve-x/frontend-0-123", at=4096,
                                        inputs={"x": (0, (1, 8, 8), "<f4"), "noise": (256, (1, 8, 8), "<f4")},
                                        output=(512, (1,), "<f8"))])
        h = to_executor.decode(frame)[0]
        answer = to_frontend.decode(to_frontend.encode([Done(id=h.id)]))[0]
        assert answer.id == i
    return (time.perf_counter() - t0) / n


def dict_round_trip(n: int) -> float:
    """The same with plain dicts as orjson JSON (the format the typed messages replaced)."""
    t0 = time.perf_counter()
    for i in range(n):
        frame = orjson.dumps([{"op": "run", "id": i, "model": "digits", "version": "1", "task": "score", "timeout_s": 30.0,
                               "shm": "/dev/shm/flowserve-x/frontend-0-123", "at": 4096,
                               "inputs": {"x": [0, [1, 8, 8], "<f4"], "noise": [256, [1, 8, 8], "<f4"]},
                               "output": [512, [1], "<f8"]}], option=orjson.OPT_SERIALIZE_NUMPY)
        h = orjson.loads(frame)[0]
        answer = orjson.loads(orjson.dumps([{"op": "done", "id": h["id"]}], option=orjson.OPT_SERIALIZE_NUMPY))[0]
        assert answer["id"] == i
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=20000, help="round trips per measurement")
    args = ap.parse_args()
    typed_round_trip(1000), dict_round_trip(1000)  # warm
    typed, plain = [], []
    for r in range(args.rounds):
        order = (typed_round_trip, dict_round_trip) if r % 2 == 0 else (dict_round_trip, typed_round_trip)
        for fn in order:
            (typed if fn is typed_round_trip else plain).append(fn(args.n))
    t, d = statistics.median(typed), statistics.median(plain)
    print(f"typed messages (msgspec MessagePack): {t * 1e6:.2f} µs per round trip (median of {args.rounds})")
    print(f"plain dicts (orjson JSON):            {d * 1e6:.2f} µs per round trip")
    print(f"typed / plain: {t / d:.2f}× the time (per round: {', '.join(f'{a / b:.2f}' for a, b in zip(typed, plain))})")


if __name__ == "__main__":
    main()
