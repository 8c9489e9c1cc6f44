//! Bounds every server of the project applies to what a caller sends, so that no input,
//! however large, costs more than a bounded amount of memory, and the answer to one that is
//! too large says so in the code gRPC gives that meaning (RESOURCE_EXHAUSTED).

use http::header::HeaderValue;

/// Largest request a server decodes: far above any honest message (a statement is at most
/// 1 MiB, a batch of Paxos messages a few hundred KiB).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Most transactions in one audit question or answer (ListProofs, Outcomes, ListCommitted):
/// a page of them stays far below the message limit.
pub const MAX_AUDIT_PAGE: usize = 10_000;

/// tonic answers a request above the decoding limit with OUT_OF_RANGE; gRPC's own status
/// for a message larger than the receiver accepts is RESOURCE_EXHAUSTED, which is what a
/// client should see. The status of a unary call refused while decoding travels in the
/// response headers (a trailers-only response), where this rewrites it.
pub fn resource_exhausted_for_large_messages<B>(
    mut response: http::Response<B>,
) -> http::Response<B> {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").map(HeaderValue::as_bytes) == Some(b"11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    response
}

/// The layer for `Server::builder().layer(...)`.
pub fn layer<B>() -> tower::util::MapResponseLayer<fn(http::Response<B>) -> http::Response<B>> {
    tower::util::MapResponseLayer::new(resource_exhausted_for_large_messages::<B>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_for_size_becomes_resource_exhausted() {
        let mut r = http::Response::new(());
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("11"));
        r.headers_mut().insert(
            "grpc-message",
            HeaderValue::from_static("Error,%20decoded%20message%20length%20too%20large"),
        );
        let r = resource_exhausted_for_large_messages(r);
        assert_eq!(r.headers()["grpc-status"], "8");
        let mut other = http::Response::new(());
        other
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_static("11"));
        let other = resource_exhausted_for_large_messages(other);
        assert_eq!(other.headers()["grpc-status"], "11");
    }
}
