//! TLS for blkplane as an NBD client (a mirror's `tls-creds=DIR`), and the certificate files
//! both sides read. The directory is laid out as QEMU's `tls-creds-x509,endpoint=client`
//! reads one: `ca-cert.pem` (the authority the server's certificate must come from, and the
//! name in it must be the host the URI names, as QEMU checks), and, if the server asks for
//! one (QEMU's and blkplane's servers do by default), `client-cert.pem` with
//! `client-key.pem`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// The certificates in `dir`/`name` (PEM), at least one.
pub fn certificates(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, String> {
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

/// The private key in `dir`/`name` (PEM).
pub fn private_key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, String> {
    let path = dir.join(name);
    PrivateKeyDer::from_pem_file(&path).map_err(|e| format!("tls-creds: {}: {e}", path.display()))
}

/// The crypto both sides use: ring, without post-quantum key exchange (which the GnuTLS of
/// QEMU's tools does not need): aws-lc-rs would add a large C build for it.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a client needs to start TLS with one server.
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    /// The name the server's certificate must carry: the URI's host.
    pub server_name: ServerName<'static>,
}

impl ClientTls {
    /// Reads the credentials in `dir` for a server reached as `host` (a name or an address).
    pub fn load(dir: &Path, host: &str) -> Result<ClientTls, String> {
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("tls-creds: the host '{host}' cannot be checked: {e}"))?;
        let mut roots = RootCertStore::empty();
        for ca in certificates(dir, "ca-cert.pem")? {
            roots.add(ca).map_err(|e| format!("tls-creds: ca-cert.pem: {e}"))?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls-creds: {e}"))?
            .with_root_certificates(roots);
        // A client certificate is optional, as in QEMU: a server that asks for one refuses
        // the handshake without it.
        let config = if dir.join("client-cert.pem").exists() {
            let chain = certificates(dir, "client-cert.pem")?;
            let key = private_key(dir, "client-key.pem")?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("tls-creds: client-cert.pem and client-key.pem: {e}"))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(ClientTls { config: Arc::new(config), server_name })
    }
}
