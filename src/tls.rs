//! The one TLS client configuration, shared by the IdP client and the proxy's upstream client: rustls
//! with the aws-lc-rs provider (the only crypto provider in the build), the system's roots, and an
//! optional extra CA file. Never disables verification.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// The crypto provider used everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs the process-wide default provider (for libraries that ask for it). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Builds a client config trusting the system's roots plus `ca_file`. `alpn` is left empty: callers
/// set the protocols they speak.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A malformed system certificate is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::CaFile {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::CaFile {
                path: path.display().to_string(),
                message: "no PEM certificates in it".to_string(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::CaFile {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// What to add to a connection error whose TLS cause rustls words cryptically: a server that
/// answered the hello in plain HTTP ("received corrupt message of type InvalidContentType"), or
/// one that presents a CA certificate as its own ("Other(OtherError(CaUsedAsEndEntity))").
pub fn tls_hint(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut next = Some(e);
    while let Some(e) = next {
        // An `io::Error` shows, but does not give as its source, the error it wraps.
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => e.source(),
        };
        if let Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) =
            e.downcast_ref()
        {
            return " (the server speaks plain HTTP, not TLS: give it an http:// URL)";
        }
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
            e.downcast_ref()
            && other.to_string().contains("CaUsedAsEndEntity")
        {
            return " (the server presents a CA certificate as its own: it needs a server certificate issued by that CA, with the CA in proxy.ca_file)";
        }
    }
    ""
}
