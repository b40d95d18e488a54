"""The one entry point every request passes before its handler runs: envelope signature,
freshness and nonce; rate limits; registration and ban status; payload decoding and bounds.
Failures abort the call with a status code and a message that names the problem.

A signer's allowance is charged only once its signature is verified, so nobody can spend
another key's allowance (the trainer's above all). Unsigned RPCs and requests that fail
verification, an operator token or registration are charged to the peer's host instead."""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError, Message

from coordinator.config import ServerSection
from coordinator.ratelimit import RateLimitedError, RateLimiter
from coordinator.store import NodeRecord
from protocol.convert import WireFormatError, check_bounds
from protocol.envelope import EnvelopeError, EnvelopeVerifier, OpenedEnvelope, ReplayedNonceError
from protocol.proto.envelope_pb2 import SignedEnvelope

RequestT = TypeVar("RequestT", bound=Message)

NODE_CACHE_S = 2.0
MAX_CACHED_NODES = 100_000


class GateError(Exception):
    def __init__(self, status: grpc.StatusCode, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Caller:
    envelope: OpenedEnvelope
    node: NodeRecord | None


@dataclass(frozen=True)
class GateLimits:
    node: RateLimiter  # per verified node key
    trainer: RateLimiter  # the trainer's key
    unauthenticated: RateLimiter  # per peer host: unsigned RPCs and failed requests
    registration: RateLimiter  # per peer host: keys registering for the first time

    @classmethod
    def from_config(cls, server: ServerSection, num_replicas: int = 1, clock=time.monotonic) -> GateLimits:
        """Each of num_replicas coordinator processes behind one address allows its share of each
        allowance (rate and burst), so a signer or host that spreads requests over all of them
        still gets one allowance in all."""

        def share(rate: float, burst: int) -> RateLimiter:
            return RateLimiter(rate / num_replicas, max(1, math.ceil(burst / num_replicas)), clock=clock)

        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        return cls(
            node=share(server.requests_per_second_per_node, server.request_burst_per_node),
            trainer=share(server.requests_per_second_trainer, server.request_burst_trainer),
            unauthenticated=share(
                server.unauthenticated_requests_per_second_per_address, server.unauthenticated_request_burst_per_address
            ),
            registration=share(server.registrations_per_second_per_address, server.registration_burst_per_address),
        )


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer (`ipv4:10.0.0.7:5123`, `ipv6:%5B::1%5D:5123`); other kinds whole."""
    kind, _, address = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0].strip("[]")
    return peer


class RefusalCounts:
    """Refused requests by RPC method and reason (a gRPC status name), for /metrics. Methods
    are the services' own, so the number of counters is bounded."""

    def __init__(self):
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def add(self, method: str, reason: str) -> None:
        with self._lock:
            self._counts[method, reason] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


def _charge(limiter: RateLimiter, key: str, who: str) -> None:
    try:
        limiter.check(key)
    except RateLimitedError as error:
        raise GateError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{who}: {error}") from None


class Gate:
    def __init__(
        self,
        verifier: EnvelopeVerifier,
        limits: GateLimits,
        find_node: Callable[[str], NodeRecord | None],
        trainer_public_key: bytes,
        operator_token: str,
        *,
        take_nonce: Callable[[bytes, bytes, int], bool] | None = None,
    ):
        """take_nonce(signer key, nonce, until ms): the nonce memory shared by the coordinator's
        replicas (Store.take_nonce), False for a nonce taken before; None for one process, whose
        verifier's own memory suffices."""
        self.verifier = verifier
        self._take_nonce = take_nonce
        self.limits = limits
        self._find_node = find_node
        self._nodes: dict[str, tuple[NodeRecord, float]] = {}
        self._nodes_lock = threading.Lock()
        self.trainer_public_key = trainer_public_key
        self.operator_token = operator_token

    def find_node(self, node_id: str) -> NodeRecord | None:
        """The registered node, cached for NODE_CACHE_S: a ban by the validator reaches the gate
        within that time (the operator's ban at once, through forget)."""
        now = time.monotonic()
        with self._nodes_lock:
            cached = self._nodes.get(node_id)
            if cached is not None and cached[1] > now:
                return cached[0]
        node = self._find_node(node_id)
        if node is not None:
            with self._nodes_lock:
                if len(self._nodes) >= MAX_CACHED_NODES:
                    self._nodes.clear()
                self._nodes[node_id] = (node, now + NODE_CACHE_S)
        return node

    def forget(self, node_id: str) -> None:
        with self._nodes_lock:
            self._nodes.pop(node_id, None)

    def unauthenticated(self, peer: str) -> None:
        """Charge an unsigned or failed request to its peer's host."""
        _charge(self.limits.unauthenticated, peer, f"unauthenticated requests from {peer}")

    def _open(self, envelope: SignedEnvelope, method: str, expected_key: bytes | None, peer: str) -> OpenedEnvelope:
        try:
            opened = self.verifier.open(envelope, method, expected_public_key=expected_key)
        except EnvelopeError as error:
            self.unauthenticated(peer)
            raise GateError(grpc.StatusCode.UNAUTHENTICATED, f"{error.code}: {error}") from None
        if self._take_nonce is not None and not self._take_nonce(
            envelope.signer_public_key, envelope.nonce, opened.timestamp_ms + self.verifier.window_ms
        ):
            self.unauthenticated(peer)
            raise GateError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{ReplayedNonceError.code}: this envelope's nonce was already used by its signer",
            )
        if opened.signer_public_key == self.trainer_public_key:
            _charge(self.limits.trainer, opened.signer_id, "the trainer")
        else:
            _charge(self.limits.node, opened.signer_id, f"node {opened.signer_id}")
        return opened

    @staticmethod
    def decode(payload: bytes, request_cls: type[RequestT]) -> RequestT:
        """The payload as `request_cls`, its integers and repeated fields within bounds."""
        try:
            request = request_cls.FromString(payload)
            check_bounds(request)
        except DecodeError as error:
            raise GateError(
                grpc.StatusCode.INVALID_ARGUMENT, f"payload is not a valid {request_cls.__name__}: {error}"
            ) from None
        except WireFormatError as error:
            raise GateError(grpc.StatusCode.INVALID_ARGUMENT, f"{request_cls.__name__}.{error}") from None
        return request

    def node_caller(self, envelope: SignedEnvelope, method: str, peer: str, *, registering: bool = False) -> Caller:
        """The verified caller of a node RPC from `peer` (a host); decode its payload with `decode`."""
        opened = self._open(envelope, method, None, peer)
        node = self.find_node(opened.signer_id)
        if node is None and not registering:
            self.unauthenticated(peer)
            raise GateError(
                grpc.StatusCode.UNAUTHENTICATED, f"node {opened.signer_id} is not registered; register first"
            )
        if node is None:
            _charge(self.limits.registration, peer, f"registrations of new keys from {peer}")
        if node is not None and node.banned:
            self.unauthenticated(peer)
            raise GateError(grpc.StatusCode.PERMISSION_DENIED, f"node {node.node_id} is banned: {node.ban_reason}")
        return Caller(opened, node)

    def trainer_request(
        self, envelope: SignedEnvelope, method: str, request_cls: type[RequestT], peer: str
    ) -> RequestT:
        opened = self._open(envelope, method, self.trainer_public_key, peer)
        return self.decode(opened.payload, request_cls)

    def operator(self, metadata, peer: str) -> None:
        if not self.operator_token:
            self.unauthenticated(peer)
            raise GateError(
                grpc.StatusCode.PERMISSION_DENIED, "admin RPCs are disabled: the coordinator has no operator token"
            )
        supplied = dict(metadata or ()).get("authorization", "")
        expected = f"Bearer {self.operator_token}"
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            self.unauthenticated(peer)
            raise GateError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong operator token")
