//! TLS to Postgres with rustls, following libpq's `sslmode` semantics:
//! `disable`; `prefer` and `require` encrypt without verifying the server
//! (as libpq does without a root certificate); `verify-ca` checks the chain;
//! `verify-full` also checks the host name. `sslrootcert` (or
//! `--database-ca`) names the CA file, else the system roots are used.
//!
//! tokio-postgres understands only disable/prefer/require and no
//! `sslrootcert`, so those parameters are taken out of the URL here and
//! applied to both connections (SQL and replication).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};

/// Selects ring as the process-wide rustls provider (several are compiled in
/// through dependencies, and then rustls cannot choose by itself). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS wanted for Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Mode and CA file.
#[derive(Debug, Clone, Default)]
pub struct PgTls {
    pub mode: Mode,
    pub root_cert: Option<PathBuf>,
}

/// Removes `sslmode` and `sslrootcert` from a libpq URL's query; returns the
/// URL tokio-postgres can parse and the TLS they asked for.
pub fn split_url(url: &str) -> Result<(String, PgTls), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), PgTls::default()));
    };
    let mut tls = PgTls::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                tls.mode = match value {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                        ));
                    }
                }
            }
            "sslrootcert" => {
                tls.root_cert = Some(PathBuf::from(crate::secrets::percent_decode(value)))
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, tls))
}

/// The rustls client configuration for `tls`.
pub fn client_config(tls: &PgTls) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.mode {
        Mode::Disable | Mode::Prefer | Mode::Require => Arc::new(Verifier {
            roots: None,
            provider,
        }),
        Mode::VerifyCa => Arc::new(Verifier {
            roots: Some(Arc::new(roots(tls.root_cert.as_ref())?)),
            provider,
        }),
        Mode::VerifyFull => WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(tls.root_cert.as_ref())?),
            provider,
        )
        .build()
        .map_err(|e| e.to_string())?,
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(config)
}

fn roots(file: Option<&PathBuf>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?
            {
                let cert =
                    cert.map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("unusable certificate in {}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(
            "no CA certificates to verify Postgres with: set sslrootcert or --database-ca".into(),
        );
    }
    Ok(roots)
}

/// Checks the server certificate as the mode asks: with `roots`, the chain
/// must lead to a trusted CA (`verify-ca`, any host name); without, any
/// certificate is accepted (`prefer`/`require`: encrypted, server not
/// authenticated, as libpq without a root certificate). Handshake signatures
/// are checked either way.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_split_out() {
        let (url, tls) = split_url(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(url, "postgres://u@h/db?application_name=x");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let (url, tls) = split_url("postgres://u@h/db").unwrap();
        assert_eq!(
            (url.as_str(), tls.mode),
            ("postgres://u@h/db", Mode::Prefer)
        );
        assert_eq!(
            split_url("postgres://u@h/db?sslmode=disable")
                .unwrap()
                .1
                .mode,
            Mode::Disable
        );
        assert!(split_url("postgres://u@h/db?sslmode=always").is_err());
    }

    #[test]
    fn configs_build_for_every_mode() {
        for mode in [Mode::Disable, Mode::Prefer, Mode::Require] {
            assert!(
                client_config(&PgTls {
                    mode,
                    root_cert: None
                })
                .is_ok()
            );
        }
        let missing = PgTls {
            mode: Mode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
        };
        assert!(
            client_config(&missing)
                .unwrap_err()
                .contains("/nonexistent/ca.pem")
        );
    }
}
