//! Connections: the accept loop over hyper's HTTP/1 server. What axum's own
//! `serve` does not bound is bounded here: a client gets `header_timeout` to
//! send a request's headers (a slow or idle client, keep-alive included, is
//! then disconnected); bodies have their own deadline, in [`super::body`].
//! On shutdown the listener closes at once, idle connections close, requests
//! in flight finish, then the loop returns.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::server::metrics;

/// Serve `router` on `listener` until `shutdown` completes, then drain.
pub async fn serve_connections(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        let open = metrics::OpenConnection::accepted();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    metrics::header_timeout();
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(open);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// An `accept` error: a connection that failed before it was accepted is
/// skipped; running out of file descriptors (or another resource) pauses
/// accepting briefly instead of spinning, and the service goes on.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "cannot accept a connection; pausing 50 ms");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
