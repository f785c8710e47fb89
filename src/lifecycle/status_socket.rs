//! The local status socket that `ferry status` talks to.
//!
//! Protocol: the client writes one line, `status`, and reads one line of JSON (the same
//! document as the `status` command). The socket is created with mode 0660 (owner and group:
//! the service user and root). A stale socket file from a killed agent is replaced; a socket
//! another agent still answers on is an error (two agents must not share a spool anyway).

use crate::control::Control;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST_BYTES: u64 = 256;

/// Binds the socket; `None` (with a WARN) if it cannot, since the agent is useful without it.
pub async fn bind(path: &Path) -> Option<UnixListener> {
    if UnixStream::connect(path).await.is_ok() {
        warn!(socket = %path.display(), "Another process answers on the status socket; `ferry status` will talk to it, not to this agent.");
        return None;
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match UnixListener::bind(path) {
        Ok(l) => {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
            Some(l)
        }
        Err(e) => {
            warn!(socket = %path.display(), error = %e, "Cannot create the status socket; `ferry status` will not work.");
            None
        }
    }
}

/// Answers status requests until `stop`; removes the socket file at the end.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    control: Control,
    stop: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let control = control.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, control).await {
                        debug!(error = %e, "Status client went away.");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "Status socket accept failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(stream: UnixStream, control: Control) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let reply = match line.trim() {
        "status" => control.status().await,
        other => {
            serde_json::json!({ "error": format!("unknown request {other:?}; send `status`") })
        }
    };
    write.write_all(format!("{reply}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Client side: asks the agent listening on `path` for its status.
pub async fn request_status(path: &Path) -> std::io::Result<serde_json::Value> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(b"status\n").await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(read).read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from the agent"))??;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
