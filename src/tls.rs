//! Certificates for TLS between nodes (mutual) and on the client port:
//! generating a private CA with node certificates (`eddy certs generate`),
//! and loading the PEM files a node is started with. The only module that
//! knows rcgen and rustls; tonic under `raft` takes the PEM bytes from here,
//! and the HTTP listener under `api` takes a [`ClientPortTls`] acceptor.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A node's TLS identity and the CA that its peers' certificates must
/// chain to, as PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity { .. }")
    }
}

impl TlsIdentity {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(io_err(p));
        let id = Self {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            ca_pem: read(ca)?,
        };
        for (what, pem, path) in [
            ("certificate", &id.cert_pem, cert),
            ("private key", &id.key_pem, key),
            ("CA certificate", &id.ca_pem, ca),
        ] {
            if !pem.starts_with(b"-----BEGIN ") {
                return Err(TlsError::Invalid(format!(
                    "{}: not a PEM {what}",
                    path.display()
                )));
            }
        }
        Ok(id)
    }
}

/// TLS for the client (HTTP and WebSocket) port: the server certificate
/// and key a node presents to SDKs, workers and load balancers. Clients are
/// not asked for certificates; they authenticate with service tokens.
#[derive(Clone)]
pub struct ClientPortTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ClientPortTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientPortTls { .. }")
    }
}

impl ClientPortTls {
    /// Load a PEM certificate chain and its private key (`--tls-cert`,
    /// `--tls-key`).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = std::fs::read(cert).map_err(io_err(cert))?;
        let key_pem = std::fs::read(key).map_err(io_err(key))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Invalid(format!("TLS certificate: {e}")))?;
        if chain.is_empty() {
            return Err(TlsError::Invalid(
                "TLS certificate: no PEM certificate found".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsError::Invalid(format!("TLS private key: {e}")))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Invalid(format!("TLS certificate and key: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
        })
    }

    /// Run the server side of a handshake on an accepted connection.
    pub async fn accept<IO>(
        &self,
        stream: IO,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.acceptor.accept(stream).await
    }
}

/// What `generate` wrote.
#[derive(Debug)]
pub struct Generated {
    pub files: Vec<PathBuf>,
}

/// Write a new CA (`ca.pem`, `ca-key.pem`) and, for each node name, a
/// certificate valid for server and client authentication (`NAME.pem`,
/// `NAME-key.pem`) for the names `NAME`, `localhost`, `127.0.0.1` and
/// `extra_names`; with `secret`, also a random `cluster-secret`. Existing
/// files are left alone unless `force`, so running it twice keeps a
/// cluster's identity.
pub fn generate(
    out: &Path,
    nodes: &[String],
    extra_names: &[String],
    secret: bool,
    force: bool,
) -> Result<Generated, TlsError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let ca_path = out.join("ca.pem");
    let ca_key_path = out.join("ca-key.pem");
    let mut files = Vec::new();
    if ca_path.exists() && !force {
        return Err(TlsError::Invalid(format!(
            "{} exists: keep it, or pass --force to make a new CA (every node then needs new certificates)",
            ca_path.display()
        )));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Eddy cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&ca_path, ca_cert.pem().as_bytes(), false)?;
    write(&ca_key_path, ca_key.serialize_pem().as_bytes(), true)?;
    files.extend([ca_path, ca_key_path]);
    let issuer = Issuer::new(ca_params, ca_key);
    for node in nodes {
        if node.is_empty() || node.contains(['/', '\\']) {
            return Err(TlsError::Invalid(format!("bad node name {node:?}")));
        }
        let mut names = vec![node.clone(), "localhost".into(), "127.0.0.1".into()];
        names.extend(extra_names.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, node);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let (c, k) = (
            out.join(format!("{node}.pem")),
            out.join(format!("{node}-key.pem")),
        );
        write(&c, cert.pem().as_bytes(), false)?;
        write(&k, key.serialize_pem().as_bytes(), true)?;
        files.extend([c, k]);
    }
    if secret {
        let path = out.join("cluster-secret");
        let value = format!(
            "{}{}\n",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        write(&path, value.as_bytes(), true)?;
        files.push(path);
    }
    Ok(Generated { files })
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_ca_node_certificates_and_a_secret_and_keeps_an_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = vec!["eddy-1".to_string(), "eddy-2".to_string()];
        let g = generate(dir.path(), &nodes, &["eddy.example".into()], true, false).unwrap();
        assert_eq!(g.files.len(), 7);
        let id = TlsIdentity::load(
            &dir.path().join("eddy-1.pem"),
            &dir.path().join("eddy-1-key.pem"),
            &dir.path().join("ca.pem"),
        )
        .unwrap();
        assert!(id.key_pem.starts_with(b"-----BEGIN PRIVATE KEY"));
        let secret = std::fs::read_to_string(dir.path().join("cluster-secret")).unwrap();
        assert_eq!(secret.trim().len(), 64);
        assert!(generate(dir.path(), &nodes, &[], true, false).is_err());
    }
}
