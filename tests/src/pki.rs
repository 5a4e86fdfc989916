//! Certificates for TLS tests, made with rcgen: a mesh root for a trust domain, SPIFFE leaf
//! certificates (good ones and every kind of bad one), written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};

/// A certificate authority: its certificate (PEM) and what signs with it.
pub struct Ca {
    /// The root certificate, PEM.
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct LeafFiles {
    /// The certificate chain, PEM (the leaf only: roots are in the bundle).
    pub cert: PathBuf,
    /// The private key, PEM.
    pub key: PathBuf,
}

/// What a leaf certificate looks like.
#[derive(Clone, Debug)]
pub struct Leaf<'a> {
    /// URI SANs (a SPIFFE certificate has exactly one).
    pub uris: Vec<&'a str>,
    /// DNS SANs.
    pub dns: Vec<&'a str>,
    /// Validity, as (year, month, day) pairs.
    pub valid: ((i32, u8, u8), (i32, u8, u8)),
}

impl<'a> Leaf<'a> {
    /// A SPIFFE leaf valid from 2020 to 2100.
    pub fn spiffe(id: &'a str) -> Self {
        Self {
            uris: vec![id],
            dns: Vec::new(),
            valid: ((2020, 1, 1), (2100, 1, 1)),
        }
    }

    /// A SPIFFE leaf that expired in 2021.
    pub fn expired(id: &'a str) -> Self {
        Self {
            valid: ((2020, 1, 1), (2021, 1, 1)),
            ..Self::spiffe(id)
        }
    }

    /// A server certificate for DNS names, valid from 2020 to 2100.
    pub fn dns(names: &[&'a str]) -> Self {
        Self {
            uris: Vec::new(),
            dns: names.to_vec(),
            valid: ((2020, 1, 1), (2100, 1, 1)),
        }
    }

    fn params(&self) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = self
            .uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("uri")))
            .chain(
                self.dns
                    .iter()
                    .map(|d| SanType::DnsName((*d).try_into().expect("dns"))),
            )
            .collect();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let ((y0, m0, d0), (y1, m1, d1)) = self.valid;
        p.not_before = date_time_ymd(y0, m0, d0);
        p.not_after = date_time_ymd(y1, m1, d1);
        p
    }
}

impl Ca {
    /// A new root CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name.push(DnType::CommonName, name);
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2100, 1, 1);
        let cert = p.self_signed(&key).expect("self-signed root");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// Writes the root to `dir/name` and returns its path.
    pub fn write_bundle(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).expect("write bundle");
        path
    }

    /// Issues `leaf` and writes it and its key to `dir/<name>.crt` and `dir/<name>.key`.
    pub fn issue(&self, leaf: &Leaf<'_>, dir: &Path, name: &str) -> LeafFiles {
        let key = KeyPair::generate().expect("key");
        let cert = leaf
            .params()
            .signed_by(&key, &self.issuer)
            .expect("signed leaf");
        write_leaf(dir, name, &cert.pem(), &key.serialize_pem())
    }
}

/// A self-signed certificate for `leaf` (no CA), written like [`Ca::issue`].
pub fn self_signed(leaf: &Leaf<'_>, dir: &Path, name: &str) -> LeafFiles {
    let key = KeyPair::generate().expect("key");
    let cert = leaf.params().self_signed(&key).expect("self-signed");
    write_leaf(dir, name, &cert.pem(), &key.serialize_pem())
}

fn write_leaf(dir: &Path, name: &str, cert: &str, key: &str) -> LeafFiles {
    let files = LeafFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, cert).expect("write cert");
    std::fs::write(&files.key, key).expect("write key");
    files
}
