//! `tether cert`: the files of a self-signed secure setup in one step. A private CA signs the
//! coordinator's certificate for the names it is reached by; workers and client commands
//! trust that CA with `--ca-file`. A fleet secret is written too, unless one exists.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::output::outln;
use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Names the certificate is valid for when none are given.
const DEFAULT_NAMES: &[&str] = &["localhost", "127.0.0.1"];
/// Default validity, days.
const DEFAULT_DAYS: u32 = 365;
/// Longest validity, days (a hundred years).
const MAX_DAYS: u32 = 36_500;
/// Random bytes of a generated fleet secret (written as twice as many hex digits).
const SECRET_BYTES: usize = 32;

#[derive(clap::Args, Debug)]
pub struct CertArgs {
    /// Directory to write ca.pem, cert.pem, key.pem and fleet.secret into (created if missing).
    #[arg(long, default_value = "tether-certs")]
    out: PathBuf,
    /// A DNS name or IP address the coordinator is reached by; repeat for several
    /// (default: localhost and 127.0.0.1).
    #[arg(long = "name")]
    names: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = DEFAULT_DAYS)]
    days: u32,
    /// Replace certificate files that exist (a fleet secret that exists is always kept).
    #[arg(long)]
    force: bool,
}

impl CertArgs {
    /// Certificates for localhost and 127.0.0.1, valid for a day, into `out` (tests and
    /// `tether stress --tls`).
    pub fn local(out: PathBuf) -> Self {
        Self {
            out,
            names: Vec::new(),
            days: 1,
            force: false,
        }
    }
}

/// What `tether cert` wrote.
#[derive(Debug)]
pub struct Written {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub secret: PathBuf,
    /// Whether the fleet secret was created now (false: an existing one was kept).
    pub new_secret: bool,
}

pub async fn run(a: CertArgs) -> anyhow::Result<()> {
    let w = write(&a)?;
    let names = effective_names(&a.names).join(", ");
    outln!(
        "wrote {} (the CA: give it to workers and client commands as --ca-file)",
        w.ca.display()
    )?;
    outln!(
        "wrote {} and {} (the coordinator's certificate for {names}, and its key)",
        w.cert.display(),
        w.key.display()
    )?;
    if w.new_secret {
        outln!(
            "wrote {} (a new fleet secret; keep it private)",
            w.secret.display()
        )?;
    } else {
        outln!(
            "kept {} (the fleet secret that was there)",
            w.secret.display()
        )?;
    }
    let (ca, cert, key, secret) = (
        w.ca.display(),
        w.cert.display(),
        w.key.display(),
        w.secret.display(),
    );
    outln!()?;
    let host = url_host(&effective_names(&a.names)[0]);
    outln!("  tether coordinator --listen 0.0.0.0:8765 --tls-cert {cert} --tls-key {key} \\")?;
    outln!("      --secret-file {secret} --message-mac --admin-token-file <tokens>")?;
    outln!(
        "  tether worker --coordinator wss://{host}:8765 --id <worker-id> --ca-file {ca} --secret-file {secret} --message-mac"
    )?;
    outln!("  tether tasks --coordinator https://{host}:8765 --ca-file {ca} --token-file <token>")?;
    Ok(())
}

/// `name` (a DNS name or an IP address the certificate is for) as the host of a URL: an IPv6
/// address in brackets. The commands printed name the first name given, where they showed
/// `<name>` for the user to fill in.
fn url_host(name: &str) -> String {
    match name.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{name}]"),
        Err(_) => name.to_owned(),
    }
}

fn effective_names(names: &[String]) -> Vec<String> {
    if names.is_empty() {
        DEFAULT_NAMES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        names.to_vec()
    }
}

/// Creates the CA, the coordinator certificate signed by it, and (when missing) the secret.
pub fn write(a: &CertArgs) -> anyhow::Result<Written> {
    if !(1..=MAX_DAYS).contains(&a.days) {
        bail!("--days must be between 1 and {MAX_DAYS}");
    }
    let names = effective_names(&a.names);
    for n in &names {
        check_name(n)?;
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create directory {}", a.out.display()))?;
    let w = Written {
        ca: a.out.join("ca.pem"),
        cert: a.out.join("cert.pem"),
        key: a.out.join("key.pem"),
        secret: a.out.join("fleet.secret"),
        new_secret: false,
    };
    if !a.force {
        for p in [&w.ca, &w.cert, &w.key] {
            if p.exists() {
                bail!(
                    "{} exists; give --force to replace the certificates",
                    p.display()
                );
            }
        }
    }
    // From yesterday, so a worker whose clock is a little behind still accepts it; until the
    // midnight (UTC) after `--days` full days from now (a date's certificate time is its
    // midnight: `today + days` would leave one made at 23:59 a minute of its last day).
    use chrono::Datelike;
    let ymd = |d: chrono::NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    let today = chrono::Utc::now().date_naive();
    let from = ymd(today - chrono::Days::new(1));
    let until = ymd(today + chrono::Days::new(u64::from(a.days) + 1));

    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = name("tether private CA");
    ca.not_before = from;
    ca.not_after = until;
    let ca_cert = ca.self_signed(&ca_key).context("sign the CA")?;

    let key = KeyPair::generate().context("generate the coordinator key")?;
    let mut leaf = CertificateParams::new(names.clone())
        .with_context(|| format!("names {names:?} are not DNS names or IP addresses"))?;
    leaf.distinguished_name = name("tether coordinator");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = from;
    leaf.not_after = until;
    let issuer = Issuer::new(ca, ca_key);
    let cert = leaf
        .signed_by(&key, &issuer)
        .context("sign the coordinator certificate")?;

    write_file(&w.ca, ca_cert.pem().as_bytes(), false)?;
    write_file(&w.cert, cert.pem().as_bytes(), false)?;
    write_file(&w.key, key.serialize_pem().as_bytes(), true)?;
    let new_secret = !w.secret.exists();
    if new_secret {
        write_secret(&w.secret)?;
    }
    Ok(Written { new_secret, ..w })
}

/// Writes a new random fleet secret (hex), readable by its owner only.
pub(crate) fn write_secret(path: &Path) -> anyhow::Result<()> {
    let secret = tether_proto::auth::to_hex(&rand::random::<[u8; SECRET_BYTES]>());
    write_file(path, format!("{secret}\n").as_bytes(), true)
}

/// A name a worker can verify the certificate against: an IP address or a DNS name, as the
/// worker's TLS client (rustls) parses them.
fn check_name(name: &str) -> anyhow::Result<()> {
    rustls::pki_types::ServerName::try_from(name)
        .map(|_| ())
        .map_err(|_| anyhow::anyhow!("--name {name:?} is neither a DNS name nor an IP address"))
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common);
    dn
}

/// Writes a file; a private one is created readable by its owner only.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // A file replaced with --force keeps its old mode at open: tighten it first.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_name;

    /// A certificate made for `--days 1` is valid a whole day from now at any time of day:
    /// it is served for at least that long (it used to expire at the next midnight).
    #[test]
    fn a_certificate_lasts_at_least_the_days_asked_for() {
        let dir = tempfile::tempdir().expect("dir");
        let w = super::write(&super::CertArgs::local(dir.path().to_owned())).expect("write");
        let pem = std::fs::read(&w.cert).expect("cert");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let day_from_now = chrono::Utc::now().timestamp() + 86_400;
        let until = cert.validity().not_after.timestamp();
        assert!(until >= day_from_now, "{until} < {day_from_now}");
        assert!(until <= day_from_now + 86_400, "no more than a day over");
    }

    #[test]
    fn names_are_dns_names_or_ip_addresses() {
        for ok in [
            "localhost",
            "127.0.0.1",
            "::1",
            "coordinator.example",
            "a-b.c",
        ] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["bad name!", "", "a..b", "http://x", "x/y"] {
            let e = check_name(bad).expect_err(bad);
            assert!(e.to_string().contains("neither a DNS name"), "{e}");
        }
    }
}
