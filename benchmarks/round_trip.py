"""The bare round trip of a small message between two processes on one host: Python gRPC
(unary, loopback TCP, as every RunExperts call paid before the local lane) against a Unix
seqpacket socket (the local lane, moe_common/lane.py). No model, no codec: the fixed cost
that a layer call whose rows are in shared memory cannot avoid.

    python benchmarks/round_trip.py                  # 300-byte messages, 2000 round trips each
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from moe_common import lane  # noqa: E402
from moe_common.serving import pick_free_port  # noqa: E402


def grpc_echo(port: int, ready) -> None:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    server.wait_for_termination()


def lane_echo(name: str, ready) -> None:
    listener = lane.new_socket()
    listener.bind(lane.address(name))
    listener.listen(1)
    ready.set()
    conn, _ = listener.accept()
    while message := lane.receive(conn):
        conn.sendall(message)


def timed(call, message: bytes, repeats: int) -> list[float]:
    call(message)  # connect and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call(message)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=300, help="message size (a RunExperts control message is ~100-500)")
    p.add_argument("--repeats", type=int, default=2000)
    a = p.parse_args()
    message = b"x" * a.bytes
    results = {}

    ready = multiprocessing.Event()
    port = pick_free_port()
    server = multiprocessing.Process(target=grpc_echo, args=(port, ready), daemon=True)
    server.start()
    ready.wait(30)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        results["grpc"] = timed(channel.unary_unary("/bench.Echo/Echo"), message, a.repeats)
    server.terminate()

    ready = multiprocessing.Event()
    name = lane.lane_name(0)
    server = multiprocessing.Process(target=lane_echo, args=(name, ready), daemon=True)
    server.start()
    ready.wait(30)
    sock = lane.new_socket()
    sock.connect(lane.address(name))

    def over_lane(m: bytes) -> bytes:
        sock.sendall(m)
        return lane.receive(sock)

    results["unix seqpacket"] = timed(over_lane, message, a.repeats)
    sock.close()
    server.join(10)

    base = statistics.median(results["grpc"])
    print(f"{a.bytes}-byte round trips between two processes, median of {a.repeats}:")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"  {name:15} {median * 1e6:8.1f} us   (gRPC's time / this: {base / median:.1f}x)")


if __name__ == "__main__":
    main()
