//! The server's TLS credentials, read from a directory laid out as QEMU's `tls-creds-x509`
//! reads one: `ca-cert.pem` (the authority clients' certificates must come from),
//! `server-cert.pem` (the chain, leaf first) and `server-key.pem`. With `verify-peer=on`
//! (QEMU's default) a client must show a certificate that `ca-cert.pem` signed; QEMU's
//! tools send `client-cert.pem` and `client-key.pem` from their own directory.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

fn certificates(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let path = dir.join(name);
    let certs: Vec<_> = CertificateDer::pem_file_iter(&path)
        .map_err(|e| format!("tls-creds: {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls-creds: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("tls-creds: {} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The TLS configuration of the credentials in `dir`, checked whole: every file there and
/// readable, the key matching the certificate.
pub fn load(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, String> {
    // ring, without post-quantum key exchange (which the GnuTLS of QEMU's tools does not
    // need): aws-lc-rs would add a large C build for it.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(dir, "server-cert.pem")?;
    let key_path = dir.join("server-key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("tls-creds: {}: {e}", key_path.display()))?;
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
