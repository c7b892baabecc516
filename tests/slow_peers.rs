//! Slow peers, tried as an attacker would: a client dripping its body at
//! one byte a second to `VerifyWebhookLayer`, and a receiver that answers
//! and then drips its body to `WebhookSink`. Neither holds the other for
//! longer than its deadline.
#![cfg(all(feature = "verify", feature = "webhook"))]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use eventsink::signature::Secret;
use eventsink::verify::{self, VerifyConfig, VerifyWebhookLayer};
use eventsink::webhook::classify::RESPONSE_BODY_TIMEOUT;
use eventsink::{Error, Event, Retryable, SinkExt, WebhookSink};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;

/// Room for a loaded CI machine on top of each deadline; the bound is still
/// far below what the peer would hold without the deadline.
const SLACK: Duration = Duration::from_secs(10);

/// Serves `layer` around a handler that counts its calls, with hyper's
/// HTTP/1 server on loopback.
async fn serve(layer: VerifyWebhookLayer) -> (SocketAddr, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let handler = tower::service_fn(move |_: Request<Full<Bytes>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    });
    let service = ServiceBuilder::new().layer(layer).service(handler);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, handled)
}

/// Reads until the peer closes the connection (an orderly close, or a reset
/// because it left our dripped bytes unread), and returns what arrived.
async fn read_until_closed(reader: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buf = [0; 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => return answer,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return answer,
            Err(error) => panic!("reading the answer: {error}"),
        }
    }
}

#[tokio::test]
async fn a_body_dripped_at_one_byte_a_second_is_cut_off_with_408() {
    let deadline = Duration::from_secs(1);
    let secret = Secret::generate().unwrap();
    let config = VerifyConfig::new(secret.clone()).body_timeout(deadline);
    let (addr, handled) = serve(VerifyWebhookLayer::new(config)).await;

    // Valid headers, signed over the body: only its pace is wrong.
    let body =
        br#"{"kind":"ping","id":"evt_slow","payload":{},"created_at":"2026-11-29T00:00:00Z"}"#;
    let now = chrono::Utc::now().timestamp();
    let signed = verify::sign(std::slice::from_ref(&secret), "evt_slow", now, body).unwrap();
    let mut head = format!(
        "POST /hook HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in &signed {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("\r\n");

    let (mut reader, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
    let drip = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for byte in body {
            tick.tick().await;
            writer.write_all(&[*byte]).await?;
        }
        Ok::<_, std::io::Error>(())
    });

    let answer = tokio::time::timeout(deadline + SLACK, read_until_closed(&mut reader))
        .await
        .expect("the server closes the connection soon after the body deadline");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(
        answer.contains("the webhook body did not arrive within 1000 ms"),
        "{answer}"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0, "the handler never ran");
    drip.abort();
}

/// Reads one request: its head and `content-length` bytes of body.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut data = Vec::new();
    let mut buf = [0; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                return Ok(());
            }
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        data.extend_from_slice(&buf[..n]);
    }
}

/// A receiver that answers `status_line` promptly with a 1000-byte body,
/// and then sends that body at one byte a second.
async fn dripping_receiver(status_line: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            tokio::spawn(answer_and_drip(stream, status_line));
        }
    });
    addr
}

/// Reads the request, answers at once, then drips the body until the
/// client goes away.
async fn answer_and_drip(mut stream: TcpStream, status_line: &str) -> std::io::Result<()> {
    read_request(&mut stream).await?;
    let head = format!("{status_line}\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        stream.write_all(b"x").await?;
    }
}

/// Publishes one event to a receiver answering `status_line` and dripping
/// its body, with an attempt timeout far above the bound the answer must
/// come within.
async fn publish_to_dripping(status_line: &'static str) -> Result<(), Error> {
    let addr = dripping_receiver(status_line).await;
    let mut sink = WebhookSink::builder(format!("http://{addr}/hook"))
        .secret(Secret::generate().unwrap())
        .attempt_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    tokio::time::timeout(
        RESPONSE_BODY_TIMEOUT + SLACK,
        sink.publish(Event::new("ping", json!({}))),
    )
    .await
    .expect("publish returns once the answer's body deadline passes, not after the attempt timeout")
}

#[tokio::test]
async fn a_receiver_dripping_its_answer_does_not_hold_publish() {
    let (delivered, refused) = tokio::join!(
        publish_to_dripping("HTTP/1.1 200 OK"),
        publish_to_dripping("HTTP/1.1 503 Service Unavailable"),
    );
    delivered.expect("a 2xx is a delivery, however slow its body");
    let error = refused.unwrap_err();
    assert!(
        matches!(error, Error::Http { status, .. } if status == 503),
        "{error:?}"
    );
    assert!(error.is_retryable());
}
