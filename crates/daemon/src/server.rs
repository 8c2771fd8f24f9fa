//! The HTTP server: hyper's HTTP/1 connections under the limits that keep slow, idle or
//! too many clients from holding the daemon's resources, and one error shape for every route.
//!
//! `axum::serve` has no timeouts and no connection limit (a socket that sends nothing stays
//! open forever), so the daemon accepts connections itself and serves each with hyper:
//!
//! ```text
//!  accept ─► permit? ──no──► 503 {"detail": …}, close        (at most `max_connections`)
//!              │yes
//!              ▼
//!  Metered<TcpStream> (holds the permit, notes when a request head starts)
//!              │
//!  hyper http1 connection ─► service: body under a deadline ─► Router ─► JSON error bodies
//!              ▲
//!  connection task: idle → `idle_timeout`; head begun → `header_read_timeout`; else none
//! ```
//!
//! * **Header read timeout**: a request head must be complete within this time of its first
//!   byte, and a new connection must send its first head within it. (hyper's own `header_read_timeout` starts when the connection goes idle, so it
//!   cannot tell an idle keep-alive connection from a slow head; the daemon tracks both.)
//! * **Idle timeout**: a connection with no request in progress is closed after it (this
//!   also bounds how long a response may wait for a client that does not read it).
//! * **Body read timeout**: the whole body must arrive within this time of its head, else
//!   408 and the connection is closed. Handlers may take as long as they need.
//! * **Connections**: each socket holds a permit for its whole life, websockets included
//!   (the permit travels with the socket through the upgrade). Beyond the limit a socket gets
//!   one 503 answer and is closed; at most [`REFUSALS_IN_FLIGHT`] such answers are written at
//!   once, further sockets are closed at once.
//! * **Error shape**: every 4xx/5xx answer whose body is not JSON (axum's extractor
//!   rejections, unknown routes, wrong methods, quiet webhook answers) is rewritten to
//!   `{"detail": <its text or the status's reason>}`, headers kept. hyper's own answers to
//!   requests it cannot parse (400, and 431 for oversized headers) come before any service
//!   and stay bodiless.
//! * **TLS** (`--tls-cert/--tls-key`): the handshake runs on the connection's task, under the
//!   header read timeout, before hyper sees the socket (so a silent client costs one permit for
//!   at most that long). A client that speaks plain HTTP to the TLS port (its first byte is not
//!   a TLS handshake record) gets one plain `400` saying to use `https://`, and the connection
//!   is closed.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

/// How many "too many connections" answers are written at once; sockets beyond that are
/// closed without one.
pub const REFUSALS_IN_FLIGHT: usize = 64;

/// How long shutdown waits for requests in progress before it stops serving them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The largest error body rewritten into `{"detail": …}` (longer ones are cut).
const MAX_DETAIL_BYTES: usize = 4096;

/// The connection limits (see the module docs); [`crate::DaemonConfig`] holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// A request head must be complete within this time of its first byte.
    pub header_read_timeout: Duration,
    /// A request body must be complete within this time of its head.
    pub body_read_timeout: Duration,
    /// A connection with no request in progress is closed after this time.
    pub idle_timeout: Duration,
    /// Open connections (websockets included) beyond which new ones are refused with 503.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// The PEM files the HTTP API serves TLS with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the TLS files cannot be served; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no certificate.
    #[error("TLS certificate {}: {reason}", path.display())]
    Cert {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file is unreadable or holds no private key.
    #[error("TLS key {}: {reason}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key is not the certificate's).
    #[error("TLS certificate {} with key {}: {reason}", cert.display(), key.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Reads the certificate chain and key and builds the acceptor (rustls with `ring`, HTTP/1.1).
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |path: &Path| std::fs::read(path).map_err(|e| e.to_string());
    let cert_error = |reason: String| TlsError::Cert {
        path: files.cert.clone(),
        reason,
    };
    let key_error = |reason: String| TlsError::Key {
        path: files.key.clone(),
        reason,
    };
    let cert_pem = read(&files.cert).map_err(cert_error)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(cert_error("holds no PEM certificate".to_owned()));
    }
    let key_pem = read(&files.key).map_err(key_error)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| key_error(format!("holds no PEM private key ({e})")))?;
    let pair_error = |e: rustls::Error| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(pair_error)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(pair_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// What a connection is doing, shared by its socket, its service and its task.
struct Activity {
    started: Instant,
    /// Requests whose answer is not made yet.
    in_flight: AtomicUsize,
    /// Milliseconds since `started` at which the connection last became idle (`u64::MAX`:
    /// no request yet).
    idle_since: AtomicU64,
    /// Milliseconds since `started` at which bytes of a new request head arrived while idle
    /// (`u64::MAX`: none yet).
    head_started: AtomicU64,
    /// Wakes the connection task when the deadline may have moved.
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(u64::MAX),
            head_started: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// When the connection must be closed unless something happens first, and why; `None`
    /// while a request is in progress.
    fn deadline(&self, limits: &ServerLimits) -> Option<(Instant, &'static str)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, limit: Duration| self.started + Duration::from_millis(ms) + limit;
        match (
            self.head_started.load(Ordering::Acquire),
            self.idle_since.load(Ordering::Acquire),
        ) {
            (u64::MAX, u64::MAX) => Some((at(0, limits.header_read_timeout), "no request")),
            (u64::MAX, idle) => Some((at(idle, limits.idle_timeout), "idle")),
            (head, _) => Some((
                at(head, limits.header_read_timeout),
                "request head too slow",
            )),
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(u64::MAX, Ordering::Release);
        self.changed.notify_one();
    }

    fn request_answered(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.now_ms(), Ordering::Release);
            self.head_started.store(u64::MAX, Ordering::Release);
        }
        self.changed.notify_one();
    }
}

/// Marks a request answered when dropped (also when its connection goes away mid-request).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_answered();
    }
}

/// A socket that holds its connection permit and tells [`Activity`] when a request head
/// begins. It stays under the websocket after an upgrade, so the permit lasts as long as
/// the socket does.
struct Metered {
    stream: TcpStream,
    activity: Arc<Activity>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            let activity = &self.activity;
            if activity.in_flight.load(Ordering::Acquire) == 0
                && activity.head_started.load(Ordering::Acquire) == u64::MAX
            {
                activity
                    .head_started
                    .store(activity.now_ms(), Ordering::Release);
                activity.changed.notify_one();
            }
        }
        result
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTimedOut(Duration);

/// A request body that fails once its deadline passes (and says so in `timed_out`).
struct TimedBody {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    timed_out: Arc<AtomicBool>,
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut(self.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A JSON error answer: `{"detail": …}`.
pub fn json_error(status: StatusCode, detail: &str) -> Response<Body> {
    let body = serde_json::json!({ "detail": detail }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The body limit of the route at `path` (what its 413 names).
fn body_limit(path: &str) -> usize {
    if path.starts_with("/hooks/") {
        spur_ingest::webhook::MAX_WEBHOOK_BODY
    } else if path == "/api/events" {
        spur_ingest::http::MAX_BODY_BYTES
    } else {
        AXUM_DEFAULT_BODY_LIMIT
    }
}

/// axum's `DefaultBodyLimit` where a route sets none.
const AXUM_DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Rewrites a 4xx/5xx answer whose body is not JSON into `{"detail": …}` (headers kept); a
/// 413 names the route's body limit.
async fn with_json_error_body(response: Response<Body>, path: &str) -> Response<Body> {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_DETAIL_BYTES).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let detail = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the request body is over the limit of {} bytes",
            body_limit(path)
        )
    } else if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let body = serde_json::json!({ "detail": detail }).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// Serves one request: body under its deadline, the router, JSON error bodies.
async fn handle(
    router: Router,
    request: Request<Incoming>,
    activity: Arc<Activity>,
    limits: ServerLimits,
) -> Result<Response<Body>, std::convert::Infallible> {
    activity.request_started();
    let _in_flight = InFlight(activity);
    let path = request.uri().path().to_owned();
    let timed_out = Arc::new(AtomicBool::new(false));
    let request = request.map(|incoming| {
        let inner = Body::new(incoming);
        if inner.is_end_stream() {
            inner
        } else {
            Body::new(TimedBody {
                inner,
                sleep: Box::pin(tokio::time::sleep(limits.body_read_timeout)),
                limit: limits.body_read_timeout,
                timed_out: timed_out.clone(),
            })
        }
    });
    let response = match tower_service::Service::call(&mut router.clone(), request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if timed_out.load(Ordering::Acquire) {
        debug!(limit = ?limits.body_read_timeout, "request body too slow; closing the connection");
        let mut answer = json_error(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the request body did not arrive within {} s",
                limits.body_read_timeout.as_secs_f64()
            ),
        );
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(answer);
    }
    Ok(with_json_error_body(response, &path).await)
}

/// Answers a socket beyond the connection limit with 503 and closes it.
async fn refuse(stream: TcpStream, limit: usize) {
    let body = serde_json::json!({
        "detail": format!("too many connections (the limit is {limit}); retry later")
    })
    .to_string();
    answer_and_close(
        stream,
        "503 Service Unavailable",
        "retry-after: 1\r\n",
        &body,
    )
    .await;
}

/// Writes one plain HTTP answer and closes: reads the request head first (an HTTP client
/// takes an answer that comes before its request for a broken connection), then answers,
/// then drops what else the client sends for a moment, so the answer is not lost to a
/// reset. All of it within about a second.
async fn answer_and_close(mut stream: TcpStream, status: &str, extra_headers: &str, body: &str) {
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n{extra_headers}connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match stream.read(&mut buf).await? {
                0 => return Ok(()),
                n => head.extend_from_slice(&buf[..n]),
            }
        }
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut drained = 0;
        while drained < 64 * 1024 {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves one TLS connection: waits (under the header read timeout) for the first byte,
/// answers plain HTTP with a 400, else shakes hands and serves what comes through.
async fn serve_tls(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    mut connection: Connection,
) {
    let limit = connection.limits.header_read_timeout;
    let peer = connection.peer;
    let mut first = [0u8; 1];
    match tokio::time::timeout(limit, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(Ok(1)) => {
            debug!(%peer, "plain HTTP on the TLS port; answering 400 and closing");
            let body = serde_json::json!({
                "detail": "this port speaks TLS: use https://"
            })
            .to_string();
            answer_and_close(stream, "400 Bad Request", "", &body).await;
            return;
        }
        Ok(_) => return,
        Err(_) => {
            debug!(%peer, "no TLS handshake in time; closing the connection");
            return;
        }
    }
    let metered = connection.meter(stream);
    match tokio::time::timeout(limit, acceptor.accept(metered)).await {
        Ok(Ok(tls)) => connection.drive(TokioIo::new(tls)).await,
        Ok(Err(e)) => debug!(error = %e, %peer, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake too slow; closing the connection"),
    }
}

/// One accepted connection, before its socket is wrapped: what its task needs.
struct Connection {
    router: Router,
    limits: ServerLimits,
    activity: Arc<Activity>,
    permit: Option<OwnedSemaphorePermit>,
    shutdown: watch::Receiver<bool>,
    peer: std::net::SocketAddr,
}

impl Connection {
    /// Wraps the socket; the permit moves into it (so it lasts as long as the socket does,
    /// through a websocket upgrade too).
    fn meter(&mut self, stream: TcpStream) -> Metered {
        Metered {
            stream,
            activity: self.activity.clone(),
            _permit: self.permit.take(),
        }
    }

    /// Serves HTTP/1 on `io` under the connection's deadlines until it ends or shutdown
    /// has drained it.
    async fn drive<I>(self, io: TokioIo<I>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            router,
            limits,
            activity,
            mut shutdown,
            peer,
            ..
        } = self;
        let service = {
            let activity = activity.clone();
            hyper::service::service_fn(move |request| {
                handle(router.clone(), request, activity.clone(), limits)
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.keep_alive(true).header_read_timeout(None);
        let conn = builder.serve_connection(io, service).with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let mut draining = false;
        loop {
            let deadline = activity.deadline(&limits);
            let changed = activity.changed.notified();
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        debug!(error = %e, %peer, "connection ended with an error");
                    }
                    break;
                }
                _ = changed => {}
                _ = async {
                    match deadline {
                        Some((at, _)) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Only if nothing moved the deadline meanwhile.
                    if let Some((at, why)) = activity.deadline(&limits)
                        && at <= Instant::now()
                    {
                        debug!(%peer, reason = why, "closing connection");
                        break;
                    }
                }
                _ = shutdown.changed(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `shutdown` turns
/// true; then stops accepting, lets requests in progress finish (for up to
/// [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let last_refusal_log = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Logged once per 10 s at most (a flood must not flood the log too).
            let now = started.elapsed().as_secs() + 10;
            let last = last_refusal_log.load(Ordering::Relaxed);
            if now >= last + 10 {
                last_refusal_log.store(now, Ordering::Relaxed);
                warn!(limit = limits.max_connections, %peer, "too many connections: refusing new ones with 503");
            }
            if let Ok(writer) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, limits.max_connections).await;
                    drop(writer);
                });
            }
            continue;
        };
        let mut connection = Connection {
            router: router.clone(),
            limits,
            activity: Arc::new(Activity::new()),
            permit: Some(permit),
            shutdown: shutdown.clone(),
            peer,
        };
        let open = open_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => serve_tls(stream, acceptor, connection).await,
                None => {
                    let io = TokioIo::new(connection.meter(stream));
                    connection.drive(io).await
                }
            }
            drop(open);
        });
    }
    drop(open_rx);
    if tokio::time::timeout(SHUTDOWN_GRACE, open_tx.closed())
        .await
        .is_err()
    {
        warn!("requests still in progress after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_follow_what_the_connection_is_doing() {
        let limits = ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..ServerLimits::default()
        };
        let a = Activity::new();
        let (at, why) = a.deadline(&limits).expect("a deadline");
        assert_eq!(
            (at, why),
            (a.started + limits.header_read_timeout, "no request")
        );
        a.request_started();
        assert_eq!(
            a.deadline(&limits),
            None,
            "handlers take as long as they need"
        );
        a.request_answered();
        assert_eq!(a.deadline(&limits).map(|d| d.1), Some("idle"));
        a.head_started.store(5_000, Ordering::Release);
        let (at, why) = a.deadline(&limits).expect("a deadline");
        assert_eq!(why, "request head too slow");
        assert_eq!(at, a.started + Duration::from_secs(15));
    }

    #[tokio::test]
    async fn error_bodies_become_json_and_keep_their_headers() {
        let mut response = Response::new(Body::from("Failed to deserialize query string"));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        let rewritten = with_json_error_body(response, "/api/runs").await;
        assert_eq!(rewritten.status(), StatusCode::BAD_REQUEST);
        assert_eq!(rewritten.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            rewritten.headers()[header::CONTENT_TYPE],
            "application/json"
        );
        let body = axum::body::to_bytes(rewritten.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).expect("JSON"),
            serde_json::json!({"detail": "Failed to deserialize query string"})
        );
        // An empty 405 says its reason; a 413 names the route's limit; JSON and 2xx stay.
        let mut empty = Response::new(Body::empty());
        *empty.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        let body = axum::body::to_bytes(with_json_error_body(empty, "/x").await.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(&body[..], br#"{"detail":"Method Not Allowed"}"#);
        let mut large = Response::new(Body::from("length limit exceeded"));
        *large.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        let body = axum::body::to_bytes(
            with_json_error_body(large, "/hooks/abc").await.into_body(),
            1024,
        )
        .await
        .expect("body");
        assert!(String::from_utf8_lossy(&body).contains("1048576 bytes"));
        let json = json_error(StatusCode::CONFLICT, "already");
        let body = axum::body::to_bytes(with_json_error_body(json, "/x").await.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(&body[..], br#"{"detail":"already"}"#);
        let ok = Response::new(Body::from("ok"));
        let body =
            axum::body::to_bytes(with_json_error_body(ok, "/healthz").await.into_body(), 1024)
                .await
                .expect("body");
        assert_eq!(&body[..], b"ok");
    }
}
