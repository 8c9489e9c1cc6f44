"""The client: begin on a coordinator replica, execute on the participants' agents, finish
on the transaction's leader (or, when it is gone, on the replicas that take over).

It mirrors the Rust client (proto/src/client.rs) and follows the rules of docs/PROTOCOL.md:
it never guesses an outcome, and it sends a request again only where a repeat cannot do
anything twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from types import TracebackType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar

import grpc

from . import errors
from ._pb import paxoscommit_pb2 as pb
from ._pb import paxoscommit_pb2_grpc as pb_grpc
from .errors import Cause, OutcomeUnknown, PaxosCommitError
from .outcomes import Decision, Outcome, Result, TransactionStatus, TxnState
from .retry import run
from .values import from_value, to_value

log = logging.getLogger("paxos_commit")

T = TypeVar("T")

# The servers' message size limit (proto/src/limits.rs): larger requests are refused with
# RESOURCE_EXHAUSTED, and results can be as large.
MAX_MESSAGE_BYTES = 8 << 20

# An Execute (or a keyed Begin) that failed in transport is sent again this many times,
# after 50 ms, then 100 ms, then 200 ms.
TRANSPORT_RETRIES = 3
TRANSPORT_PAUSE_S = 0.05

# Begin moves on to the next replica on these: the replica is stopping, degraded, at its
# limit of open transactions, or did not answer.
BEGIN_MOVES_ON = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

# A replica that answered with one of these cannot serve this transaction; another may.
ASK_ANOTHER_REPLICA = frozenset({"REPLICA_UNAVAILABLE", "NOT_LEADER"})


def reason_name(number: int) -> str:
    """The ErrorReason name of `number`; a newer server's unknown number reads as
    unspecified, as the Rust client reads it."""
    try:
        return str(pb.ErrorReason.Name(number))
    except ValueError:
        return "ERROR_REASON_UNSPECIFIED"


def _decision(r: pb.DecisionResponse) -> Decision:
    if r.outcome == pb.OUTCOME_COMMITTED:
        outcome = Outcome.COMMITTED
    elif r.outcome == pb.OUTCOME_ABORTED:
        outcome = Outcome.ABORTED
    else:
        raise PaxosCommitError(
            f"a decision without an outcome for {r.txid}",
            code=grpc.StatusCode.INTERNAL,
            txid=r.txid,
        )
    cause = None
    if outcome is Outcome.ABORTED and r.HasField("cause"):
        cause = Cause(
            reason=reason_name(r.cause.reason),
            participant=r.cause.participant or None,
            sqlstate=r.cause.sqlstate or None,
            message=r.cause.message,
        )
    return Decision(
        txid=r.txid,
        outcome=outcome,
        reason=r.reason,
        cause=cause,
        all_applied=r.all_applied,
        not_applied=tuple(r.not_applied),
    )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Client:
    """A handle on a deployment: its coordinator replicas and its participants' agents.

    Every link is mutual TLS: `ca` is the deployment's CA bundle, `cert` and `key` this
    application's certificate (URI SAN spiffe://<group>/client/<name>) and private key, all
    PEM files. `insecure=True` talks plaintext, which only servers started insecure accept.
    Thread-safe; `close()` (or a `with` block) releases the connections.
    """

    def __init__(
        self,
        replicas: Sequence[str],
        agents: Mapping[str, str],
        *,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        rpc_timeout: float = 30.0,
        insecure: bool = False,
    ) -> None:
        if not replicas:
            raise ValueError("at least one coordinator replica address is needed")
        if insecure:
            credentials = None
        elif ca and cert and key:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca),
                private_key=_read(key),
                certificate_chain=_read(cert),
            )
        else:
            raise ValueError("mutual TLS needs ca, cert and key (or insecure=True)")
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC waits up to two minutes before reconnecting to a server it lost: a
            # replica or agent that restarts must be usable again within seconds.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]

        def channel(address: str) -> grpc.Channel:
            if "://" in address:
                raise ValueError(f"give host:port, not {address!r}")
            if credentials is None:
                return grpc.insecure_channel(address, options=options)
            return grpc.secure_channel(address, credentials, options=options)

        self._channels: list[grpc.Channel] = []
        self._replicas: list[pb_grpc.CoordinatorStub] = []
        for address in replicas:
            ch = channel(address)
            self._channels.append(ch)
            self._replicas.append(pb_grpc.CoordinatorStub(ch))
        self._agents: dict[str, pb_grpc.AgentStub] = {}
        for participant, address in agents.items():
            ch = channel(address)
            self._channels.append(ch)
            self._agents[participant] = pb_grpc.AgentStub(ch)
        self._rpc_timeout = rpc_timeout
        # The replica Begin tries first; it moves on when one fails.
        self._preferred = 0

    @classmethod
    def from_env(cls, prefix: str = "PAXOS_COMMIT_", **kwargs: Any) -> "Client":
        """A client from the variables txctl reads too: <prefix>REPLICAS (host:port,...),
        <prefix>AGENTS (participant=host:port,...), <prefix>TLS_CA, _TLS_CERT, _TLS_KEY."""

        def var(name: str) -> str:
            value = os.environ.get(prefix + name)
            if not value:
                raise ValueError(f"{prefix}{name} is not set")
            return value

        agents = dict(item.split("=", 1) for item in var("AGENTS").split(","))
        return cls(
            var("REPLICAS").split(","),
            agents,
            ca=var("TLS_CA"),
            cert=var("TLS_CERT"),
            key=var("TLS_KEY"),
            **kwargs,
        )

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def replica_count(self) -> int:
        return len(self._replicas)

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        retries: int = 0,
        txid: Optional[str] = None,
        participant: Optional[str] = None,
        transport_reason: Optional[str] = None,
    ) -> T:
        """One RPC with the client's deadline; a failure in transport is sent again up to
        `retries` times (only for requests a repeat cannot apply twice). Raises the typed
        error."""
        pause = TRANSPORT_PAUSE_S
        attempt = 0
        while True:
            try:
                return method(request, timeout=self._rpc_timeout)
            except grpc.RpcError as e:
                err = errors.from_rpc_error(
                    e,  # a sync call's RpcError is also a grpc.Call
                    txid=txid,
                    participant=participant,
                    transport_reason=transport_reason,
                )
                if err.from_transport and attempt < retries:
                    attempt += 1
                    log.debug("%s failed in transport (%s); sending it again", txid, err)
                    time.sleep(pause)
                    pause *= 2
                    continue
                raise err from e

    def begin(self, idempotency_key: Optional[str] = None, timeout_ms: int = 0) -> "Transaction":
        """Begins a transaction on the first replica that serves, starting with the one
        that served last.

        With an `idempotency_key` (at most 128 bytes), a Begin whose reply was lost is sent
        again to the same replica, which answers with the transaction it began the first
        time (`Transaction.existing`). A key counts per caller certificate and per replica,
        within the replica's retention window.
        """
        n = len(self._replicas)
        start = self._preferred
        request = pb.BeginRequest(idempotency_key=idempotency_key or "", timeout_ms=timeout_ms)
        last: Optional[PaxosCommitError] = None
        for k in range(n):
            i = (start + k) % n
            try:
                r = self._call(
                    self._replicas[i].Begin,
                    request,
                    retries=TRANSPORT_RETRIES if idempotency_key else 0,
                    transport_reason="REPLICA_UNAVAILABLE",
                )
            except PaxosCommitError as e:
                if e.code not in BEGIN_MOVES_ON:
                    raise
                last = e
                continue
            self._preferred = i
            return Transaction(self, r.txid, r.leader, existing=r.existing)
        self._preferred = (start + 1) % n
        assert last is not None
        raise last

    def status(self, txid: str) -> TransactionStatus:
        """Committed, aborted, in progress or unknown, from the first replica that answers."""
        last: Optional[PaxosCommitError] = None
        for stub in self._replicas:
            try:
                r = self._call(stub.GetStatus, pb.StatusRequest(txid=txid), txid=txid)
            except PaxosCommitError as e:
                if not (e.from_transport or e.reason in ASK_ANOTHER_REPLICA):
                    raise
                last = e
                continue
            state = {
                pb.TXN_STATE_IN_PROGRESS: TxnState.IN_PROGRESS,
                pb.TXN_STATE_COMMITTED: TxnState.COMMITTED,
                pb.TXN_STATE_ABORTED: TxnState.ABORTED,
            }.get(r.state, TxnState.UNKNOWN)
            return TransactionStatus(txid=txid, state=state, expired=r.expired, raw=r)
        assert last is not None
        raise last

    def run(self, fn: Callable[["Transaction"], T], **options: Any) -> T:
        """Runs `fn(txn)` in a transaction and commits it, again from the start while it
        fails for a transient reason; returns what `fn` returned. `fn` may run several times,
        each with a new transaction: it does everything through `txn` and leaves commit and
        abort to `run`. See retry.py for the algorithm and the options (max_attempts,
        budget_s, settle_s, poll_s, backoff)."""
        return run(self, fn, **options)

    def _agent(self, participant: str) -> pb_grpc.AgentStub:
        try:
            return self._agents[participant]
        except KeyError:
            raise PaxosCommitError(
                f"no participant named {participant!r} is configured",
                code=grpc.StatusCode.INVALID_ARGUMENT,
                reason="UNKNOWN_PARTICIPANT",
                participant=participant,
            ) from None

    def _finish(self, txid: str, leader: int, method: str, request: Any) -> Decision:
        """Asks the leader, then the other replicas (which take the transaction over)."""
        n = len(self._replicas)
        last: Optional[PaxosCommitError] = None
        for k in range(n):
            stub = self._replicas[(leader + k) % n]
            try:
                return _decision(self._call(getattr(stub, method), request, txid=txid))
            except PaxosCommitError as e:
                if isinstance(e, OutcomeUnknown):
                    raise
                # Not answered (it may still have arrived), or this replica cannot serve it,
                # or (not the leader) it does not know the transaction: ask the next.
                if e.from_transport or e.reason in ASK_ANOTHER_REPLICA:
                    last = e
                elif e.code == grpc.StatusCode.NOT_FOUND and k > 0:
                    last = e
                else:
                    raise
        raise OutcomeUnknown(
            f"no replica could tell the outcome of {txid} (last: {last}); ask status() later",
            code=last.code if last else grpc.StatusCode.UNAVAILABLE,
            reason="OUTCOME_UNKNOWN",
            txid=txid,
            from_transport=bool(last and last.from_transport),
        )


class _Lane:
    """One participant's statement numbers; its lock keeps them in order on the wire."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_seq = 0


class Transaction:
    """One distributed transaction.

    Statements are numbered per participant (ExecuteRequest.seq 1, 2, ...) and sent one at
    a time per participant, so that a statement whose reply was lost can be sent again with
    its number and run once. As a context manager it aborts when the block is left, by an
    exception or otherwise, before commit, commit_fast, prepare or abort was called.
    """

    def __init__(self, client: Client, txid: str, leader: int, existing: bool = False) -> None:
        self.client = client
        self.txid = txid
        # The index, in the client's replica list, of the replica that leads it.
        self.leader = leader
        # A keyed Begin found the transaction its key began before (which may be decided).
        self.existing = existing
        self._lanes: dict[str, _Lane] = {}
        self._lanes_lock = threading.Lock()
        # Prepare, Commit or Abort was sent: leaving the block must not abort it then.
        self._finishing = False

    def __repr__(self) -> str:
        return f"Transaction({self.txid!r}, leader={self.leader})"

    def execute(self, participant: str, sql: str, params: Iterable[Any] = ()) -> Result:
        """Runs one statement on `participant`'s database in this transaction; `params`
        fill $1, $2, ... (see values.py for the types)."""
        stub = self.client._agent(participant)
        values = [to_value(p) for p in params]
        with self._lanes_lock:
            lane = self._lanes.setdefault(participant, _Lane())
        with lane.lock:
            # Taken before sending: a failed call leaves its number used, so the next
            # statement is never mistaken for a repeat of one that may have run.
            lane.last_seq += 1
            request = pb.ExecuteRequest(txid=self.txid, sql=sql, params=values, seq=lane.last_seq)
            r = self.client._call(
                stub.Execute,
                request,
                retries=TRANSPORT_RETRIES,
                txid=self.txid,
                participant=participant,
                transport_reason="PARTICIPANT_UNREACHABLE",
            )
        return Result(
            columns=list(r.columns),
            rows=[tuple(from_value(v) for v in row.values) for row in r.rows],
            rows_affected=r.rows_affected,
        )

    def commit(self) -> Decision:
        """Commits (or learns that it aborted) once every participant applied the decision.
        Raises OutcomeUnknown when no replica can tell; calling it again is safe."""
        return self._finish("Commit", pb.CommitRequest(txid=self.txid))

    def commit_fast(self) -> Decision:
        """Commits and answers as soon as the decision is chosen."""
        return self._finish("Commit", pb.CommitRequest(txid=self.txid, return_on_decision=True))

    def prepare(self) -> Decision:
        """Runs the voting phase and returns the decision without waiting for it to apply."""
        return self._finish("Prepare", pb.TxnRequest(txid=self.txid))

    def abort(self) -> Decision:
        """Aborts unless already decided; the answer is the decision (Committed if it was)."""
        return self._finish("Abort", pb.TxnRequest(txid=self.txid))

    def _finish(self, method: str, request: Any) -> Decision:
        self._finishing = True
        return self.client._finish(self.txid, self.leader, method, request)

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._finishing:
            return
        try:
            self.abort()
        except PaxosCommitError as e:
            # Best effort: the leader's open timeout ends it anyway.
            log.debug("%s left unfinished; abort failed: %s", self.txid, e)
