//! Certificates a terminate listener presents: PEM chains and keys (PKCS#8,
//! PKCS#1 RSA or SEC1 EC), chosen per connection by SNI, reloadable.
//!
//! The first certificate is the default, used for clients that send no
//! SNI (browsers reaching the proxy by IP address) or a name no certificate
//! covers. Otherwise the first certificate whose SANs cover the SNI is
//! presented. [`CertStore::reload`] re-reads the files; a set that fails to
//! load leaves the running one in place, and handshakes in progress keep
//! the certificate they started with.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::context::CertFiles;

/// A certificate or key that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file could not be read or holds no PEM item of the kind needed.
    #[error("{path}: {what}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The key does not fit the certificate, or rustls refused it.
    #[error("{cert}: {what}")]
    Pair {
        /// The certificate file.
        cert: String,
        /// What is wrong.
        what: String,
    },
    /// No certificate configured.
    #[error("a terminate listener needs at least one certificate")]
    Empty,
}

/// Load one chain and key.
pub fn load(files: &CertFiles) -> Result<Arc<CertifiedKey>, CertError> {
    let file_err = |p: &Path, what: String| CertError::File {
        path: p.display().to_string(),
        what,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_err(&files.cert, pem_reason(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&files.cert, pem_reason(e)))?;
    if chain.is_empty() {
        return Err(file_err(
            &files.cert,
            "no CERTIFICATE block found (expected a PEM certificate chain)".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        file_err(
            &files.key,
            match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no PRIVATE KEY block found (expected PKCS#8, RSA or EC PEM)".into()
                }
                e => pem_reason(e),
            },
        )
    })?;
    ParsedCertificate::try_from(&chain[0]).map_err(|e| CertError::Pair {
        cert: files.cert.display().to_string(),
        what: format!("cannot parse the certificate: {e}"),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| CertError::Pair {
        cert: files.cert.display().to_string(),
        what: format!("key {} does not fit: {e}", files.key.display()),
    })?;
    Ok(Arc::new(ck))
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => format!("cannot read: {e}"),
        Error::NoItemsFound => "no PEM item found".into(),
        e => format!("not valid PEM: {e:?}"),
    }
}

/// Whether `cert`'s SANs cover `name` (a DNS name or IP address).
pub fn covers(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(parsed) = ParsedCertificate::try_from(cert) else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &server_name).is_ok()
}

/// Warnings for route names no certificate covers: clients that reach the
/// listener by such a name would see a certificate name mismatch. A
/// wildcard route is checked with a sample name one label below it.
pub fn uncovered(leaves: &[CertificateDer<'_>], routes: &crate::route::RouteTable) -> Vec<String> {
    use crate::route::SniPattern;
    routes
        .patterns()
        .into_iter()
        .filter(|p| {
            let sample = match p {
                SniPattern::Exact(n) => n.clone(),
                SniPattern::Wildcard(s) => format!("sample.{s}"),
            };
            !leaves.iter().any(|c| covers(c, &sample))
        })
        .map(|p| {
            format!(
                "no certificate covers route name {p}; clients using it will see a name mismatch"
            )
        })
        .collect()
}

/// The certificates of one listener, replaceable while it runs.
#[derive(Debug)]
pub struct CertStore {
    files: Vec<CertFiles>,
    current: RwLock<Arc<Vec<Arc<CertifiedKey>>>>,
}

impl CertStore {
    /// Load every pair; any failure fails the whole set.
    pub fn load(files: Vec<CertFiles>) -> Result<CertStore, CertError> {
        let set = load_all(&files)?;
        Ok(CertStore {
            files,
            current: RwLock::new(Arc::new(set)),
        })
    }

    /// Re-read the files. On error the running certificates stay.
    pub fn reload(&self) -> Result<usize, CertError> {
        let set = load_all(&self.files)?;
        let n = set.len();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(n)
    }

    /// The certificate for `sni`.
    pub fn choose(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let set = Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()));
        if let (Some(name), true) = (sni, set.len() > 1) {
            if let Some(ck) = set.iter().find(|ck| covers(&ck.cert[0], name)) {
                return Some(Arc::clone(ck));
            }
        }
        set.first().cloned()
    }

    /// The end-entity certificates, in order.
    pub fn leaves(&self) -> Vec<CertificateDer<'static>> {
        let set = self.current.read().unwrap_or_else(|p| p.into_inner());
        set.iter().map(|ck| ck.cert[0].clone()).collect()
    }
}

fn load_all(files: &[CertFiles]) -> Result<Vec<Arc<CertifiedKey>>, CertError> {
    if files.is_empty() {
        return Err(CertError::Empty);
    }
    files.iter().map(load).collect()
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name())
    }
}

/// The rustls server configuration of a terminate listener: TLS 1.2 and
/// 1.3, ALPN `http/1.1` only, certificates from `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_no_client_auth()
    .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A self-signed certificate and its key, as PEM.
#[derive(Debug)]
pub struct Generated {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8, ECDSA P-256).
    pub key_pem: String,
}

/// Generate a self-signed certificate for `sans` (`DNS:name`, `IP:addr`,
/// or a bare name or address), valid from yesterday for `days` days. The
/// first SAN is also the subject's common name.
pub fn generate(sans: &[String], days: u32) -> Result<Generated, String> {
    if sans.is_empty() {
        return Err("give at least one --san (DNS:name or IP:address)".into());
    }
    let mut names = Vec::new();
    for s in sans {
        let (kind, value) = match s.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("dns") || k.eq_ignore_ascii_case("ip") => {
                (k.to_ascii_lowercase(), v)
            }
            _ => (String::new(), s.as_str()),
        };
        let is_ip = value.parse::<std::net::IpAddr>().is_ok();
        match kind.as_str() {
            "ip" if !is_ip => return Err(format!("--san {s}: `{value}` is not an IP address")),
            "dns" if is_ip => {
                return Err(format!(
                    "--san {s}: an address goes in IP:{value}, not DNS:"
                ))
            }
            _ => {}
        }
        if !is_ip {
            let bare = value.strip_prefix("*.").unwrap_or(value);
            if crate::sniff::normalise_sni(bare.as_bytes()).is_none() {
                return Err(format!("--san {s}: `{value}` is not a DNS name"));
            }
        }
        names.push(value.to_owned());
    }
    let mut params = rcgen::CertificateParams::new(names.clone()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0].clone());
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let ymd = |days: i64| {
        let (y, m, d) = civil_from_days(days);
        rcgen::date_time_ymd(y, m, d)
    };
    params.not_before = ymd(today - 1);
    params.not_after = ymd(today + i64::from(days.max(1)));
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(Generated {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn generated_certificates_cover_their_sans() {
        let g = generate(
            &[
                "DNS:vpce-1.example.com".into(),
                "IP:10.0.0.5".into(),
                "*.dcv.example".into(),
            ],
            30,
        )
        .unwrap();
        let der = CertificateDer::from_pem_slice(g.cert_pem.as_bytes()).unwrap();
        for name in ["vpce-1.example.com", "10.0.0.5", "a.dcv.example"] {
            assert!(covers(&der, name), "{name}");
        }
        assert!(!covers(&der, "other.example"));
        assert!(generate(&["IP:nope".into()], 1)
            .unwrap_err()
            .contains("not an IP"));
        assert!(generate(&["DNS:10.0.0.1".into()], 1)
            .unwrap_err()
            .contains("IP:"));
        assert!(generate(&[], 1).is_err());
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_779), (2026, 11, 22));
    }

    #[test]
    fn chooses_by_sni_with_first_as_default_and_reload_keeps_old_on_error() {
        let dir = std::env::temp_dir().join(format!("splicegate-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = crate::testkit::identity(&["a.example"]).unwrap();
        let b = crate::testkit::identity(&["*.b.example", "10.0.0.5"]).unwrap();
        let files = vec![
            CertFiles {
                cert: write(&dir, "a.pem", &a.cert_pem),
                key: write(&dir, "a.key", &a.key_pem),
            },
            CertFiles {
                cert: write(&dir, "b.pem", &b.cert_pem),
                key: write(&dir, "b.key", &b.key_pem),
            },
        ];
        let store = CertStore::load(files.clone()).unwrap();
        let leaf = |n: Option<&str>| store.choose(n).unwrap().cert[0].clone();
        assert_eq!(leaf(Some("x.b.example")), b.cert);
        assert_eq!(leaf(Some("10.0.0.5")), b.cert);
        assert_eq!(leaf(Some("a.example")), a.cert);
        assert_eq!(leaf(Some("other.example")), a.cert);
        assert_eq!(leaf(None), a.cert);
        assert!(covers(&b.cert, "y.b.example") && !covers(&b.cert, "b.example"));

        // A broken key on reload keeps the running set.
        write(&dir, "b.key", "garbage");
        let e = store.reload().unwrap_err().to_string();
        assert!(e.contains("b.key") && e.contains("PRIVATE KEY"), "{e}");
        assert_eq!(leaf(Some("x.b.example")), b.cert);
        // A key that belongs to another certificate is refused.
        write(&dir, "b.key", &a.key_pem);
        let e = store.reload().unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
