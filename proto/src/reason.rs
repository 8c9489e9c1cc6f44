//! Typed error details: every error status a server sends carries one google.rpc.ErrorInfo
//! (domain [`DOMAIN`], a stable [`ErrorReason`] name, the SQLSTATE and the participant where
//! they apply), so that a client in any language decides from a reason and never from the
//! English of a message.
//!
//! Servers attach a reason where the error is made ([`status`]); [`ReasonLayer`] gives the
//! errors that no handler made (an unauthenticated caller, an oversized request refused by
//! the codec) a reason from their code on the way out.

use crate::pb::ErrorReason;
use std::collections::HashMap;
use std::task::{Context, Poll};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The ErrorInfo domain of paxos-commit's reasons.
pub const DOMAIN: &str = "paxos-commit";

/// Metadata keys of the ErrorInfo.
pub const SQLSTATE: &str = "sqlstate";
pub const PARTICIPANT: &str = "participant";
pub const TXID: &str = "txid";

/// A status with `code`, `message` and an ErrorInfo of `reason` and `metadata`.
pub fn status(
    code: Code,
    message: impl Into<String>,
    reason: ErrorReason,
    metadata: &[(&str, &str)],
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let details = ErrorDetails::with_error_info(reason.as_str_name(), DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// What a status says about why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub reason: ErrorReason,
    /// PostgreSQL's SQLSTATE, when PostgreSQL said no.
    pub sqlstate: Option<String>,
    pub participant: Option<String>,
}

/// The reason a status carries, if it carries one of ours. A reason name this build does
/// not know (a newer server) reads as `ERROR_REASON_UNSPECIFIED`, with the SQLSTATE kept.
pub fn of(s: &Status) -> Option<Reason> {
    let details = s.get_error_details();
    let info = details.error_info()?;
    if info.domain != DOMAIN {
        return None;
    }
    Some(Reason {
        reason: ErrorReason::from_str_name(&info.reason).unwrap_or(ErrorReason::Unspecified),
        sqlstate: info.metadata.get(SQLSTATE).cloned(),
        participant: info.metadata.get(PARTICIPANT).cloned(),
    })
}

/// The reason of a status no handler gave one, from its code alone.
pub fn default_for(code: Code) -> ErrorReason {
    match code {
        Code::Unauthenticated => ErrorReason::Unauthenticated,
        Code::PermissionDenied => ErrorReason::PermissionDenied,
        // The codec refuses a message over the size limit with this code; a server's own
        // limits (open transactions, busy agents) set their reasons themselves.
        Code::ResourceExhausted => ErrorReason::MessageTooLarge,
        Code::InvalidArgument | Code::OutOfRange => ErrorReason::InvalidArgument,
        Code::NotFound => ErrorReason::UnknownTransaction,
        Code::Unavailable | Code::Cancelled => ErrorReason::ReplicaUnavailable,
        Code::DeadlineExceeded => ErrorReason::OutcomeUnknown,
        _ => ErrorReason::Unspecified,
    }
}

/// The reason of a PostgreSQL error, from its SQLSTATE.
pub fn of_sqlstate(sqlstate: &str) -> ErrorReason {
    match sqlstate {
        "55P03" => ErrorReason::LockTimeout,
        "40P01" => ErrorReason::Deadlock,
        "57014" => ErrorReason::StatementTimeout,
        s if s.starts_with("40") => ErrorReason::SerializationFailure,
        s if s.starts_with("23") => ErrorReason::ConstraintViolation,
        // Connection failures, the server shutting down, insufficient resources (too many
        // connections, out of memory): the database, not the statement.
        s if s.starts_with("08") || s.starts_with("57P") || s.starts_with("53") => {
            ErrorReason::DatabaseUnavailable
        }
        _ => ErrorReason::SqlError,
    }
}

/// Whether a transaction that failed for `reason` may succeed if run again from the start:
/// contention (locks, deadlocks, serialization), resources that free up, and causes that
/// pass (a replica or agent restarting, a participant that did not vote in time).
pub fn is_transient(reason: ErrorReason) -> bool {
    matches!(
        reason,
        ErrorReason::LockTimeout
            | ErrorReason::Deadlock
            | ErrorReason::SerializationFailure
            | ErrorReason::PreparedTransactionsExhausted
            | ErrorReason::AgentBusy
            | ErrorReason::AgentShuttingDown
            | ErrorReason::TooManyTransactions
            | ErrorReason::Overloaded
            | ErrorReason::ReplicaUnavailable
            | ErrorReason::DatabaseUnavailable
            | ErrorReason::ParticipantUnreachable
            | ErrorReason::AbortedByTakeover
    )
}

/// Gives every error status that leaves a server without an ErrorInfo one from its code
/// ([`default_for`]). Errors of unary calls travel in the response headers
/// (trailers-only), which is where the handlers' own and the codec's and interceptors'
/// refusals are; a streaming call's end-of-stream status is the stream's own business.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReasonLayer;

impl<S> tower::Layer<S> for ReasonLayer {
    type Service = ReasonService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReasonService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ReasonService<S> {
    inner: S,
}

const DETAILS_HEADER: &str = "grpc-status-details-bin";

/// Adds the default ErrorInfo to an error response's headers that lack details.
fn add_reason<B>(response: &mut http::Response<B>) {
    let headers = response.headers_mut();
    if headers.contains_key(DETAILS_HEADER) {
        return;
    }
    let Some(sent) = Status::from_header_map(headers) else {
        return;
    };
    if sent.code() == Code::Ok {
        return;
    }
    // Rebuilt to reuse tonic's encoding of the details; the status itself stays as sent.
    let with = status(sent.code(), sent.message(), default_for(sent.code()), &[]);
    let mut fresh = http::HeaderMap::new();
    if with.add_header(&mut fresh).is_ok() {
        if let Some(details) = fresh.remove(DETAILS_HEADER) {
            headers.insert(DETAILS_HEADER, details);
        }
    }
}

impl<S, Req, B> tower::Service<Req> for ReasonService<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            add_reason(&mut response);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_survives_the_trip_through_headers() {
        let s = status(
            Code::Aborted,
            "deadlock detected",
            ErrorReason::Deadlock,
            &[(SQLSTATE, "40P01"), (PARTICIPANT, "bank_a"), (TXID, "")],
        );
        let mut headers = http::HeaderMap::new();
        s.add_header(&mut headers).unwrap();
        let back = Status::from_header_map(&headers).unwrap();
        let r = of(&back).unwrap();
        assert_eq!(r.reason, ErrorReason::Deadlock);
        assert_eq!(r.sqlstate.as_deref(), Some("40P01"));
        assert_eq!(r.participant.as_deref(), Some("bank_a"));
        assert_eq!(of(&Status::internal("plain")), None);
    }

    #[test]
    fn the_layer_gives_a_plain_error_a_reason_and_keeps_one_given() {
        let mut plain = http::Response::new(());
        Status::unauthenticated("no certificate")
            .add_header(plain.headers_mut())
            .unwrap();
        add_reason(&mut plain);
        let s = Status::from_header_map(plain.headers()).unwrap();
        assert_eq!(s.message(), "no certificate");
        assert_eq!(of(&s).unwrap().reason, ErrorReason::Unauthenticated);

        let mut given = http::Response::new(());
        status(Code::Aborted, "x", ErrorReason::LockTimeout, &[])
            .add_header(given.headers_mut())
            .unwrap();
        add_reason(&mut given);
        let s = Status::from_header_map(given.headers()).unwrap();
        assert_eq!(of(&s).unwrap().reason, ErrorReason::LockTimeout);

        let mut ok = http::Response::new(());
        add_reason(&mut ok);
        assert!(ok.headers().is_empty());
    }

    #[test]
    fn sqlstates_map_to_reasons() {
        assert_eq!(of_sqlstate("55P03"), ErrorReason::LockTimeout);
        assert_eq!(of_sqlstate("40P01"), ErrorReason::Deadlock);
        assert_eq!(of_sqlstate("40001"), ErrorReason::SerializationFailure);
        assert_eq!(of_sqlstate("23514"), ErrorReason::ConstraintViolation);
        assert_eq!(of_sqlstate("42601"), ErrorReason::SqlError);
        assert_eq!(of_sqlstate("57P01"), ErrorReason::DatabaseUnavailable);
        assert_eq!(of_sqlstate("57014"), ErrorReason::StatementTimeout);
    }
}
