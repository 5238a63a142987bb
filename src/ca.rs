//! Local certificate authority and per-host TLS leaf minting for MITM of registry pulls.
//!
//! Owns `ca.crt` / `ca.key` in the state directory and the cache of per-host rustls
//! server configs. Invariants:
//! - An existing CA is never silently replaced: a missing half, unparsable file, key/cert
//!   mismatch or group/world-readable key is an error the operator must resolve.
//! - The key file is created 0600 atomically (never chmod-ed afterwards); the key is never
//!   logged, displayed or exposed through this API.
//! - Leaves use a fresh P-256 key each, are issued from the *on-disk* CA cert (issuer name and
//!   AKI = CA SKI come from the stored DER) and are minted at most once per host, outside the
//!   map lock; they are re-minted only when close to expiry.
//! - The host cache is unbounded: callers are expected to only intercept allow-listed hosts.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

const CA_VALIDITY_DAYS: i64 = 3652;
/// notBefore is backdated 1 day for client clock skew; 1 + 395 = 396 days total, under the
/// 397/398-day ceiling Apple and browsers enforce for server certificates.
const LEAF_VALIDITY_DAYS: i64 = 395;
/// Cached leaves this close to notAfter are re-minted so a long-running proxy never serves
/// an expired certificate.
const LEAF_RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA path {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("found {present} but not {missing}; restore {missing} or remove {present} so a new CA can be generated")]
    Incomplete { present: String, missing: String },
    #[error(
        "CA key {path} is accessible by group/others (mode {mode:03o}); run `chmod 600 {path}`"
    )]
    InsecureKey { path: String, mode: u32 },
    #[error(
        "CA key {path} is unreadable or corrupt: {detail}; fix or remove both ca.crt and ca.key"
    )]
    BadKey { path: String, detail: String },
    #[error("CA certificate {path} is unreadable or corrupt: {detail}; fix or remove both ca.crt and ca.key")]
    BadCert { path: String, detail: String },
    #[error("CA key {key} does not belong to CA certificate {cert}; fix or remove both ca.crt and ca.key")]
    KeyMismatch { cert: String, key: String },
    #[error("generating CA in {dir}: {detail}")]
    Generate { dir: String, detail: String },
    #[error(
        "invalid TLS host {host:?}: expected a DNS name or IP literal without port or brackets"
    )]
    InvalidHost { host: String },
    #[error("minting certificate for {host}: {detail}")]
    Mint { host: String, detail: String },
}

struct Leaf {
    config: Arc<ServerConfig>,
    renew_at: OffsetDateTime,
}

/// Per-host slot: its own mutex so concurrent requests for one host wait for a single mint
/// while other hosts proceed; `None` after a failed mint so the next caller retries.
type Slot = Arc<Mutex<Option<Leaf>>>;

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: OffsetDateTime,
    created: bool,
    provider: Arc<CryptoProvider>,
    leaves: Mutex<HashMap<String, Slot>>,
    minted: AtomicU64,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Deliberately no key material.
        f.debug_struct("CertificateAuthority")
            .field("fingerprint_sha256", &self.fingerprint_sha256())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads dir/ca.crt + dir/ca.key, or generates both if NEITHER exists (creating dir).
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        let exists = |p: &Path| p.try_exists().map_err(|e| io_err(p, e));
        let created = match (exists(&cert_path)?, exists(&key_path)?) {
            (false, false) => {
                generate(dir, &cert_path, &key_path)?;
                true
            }
            (true, true) => false,
            (cert, _) => {
                let (present, missing) = if cert {
                    (&cert_path, &key_path)
                } else {
                    (&key_path, &cert_path)
                };
                return Err(CaError::Incomplete {
                    present: disp(present),
                    missing: disp(missing),
                });
            }
        };
        check_key_mode(&key_path)?;
        let bad_key = |detail: String| CaError::BadKey {
            path: disp(&key_path),
            detail,
        };
        let bad_cert = |detail: String| CaError::BadCert {
            path: disp(&cert_path),
            detail,
        };

        let key_pem = fs::read_to_string(&key_path).map_err(|e| bad_key(e.to_string()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad_key(e.to_string()))?;
        let cert_der =
            CertificateDer::from_pem_file(&cert_path).map_err(|e| bad_cert(e.to_string()))?;
        let not_after =
            der_not_after(&cert_der).ok_or_else(|| bad_cert("no parsable validity".into()))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signer = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .map_err(|e| bad_key(e.to_string()))?;
        match rustls::sign::CertifiedKey::new(vec![cert_der.clone()], signer).keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(CaError::KeyMismatch {
                    cert: disp(&cert_path),
                    key: disp(&key_path),
                })
            }
            Err(e) => return Err(bad_cert(e.to_string())),
        }
        // From the stored DER, not from fresh params: leaves must carry the exact issuer
        // name and AKI (= stored SKI) that clients' trust stores will chain against.
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad_cert(e.to_string()))?;

        if not_after < OffsetDateTime::now_utc() {
            tracing::warn!(path = %cert_path.display(), %not_after, "CA certificate has expired; clients will reject intercepted connections");
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert_der.as_ref());
        let mut cert_pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            cert_pem.push_str(&String::from_utf8_lossy(line));
            cert_pem.push('\n');
        }
        cert_pem.push_str("-----END CERTIFICATE-----\n");
        Ok(Self {
            issuer,
            cert_der,
            cert_pem,
            not_after,
            created,
            provider,
            leaves: Mutex::new(HashMap::new()),
            minted: AtomicU64::new(0),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint_sha256(&self) -> String {
        fingerprint(self.cert_der.as_ref())
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub fn created(&self) -> bool {
        self.created
    }

    /// rustls server config presenting a leaf for `host` (DNS name or IP literal, no port, no brackets).
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let (key, san) = match host.parse::<IpAddr>() {
            Ok(ip) => (ip.to_string(), SanType::IpAddress(ip)),
            Err(_) => {
                let invalid = || CaError::InvalidHost {
                    host: host.to_string(),
                };
                let name = host.to_ascii_lowercase();
                rustls_pki_types::DnsName::try_from(name.as_str()).map_err(|_| invalid())?;
                let ia5 = name.clone().try_into().map_err(|_| invalid())?;
                (name, SanType::DnsName(ia5))
            }
        };
        let slot = {
            let mut map = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
            map.entry(key.clone()).or_default().clone()
        };
        // A poisoned slot just holds a cached value or None; both are safe to reuse.
        let mut leaf = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = leaf
            .as_ref()
            .filter(|l| OffsetDateTime::now_utc() < l.renew_at)
        {
            return Ok(l.config.clone());
        }
        let minted = self.mint(&key, san)?;
        let config = minted.config.clone();
        *leaf = Some(minted);
        self.minted.fetch_add(1, Ordering::Relaxed);
        Ok(config)
    }

    /// number of leaves minted so far (for tests/metrics)
    pub fn minted_count(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    fn mint(&self, host: &str, san: SanType) -> Result<Leaf, CaError> {
        let fail = |detail: String| CaError::Mint {
            host: host.to_string(),
            detail,
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let key_der = PrivatePkcs8KeyDer::from(key.serialize_der());
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![cert.der().clone()], key_der.into())
            })
            .map_err(|e| fail(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tracing::debug!(host, "minted leaf certificate");
        let renew_at = params.not_after - Duration::days(LEAF_RENEW_BEFORE_DAYS);
        Ok(Leaf {
            config: Arc::new(config),
            renew_at,
        })
    }
}

fn generate(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
    let fail = |e: rcgen::Error| CaError::Generate {
        dir: disp(dir),
        detail: e.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "pullcache CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "pullcache");
    // pathlen 0: this CA may only sign leaves, never another CA. IsCa::Ca also makes rcgen emit SKI.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key).map_err(fail)?;

    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| io_err(dir, e))?;
    write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(cert_path, cert.pem().as_bytes(), 0o644) {
        // Don't leave a lone key behind: that would make every later start fail as "incomplete".
        let _ = fs::remove_file(key_path);
        return Err(e);
    }
    tracing::info!(path = %cert_path.display(), "generated new pullcache CA; add it to clients' trust stores");
    Ok(())
}

/// create_new so a concurrent generator or a dangling symlink can't be clobbered, and the
/// mode is applied at creation so the key is never briefly readable by others.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(|e| io_err(path, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(path, e))
}

fn check_key_mode(key_path: &Path) -> Result<(), CaError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(key_path)
            .map_err(|e| io_err(key_path, e))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::InsecureKey {
                path: disp(key_path),
                mode,
            });
        }
    }
    Ok(())
}

/// 16 random bytes with the top bit cleared (positive INTEGER) and the next bit set, so the
/// DER encoding is always 16 bytes / 127 bits — never shortened by leading zeros.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from(bytes.to_vec())
}

fn disp(p: &Path) -> String {
    p.display().to_string()
}

fn io_err(p: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: disp(p),
        source,
    }
}

/// The certificate's notAfter (x509-parser is already compiled in through rcgen).
fn der_not_after(cert: &[u8]) -> Option<OffsetDateTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.validity().not_after.to_datetime())
}

/// SHA-256 of a certificate's DER as `AB:CD:…`, as `openssl x509 -fingerprint -sha256` prints.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::{parse_x509_certificate, X509Certificate};

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        parse_x509_certificate(der).unwrap().1
    }

    fn ski<'a>(c: &X509Certificate<'a>) -> Option<&'a [u8]> {
        c.iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
                _ => None,
            })
    }

    fn aki<'a>(c: &X509Certificate<'a>) -> Option<&'a [u8]> {
        c.iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0)
                }
                _ => None,
            })
    }

    fn assert_serial(c: &X509Certificate<'_>) {
        let raw = c.tbs_certificate.raw_serial();
        assert!(
            raw[0] & 0x80 == 0 && c.serial.bits() >= 64,
            "serial {raw:02x?}"
        );
    }

    /// In-memory handshake with `root` as the only trust anchor; returns the presented leaf.
    fn handshake(
        ca: &CertificateAuthority,
        root: &CertificateDer<'static>,
        host: &str,
        v: &'static rustls::SupportedProtocolVersion,
    ) -> CertificateDer<'static> {
        let mut roots = RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[v])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(host.to_string()).unwrap();
        let mut client = ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut server = ServerConnection::new(ca.server_config(host).unwrap()).unwrap();
        let mut buf = Vec::new();
        for _ in 0..10 {
            buf.clear();
            client.write_tls(&mut buf).unwrap();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
                server.process_new_packets().unwrap();
            }
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().expect("client rejected leaf");
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking());
        assert_eq!(client.protocol_version(), Some(v.version));
        assert_eq!(client.alpn_protocol(), Some(&b"http/1.1"[..]));
        client.peer_certificates().unwrap()[0].clone()
    }

    #[test]
    fn ca_profile_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(&dir.path().join("state")).unwrap();
        assert!(ca.created());
        let c = parse(ca.cert_der());
        let bc = c.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca && bc.value.path_len_constraint == Some(0));
        let ku = c.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(ski(&c).is_some());
        assert_eq!(c.subject(), c.issuer());
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        let o = c
            .subject()
            .iter_organization()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!((cn, o), ("pullcache CA", "pullcache"));
        assert_serial(&c);
        let (nb, na) = (
            c.validity().not_before.to_datetime(),
            c.validity().not_after.to_datetime(),
        );
        let now = OffsetDateTime::now_utc();
        assert!(nb < now - Duration::hours(23));
        assert!((na - now - Duration::days(3652)).abs() < Duration::minutes(5));
        assert_eq!(ca.not_after(), na);
        assert_eq!(ca.fingerprint_sha256().len(), 32 * 3 - 1);
        assert!(ca
            .fingerprint_sha256()
            .chars()
            .all(|ch| ch == ':' || ch.is_ascii_hexdigit() && !ch.is_ascii_lowercase()));
        assert_eq!(
            CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap(),
            *ca.cert_der()
        );
        let mode = |f| {
            fs::metadata(dir.path().join("state").join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode(CA_KEY_FILE), mode(CA_CERT_FILE)), (0o600, 0o644));
        let dbg = format!("{ca:?}");
        assert!(!dbg.contains("PRIVATE") && dbg.contains(&ca.fingerprint_sha256()));
    }

    #[test]
    fn leaf_profile_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let ca_cert = parse(ca.cert_der());
        let ca_ski = ski(&ca_cert).unwrap();
        let mut serials = Vec::new();
        for (host, v) in [
            ("Registry-1.Docker.IO", &rustls::version::TLS13),
            ("10.1.2.3", &rustls::version::TLS12),
            ("::1", &rustls::version::TLS13),
        ] {
            let der = handshake(&ca, ca.cert_der(), host, v);
            let c = parse(&der);
            let san = c
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .clone();
            match host.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => {
                    assert_eq!(san, vec![GeneralName::IPAddress(&ip.octets()[..])])
                }
                Ok(IpAddr::V6(ip)) => {
                    assert_eq!(san, vec![GeneralName::IPAddress(&ip.octets()[..])])
                }
                Err(_) => assert_eq!(san, vec![GeneralName::DNSName("registry-1.docker.io")]),
            }
            let cn = c
                .subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap();
            assert!(cn.eq_ignore_ascii_case(host));
            assert_eq!(c.issuer(), ca_cert.subject());
            assert!(c.extended_key_usage().unwrap().unwrap().value.server_auth);
            let ku = c.key_usage().unwrap().unwrap();
            assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
            assert!(c.basic_constraints().unwrap().is_none_or(|bc| !bc.value.ca));
            assert_eq!(aki(&c), Some(ca_ski));
            assert_ne!(ski(&c), Some(ca_ski));
            assert_ne!(c.public_key().raw, ca_cert.public_key().raw);
            let (nb, na) = (
                c.validity().not_before.to_datetime(),
                c.validity().not_after.to_datetime(),
            );
            assert!(nb < OffsetDateTime::now_utc() && na - nb <= Duration::days(397));
            assert_serial(&c);
            serials.push(c.tbs_certificate.raw_serial().to_vec());
        }
        serials.dedup();
        assert_eq!(serials.len(), 3);
        assert_eq!(ca.minted_count(), 3);
        // Cached: same Arc, no new mint.
        assert!(Arc::ptr_eq(
            &ca.server_config("registry-1.docker.io").unwrap(),
            &ca.server_config("REGISTRY-1.docker.io").unwrap()
        ));
        assert_eq!(ca.minted_count(), 3);
        for bad in ["[::1]", "host:443", "", "bad host"] {
            assert!(
                matches!(ca.server_config(bad), Err(CaError::InvalidHost { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn reload_keeps_identity() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let again = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert!(!again.created());
        assert_eq!(again.fingerprint_sha256(), first.fingerprint_sha256());
        assert_eq!(again.not_after(), first.not_after());
        // Leaf from the reloaded CA verifies against the originally distributed root.
        let leaf = handshake(&again, first.cert_der(), "ghcr.io", &rustls::version::TLS13);
        assert_eq!(aki(&parse(&leaf)), ski(&parse(first.cert_der())));
    }

    #[test]
    fn broken_state_is_an_error_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        let (crt, key) = (dir.path().join(CA_CERT_FILE), dir.path().join(CA_KEY_FILE));
        let snapshot = || (fs::read(&crt).unwrap(), fs::read(&key).unwrap());

        fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let before = snapshot();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, CaError::BadKey { .. }) && err.to_string().contains("ca.key"),
            "{err}"
        );
        assert_eq!(snapshot(), before);

        let other = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(other.path()).unwrap();
        fs::write(&key, fs::read(other.path().join(CA_KEY_FILE)).unwrap()).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");

        fs::write(&crt, "not a cert").unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::BadCert { .. }), "{err}");

        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, CaError::InsecureKey { .. }) && err.to_string().contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn half_present_is_an_error() {
        for keep in [CA_CERT_FILE, CA_KEY_FILE] {
            let dir = tempfile::tempdir().unwrap();
            CertificateAuthority::load_or_create(dir.path()).unwrap();
            let lone = fs::read(dir.path().join(keep)).unwrap();
            let gone = if keep == CA_CERT_FILE {
                CA_KEY_FILE
            } else {
                CA_CERT_FILE
            };
            fs::remove_file(dir.path().join(gone)).unwrap();
            let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
            assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
            assert!(!dir.path().join(gone).exists());
            assert_eq!(fs::read(dir.path().join(keep)).unwrap(), lone);
        }
    }

    #[test]
    fn der_not_after_reads_utc_and_generalized_time() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        // rcgen switches from UTCTime to GeneralizedTime at 2050 (RFC 5280).
        for year in [2049, 2050, 2100] {
            let mut p = CertificateParams::default();
            p.not_after = rcgen::date_time_ymd(year, 6, 30) + Duration::seconds(3723);
            let cert = p.self_signed(&key).unwrap();
            assert_eq!(der_not_after(cert.der()), Some(p.not_after));
            assert_eq!(der_not_after(&cert.der()[..60]), None);
        }
    }

    #[test]
    fn concurrent_requests_mint_once() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CertificateAuthority>();
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let barrier = std::sync::Barrier::new(16);
        let configs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        ca.server_config("same.host").unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ca.minted_count(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }
}
