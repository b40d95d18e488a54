"""The one entry point every signed request passes before its handler runs: envelope
signature, freshness and nonce; rate limit per signer; registration and ban status; payload
decoding. Failures abort the call with a status code and a message that names the problem."""

from __future__ import annotations

import hmac
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
        self.find_node = find_node
        self.trainer_public_key = trainer_public_key
        self.operator_token = operator_token

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
