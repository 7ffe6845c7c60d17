//! What every TLS setup in sonde shares: `tls_config.insecure_skip_verify`, one meaning
//! for every TLS client (the probers' and the remote-write client's), Go's
//! `InsecureSkipVerify`; and the one reader of PEM certificate and key files, whose
//! errors name the file and say what it holds instead.

use rustls::DigitallySignedStruct;
use rustls::SignatureScheme;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Accepts any certificate for any name, as Go's `InsecureSkipVerify` does. The
/// handshake signatures are still checked with `provider`'s algorithms, so the peer
/// must hold the key of the certificate it shows and the connection is at least
/// encrypted to whoever answered.
#[derive(Debug)]
pub struct SkipVerify {
    provider: Arc<CryptoProvider>,
}

impl SkipVerify {
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self { provider }
    }
}

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The largest PEM file read: a CA bundle of every public root is under 300 KiB, and a
/// bound keeps a path that names a device or a huge file by mistake from filling memory.
pub const MAX_PEM_FILE_BYTES: u64 = 16 << 20;

/// Why a PEM file gives no certificate or no private key. Every message names the file;
/// callers put the option that named it in front.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is larger than {} MiB, which no certificate or key file is; check the path",
        path.display(),
        MAX_PEM_FILE_BYTES >> 20
    )]
    TooLarge { path: PathBuf },
    #[error("{} is not valid PEM: {problem}", path.display())]
    Malformed { path: PathBuf, problem: String },
    #[error(
        "no certificate in {} (a PEM block -----BEGIN CERTIFICATE-----); {holds}",
        path.display()
    )]
    NoCertificate { path: PathBuf, holds: String },
    #[error(
        "{} holds no private key (PKCS#8, PKCS#1 or SEC1: a PEM block -----BEGIN PRIVATE KEY-----, \
         -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----); {holds}",
        path.display()
    )]
    NoPrivateKey { path: PathBuf, holds: String },
    #[error(
        "{} holds an encrypted private key, and sonde reads only unencrypted ones: write it \
         out decrypted (`openssl pkey -in {} -out key.pem`), readable only by sonde's user",
        path.display(),
        path.display()
    )]
    EncryptedPrivateKey { path: PathBuf },
}

/// Every certificate in the PEM file at `path`, in file order; other blocks (keys, CRLs)
/// are passed over. A file with none is an error.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let text = read_pem_file(path)?;
    let certificates: Vec<CertificateDer<'static>> = sections(path, &text)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certificates.is_empty() {
        return Err(PemError::NoCertificate {
            path: path.to_path_buf(),
            holds: what_it_holds(&text),
        });
    }
    Ok(certificates)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path`; other
/// blocks (certificates of the same pair) are passed over.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let text = read_pem_file(path)?;
    let key = sections(path, &text)?
        .into_iter()
        .find_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der));
    match key {
        Some(key) => Ok(key),
        None if labels(&text).any(|label| label.contains("ENCRYPTED"))
            || contains(&text, b"Proc-Type: 4,ENCRYPTED") =>
        {
            Err(PemError::EncryptedPrivateKey {
                path: path.to_path_buf(),
            })
        }
        None => Err(PemError::NoPrivateKey {
            path: path.to_path_buf(),
            holds: what_it_holds(&text),
        }),
    }
}

fn read_pem_file(path: &Path) -> Result<Vec<u8>, PemError> {
    let read_error = |source| PemError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(PemError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// The blocks of `text` that rustls knows, in order; a block that does not decode is an
/// error even when it is not the kind asked for, since the file is then not what its
/// writer meant.
fn sections(path: &Path, text: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, PemError> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| PemError::Malformed {
            path: path.to_path_buf(),
            problem: describe(error),
        })
}

fn describe(error: pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a block has no end line (-----END {}-----)",
            String::from_utf8_lossy(&end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "a block starts with a malformed line ({})",
            String::from_utf8_lossy(&line).trim_end()
        ),
        pem::Error::Base64Decode(error) => format!("a block's base64 does not decode: {error}"),
        other => other.to_string(),
    }
}

/// The labels of the `-----BEGIN …-----` lines of `text`.
fn labels(text: &[u8]) -> impl Iterator<Item = String> + '_ {
    text.split(|b| *b == b'\n').filter_map(|line| {
        let line = line.trim_ascii();
        let label = line.strip_prefix(b"-----BEGIN ")?.strip_suffix(b"-----")?;
        Some(String::from_utf8_lossy(label).into_owned())
    })
}

fn contains(text: &[u8], needle: &[u8]) -> bool {
    text.windows(needle.len()).any(|window| window == needle)
}

/// What a file that lacks the block asked for holds instead, for the error message.
fn what_it_holds(text: &[u8]) -> String {
    let mut found: Vec<String> = Vec::new();
    for label in labels(text) {
        if !found.contains(&label) {
            found.push(label);
        }
    }
    if !found.is_empty() {
        return format!("it holds {}", found.join(", "));
    }
    if text.trim_ascii().is_empty() {
        return "the file is empty".into();
    }
    if text.first() == Some(&0x30) {
        return "it looks like DER; convert it to PEM (`openssl x509 -inform der` for a \
                certificate, `openssl pkey -inform der` for a key)"
            .into();
    }
    "it holds no PEM block at all".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A self-signed P-256 certificate and its key, made with `openssl req -x509 -newkey ec
    // -pkeyopt ec_paramgen_curve:P-256 -nodes`; the key again as SEC1 (`openssl ec`) and
    // encrypted (`openssl pkey -aes256`).
    const CERTIFICATE: &str = include_str!("../testdata/pem/cert.pem");
    const PKCS8_KEY: &str = include_str!("../testdata/pem/key-pkcs8.pem");
    const SEC1_KEY: &str = include_str!("../testdata/pem/key-sec1.pem");
    const ENCRYPTED_KEY: &str = include_str!("../testdata/pem/key-encrypted.pem");

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("sonde-pem-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_certificates_and_keys_of_every_form() {
        let dir = Dir::new("ok");
        let pair = dir.file("pair.pem", format!("{PKCS8_KEY}{CERTIFICATE}{CERTIFICATE}"));
        assert_eq!(read_certificates(&pair).unwrap().len(), 2);
        assert!(matches!(
            read_private_key(&pair).unwrap(),
            PrivateKeyDer::Pkcs8(_)
        ));
        let sec1 = dir.file("sec1.pem", SEC1_KEY);
        assert!(matches!(
            read_private_key(&sec1).unwrap(),
            PrivateKeyDer::Sec1(_)
        ));
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = Dir::new("missing");
        let path = dir.0.join("absent.pem");
        let message = read_certificates(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("cannot read {}: ", path.display())),
            "{message}"
        );
        assert!(message.contains("No such file"), "{message}");
    }

    #[test]
    fn a_key_file_given_as_certificate_says_what_it_holds() {
        let dir = Dir::new("swapped");
        let key = dir.file("key.pem", PKCS8_KEY);
        let cert = dir.file("cert.pem", CERTIFICATE);
        assert_eq!(
            read_certificates(&key).unwrap_err().to_string(),
            format!(
                "no certificate in {} (a PEM block -----BEGIN CERTIFICATE-----); it holds PRIVATE KEY",
                key.display()
            )
        );
        assert_eq!(
            read_private_key(&cert).unwrap_err().to_string(),
            format!(
                "{} holds no private key (PKCS#8, PKCS#1 or SEC1: a PEM block -----BEGIN PRIVATE KEY-----, \
                 -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----); it holds CERTIFICATE",
                cert.display()
            )
        );
    }

    #[test]
    fn empty_der_and_text_files_are_told_apart() {
        let dir = Dir::new("not-pem");
        let empty = dir.file("empty.pem", "");
        let message = read_certificates(&empty).unwrap_err().to_string();
        assert!(message.ends_with("; the file is empty"), "{message}");
        let der = dir.file("cert.der", [0x30, 0x82, 0x01, 0x0a, 0x02, 0x01]);
        let message = read_private_key(&der).unwrap_err().to_string();
        assert!(message.contains("it looks like DER"), "{message}");
        let text = dir.file("notes.txt", "not a certificate\n");
        let message = read_certificates(&text).unwrap_err().to_string();
        assert!(
            message.ends_with("; it holds no PEM block at all"),
            "{message}"
        );
    }

    #[test]
    fn a_broken_block_is_an_error_naming_the_file() {
        let dir = Dir::new("broken");
        let truncated = &CERTIFICATE[..CERTIFICATE.len() / 2];
        let path = dir.file("truncated.pem", truncated);
        let message = read_certificates(&path).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "{} is not valid PEM: a block has no end line (-----END CERTIFICATE-----)",
                path.display()
            )
        );
        let bad_base64 = CERTIFICATE.replacen("MII", "M*I", 1);
        let path = dir.file("base64.pem", bad_base64);
        let message = read_certificates(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!(
                "{} is not valid PEM: a block's base64 does not decode",
                path.display()
            )),
            "{message}"
        );
    }

    #[test]
    fn an_encrypted_key_says_how_to_decrypt_it() {
        let dir = Dir::new("encrypted");
        let path = dir.file("key.pem", ENCRYPTED_KEY);
        let message = read_private_key(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!(
                "{} holds an encrypted private key, and sonde reads only unencrypted ones",
                path.display()
            )),
            "{message}"
        );
        assert!(message.contains("openssl pkey -in"), "{message}");
    }

    #[test]
    fn a_device_or_huge_file_is_refused_without_reading_it_all() {
        let message = read_certificates(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "/dev/zero is larger than 16 MiB, which no certificate or key file is; check the path"
        );
    }
}
