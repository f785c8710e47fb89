//! TLS for the uplink: rustls with the ring provider, a `ClientConfig` built by us from a CA
//! file and an optional client certificate and key (mutual TLS).
//!
//! A leaf module taking paths and PEM bytes, not settings: the uplink builds its connection
//! with it and config validation checks the same files with the same parsers, without either
//! importing the other.
//!
//! Server verification is always on. rumqttc's default-config helpers are never used: they
//! load the system store and panic on an unreadable certificate. Exactly one crypto provider
//! (ring) is compiled in, which cross-compiles with Debian's gcc cross compilers alone. The
//! files are read again at every connection epoch, so a rotated certificate is picked up on
//! the next reconnect.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("invalid PEM certificate: {0}")]
    BadCertificate(String),
    #[error("invalid PEM private key (PKCS#8, PKCS#1 or SEC1 expected): {0}")]
    BadKey(String),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Parses a CA bundle into a root store.
pub fn parse_ca(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    // A system bundle may hold a certificate webpki cannot use; skip those, as long as at
    // least one trust anchor remains.
    let mut roots = RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(TlsError::BadCertificate(format!(
            "none of the {unusable} certificates is usable as a trust anchor"
        )));
    }
    Ok(roots)
}

/// Parses a client certificate chain and its private key.
pub fn parse_client_identity(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey(e.to_string()))?;
    Ok((certs, key))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the CA file and the optional client certificate and key (in that order) and builds
/// the client configuration.
pub fn client_config(
    ca_file: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = parse_ca(&read("CA file", ca_file)?)?;
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key)) => {
            let (certs, key) = parse_client_identity(
                &read("client certificate", cert)?,
                &read("client key", key)?,
            )?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
