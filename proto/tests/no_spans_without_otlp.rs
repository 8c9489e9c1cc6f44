//! With no OTLP endpoint, the servers' logging creates no span below the log level: neither
//! the protocol's own phase spans nor the libraries' (h2, hyper, tokio-postgres create
//! spans at trace and debug level on every call). A span that is created and closed for nobody cost a fifth of a replica's CPU
//! under load. Its own test binary: the subscriber is global to the process.

#[test]
fn logging_alone_creates_no_span_below_the_log_level() {
    paxos_commit_proto::init_logging();
    let phase = paxos_commit_proto::phase_span!("begin", txid = 1);
    assert!(phase.is_disabled(), "a phase span was created");
    for span in [
        tracing::trace_span!(target: "h2::proto::connection", "poll"),
        tracing::debug_span!(target: "tokio_postgres::query", "query"),
        tracing::trace_span!("anything"),
    ] {
        assert!(span.is_disabled(), "{:?} was created", span.metadata());
    }
    // Events still reach the log.
    assert!(tracing::enabled!(tracing::Level::INFO));
    assert!(!tracing::enabled!(tracing::Level::DEBUG));
}
