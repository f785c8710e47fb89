//! A throwaway PKI made with the `openssl` CLI at test time.
//!
//! Real X.509 v3 certificates with P-256 keys (PKCS#8 PEM, `BEGIN PRIVATE KEY`), which both
//! Mosquitto (OpenSSL) and rustls with the ring provider accept:
//! - a CA and a server certificate for `IP:127.0.0.1` and `DNS:localhost` signed by it,
//! - a client certificate (`CN=ferry-test`, so `use_identity_as_username` makes the username
//!   `ferry-test`) signed by the same CA,
//! - an unrelated "other" CA with its own server certificate for 127.0.0.1, to test that a
//!   wrong CA is refused in both directions.
//!
//! Each certificate is one `openssl req -x509` call (OpenSSL 3 signs with `-CA`), about 10 ms.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Subject CN of the client certificate, which mTLS brokers turn into the username.
pub const CLIENT_CN: &str = "ferry-test";

/// Paths of the generated files. All live in the directory given to [`Pki::generate`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_crt: PathBuf,
    pub ca_key: PathBuf,
    pub server_crt: PathBuf,
    pub server_key: PathBuf,
    pub client_crt: PathBuf,
    pub client_key: PathBuf,
    pub other_ca_crt: PathBuf,
    pub other_ca_key: PathBuf,
    pub other_server_crt: PathBuf,
    pub other_server_key: PathBuf,
}

impl Pki {
    /// Generates everything into `dir` (created if missing). Panics with openssl's stderr if a
    /// command fails.
    pub fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create PKI dir {}: {e}", dir.display()));
        let path = |name: &str| dir.join(name);
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_crt: path("ca.crt"),
            ca_key: path("ca.key"),
            server_crt: path("server.crt"),
            server_key: path("server.key"),
            client_crt: path("client.crt"),
            client_key: path("client.key"),
            other_ca_crt: path("other-ca.crt"),
            other_ca_key: path("other-ca.key"),
            other_server_crt: path("other-server.crt"),
            other_server_key: path("other-server.key"),
        };

        make_ca(&pki.ca_key, &pki.ca_crt, "ferry test CA");
        let ca = (pki.ca_crt.as_path(), pki.ca_key.as_path());
        issue(
            &pki.server_key,
            &pki.server_crt,
            "localhost",
            ca,
            SERVER_EXT,
        );
        issue(&pki.client_key, &pki.client_crt, CLIENT_CN, ca, CLIENT_EXT);

        make_ca(&pki.other_ca_key, &pki.other_ca_crt, "unrelated test CA");
        let other = (pki.other_ca_crt.as_path(), pki.other_ca_key.as_path());
        issue(
            &pki.other_server_key,
            &pki.other_server_crt,
            "localhost",
            other,
            SERVER_EXT,
        );
        pki
    }
}

/// Extensions of a server certificate that is valid for the loopback address and name.
const SERVER_EXT: &[&str] = &[
    "subjectAltName=IP:127.0.0.1,DNS:localhost",
    "basicConstraints=critical,CA:FALSE",
    "keyUsage=critical,digitalSignature",
    "extendedKeyUsage=serverAuth",
];

const CLIENT_EXT: &[&str] = &[
    "basicConstraints=critical,CA:FALSE",
    "keyUsage=critical,digitalSignature",
    "extendedKeyUsage=clientAuth",
];

/// Common `req` arguments: a fresh P-256 key, unencrypted.
const NEW_KEY: &[&str] = &[
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-noenc",
];

fn make_ca(key: &Path, crt: &Path, cn: &str) {
    let mut cmd = openssl(NEW_KEY);
    cmd.args(["-days", "3650", "-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(crt)
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    run(cmd);
}

fn issue(key: &Path, crt: &Path, cn: &str, (ca_crt, ca_key): (&Path, &Path), ext: &[&str]) {
    let mut cmd = openssl(NEW_KEY);
    cmd.args(["-days", "825", "-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(crt)
        .arg("-CA")
        .arg(ca_crt)
        .arg("-CAkey")
        .arg(ca_key);
    for e in ext {
        cmd.args(["-addext", e]);
    }
    run(cmd);
}

fn openssl(args: &[&str]) -> Command {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    cmd
}

fn run(mut cmd: Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is openssl installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
