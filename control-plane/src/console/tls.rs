//! HTTPS for the console when TLS is on: the gRPC listener's certificate files (reloaded the same
//! way, through [`crate::tls::Reloading`]), ALPN `http/1.1`, handshakes off the accept loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// The certificate and key files of `HERALD_TLS_CERT` and `HERALD_TLS_KEY`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Accepted, handshaken connections, as `axum::serve` takes them.
pub struct Listener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Listener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept loop stopped (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Starts accepting TLS connections on `listener` until `stop`.
pub fn listen(
    listener: TcpListener,
    files: &TlsFiles,
    stop: CancellationToken,
) -> Result<Listener, crate::tls::Error> {
    let local = listener.local_addr().map_err(|e| crate::tls::Error::Cert {
        path: files.cert.clone(),
        reason: e.to_string(),
    })?;
    let resolver = crate::tls::Reloading::new(files.cert.clone(), files.key.clone())?;
    tokio::spawn(resolver.clone().watch(stop.clone()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::tls::Error::Cert {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::warn!(error = %err, "console accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "console TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%peer, "console TLS handshake timed out"),
                }
            });
        }
    });
    Ok(Listener {
        connections: rx,
        local,
    })
}
