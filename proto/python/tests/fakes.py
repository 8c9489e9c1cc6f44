"""Stand-ins for gRPC calls and servers, for the unit tests."""

from __future__ import annotations

from typing import Any, Optional

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from paxos_commit.errors import DETAILS_TRAILER, DOMAIN


def details_trailer(
    code: grpc.StatusCode, reason: str, domain: str = DOMAIN, **metadata: str
) -> tuple[str, bytes]:
    """A grpc-status-details-bin trailer holding one ErrorInfo, as the servers send it."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata))
    status = status_pb2.Status(code=code.value[0], message="m", details=[detail])
    return (DETAILS_TRAILER, status.SerializeToString())


class FakeRpcError(grpc.RpcError):
    """What a failed sync call raises: an RpcError that is also a Call."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str = "",
        reason: Optional[str] = None,
        **metadata: str,
    ) -> None:
        super().__init__(message)
        self._code = code
        self._message = message
        self._trailers = (details_trailer(code, reason, **metadata),) if reason else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers


class Method:
    """A unary method that answers from a script: each call takes the next entry, an
    exception to raise or a response to return; `requests` records what was sent."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.requests: list[Any] = []

    def __call__(self, request: Any, timeout: Optional[float] = None) -> Any:
        self.requests.append(request)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return step(request)
        return step


class FakeClock:
    """Time that passes only when slept."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s

