//! The admin endpoint, on its own (loopback) address, off the shared port:
//! `GET /metrics` (Prometheus text) and `POST /reload`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// A reload asked for over the admin endpoint; the answer says what
/// happened, or why the new configuration was refused.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

/// Serves the admin endpoint until the task is dropped. Reload requests go
/// to `reload`, whose receiver applies them.
pub async fn serve(listener: TcpListener, reload: mpsc::Sender<ReloadRequest>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("admin: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let reload = reload.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, peer, reload.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("admin: {peer}: {e}");
            }
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    reload: mpsc::Sender<ReloadRequest>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, crate::metrics::get().render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::POST, "/reload") => {
            log::info!("admin: reload asked by {peer}");
            let (tx, rx) = oneshot::channel();
            if reload.send(tx).await.is_err() {
                text(StatusCode::SERVICE_UNAVAILABLE, "mux is stopping\n".into())
            } else {
                match rx.await {
                    Ok(Ok(done)) => text(StatusCode::OK, format!("{done}\n")),
                    Ok(Err(why)) => text(StatusCode::UNPROCESSABLE_ENTITY, format!("{why}\n")),
                    Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "mux is stopping\n".into()),
                }
            }
        }
        (_, "/metrics" | "/reload") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics, POST /reload\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "GET /metrics, POST /reload\n".into()),
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
