//! Logs and distributed traces of every process, and the W3C trace context that ties one
//! transaction's spans together across the client, the replicas and the agents.
//!
//! Logs go to stderr as before ([`init_logging`](crate::init_logging)). Traces are exported
//! over OTLP/gRPC only when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; otherwise the protocol's spans are not even
//! created (their target is filtered out of the log layer, the only one there is then), and
//! no trace context is read or sent.
//!
//! The trace context travels as a W3C `traceparent`: in the gRPC metadata of unary calls, and
//! in `PaxosMessage.traceparent` on the long-lived message streams, which mix many
//! transactions and so cannot carry one context in their metadata. Whatever arrives is
//! checked here ([`TraceParent::parse`]); a malformed or oversized one is ignored, never an
//! error: a bad trace context must not fail a transaction.

use crate::pb;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The `tracing` target of the protocol's spans. The log layer never shows them (logs look
/// the same with tracing on or off); the OTLP layer exports them.
pub const SPAN_TARGET: &str = "paxos_commit::span";

/// The gRPC metadata key of the trace context (W3C Trace Context).
pub const TRACEPARENT: &str = "traceparent";

/// Longest `traceparent` accepted. Version 00 is exactly 55 characters; later versions may
/// append fields, which are dropped when the context is passed on.
pub const MAX_TRACEPARENT_LEN: usize = 128;

/// Version 00's length: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
const TRACEPARENT_V00_LEN: usize = 55;

/// Set once the OTLP layer is installed: until then nothing reads or attaches trace contexts.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces (and so reads and passes on trace contexts).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A checked W3C `traceparent`, in its version-00 form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceParent(String);

impl TraceParent {
    /// Checks a `traceparent` from the network: at most [`MAX_TRACEPARENT_LEN`] bytes, lower
    /// case hex fields of the right lengths, a version other than `ff`, non-zero trace and
    /// parent ids. Anything else is `None`.
    pub fn parse(s: &str) -> Option<TraceParent> {
        if s.len() > MAX_TRACEPARENT_LEN || s.len() < TRACEPARENT_V00_LEN || !s.is_ascii() {
            return None;
        }
        let (head, rest) = s.split_at(TRACEPARENT_V00_LEN);
        let mut fields = head.split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return None;
        };
        let hex = |f: &str, n: usize| {
            f.len() == n
                && f.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !(hex(version, 2) && hex(trace, 32) && hex(parent, 16) && hex(flags, 2)) {
            return None;
        }
        // Version 00 has nothing after the flags; a later one separates what it adds by '-'.
        if version == "ff" || (version == "00" && !rest.is_empty()) {
            return None;
        }
        if !rest.is_empty() && !rest.starts_with('-') {
            return None;
        }
        if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(TraceParent(format!("00-{trace}-{parent}-{flags}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The remote span this names, as an OpenTelemetry parent context.
    fn context(&self) -> Option<opentelemetry::Context> {
        let mut fields = self.0.split('-').skip(1);
        let trace = TraceId::from_hex(fields.next()?).ok()?;
        let span = SpanId::from_hex(fields.next()?).ok()?;
        let flags = u8::from_str_radix(fields.next()?, 16).ok()?;
        let sc = SpanContext::new(
            trace,
            span,
            TraceFlags::new(flags),
            true,
            TraceState::default(),
        );
        Some(opentelemetry::Context::new().with_remote_span_context(sc))
    }

    /// The context of a span of this process; `None` for a span that is not exported.
    pub fn of(span: &tracing::Span) -> Option<TraceParent> {
        if !enabled() || span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        Some(TraceParent(format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )))
    }

    /// The context of the current span.
    pub fn current() -> Option<TraceParent> {
        TraceParent::of(&tracing::Span::current())
    }

    /// From a unary call's metadata: `None` when tracing is off, absent or malformed.
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<TraceParent> {
        if !enabled() {
            return None;
        }
        TraceParent::parse(metadata.get(TRACEPARENT)?.to_str().ok()?)
    }

    /// From a message of a stream: `None` when tracing is off, absent or malformed.
    pub fn from_pb(m: &pb::PaxosMessage) -> Option<TraceParent> {
        if !enabled() || m.traceparent.is_empty() {
            return None;
        }
        TraceParent::parse(&m.traceparent)
    }
}

/// Makes `span` a child of the remote span `parent` names (no-op without one, or when the
/// span is not exported). Must be called before the span is first entered.
pub fn set_parent(span: &tracing::Span, parent: Option<&TraceParent>) {
    if let Some(cx) = parent.and_then(TraceParent::context) {
        // Fails only for a span that is not exported or already started: nothing to do.
        let _ = span.set_parent(cx);
    }
}

/// Attaches the current span's context to an outgoing unary call.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(tp) = TraceParent::current() {
        if let Ok(v) = tp.as_str().parse() {
            req.metadata_mut().insert(TRACEPARENT, v);
        }
    }
    req
}

/// Attaches `trace` to an outgoing stream message.
pub fn attach(m: &mut pb::PaxosMessage, trace: Option<&TraceParent>) {
    if let Some(tp) = trace {
        m.traceparent = tp.as_str().to_string();
    }
}

/// Why telemetry could not start. The process still runs, with logs only.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot start the telemetry thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("the telemetry thread stopped before the exporter was built")]
    ThreadGone,
}

/// Keeps the trace exporter running; dropping it (or [`Telemetry::shutdown`]) exports the
/// spans still queued and stops it. Without an OTLP endpoint it holds nothing.
#[must_use = "dropping it stops the trace exporter"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// The exporter's gRPC channel lives on a runtime of its own, so that exporting does
    /// not depend on the server's runtime being driven (it is not, once it has stopped) and
    /// works the same in a process with no runtime at all.
    runtime: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Telemetry {
    /// Exports the spans still queued and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Flushes the batch processor; its export has its own timeout.
            if let Err(e) = provider.shutdown() {
                eprintln!("telemetry: exporting the last spans failed: {e}");
            }
        }
        if let Some((stop, thread)) = self.runtime.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The OTLP endpoint from the environment, if traces are to be exported.
fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .find(|v| !v.trim().is_empty())
}

/// The service name: `OTEL_SERVICE_NAME` when set, else the binary's default.
pub fn service_name(default: &str) -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Logs as [`init_logging`](crate::init_logging) sets them up, and traces over OTLP/gRPC
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (batch export; `OTEL_BSP_SCHEDULE_DELAY` and the
/// other `OTEL_BSP_*` variables apply), as `service` unless `OTEL_SERVICE_NAME` says
/// otherwise. An exporter that cannot start is reported and the process runs with logs only.
pub fn init_telemetry(service: &str) -> Telemetry {
    init_telemetry_with(service, otlp_endpoint())
}

/// [`init_telemetry`] with the OTLP endpoint given (`None`: no traces), for a process that
/// configures itself otherwise than by the environment (a test).
pub fn init_telemetry_with(service: &str, endpoint: Option<String>) -> Telemetry {
    let mut telemetry = Telemetry {
        provider: None,
        runtime: None,
    };
    let tracer = match endpoint {
        None => None,
        Some(endpoint) => match start_exporter(&service_name(service), endpoint, &mut telemetry) {
            Ok(tracer) => Some(tracer),
            Err(e) => {
                eprintln!("{service}: traces will not be exported: {e}");
                None
            }
        },
    };
    install(tracer);
    telemetry
}

fn start_exporter(
    service: &str,
    endpoint: String,
    telemetry: &mut Telemetry,
) -> Result<opentelemetry_sdk::trace::Tracer, TelemetryError> {
    let (built_tx, built_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = built_tx.send(Err(TelemetryError::Thread(e)));
                    return;
                }
            };
            // The exporter's channel spawns its connection task on this runtime.
            let exporter = {
                let _entered = runtime.enter();
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build()
            };
            let _ = built_tx.send(exporter.map_err(TelemetryError::from));
            runtime.block_on(async {
                let _ = stop_rx.await;
            });
        })?;
    telemetry.runtime = Some((stop_tx, thread));
    let exporter = built_rx.recv().map_err(|_| TelemetryError::ThreadGone)??;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("paxos-commit");
    telemetry.provider = Some(provider);
    Ok(tracer)
}

/// The subscriber: logs on stderr (never the protocol's spans), and the OTLP layer when
/// there is a tracer (the protocol's spans, and warnings and errors as their events).
pub(crate) fn install(tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let json = std::env::var("PAXOS_COMMIT_LOG_FORMAT").is_ok_and(|f| f == "json");
    let not_spans = filter_fn(|m| m.target() != SPAN_TARGET);
    let ansi = !json && std::io::stderr().is_terminal();
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter.and(not_spans))
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter.and(not_spans))
            .boxed()
    };
    let traces = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter_fn(|m| {
                if m.is_span() {
                    m.target() == SPAN_TARGET
                } else {
                    *m.level() <= tracing::Level::WARN
                }
            }))
    });
    let enabled = traces.is_some();
    // No `Option` layer when there is no tracer: a `None` layer is interested in every
    // callsite, and so every span of every library (h2, hyper, tokio-postgres, at every
    // level) would be created and closed for nothing: a fifth of a replica's CPU.
    let installed = match traces {
        Some(traces) => tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .try_init(),
        None => tracing_subscriber::registry().with(logs).try_init(),
    };
    if installed.is_ok() {
        ENABLED.store(enabled, Ordering::Relaxed);
    }
}

/// A span of the protocol, named after its phase, with the transaction id as a field (also
/// `tracing::field::Empty` until known, then recorded with `span.record("txid", ..)`).
#[macro_export]
macro_rules! phase_span {
    ($name:literal, $($fields:tt)*) => {
        ::tracing::info_span!(target: $crate::telemetry::SPAN_TARGET, $name, $($fields)*)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_good_traceparent_is_kept_and_later_versions_are_cut_to_version_00() {
        assert_eq!(
            TraceParent::parse(GOOD).map(|t| t.0),
            Some(GOOD.to_string())
        );
        let later = "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes";
        assert_eq!(
            TraceParent::parse(later).map(|t| t.0),
            Some(GOOD.to_string())
        );
        assert!(TraceParent::parse(GOOD).and_then(|t| t.context()).is_some());
    }

    #[test]
    fn malformed_or_oversized_traceparents_are_ignored() {
        let long = format!("cc{}-{}", &GOOD[2..], "x".repeat(MAX_TRACEPARENT_LEN));
        for bad in [
            "",
            "00",
            &GOOD[..54],
            &format!("{GOOD}-"),
            &GOOD.to_uppercase(),
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331_01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333--01",
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            "00-0af7651916cd43dd8448eb211c80319é-b7ad6b7169203331-01",
            &long,
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn nothing_is_read_or_attached_while_tracing_is_off() {
        let mut m = pb::PaxosMessage {
            traceparent: GOOD.into(),
            ..Default::default()
        };
        assert_eq!(TraceParent::from_pb(&m), None);
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(TRACEPARENT, GOOD.parse().unwrap());
        assert_eq!(TraceParent::from_metadata(&md), None);
        assert!(request(()).metadata().get(TRACEPARENT).is_none());
        m.traceparent.clear();
        attach(&mut m, None);
        assert!(m.traceparent.is_empty());
    }
}
