//! x509 credentials made with openssl for the tests' TLS: laid out as QEMU's
//! `tls-creds-x509` reads a directory (ca-cert.pem, server-cert.pem and server-key.pem for a
//! server; ca-cert.pem, client-cert.pem and client-key.pem for a client).

use std::path::Path;
use std::process::Command;

/// Makes `dir`/{srv,good,foreign,nocert}: the server's credentials (a CA, and a certificate
/// for `server_ips` and localhost it signed), a client's of the same CA, a client's whose
/// certificate another CA signed (its ca-cert.pem trusts both, so that the client itself
/// accepts the server and its own certificate), and a client with no certificate at all.
pub fn make_certs(dir: &Path, server_ips: &[&str]) {
    let names: Vec<String> = server_ips.iter().map(|ip| format!("IP:{ip}")).collect();
    let script = format!(
        r#"
set -e
ca() {{ openssl req -x509 -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1-cert.pem -days 2 -subj "/CN=$1"; }}
leaf() {{
  openssl req -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1.csr -subj "/CN=$1"
  printf '%s\n' "$3" > $1.ext
  openssl x509 -req -in $1.csr -CA $2-cert.pem -CAkey $2-key.pem -CAcreateserial -out $1-cert.pem -days 2 -extfile $1.ext
}}
ca ca; ca otherca
leaf server ca "subjectAltName={},DNS:localhost
extendedKeyUsage=serverAuth"
leaf client ca "extendedKeyUsage=clientAuth"
leaf foreign otherca "extendedKeyUsage=clientAuth"
mkdir srv good foreign nocert
cp ca-cert.pem server-cert.pem server-key.pem srv/
cp ca-cert.pem good/; cp client-cert.pem client-key.pem good/
cat ca-cert.pem otherca-cert.pem > foreign/ca-cert.pem
cp foreign-cert.pem foreign/client-cert.pem; cp foreign-key.pem foreign/client-key.pem
cp ca-cert.pem nocert/
"#,
        names.join(",")
    );
    let out = Command::new("bash").arg("-c").arg(&script).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "making certificates with openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
