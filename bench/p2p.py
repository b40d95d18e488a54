"""Peer-to-peer policy distribution on loopback: how much the origin sends, and how fast a version
spreads, for 4, 8 and 16 nodes.

Every host (the seed beside the coordinator, and each node) runs a real libp2p host in its own
trio thread on 127.0.0.1, with the same upload cap, so bandwidth and not loopback speed is what
the protocol has to share. The seed publishes a signed version; each node fetches it when the
announcement reaches it, from peers or from the seed.

Figures:
- origin egress ratio: bytes the seed sent for the version ÷ the version's size (1 is the least
  possible; sending from the origin alone would cost the number of nodes).
- spread time ratio: time until the last of 16 nodes holds the version ÷ time for one node to
  fetch it from the origin alone, under the same upload cap (the origin alone would need about 16).

Usage: python bench/p2p.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.seed import SeedHost  # noqa: E402
from p2p import P2PHost, P2PSettings  # noqa: E402
from protocol.identity import Identity, verify_signature  # noqa: E402
from protocol.proto import policy_pb2  # noqa: E402

RUN_ID = "bench-p2p"
TRAINER = Identity.from_seed(bytes(32))


def sign_version(run_id: str, version: int, blobs: list[bytes]) -> bytes:
    manifest = policy_pb2.PolicyManifest(
        run_id=run_id, version=version, base_version=version, codec=policy_pb2.CODEC_KEYFRAME
    )
    for blob in blobs:
        manifest.blobs.add(hash=hashlib.sha256(blob).digest(), size=len(blob), uncompressed_size=len(blob))
    payload = manifest.SerializeToString()
    return policy_pb2.SignedManifest(
        manifest=payload, signer_public_key=TRAINER.public_key, signature=TRAINER.sign(payload)
    ).SerializeToString()


def verify_version(data: bytes) -> policy_pb2.PolicyManifest:
    signed = policy_pb2.SignedManifest.FromString(data)
    if signed.signer_public_key != TRAINER.public_key or not verify_signature(
        signed.signer_public_key, signed.manifest, signed.signature
    ):
        raise ValueError("the manifest is not signed by the run's trainer")
    return policy_pb2.PolicyManifest.FromString(signed.manifest)


class BenchNode:
    """A node that fetches each version it hears announced, and records when it holds it."""

    def __init__(self, run_id: str, settings: P2PSettings, bootstrap: list[str]) -> None:
        self.store: dict[bytes, bytes] = {}
        self.done_at: float | None = None
        self.error: BaseException | None = None
        self._wake = threading.Event()
        self._manifest: policy_pb2.PolicyManifest | None = None
        self.host = P2PHost(
            Identity.generate(),
            run_id,
            settings,
            blob_source=self.store.get,
            blob_sink=self.store.__setitem__,
            verify_manifest=verify_version,
            bootstrap=bootstrap,
            on_announcement=self._on_announcement,
        )

    def _on_announcement(self, data: bytes, manifest: policy_pb2.PolicyManifest, publisher: str) -> None:
        self._manifest = manifest
        self._wake.set()

    def fetch_when_announced(self) -> None:
        self._wake.wait()
        manifest = self._manifest
        assert manifest is not None
        try:
            self.host.fetch_blobs([b.hash for b in manifest.blobs], [b.size for b in manifest.blobs], timeout_s=300)
            self.done_at = time.monotonic()
        except Exception as error:  # reported to the parent
            self.error = error


def serve_node_process(settings: P2PSettings) -> None:
    """Child process: join the swarm named on stdin, report progress on stdout, leave on 'leave'.

    Commands: `join <run id> <num peers to wait for> <seed multiaddr>`, `leave`, EOF to exit.
    Replies: `meshed <peer id>`, then `done <monotonic seconds>` or `error <text>`."""
    for line in sys.stdin:
        command = line.split()
        if command[0] != "join":
            continue
        run_id, num_peers, seed_addr = command[1], int(command[2]), command[3]
        node = BenchNode(run_id, settings, [seed_addr])
        node.host.start()
        while len(node.host.connected_peers()) < num_peers:
            time.sleep(0.05)
        print("meshed", node.host.peer_id, flush=True)
        fetcher = threading.Thread(target=node.fetch_when_announced, daemon=True)
        fetcher.start()
        fetcher.join()
        print(f"done {node.done_at}" if node.error is None else f"error {node.error}", flush=True)
        for leave in sys.stdin:
            if leave.strip() == "leave":
                break
        node.host.stop()


class NodeProcess:
    def __init__(self, settings_args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-node", *settings_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # py-libp2p logs every reset stream at error level
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def expect(self, timeout_s: float) -> list[str]:
        try:
            return self.lines.get(timeout=timeout_s).split(" ", 1)
        except queue.Empty:
            raise RuntimeError(f"node process {self.process.pid} did not answer within {timeout_s} s") from None

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_swarm(
    pool: list[NodeProcess], num_nodes: int, blobs: list[bytes], settings: P2PSettings
) -> tuple[float, float]:
    """(origin egress ÷ version size, seconds from publish until the last node holds the version)."""
    run_id = f"{RUN_ID}-{num_nodes}-{time.monotonic_ns()}"
    origin = {hashlib.sha256(b).digest(): b for b in blobs}
    seed = SeedHost(
        Identity.generate(), run_id, blob_source=origin.get, verify_manifest=verify_version, settings=settings
    )
    seed.start()
    nodes = pool[:num_nodes]
    try:
        for node in nodes:
            node.send(f"join {run_id} {min(num_nodes, settings.max_peers)} {seed.bootstrap_addrs[0]}")
        node_ids = {node.expect(120)[1] for node in nodes}
        deadline = time.monotonic() + 60
        while not node_ids <= set(seed.announcement_subscribers()):
            if time.monotonic() > deadline:
                raise RuntimeError("the seed did not see every node subscribe in time")
            time.sleep(0.05)
        published_at = time.monotonic()
        version = seed.publish_version(sign_version(run_id, 1, blobs))
        finished_at = []
        for node in nodes:
            kind, value = node.expect(300)
            if kind != "done":
                raise RuntimeError(f"a node failed: {value}")
            finished_at.append(float(value))
        return seed.origin_bytes_sent(version) / seed.version_size(version), max(finished_at) - published_at
    finally:
        for node in nodes:
            node.send("leave")
        seed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller version (< 1 minute)")
    parser.add_argument("--num-blobs", type=int, default=4)
    parser.add_argument("--blob-kib", type=int, default=None, help="default 512, or 128 with --quick")
    parser.add_argument("--upload-kib-per-s", type=int, default=None, help="every host's upload cap (default 2048)")
    parser.add_argument("--serve-node", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # it logs every reset stream at error level
    blob_kib = args.blob_kib or (128 if args.quick else 512)
    upload_kib_per_s = args.upload_kib_per_s or 2048
    settings = P2PSettings(upload_bytes_per_s=upload_kib_per_s * 1024, chunk_bytes=32 * 1024)
    if args.serve_node:
        serve_node_process(settings)
        return
    blobs = [os.urandom(blob_kib * 1024) for _ in range(args.num_blobs)]
    print(
        f"version: {args.num_blobs} blobs x {blob_kib} KiB = {blob_kib * args.num_blobs} KiB; "
        f"every host uploads at most {upload_kib_per_s} KiB/s"
    )
    print(f"every node is its own process and keeps up to {settings.max_peers} peers; the seed runs in this one")
    pool = [NodeProcess(["--upload-kib-per-s", str(upload_kib_per_s)]) for _ in range(16)]
    try:
        _, alone_s = run_swarm(pool, 1, blobs, settings)
        print(f"baseline: one node fetches the version from the origin alone in {alone_s:.2f} s")
        ratios: dict[int, tuple[float, float]] = {}
        for num_nodes in (4, 8, 16):
            egress_ratio, spread_s = run_swarm(pool, num_nodes, blobs, settings)
            ratios[num_nodes] = (egress_ratio, spread_s / alone_s)
            print(
                f"{num_nodes:2d} nodes: origin sent {egress_ratio:.2f}x the version (origin alone: {num_nodes}x); "
                f"last node after {spread_s:.2f} s = {spread_s / alone_s:.2f}x the one-node time "
                f"(origin alone: ~{num_nodes}x)"
            )
    finally:
        for node in pool:
            node.close()
    for num_nodes in (4, 8):
        print(f"origin-egress-ratio-{num_nodes}: {ratios[num_nodes][0]:.2f} (target: <= 2)")
    print(f"origin-egress-ratio-16: {ratios[16][0]:.2f} (target: <= 2)")
    print(f"spread-time-ratio: {ratios[16][1]:.2f} (target: < 16, the origin sending 16 copies alone)")


if __name__ == "__main__":
    main()
