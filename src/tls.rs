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
///
/// Nodes call each other's client ports too: a node passes an admin call
/// it cannot serve (a membership change) to the leader's client port, with
/// the caller's admin token. Every node of a cluster serves its client port
/// the same way, so a node with TLS there calls the leader over TLS and
/// verifies the leader's certificate against [`ClientPortTls::with_ca`]'s
/// CA, for the host name in the leader's recorded HTTP address.
#[derive(Clone)]
pub struct ClientPortTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: Option<tokio_rustls::TlsConnector>,
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
        // The client port speaks HTTP/1.1 (and WebSocket) only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
            connector: None,
        })
    }

    /// Trust other nodes' client ports whose certificates chain to this CA
    /// (PEM, one or more certificates).
    pub fn with_ca(mut self, ca_pem: &[u8]) -> Result<Self, TlsError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| TlsError::Invalid(format!("TLS CA: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Invalid(format!("TLS CA: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Invalid("TLS CA: no PEM certificate found".into()));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        self.connector = Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            config,
        )));
        Ok(self)
    }

    /// Whether this node can verify other nodes' client ports (it was
    /// given a CA for them).
    pub fn verifies_other_nodes(&self) -> bool {
        self.connector.is_some()
    }

    /// Run the client side of a handshake with another node's client port
    /// at `host` (a DNS name or an IP address), verifying its certificate.
    pub async fn connect<IO>(
        &self,
        host: &str,
        stream: IO,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio_rustls::rustls::pki_types::ServerName;
        let connector = self.connector.as_ref().ok_or_else(|| {
            std::io::Error::other(
                "this node has no CA to verify other nodes' client ports (--tls-ca)",
            )
        })?;
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
            .to_owned();
        connector.connect(name, stream).await
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

/// Whether the certificate `cert_der` (DER, as a peer presented it) is
/// valid for `host` by its subject alternative names: the check a node
/// makes of a peer it dials at `host`. Between nodes over mutual TLS, this
/// ties a connection to the members whose recorded address has that host
/// (see the Forward handling under `raft`). Certificates from
/// `eddy certs generate` name their node, `localhost` and `127.0.0.1`, so
/// nodes on different hosts are told apart; nodes sharing a host, or
/// sharing one certificate (a wildcard), are not.
pub fn certificate_valid_for_host(cert_der: &[u8], host: &str) -> bool {
    use tokio_rustls::rustls::client::verify_server_name;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::server::ParsedCertificate;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    let der = CertificateDer::from(cert_der);
    ParsedCertificate::try_from(&der).is_ok_and(|cert| verify_server_name(&cert, &name).is_ok())
}

/// The host part of a `host:port` address (`[v6]:port` included).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What `generate` wrote.
#[derive(Debug)]
pub struct Generated {
    pub files: Vec<PathBuf>,
}

/// Where `generate` writes the CA's private key unless told otherwise: a
/// subdirectory of the output, so that mounting the output's files (or
/// `kubectl create secret --from-file=DIR/`, which skips subdirectories)
/// never hands the CA key to a node.
pub const CA_KEY_SUBDIR: &str = "private";

/// Write a new CA (`ca.pem`, and its key `ca-key.pem` into `ca_key_dir`,
/// default `out/private/`) and, for each node name, a certificate valid
/// for server and client authentication (`NAME.pem`, `NAME-key.pem`) for
/// the names `NAME`, `localhost`, `127.0.0.1` and `extra_names`; with
/// `secrets`, also a random `cluster-secret` and `admin-token`. Nodes need
/// everything in `out`, each only its own certificate and key; none needs
/// the CA key. Existing files are left alone unless `force`, so running it
/// twice keeps a cluster's identity.
pub fn generate(
    out: &Path,
    ca_key_dir: Option<&Path>,
    nodes: &[String],
    extra_names: &[String],
    secrets: bool,
    force: bool,
) -> Result<Generated, TlsError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let ca_key_dir = ca_key_dir.map_or_else(|| out.join(CA_KEY_SUBDIR), Path::to_path_buf);
    let ca_path = out.join("ca.pem");
    let ca_key_path = ca_key_dir.join("ca-key.pem");
    let mut files = Vec::new();
    if ca_path.exists() && !force {
        return Err(TlsError::Invalid(format!(
            "{} exists: keep it, or pass --force to make a new CA (every node then needs new certificates)",
            ca_path.display()
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&ca_key_dir)
        .map_err(io_err(&ca_key_dir))?;
    // The key of a CA replaced with --force, where earlier versions wrote
    // it beside the node files.
    let stale_key = out.join("ca-key.pem");
    if stale_key != ca_key_path && stale_key.exists() {
        std::fs::remove_file(&stale_key).map_err(io_err(&stale_key))?;
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
    if secrets {
        for name in ["cluster-secret", "admin-token"] {
            let path = out.join(name);
            write(&path, random_secret().as_bytes(), true)?;
            files.push(path);
        }
    }
    Ok(Generated { files })
}

/// 256 random bits as 64 hex digits and a newline.
pub fn random_secret() -> String {
    format!(
        "{}{}\n",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
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
    fn generates_a_ca_node_certificates_and_secrets_and_keeps_an_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = vec!["eddy-1".to_string(), "eddy-2".to_string()];
        let g = generate(
            dir.path(),
            None,
            &nodes,
            &["eddy.example".into()],
            true,
            false,
        )
        .unwrap();
        assert_eq!(g.files.len(), 8);
        // Nodes mount the output's files; the CA key is not among them.
        let top: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!top.iter().any(|f| f.starts_with("ca-key")), "{top:?}");
        let ca_key = dir.path().join(CA_KEY_SUBDIR).join("ca-key.pem");
        assert!(
            std::fs::read(&ca_key)
                .unwrap()
                .starts_with(b"-----BEGIN PRIVATE KEY")
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(ca_key.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the CA key's directory is open to others");
        let admin = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
        assert_eq!(admin.trim().len(), 64);
        let id = TlsIdentity::load(
            &dir.path().join("eddy-1.pem"),
            &dir.path().join("eddy-1-key.pem"),
            &dir.path().join("ca.pem"),
        )
        .unwrap();
        assert!(id.key_pem.starts_with(b"-----BEGIN PRIVATE KEY"));
        let secret = std::fs::read_to_string(dir.path().join("cluster-secret")).unwrap();
        assert_eq!(secret.trim().len(), 64);
        assert_ne!(secret, admin);
        assert!(generate(dir.path(), None, &nodes, &[], true, false).is_err());
    }

    #[test]
    fn certificates_are_valid_for_their_node_and_the_shared_names_only() {
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        let dir = tempfile::tempdir().unwrap();
        let nodes = vec!["eddy-1".to_string(), "10.0.0.2".to_string()];
        generate(dir.path(), None, &nodes, &[], false, false).unwrap();
        let der = |name: &str| {
            CertificateDer::from_pem_file(dir.path().join(format!("{name}.pem")))
                .unwrap()
                .to_vec()
        };
        let (one, two) = (der("eddy-1"), der("10.0.0.2"));
        assert!(certificate_valid_for_host(&one, "eddy-1"));
        assert!(certificate_valid_for_host(&one, "EDDY-1"));
        assert!(!certificate_valid_for_host(&one, "10.0.0.2"));
        assert!(certificate_valid_for_host(&two, "10.0.0.2"));
        assert!(!certificate_valid_for_host(&two, "eddy-1"));
        assert!(certificate_valid_for_host(&two, "127.0.0.1"));
        assert!(!certificate_valid_for_host(b"not a certificate", "eddy-1"));
        assert_eq!(host_of("eddy-1:9090"), "eddy-1");
        assert_eq!(host_of("[::1]:9090"), "::1");
    }
}
