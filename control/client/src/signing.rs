//! Module signatures: ed25519 over a module's digest, made by `weftctl module push --sign`
//! (or `weftctl module sign`), checked by `weft-control` on upload and by every proxy again
//! before it runs a module. The cryptography is ring's; keys are the PEM files OpenSSL
//! writes (`openssl genpkey -algorithm ed25519`, `openssl pkey -pubout`), or
//! `weftctl module keygen`'s.
//!
//! What is signed is `weft module signature v1\n` followed by `sha256:<hex>` of the module:
//! a signature says "this key vouches for exactly these bytes" and cannot be replayed for
//! anything else. A signature travels as one line, `ed25519 <key-id> <hex signature>`: in
//! `<module>.wasm.sig` files beside modules, or in the control API's `signature` fields.

use std::path::Path;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use x509_parser::prelude::FromDer as _;

/// What is signed before the module's digest.
const CONTEXT: &[u8] = b"weft module signature v1\n";

/// The message signed for `module`.
fn message(module: &[u8]) -> Vec<u8> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(module)));
    [CONTEXT, digest.as_bytes()].concat()
}

/// The id of an ed25519 public key: `ed25519:` and 16 hex digits of its sha256.
fn key_id(public: &[u8]) -> String {
    format!("ed25519:{}", &hex::encode(Sha256::digest(public))[..16])
}

fn pem_block(path: &Path, label: &str) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let block =
        pem::parse(text.trim()).map_err(|e| format!("{}: not a PEM file: {e}", path.display()))?;
    if block.tag() != label {
        return Err(format!(
            "{}: a PEM `{}`, where a `{label}` was expected",
            path.display(),
            block.tag()
        ));
    }
    Ok(block.into_contents())
}

/// A module signature: the signing key's id and the ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSignature {
    /// The id of the key that made it (`ed25519:<16 hex>`).
    pub key_id: String,
    /// The signature, 64 bytes.
    pub signature: Vec<u8>,
}

impl ModuleSignature {
    /// Its one-line form: `ed25519 <key-id> <hex signature>`.
    pub fn to_line(&self) -> String {
        format!("ed25519 {} {}", self.key_id, hex::encode(&self.signature))
    }

    /// Reads the one-line form.
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ed25519"), Some(id), Some(sig), None) if id.starts_with("ed25519:") => {
                let signature =
                    hex::decode(sig).map_err(|e| format!("the signature is not hex: {e}"))?;
                if signature.len() != 64 {
                    return Err(format!(
                        "an ed25519 signature has 64 bytes, not {}",
                        signature.len()
                    ));
                }
                Ok(ModuleSignature {
                    key_id: id.to_owned(),
                    signature,
                })
            }
            _ => Err("not a module signature (`ed25519 <key-id> <hex signature>`)".into()),
        }
    }

    /// The signature kept in `<module>.sig` beside `module`, if that file exists.
    pub fn beside(module: &Path) -> Result<Option<Self>, String> {
        let path = sig_path(module);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(text.trim())
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

/// Where the signature of `module` is kept: `<module>.sig`.
pub fn sig_path(module: &Path) -> std::path::PathBuf {
    let mut p = module.as_os_str().to_owned();
    p.push(".sig");
    p.into()
}

/// A private ed25519 key that signs modules.
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl SigningKey {
    /// The key in a PEM `PRIVATE KEY` (PKCS#8) file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let der = pem_block(path, "PRIVATE KEY")?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| format!("{}: not an ed25519 private key: {e}", path.display()))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(SigningKey { pair, key_id })
    }

    /// A new key: (private key PEM, public key PEM, key id).
    pub fn generate() -> Result<(String, String, String), String> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| e.to_string())?;
        Ok((
            pair.serialize_pem(),
            pair.public_key_pem(),
            key_id(pair.public_key_raw()),
        ))
    }

    /// Its id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs `module`.
    pub fn sign(&self, module: &[u8]) -> ModuleSignature {
        ModuleSignature {
            key_id: self.key_id.clone(),
            signature: self.pair.sign(&message(module)).as_ref().to_vec(),
        }
    }
}

/// The public keys whose module signatures are trusted.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl TrustedKeys {
    /// The keys in PEM `PUBLIC KEY` files.
    pub fn from_files(paths: &[impl AsRef<Path>]) -> Result<Self, String> {
        let mut keys = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let der = pem_block(path, "PUBLIC KEY")?;
            let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der)
                .map_err(|e| format!("{}: not a public key: {e}", path.display()))?;
            // id-Ed25519, RFC 8410.
            if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
                return Err(format!(
                    "{}: not an ed25519 public key (algorithm {})",
                    path.display(),
                    spki.algorithm.algorithm.to_id_string()
                ));
            }
            let raw = spki.subject_public_key.data.to_vec();
            keys.push((key_id(&raw), raw));
        }
        Ok(TrustedKeys { keys })
    }

    /// Whether no key is trusted (and so signatures are not required).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The ids of the trusted keys.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Checks that `signature` is a trusted key's over `module`; answers the key's id.
    pub fn verify(
        &self,
        module: &[u8],
        signature: Option<&ModuleSignature>,
    ) -> Result<String, String> {
        let Some(sig) = signature else {
            return Err(
                "the module is not signed, and only modules signed by a trusted key are accepted"
                    .into(),
            );
        };
        let Some((id, raw)) = self.keys.iter().find(|(id, _)| *id == sig.key_id) else {
            return Err(format!(
                "the module is signed by {}, which is not a trusted key ({})",
                sig.key_id,
                self.ids().join(", ")
            ));
        };
        UnparsedPublicKey::new(&ED25519, raw)
            .verify(&message(module), &sig.signature)
            .map_err(|_| {
                format!("the module's signature by {id} does not verify: the bytes are not what was signed")
            })?;
        Ok(id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_for_the_signed_bytes_and_trusted_keys_only() {
        let dir = std::env::temp_dir().join(format!("weft-signing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (private, public, id) = SigningKey::generate().unwrap();
        let (other_private, _, _) = SigningKey::generate().unwrap();
        std::fs::write(dir.join("k.pem"), &private).unwrap();
        std::fs::write(dir.join("k.pub.pem"), &public).unwrap();
        std::fs::write(dir.join("o.pem"), &other_private).unwrap();
        let key = SigningKey::from_file(&dir.join("k.pem")).unwrap();
        assert_eq!(key.key_id(), id);
        let trusted = TrustedKeys::from_files(&[dir.join("k.pub.pem")]).unwrap();
        let sig = key.sign(b"module bytes");
        assert_eq!(ModuleSignature::parse(&sig.to_line()).unwrap(), sig);
        assert_eq!(trusted.verify(b"module bytes", Some(&sig)).unwrap(), id);
        assert!(
            trusted
                .verify(b"module bytez", Some(&sig))
                .unwrap_err()
                .contains("does not verify")
        );
        assert!(
            trusted
                .verify(b"module bytes", None)
                .unwrap_err()
                .contains("not signed")
        );
        let other = SigningKey::from_file(&dir.join("o.pem"))
            .unwrap()
            .sign(b"module bytes");
        assert!(
            trusted
                .verify(b"module bytes", Some(&other))
                .unwrap_err()
                .contains("not a trusted key")
        );
        // A signature under a trusted key's id but made by another key does not pass either.
        let forged = ModuleSignature {
            key_id: id.clone(),
            ..other
        };
        assert!(trusted.verify(b"module bytes", Some(&forged)).is_err());
        // Wrong files are clear errors naming them.
        let err = TrustedKeys::from_files(&[dir.join("k.pem")]).unwrap_err();
        assert!(err.contains("k.pem") && err.contains("PUBLIC KEY"), "{err}");
        assert!(ModuleSignature::parse("ed25519 ed25519:00 zz").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
