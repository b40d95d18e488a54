"""The one entry point every signed request passes before its handler runs: envelope
signature, freshness and nonce; rate limit per signer; registration and ban status; payload
decoding. Failures abort the call with a status code and a message that names the problem."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from coordinator.ratelimit import RateLimitedError, RateLimiter
from coordinator.store import NodeRecord
from protocol.envelope import EnvelopeError, EnvelopeVerifier, OpenedEnvelope
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


class Gate:
    def __init__(
        self,
        verifier: EnvelopeVerifier,
        limiter: RateLimiter,
        find_node: Callable[[str], NodeRecord | None],
        trainer_public_key: bytes,
        operator_token: str,
    ):
        self.verifier = verifier
        self.limiter = limiter
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

    def _open(self, envelope: SignedEnvelope, method: str, expected_key: bytes | None) -> OpenedEnvelope:
        try:
            self.limiter.check(envelope.signer_public_key.hex())
        except RateLimitedError as error:
            raise GateError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        try:
            return self.verifier.open(envelope, method, expected_public_key=expected_key)
        except EnvelopeError as error:
            raise GateError(grpc.StatusCode.UNAUTHENTICATED, f"{error.code}: {error}") from None

    @staticmethod
    def decode(payload: bytes, request_cls: type[RequestT]) -> RequestT:
        try:
            return request_cls.FromString(payload)
        except DecodeError as error:
            raise GateError(
                grpc.StatusCode.INVALID_ARGUMENT, f"payload is not a valid {request_cls.__name__}: {error}"
            ) from None

    def node_caller(self, envelope: SignedEnvelope, method: str, *, registering: bool = False) -> Caller:
        """The verified caller of a node RPC; decode its payload with `decode`."""
        opened = self._open(envelope, method, None)
        node = self.find_node(opened.signer_id)
        if node is None and not registering:
            raise GateError(grpc.StatusCode.UNAUTHENTICATED, f"node {opened.signer_id} is not registered; register first")
        if node is not None and node.banned:
            raise GateError(grpc.StatusCode.PERMISSION_DENIED, f"node {node.node_id} is banned: {node.ban_reason}")
        return Caller(opened, node)

    def trainer_request(self, envelope: SignedEnvelope, method: str, request_cls: type[RequestT]) -> RequestT:
        opened = self._open(envelope, method, self.trainer_public_key)
        return self.decode(opened.payload, request_cls)

    def operator(self, metadata) -> None:
        if not self.operator_token:
            raise GateError(grpc.StatusCode.PERMISSION_DENIED, "admin RPCs are disabled: the coordinator has no operator token")
        supplied = dict(metadata or ()).get("authorization", "")
        expected = f"Bearer {self.operator_token}"
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise GateError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong operator token")
