//! TLS for the coordinator's one listener (`wss://` for workers, `https://` for the API): a
//! certificate chain and a private key from PEM files, served with rustls.
//!
//! The files are read again when they change (looked at, at most, every
//! [`RELOAD_CHECK`] at a handshake), so a renewed certificate is served without a restart
//! that would drop every worker's session. A certificate that is expired or not valid yet is
//! refused at start (every worker would refuse it, and stop after three refusals) and never
//! replaces the one served; one that expires within [`EXPIRY_WARNING`] is warned of.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often, at most, a handshake looks whether the certificate or key file changed.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// A certificate that expires sooner than this is warned of, at start and at each reload.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("TLS key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Config(#[from] rustls::Error),
}

/// A rustls server configuration from a PEM certificate chain and a PEM private key, which
/// serves the files' new contents once they change.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = CertFiles::load(cert, key, provider.clone(), RELOAD_CHECK)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(files));
    // Workers reconnect after every network fault. With a session ticket a reconnecting worker
    // resumes its TLS session (a key exchange, no certificate and no signature); stateless
    // tickets, under keys that rotate in memory every 6 hours, serve any number of workers,
    // where rustls's default session cache remembers 256.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// The certificate served, read from its files and read again when they change.
#[derive(Debug)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    check_every: Duration,
    served: RwLock<Arc<CertifiedKey>>,
    /// When the files were last looked at, and what they held then: a change is read once,
    /// whether it loads or not.
    looked: Mutex<(Instant, Stamp)>,
}

/// What tells the files changed: a digest of their contents (a modification time is only as
/// fine as the kernel's clock tick, and a renewed certificate often has the size of the old
/// one); `None` while either cannot be read.
type Stamp = Option<[u8; 32]>;

/// The certificate file's and the key file's contents, read together.
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Contents {
    fn read(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| std::fs::read(path).map_err(|e| (path.to_owned(), e.to_string()));
        let cert = read(cert).map_err(|(path, reason)| TlsError::Cert { path, reason })?;
        let key = read(key).map_err(|(path, reason)| TlsError::Key { path, reason })?;
        Ok(Self { cert, key })
    }

    fn stamp(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((self.cert.len() as u64).to_le_bytes());
        h.update(&self.cert);
        h.update(&self.key);
        h.finalize().into()
    }
}

impl CertFiles {
    fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
        check_every: Duration,
    ) -> Result<Self, TlsError> {
        let contents = Contents::read(cert, key)?;
        let served = certified_key((cert, key), &contents, &provider, SystemTime::now())?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            check_every,
            served: RwLock::new(Arc::new(served)),
            looked: Mutex::new((Instant::now(), Some(contents.stamp()))),
        })
    }

    /// Reads the files again if they changed since they were last looked at (at most every
    /// `check_every`). A change that does not load (a half-written file, a key that does not
    /// match, a certificate expired, a file gone) is logged once and the certificate served
    /// stays.
    fn reload_if_changed(&self) {
        let contents = {
            let mut looked = self.looked.lock().unwrap_or_else(|p| p.into_inner());
            if looked.0.elapsed() < self.check_every {
                return;
            }
            looked.0 = Instant::now();
            let contents = Contents::read(&self.cert, &self.key);
            let now = contents.as_ref().ok().map(Contents::stamp);
            if now == looked.1 {
                return;
            }
            looked.1 = now;
            contents
        };
        let paths = (self.cert.as_path(), self.key.as_path());
        let loaded =
            contents.and_then(|c| certified_key(paths, &c, &self.provider, SystemTime::now()));
        match loaded {
            Ok(new) => {
                *self.served.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
                tracing::info!(cert = %self.cert.display(), key = %self.key.display(), "TLS certificate changed on disk: serving the new one");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate or key changed on disk but cannot be served; the previous certificate is served still");
            }
        }
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        Some(
            self.served
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The chain and the key of `contents` (read from the files `cert` and `key`), checked to
/// match and the certificate to be valid at `now`.
fn certified_key(
    (cert, key): (&Path, &Path),
    contents: &Contents,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<CertifiedKey, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: cert.to_owned(),
        reason,
    };
    let key_error = |reason: String| TlsError::Key {
        path: key.to_owned(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    let Some(leaf) = certs.first() else {
        return Err(cert_error("no certificate in it".into()));
    };
    check_validity(leaf, now).map_err(cert_error)?;
    let der = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => key_error(
            "no private key in it (PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE \
             KEY\", unencrypted)"
                .into(),
        ),
        e => key_error(e.to_string()),
    })?;
    CertifiedKey::from_der(certs, der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_error(format!(
            "not the key of the certificate in {}",
            cert.display()
        )),
        e => key_error(e.to_string()),
    })
}

/// Whether the end-entity certificate is valid at `now`: workers refuse one that is not,
/// and one refused three times in a row stops a worker. Warns of one expiring soon.
fn check_validity(leaf: &CertificateDer<'_>, now: SystemTime) -> Result<(), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the certificate cannot be read: {e}"))?;
    let validity = parsed.validity();
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (from, until) = (validity.not_before, validity.not_after);
    if now_s < from.timestamp() {
        return Err(format!("the certificate is not valid before {from}"));
    }
    if now_s > until.timestamp() {
        return Err(format!(
            "the certificate expired on {until}: workers would refuse it"
        ));
    }
    let left = (until.timestamp() - now_s) as u64;
    if left < EXPIRY_WARNING.as_secs() {
        tracing::warn!(expires = %until, days_left = left / 86_400, "the TLS certificate expires soon: replace its file (the coordinator serves the new one without a restart)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    /// A self-signed certificate for localhost valid from `from` to `until` days from now,
    /// written with its key into `dir` as cert.pem and key.pem.
    fn write_cert(dir: &Path, from: i64, until: i64) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        let day = |d: i64| {
            let t = chrono::Utc::now() + chrono::Duration::days(d);
            use chrono::Datelike;
            rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8)
        };
        params.not_before = day(from);
        params.not_after = day(until);
        let cert = params.self_signed(&key).expect("sign");
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn an_expired_or_not_yet_valid_certificate_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -30, -1);
        let e = server_config(&c, &k).expect_err("expired").to_string();
        assert!(e.contains("expired on"), "{e}");
        let (c, k) = write_cert(dir.path(), 2, 30);
        let e = server_config(&c, &k)
            .expect_err("not yet valid")
            .to_string();
        assert!(e.contains("not valid before"), "{e}");
        let (c, k) = write_cert(dir.path(), -1, 30);
        server_config(&c, &k).expect("valid");
    }

    #[test]
    fn a_key_file_without_a_key_or_with_another_key_is_named_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, _) = write_cert(dir.path(), -1, 30);
        let e = server_config(&c, &c).expect_err("no key").to_string();
        assert!(e.contains("no private key in it"), "{e}");
        let other = dir.path().join("other");
        std::fs::create_dir(&other).expect("dir");
        let (_, k) = write_cert(&other, -1, 30);
        let e = server_config(&c, &k).expect_err("another key").to_string();
        assert!(e.contains("not the key of the certificate"), "{e}");
    }

    /// A renewed certificate is served once its files change; a change that cannot be served
    /// (expired, or a key of another certificate) leaves the previous one served.
    #[test]
    fn a_changed_certificate_is_served_and_a_bad_change_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_cert(dir.path(), -1, 30);
        let files = CertFiles::load(&c, &k, provider(), Duration::ZERO).expect("load");
        let served = || {
            files.reload_if_changed();
            files.served.read().expect("served").cert[0].clone()
        };
        let first = served();
        assert_eq!(served(), first, "unchanged files: the same certificate");
        let renewed = dir.path().join("renewed");
        std::fs::create_dir(&renewed).expect("dir");
        let (c2, k2) = write_cert(&renewed, -1, 60);
        std::fs::copy(&c2, &c).expect("copy");
        std::fs::copy(&k2, &k).expect("copy");
        let second = served();
        assert_ne!(second, first, "the renewed certificate is served");
        assert_eq!(second, CertificateDer::from_pem_file(&c).expect("pem"));
        // Expired: refused, the renewed one stays.
        let (c3, k3) = write_cert(&renewed, -30, -2);
        std::fs::copy(&c3, &c).expect("copy");
        std::fs::copy(&k3, &k).expect("copy");
        assert_eq!(served(), second);
        // The certificate alone replaced (its key not yet): refused until the key comes.
        let (c4, k4) = write_cert(&renewed, -1, 90);
        std::fs::copy(&c4, &c).expect("copy");
        assert_eq!(served(), second);
        std::fs::copy(&k4, &k).expect("copy");
        assert_eq!(served(), CertificateDer::from_pem_file(&c4).expect("pem"));
    }
}
