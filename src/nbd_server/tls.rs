//! The server's TLS credentials, read from a directory laid out as QEMU's `tls-creds-x509`
//! reads one: `ca-cert.pem` (the authority clients' certificates must come from),
//! `server-cert.pem` (the chain, leaf first) and `server-key.pem`. With `verify-peer=on`
//! (QEMU's default) a client must show a certificate that `ca-cert.pem` signed; QEMU's
//! tools send `client-cert.pem` and `client-key.pem` from their own directory.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::engine::nbd::tls::{certificates, private_key, provider};

/// The TLS configuration of the credentials in `dir`, checked whole: every file there and
/// readable, the key matching the certificate.
pub fn load(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let chain = certificates(dir, "server-cert.pem")?;
    let key = private_key(dir, "server-key.pem")?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls-creds: {e}"))?;
    let builder = if verify_peer {
        let mut roots = RootCertStore::empty();
        for ca in certificates(dir, "ca-cert.pem")? {
            roots.add(ca).map_err(|e| format!("tls-creds: ca-cert.pem: {e}"))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("tls-creds: ca-cert.pem: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls-creds: server-cert.pem and server-key.pem: {e}"))?;
    Ok(Arc::new(config))
}
