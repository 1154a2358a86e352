//! `tether cert`: the files of a self-signed secure setup in one step. A private CA signs the
//! coordinator's certificate for the names it is reached by; workers and client commands
//! trust that CA with `--ca-file`. A fleet secret is written too, unless one exists. The CA's
//! key is kept beside it (`ca-key.pem`, private) and the CA lives long (`--ca-days`), so that
//! `tether cert --renew` signs the coordinator a new certificate that every worker trusting
//! `ca.pem` accepts as it is: renewing with a new CA stopped every worker at its next full
//! handshake.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::output::outln;
use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Names the certificate is valid for when none are given.
const DEFAULT_NAMES: &[&str] = &["localhost", "127.0.0.1"];
/// Default validity of the coordinator's certificate, days.
const DEFAULT_DAYS: u32 = 365;
/// Default validity of a new CA, days (ten years): the coordinator's certificate is renewed
/// under it (`--renew`) that long, with no change on any worker.
const DEFAULT_CA_DAYS: u32 = 3650;
/// Longest validity, days (a hundred years).
const MAX_DAYS: u32 = 36_500;
/// Random bytes of a generated fleet secret (written as twice as many hex digits).
const SECRET_BYTES: usize = 32;

#[derive(clap::Args, Debug)]
pub struct CertArgs {
    /// Directory to write ca.pem, ca-key.pem, cert.pem, key.pem and fleet.secret into
    /// (created if missing); with --renew, the directory whose CA signs the new certificate.
    #[arg(long, default_value = "tether-certs")]
    out: PathBuf,
    /// A DNS name or IP address the coordinator is reached by; repeat for several
    /// (default: localhost and 127.0.0.1; with --renew, the names of the certificate renewed).
    #[arg(long = "name")]
    names: Vec<String>,
    /// Days the coordinator's certificate is valid.
    #[arg(long, default_value_t = DEFAULT_DAYS)]
    days: u32,
    /// Days a new CA is valid: the coordinator's certificate can be renewed under it
    /// (--renew) until then, with nothing to change on workers.
    #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
    ca_days: u32,
    /// Sign a new certificate and key for the coordinator (cert.pem, key.pem) with the CA in
    /// --out (ca.pem and ca-key.pem, kept), which workers and clients trust already.
    #[arg(long, conflicts_with_all = ["force", "ca_days"])]
    renew: bool,
    /// Replace certificate files that exist, the CA among them: workers trusting the old CA
    /// refuse the new certificate (a fleet secret that exists is always kept).
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
            ca_days: 1,
            renew: false,
            force: false,
        }
    }
}

/// What `tether cert` wrote.
#[derive(Debug)]
pub struct Written {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub secret: PathBuf,
    /// Whether the fleet secret was created now (false: an existing one was kept).
    pub new_secret: bool,
    /// Whether a CA that was there was replaced (`--force`): workers trusting it refuse the
    /// new certificate.
    pub replaced_ca: bool,
}

impl Written {
    fn paths(out: &Path) -> Self {
        Written {
            ca: out.join("ca.pem"),
            ca_key: out.join("ca-key.pem"),
            cert: out.join("cert.pem"),
            key: out.join("key.pem"),
            secret: out.join("fleet.secret"),
            new_secret: false,
            replaced_ca: false,
        }
    }
}

pub async fn run(a: CertArgs) -> anyhow::Result<()> {
    if a.renew {
        let r = renew(&a)?;
        return say_renewed(&r);
    }
    let w = write(&a)?;
    let names = effective_names(&a.names).join(", ");
    outln!(
        "wrote {} (the CA, valid {} days: give it to workers and client commands as --ca-file)",
        w.ca.display(),
        a.ca_days
    )?;
    outln!(
        "wrote {} (the CA's key: keep it private; tether cert --renew --out {} signs the next certificate with it)",
        w.ca_key.display(),
        a.out.display()
    )?;
    outln!(
        "wrote {} and {} (the coordinator's certificate for {names}, valid {} days, and its key)",
        w.cert.display(),
        w.key.display(),
        a.days
    )?;
    if w.replaced_ca {
        outln!(
            "replaced the CA that was in {}: workers and clients trusting the old one refuse the new certificate at their next full TLS handshake; to renew under the old CA, use --renew (see docs/SECURITY.md, \"Renewing the certificate\")",
            w.ca.display()
        )?;
    }
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

/// What `tether cert --renew` did, and what the operator does next.
fn say_renewed(r: &Renewed) -> anyhow::Result<()> {
    let (ca, ca_key, cert, key) = (
        r.files.ca.display(),
        r.files.ca_key.display(),
        r.files.cert.display(),
        r.files.key.display(),
    );
    outln!(
        "wrote {cert} and {key} (a new certificate for {}, valid until {} UTC, and its key)",
        r.names.join(", "),
        r.until
    )?;
    outln!(
        "kept {ca} and {ca_key} (the CA that signed it, valid until {} UTC): workers and clients trusting {ca} accept the new certificate as they are",
        r.ca_until
    )?;
    outln!()?;
    outln!(
        "next: nothing to restart. A coordinator started with --tls-cert {cert} --tls-key {key} reads them again by itself: a TLS handshake {}s or more after its last look starts a look, and the handshakes after it are served the new certificate (its log says \"TLS certificate changed on disk: serving the new one\"). One that serves copies of these files needs both copied.",
        tether_coordinator::tls::RELOAD_CHECK.as_secs()
    )?;
    if r.ca_days_left < CA_RENEWAL_NOTICE_DAYS {
        outln!(
            "note: the CA ends in {} days; before then, rotate it (docs/SECURITY.md, \"Rotating the CA\")",
            r.ca_days_left
        )?;
    }
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

/// Creates the CA (its key kept), the coordinator certificate signed by it, and (when missing)
/// the secret.
pub fn write(a: &CertArgs) -> anyhow::Result<Written> {
    check_days("--days", a.days)?;
    check_days("--ca-days", a.ca_days)?;
    if a.days > a.ca_days {
        bail!(
            "--days {} is longer than the CA's --ca-days {}: the certificate would outlive the CA that signs it",
            a.days,
            a.ca_days
        );
    }
    let names = effective_names(&a.names);
    for n in &names {
        check_name(n)?;
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create directory {}", a.out.display()))?;
    let w = Written::paths(&a.out);
    if !a.force {
        for p in [&w.ca, &w.ca_key, &w.cert, &w.key] {
            if p.exists() {
                bail!(
                    "{} exists; give --renew to sign a new certificate with the CA there, or --force to replace the CA and the certificate (workers trusting that CA then refuse the new certificate)",
                    p.display()
                );
            }
        }
    }
    let replaced_ca = w.ca.exists();
    let today = chrono::Utc::now().date_naive();
    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let ca = ca_params(from(today), until(today, a.ca_days));
    let ca_cert = ca.self_signed(&ca_key).context("sign the CA")?;
    let ca_key_pem = ca_key.serialize_pem();
    let (cert, key) = leaf(&names, today, a.days, &Issuer::new(ca, ca_key))?;

    write_file(&w.ca_key, ca_key_pem.as_bytes(), true)?;
    write_file(&w.ca, ca_cert.pem().as_bytes(), false)?;
    write_file(&w.key, key.as_bytes(), true)?;
    write_file(&w.cert, cert.as_bytes(), false)?;
    let new_secret = !w.secret.exists();
    if new_secret {
        write_secret(&w.secret)?;
    }
    Ok(Written {
        new_secret,
        replaced_ca,
        ..w
    })
}

/// What `tether cert --renew` wrote.
#[derive(Debug)]
pub struct Renewed {
    pub files: Written,
    /// The names the new certificate is for.
    pub names: Vec<String>,
    /// The end of the new certificate's validity.
    pub until: chrono::NaiveDateTime,
    /// The end of the CA's validity.
    pub ca_until: chrono::NaiveDateTime,
    /// Whole days from now to the CA's end.
    pub ca_days_left: i64,
}

/// A CA with fewer days left than this is noted at a renewal: time to rotate it.
const CA_RENEWAL_NOTICE_DAYS: i64 = 365;

/// Signs a new certificate and key for the coordinator with the CA in `a.out` (`ca.pem` and
/// `ca-key.pem`, both kept), for `a.names` or else the names of the certificate there. The
/// new certificate is checked to verify against `ca.pem` for each name, as a worker verifies
/// it, before anything is written. Refused, with nothing written, when the CA's key is not
/// there (a directory an older `tether cert` made: the CA has to be rotated), is not the key
/// of `ca.pem`, or the CA ends before the new certificate would.
pub fn renew(a: &CertArgs) -> anyhow::Result<Renewed> {
    check_days("--days", a.days)?;
    let w = Written::paths(&a.out);
    let ca_pem = std::fs::read(&w.ca).with_context(|| {
        format!(
            "cannot read the CA certificate {} to renew under (make a new setup with tether cert --out {})",
            w.ca.display(),
            a.out.display()
        )
    })?;
    let ca_key_pem = match std::fs::read_to_string(&w.ca_key) {
        Ok(k) => k,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} is missing: the CA's key was not kept (tether cert did not keep it before it wrote ca-key.pem), so no certificate can be signed that workers trusting {} accept. Rotate the CA instead (docs/SECURITY.md, \"Rotating the CA\"): make a new setup with tether cert --out <new-dir>, give every worker and client a --ca-file holding both CAs (cat {} <new-dir>/ca.pem > both.pem), then serve <new-dir>/cert.pem and <new-dir>/key.pem",
            w.ca_key.display(),
            w.ca.display(),
            w.ca.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the CA key {}", w.ca_key.display()));
        }
    };
    let ca_der = CertificateDer::from_pem_slice(&ca_pem)
        .map_err(|e| anyhow::anyhow!("{} holds no PEM certificate: {e}", w.ca.display()))?;
    let ca_parts = Parts::of(&ca_der)
        .with_context(|| format!("{} is not an X.509 certificate", w.ca.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| anyhow::anyhow!("{} holds no private key: {e}", w.ca_key.display()))?;
    if ca_key.subject_public_key_info() != ca_parts.spki {
        bail!(
            "{} is not the key of the CA in {}: put the CA's own key there (or rotate the CA: docs/SECURITY.md, \"Rotating the CA\")",
            w.ca_key.display(),
            w.ca.display()
        );
    }
    let names = if a.names.is_empty() {
        leaf_names(&w.cert)?
    } else {
        a.names.clone()
    };
    for n in &names {
        check_name(n)?;
    }
    let now = chrono::Utc::now();
    let today = now.date_naive();
    let ca_until = ca_parts.not_after;
    let ends = until(today, a.days).and_time(chrono::NaiveTime::MIN);
    if ca_until <= now.naive_utc() {
        bail!(
            "the CA in {} expired on {ca_until} UTC: every worker refuses what it signs; rotate it (docs/SECURITY.md, \"Rotating the CA\")",
            w.ca.display()
        );
    }
    if ends > ca_until {
        let most = (ca_until.date() - today).num_days() - 1;
        let shorter = match most {
            1.. => format!("give --days {most} or fewer to renew until then, and "),
            _ => String::new(),
        };
        bail!(
            "the CA in {} ends on {ca_until} UTC, before a certificate of --days {} would (on {ends} UTC): {shorter}rotate the CA before it ends (docs/SECURITY.md, \"Rotating the CA\")",
            w.ca.display(),
            a.days
        );
    }
    // The issuer as the CA was made: its name is what the new certificate's issuer field
    // holds, its key what signs. A CA made otherwise (another name) fails the check below.
    let issuer = Issuer::new(ca_params(from(today), from(today)), ca_key);
    let (cert, key) = leaf(&names, today, a.days, &issuer)?;
    verify(&ca_der, &cert, &names).with_context(|| {
        format!(
            "the new certificate does not verify against {} (was it made by tether cert?); nothing was written: rotate the CA (docs/SECURITY.md, \"Rotating the CA\")",
            w.ca.display()
        )
    })?;
    // Each file whole (renamed into place). A coordinator that looks between the two renames
    // reads a pair that does not match: it says so once and serves the old pair until its
    // next look, which finds both new.
    write_file(&w.key, key.as_bytes(), true)?;
    write_file(&w.cert, cert.as_bytes(), false)?;
    Ok(Renewed {
        files: w,
        names,
        until: ends,
        ca_until,
        ca_days_left: (ca_until - now.naive_utc()).num_days(),
    })
}

fn check_days(flag: &str, days: u32) -> anyhow::Result<()> {
    if !(1..=MAX_DAYS).contains(&days) {
        bail!("{flag} must be between 1 and {MAX_DAYS}");
    }
    Ok(())
}

/// A certificate's start: yesterday, so that a worker whose clock is a little behind still
/// accepts it.
fn from(today: chrono::NaiveDate) -> chrono::NaiveDate {
    today - chrono::Days::new(1)
}

/// A certificate's end: the midnight (UTC) after `days` full days from now (a date's
/// certificate time is its midnight: `today + days` would leave one made at 23:59 a minute of
/// its last day).
fn until(today: chrono::NaiveDate, days: u32) -> chrono::NaiveDate {
    today + chrono::Days::new(u64::from(days) + 1)
}

/// Makes `params` valid from the midnight (UTC) that begins `from` to the one that begins
/// `until`.
fn valid(params: &mut CertificateParams, from: chrono::NaiveDate, until: chrono::NaiveDate) {
    use chrono::Datelike;
    let ymd = |d: chrono::NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    params.not_before = ymd(from);
    params.not_after = ymd(until);
}

/// The CA's parameters, valid from `from` until `until`: a renewal signs with these (their
/// name and key usages), so they stay as the CA was made.
fn ca_params(from: chrono::NaiveDate, until: chrono::NaiveDate) -> CertificateParams {
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = name("tether private CA");
    valid(&mut ca, from, until);
    ca
}

/// A new coordinator certificate for `names`, valid `days` from `today`, signed by `issuer`,
/// and its new key, both PEM.
fn leaf(
    names: &[String],
    today: chrono::NaiveDate,
    days: u32,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generate the coordinator key")?;
    let mut leaf = CertificateParams::new(names.to_vec())
        .with_context(|| format!("names {names:?} are not DNS names or IP addresses"))?;
    leaf.distinguished_name = name("tether coordinator");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    valid(&mut leaf, from(today), until(today, days));
    let cert = leaf
        .signed_by(&key, issuer)
        .context("sign the coordinator certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The names of the coordinator certificate at `path`, for a renewal given no `--name`.
fn leaf_names(path: &Path) -> anyhow::Result<Vec<String>> {
    let give = "give the names it is for with --name";
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read {} for its names; {give}", path.display()))?;
    let names = CertificateDer::from_pem_slice(&pem)
        .ok()
        .and_then(|der| Parts::of(&der))
        .map(|p| p.names)
        .unwrap_or_default();
    if names.is_empty() {
        bail!("{} names no DNS name or IP address; {give}", path.display());
    }
    Ok(names)
}

/// Checks that `cert_pem` verifies for each of `names` against the CA `ca` alone, now, as a
/// worker with `--ca-file ca.pem` verifies the coordinator.
fn verify(ca: &CertificateDer<'_>, cert_pem: &str, names: &[String]) -> anyhow::Result<()> {
    use rustls::client::danger::ServerCertVerifier;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).context("the CA as a trust anchor")?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .context("a verifier")?;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the new certificate: {e}"))?;
    for n in names {
        let server = rustls::pki_types::ServerName::try_from(n.as_str())
            .map_err(|_| anyhow::anyhow!("{n:?} is not a name to verify"))?;
        verifier
            .verify_server_cert(&cert, &[], &server, &[], rustls::pki_types::UnixTime::now())
            .with_context(|| format!("for {n}"))?;
    }
    Ok(())
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

/// Writes a file whole or not at all: a temporary file beside it, synced, renamed over it
/// (a coordinator looking at its certificate meanwhile reads the old file or the new one,
/// never half of one), and the directory synced. A private one is readable by its owner
/// only from its creation; others are 0644.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    // `tempfile` makes it 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(dir)
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    if !private {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // The rename durable: a crash after `tether cert` said it wrote the files keeps them.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What a renewal reads from a certificate: the CA's end and public key, and the names of the
/// certificate renewed.
struct Parts {
    /// The end of its validity (UTC).
    not_after: chrono::NaiveDateTime,
    /// Its SubjectPublicKeyInfo, whole (tag and length too), as [`PublicKeyData`] gives a key's.
    spki: Vec<u8>,
    /// Its DNS names and IP addresses.
    names: Vec<String>,
}

impl Parts {
    /// The parts of the certificate `der`, or `None` if it is not one (or its SubjectAltName
    /// cannot be read).
    fn of(der: &[u8]) -> Option<Parts> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let not_after =
            chrono::DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)?.naive_utc();
        let san = cert.subject_alternative_name().ok()?;
        let names = san
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some((*d).to_owned()),
                        GeneralName::IPAddress(a) => ip(a).map(|a| a.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Parts {
            not_after,
            spki: cert.tbs_certificate.subject_pki.raw.to_vec(),
            names,
        })
    }
}

/// The address of a SubjectAltName's iPAddress (4 or 16 bytes); `None` for other lengths.
fn ip(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::check_name;
    use rustls::pki_types::pem::PemObject;

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

    /// What a renewal reads of a setup is what was written: the CA's end in both time forms
    /// (UTCTime until 2049, GeneralizedTime after), the CA's public key as its kept key has it
    /// (the check that `ca-key.pem` belongs to `ca.pem`), and the certificate's DNS names and
    /// IP addresses of both families (the names a renewal given no `--name` keeps).
    #[test]
    fn a_renewal_reads_the_ca_end_and_key_and_the_names_a_setup_was_written_with() {
        use rcgen::PublicKeyData;
        let dir = tempfile::tempdir().expect("dir");
        for ca_days in [30, super::MAX_DAYS] {
            let mut a = super::CertArgs::local(dir.path().join(ca_days.to_string()));
            a.names = ["coordinator.example", "10.1.2.3", "::1"]
                .map(String::from)
                .to_vec();
            a.ca_days = ca_days;
            let before = chrono::Utc::now().date_naive();
            let w = super::write(&a).expect("write");
            let after = chrono::Utc::now().date_naive();
            let parts = |path: &std::path::Path| {
                let pem = std::fs::read(path).expect("pem");
                let der = super::CertificateDer::from_pem_slice(&pem).expect("der");
                super::Parts::of(&der).expect("parts")
            };
            let ca = parts(&w.ca);
            let ends =
                [before, after].map(|d| super::until(d, ca_days).and_time(chrono::NaiveTime::MIN));
            assert!(
                ends.contains(&ca.not_after),
                "{} not in {ends:?}",
                ca.not_after
            );
            let key = std::fs::read_to_string(&w.ca_key).expect("ca key");
            let key = rcgen::KeyPair::from_pem(&key).expect("key");
            assert_eq!(ca.spki, key.subject_public_key_info());
            assert!(ca.names.is_empty(), "{:?}", ca.names);
            assert_eq!(parts(&w.cert).names, a.names);
        }
    }

    /// Damaged input is refused, never a panic: every cut of a certificate.
    #[test]
    fn a_cut_certificate_is_not_read() {
        let dir = tempfile::tempdir().expect("dir");
        let w = super::write(&super::CertArgs::local(dir.path().to_owned())).expect("write");
        let pem = std::fs::read(&w.cert).expect("pem");
        let der = super::CertificateDer::from_pem_slice(&pem).expect("der");
        assert!(super::Parts::of(&der).is_some());
        for len in 0..der.len() {
            assert!(super::Parts::of(&der[..len]).is_none(), "cut at {len}");
        }
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
