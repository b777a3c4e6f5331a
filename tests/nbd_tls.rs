//! `ringblk-nbd` with X.509 TLS, driven by real clients (qemu-img, nbdinfo,
//! nbdcopy) and by raw sockets. A private CA, a server certificate and client
//! certificates are made per test with GnuTLS's certtool, laid out as QEMU's
//! `tls-creds-x509` expects: the server's directory holds ca-cert.pem,
//! server-cert.pem and server-key.pem; a client's holds ca-cert.pem,
//! client-cert.pem and client-key.pem (libnbd's `tls-certificates=DIR` reads
//! the same layout).

#[path = "nbd_wire.rs"]
mod wire;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ringblk_tests::{assert_bytes_eq, bin, have, run, Rng};
use wire::*;

const SIZE: usize = 4 << 20;

/// The subject of client1's certificate as QEMU's authz-simple sees it:
/// GnuTLS's gnutls_x509_crt_get_dn, which lists the RDNs in certificate
/// (DER) order. certtool puts C, then O, then CN.
const CLIENT1_DN_QEMU: &str = "C=GB,O=ringblk test,CN=client1";
/// The same RDNs most specific first (RFC 4514 order).
const CLIENT1_DN_REVERSED: &str = "CN=client1,O=ringblk test,C=GB";

fn tools() -> bool {
    have("certtool") && have("qemu-img") && have("nbdinfo")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Certificates and the image, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Directories: `server` (verify-peer clients against the CA), `client1`
    /// (C=GB, O=ringblk test, CN=client1), `client2` (just CN=client2),
    /// `nocert` (only the CA), `rogue` (CN=client1 again, from another CA).
    /// Also `disk.raw` and the same data as `disk.qcow2`.
    fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir_in("/var/tmp").unwrap() };
        let ca = pki.ca("ca", "ringblk test CA");
        let rogue_ca = pki.ca("rogue-ca", "some other CA");
        pki.cert(&ca, "server", "organization = ringblk test\ncn = localhost\ndns_name = localhost\ntls_www_server\n");
        // certtool writes these in the order C, O, CN.
        pki.cert(&ca, "client1", "country = GB\norganization = ringblk test\ncn = client1\ntls_www_client\n");
        pki.cert(&ca, "client2", "cn = client2\ntls_www_client\n");
        pki.cert(&rogue_ca, "rogue", "country = GB\norganization = ringblk test\ncn = client1\ntls_www_client\n");
        let layout = [
            ("server", "ca", "server", "server"),
            ("client1", "ca", "client1", "client"),
            ("client2", "ca", "client2", "client"),
            ("rogue", "ca", "rogue", "client"),
        ];
        for (dir, ca, cert, role) in layout {
            let d = pki.path(dir);
            std::fs::create_dir(&d).unwrap();
            std::fs::copy(pki.path(&format!("{ca}-cert.pem")), d.join("ca-cert.pem")).unwrap();
            std::fs::copy(pki.path(&format!("{cert}-cert.pem")), d.join(format!("{role}-cert.pem"))).unwrap();
            std::fs::copy(pki.path(&format!("{cert}-key.pem")), d.join(format!("{role}-key.pem"))).unwrap();
        }
        std::fs::create_dir(pki.path("nocert")).unwrap();
        std::fs::copy(pki.path("ca-cert.pem"), pki.path("nocert/ca-cert.pem")).unwrap();

        // 4 MiB: random data in every other 256 KiB, zeroes between.
        let mut rng = Rng::new(0x715);
        let mut data = vec![0u8; SIZE];
        for (i, c) in data.chunks_mut(256 << 10).enumerate() {
            if i % 2 == 0 {
                c.copy_from_slice(&rng.bytes(c.len()));
            }
        }
        std::fs::write(pki.path("disk.raw"), &data).unwrap();
        let (raw, qcow2) = (pki.path("disk.raw"), pki.path("disk.qcow2"));
        run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]));
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn template(&self, name: &str, body: &str) -> PathBuf {
        let p = self.path(&format!("{name}.info"));
        let mut f = std::fs::File::create(&p).unwrap();
        writeln!(f, "{body}expiration_days = 30").unwrap();
        p
    }

    fn key(&self, name: &str) -> PathBuf {
        let k = self.path(&format!("{name}-key.pem"));
        // RSA: QEMU insists on the key encipherment usage, which certtool
        // does not give ECDSA keys.
        run(Command::new("certtool").args(["--generate-privkey", "--bits", "2048", "--outfile", s(&k)]));
        k
    }

    /// A self-signed CA; returns its name.
    fn ca(&self, name: &str, cn: &str) -> String {
        let key = self.key(name);
        let t = self.template(name, &format!("cn = {cn}\nca\ncert_signing_key\n"));
        let cert = self.path(&format!("{name}-cert.pem"));
        run(Command::new("certtool").args([
            "--generate-self-signed",
            "--load-privkey",
            s(&key),
            "--template",
            s(&t),
            "--outfile",
            s(&cert),
        ]));
        name.to_string()
    }

    /// A certificate for `name` signed by the CA `ca`.
    fn cert(&self, ca: &str, name: &str, body: &str) {
        let key = self.key(name);
        let t = self.template(name, &format!("{body}signing_key\nencryption_key\n"));
        let (ca_cert, ca_key) = (self.path(&format!("{ca}-cert.pem")), self.path(&format!("{ca}-key.pem")));
        let cert = self.path(&format!("{name}-cert.pem"));
        run(Command::new("certtool").args([
            "--generate-certificate",
            "--load-privkey",
            s(&key),
            "--load-ca-certificate",
            s(&ca_cert),
            "--load-ca-privkey",
            s(&ca_key),
            "--template",
            s(&t),
            "--outfile",
            s(&cert),
        ]));
    }

    /// `ringblk-nbd` exporting disk.qcow2 with TLS required. `authz`: the
    /// identity for `--tls-authz`, in QEMU option syntax (commas doubled).
    fn server(&self, name: &str, verify_peer: bool, authz: Option<&str>) -> NbdServer {
        let creds = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer={}",
            s(&self.path("server")),
            if verify_peer { "on" } else { "off" }
        );
        let img = self.path("disk.qcow2");
        let mut args = vec!["-v", "-t", "-e", "4", "--object", &creds, "--tls-creds", "tls0"];
        let obj;
        if let Some(id) = authz {
            obj = format!("authz-simple,id=auth0,identity={id}");
            args.extend(["--object", &obj, "--tls-authz", "auth0"]);
        }
        args.extend(["-f", "qcow2", s(&img)]);
        NbdServer::ringblk(Via::Unix(self.path(&format!("{name}.sock"))), &args)
    }

    /// qemu-img `sub` against the server's socket as a TLS client with the
    /// credentials in `client` (a directory name), then `rest`.
    fn qemu_img(&self, sub: &str, sock: &Path, client: &str, rest: &[&str]) -> Output {
        let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(&self.path(client)));
        // Over a unix socket QEMU has no host name to check the server's
        // certificate against unless told.
        let opts = format!("driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost", s(sock));
        output(Command::new("qemu-img").args([sub, "--object", &creds, "--image-opts", &opts]).args(rest))
    }

    /// `ringblk sub` as a TLS client of the socket with the credentials in
    /// `client` and `opts` added to the image options, then `rest`.
    fn ringblk(&self, sub: &str, sock: &Path, client: &str, opts: &str, rest: &[&str]) -> Output {
        let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(&self.path(client)));
        let image = format!("driver=nbd,server.type=unix,server.path={},tls-creds=tls0{opts}", s(sock));
        output(Command::new(bin("ringblk")).args([sub, "--object", &creds, "--image-opts", &image]).args(rest))
    }

    /// The libnbd URI for a TLS connection with the credentials in `client`.
    fn uri(&self, sock: &Path, client: &str) -> String {
        format!("nbds+unix:///?socket={}&tls-certificates={}", s(sock), s(&self.path(client)))
    }
}

/// qemu-nbd exporting a copy of disk.qcow2 (ringblk-nbd may hold the
/// original's lock) with the server credentials as `tls0` (verify-peer on),
/// plus `extra` arguments.
fn qemu_nbd(pki: &Pki, name: &str, extra: &[&str]) -> NbdServer {
    let img = pki.path(&format!("{name}.qcow2"));
    std::fs::copy(pki.path("disk.qcow2"), &img).unwrap();
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on", s(&pki.path("server")));
    let mut args = vec!["-t", "-e", "4", "--object", &creds, "--tls-creds", "tls0"];
    args.extend_from_slice(extra);
    args.extend(["-f", "qcow2", s(&img)]);
    let sock = pki.path(&format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    NbdServer::start("qemu-nbd", Via::Unix(sock), &args)
}

#[track_caller]
fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[track_caller]
fn refused(o: Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what} succeeded but must be refused: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn qemu_img_reads_the_export_over_tls() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let srv = pki.server("srv", true, None);
    let info = ok(pki.qemu_img("info", srv.sock(), "client1", &["--output=json"]), "qemu-img info over TLS");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], SIZE as u64, "{info}");
    let out = pki.path("copy.raw");
    ok(pki.qemu_img("convert", srv.sock(), "client1", &["-O", "raw", s(&out)]), "qemu-img convert over TLS");
    let want = std::fs::read(pki.path("disk.raw")).unwrap();
    assert_bytes_eq(&std::fs::read(&out).unwrap(), &want, "qemu-img convert of the export over TLS");
    // Writes too: convert other data onto the export, then read it back.
    let src = pki.path("new.raw");
    let mut rng = Rng::new(3);
    let new = rng.bytes(SIZE);
    std::fs::write(&src, &new).unwrap();
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(&pki.path("client1")));
    let target =
        format!("driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost", s(srv.sock()));
    ok(
        output(Command::new("qemu-img").args([
            "convert",
            "-n",
            "--object",
            &creds,
            "-f",
            "raw",
            s(&src),
            "--target-image-opts",
            &target,
        ])),
        "qemu-img convert onto the export over TLS",
    );
    ok(pki.qemu_img("convert", srv.sock(), "client1", &["-O", "raw", s(&out)]), "qemu-img convert over TLS");
    assert_bytes_eq(&std::fs::read(&out).unwrap(), &new, "data written over TLS, read back over TLS");
    srv.finish();
}

#[test]
fn libnbd_clients_connect_over_tls() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let srv = pki.server("srv", true, None);
    let uri = pki.uri(srv.sock(), "client1");
    let json = ok(output(Command::new("nbdinfo").args(["--json", &uri])), "nbdinfo over TLS");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["TLS"], true, "{json}");
    assert_eq!(v["exports"][0]["export-size"], SIZE as u64, "{json}");
    let size = ok(output(Command::new("nbdinfo").args(["--size", &uri])), "nbdinfo --size");
    assert_eq!(size.trim(), SIZE.to_string());
    if have("nbdcopy") {
        // Several connections at once, structured replies, all under TLS.
        let out = pki.path("nbdcopy.raw");
        ok(output(Command::new("nbdcopy").args([&uri, s(&out)])), "nbdcopy over TLS");
        let want = std::fs::read(pki.path("disk.raw")).unwrap();
        assert_bytes_eq(&std::fs::read(&out).unwrap(), &want, "nbdcopy of the export over TLS");
    }
    srv.finish();
}

#[test]
fn plain_text_clients_are_refused_and_get_no_data() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let mut srv = pki.server("srv", true, None);
    let plain = format!("nbd+unix:///?socket={}", s(srv.sock()));
    refused(output(Command::new("nbdinfo").arg(&plain)), "nbdinfo without TLS");
    let err = refused(output(Command::new("qemu-img").args(["info", &plain])), "qemu-img info without TLS");
    // QEMU names the server's NBD_REP_ERR_TLS_REQD.
    assert!(err.contains("TLS"), "qemu-img did not see a TLS-required refusal: {err}");

    // Raw: every option but STARTTLS and ABORT is answered TLS_REQD, and the
    // connection stays in step.
    let mut c = greet(srv.sock());
    for (opt, data) in [(OPT_GO, go_data("")), (OPT_INFO, go_data("")), (OPT_LIST, vec![]), (OPT_GO, go_data(""))] {
        c.write_all(&option(opt, &data)).unwrap();
        let r = read_option_reply(&mut c).unwrap();
        assert_eq!((r.opt, r.ty), (opt, REP_ERR_TLS_REQD), "option {opt} without TLS: {r:?}");
    }
    // EXPORT_NAME cannot be refused with a reply: the server hangs up, and
    // sends no export size.
    c.write_all(&option(OPT_EXPORT_NAME, b"")).unwrap();
    let got = wait_closed(&mut c, IO_TIMEOUT);
    assert!(got.is_empty(), "EXPORT_NAME without TLS got {got:02x?}");

    // STARTTLS, then plain text instead of a TLS handshake: the connection
    // ends with at most a TLS alert, never NBD data.
    let mut c = greet(srv.sock());
    c.write_all(&option(OPT_STARTTLS, &[])).unwrap();
    let r = read_option_reply(&mut c).unwrap();
    assert_eq!((r.opt, r.ty), (OPT_STARTTLS, REP_ACK));
    c.write_all(&option(OPT_GO, &go_data(""))).unwrap();
    let got = wait_closed(&mut c, IO_TIMEOUT);
    assert!(got.is_empty() || got[0] == 0x15, "after a botched TLS handshake the server sent {got:02x?}");

    // ABORT is allowed in plain text.
    let mut c = greet(srv.sock());
    c.write_all(&option(OPT_ABORT, &[])).unwrap();
    let r = read_option_reply(&mut c).unwrap();
    assert_eq!((r.opt, r.ty), (OPT_ABORT, REP_ACK));
    wait_closed(&mut c, IO_TIMEOUT);

    srv.assert_alive();
    // A TLS client still gets in.
    ok(pki.qemu_img("info", srv.sock(), "client1", &[]), "qemu-img info over TLS");
    srv.finish();
}

#[test]
fn tls_authz_admits_only_the_listed_identity() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    // client2's subject has one RDN, so its DN reads the same in any order.
    let srv = pki.server("allow", true, Some("CN=client2"));
    ok(pki.qemu_img("info", srv.sock(), "client2", &[]), "qemu-img as the authorized client");
    ok(output(Command::new("nbdinfo").arg(pki.uri(srv.sock(), "client2"))), "nbdinfo as the authorized client");
    refused(pki.qemu_img("info", srv.sock(), "client1", &[]), "qemu-img as a verified but unlisted client");
    refused(output(Command::new("nbdinfo").arg(pki.uri(srv.sock(), "client1"))), "nbdinfo as an unlisted client");
    srv.finish();

    let srv = pki.server("deny", true, Some("CN=intruder"));
    refused(pki.qemu_img("info", srv.sock(), "client2", &[]), "qemu-img with an identity not listed");
    refused(output(Command::new("nbdinfo").arg(pki.uri(srv.sock(), "client2"))), "nbdinfo not listed");
    srv.finish();

    // The right RDNs in an order neither QEMU nor RFC 4514 uses: no match.
    let srv = pki.server("deny2", true, Some("O=ringblk test,,CN=client1,,C=GB"));
    refused(pki.qemu_img("info", srv.sock(), "client1", &[]), "qemu-img with RDNs in a third order");
    srv.finish();
}

/// The identity an authz-simple object must name for a certificate with
/// several RDNs is the string QEMU builds (GnuTLS's gnutls_x509_crt_get_dn:
/// certificate order, "C=GB,O=ringblk test,CN=client1"), so one command line
/// works with qemu-nbd and ringblk-nbd alike. qemu-nbd is the oracle.
#[test]
fn tls_authz_identity_is_the_dn_as_qemu_writes_it() {
    if !tools() || !have("qemu-nbd") {
        return;
    }
    let pki = Pki::new();
    let qemu_form = CLIENT1_DN_QEMU.replace(',', ",,");
    let reversed = CLIENT1_DN_REVERSED.replace(',', ",,");
    for (id, admitted) in [(&qemu_form, true), (&reversed, false)] {
        // The oracle: qemu-nbd with the same objects.
        let authz = format!("authz-simple,id=auth0,identity={id}");
        let q = qemu_nbd(&pki, "q", &["--object", &authz, "--tls-authz", "auth0"]);
        let q_ok = pki.qemu_img("info", q.sock(), "client1", &[]).status.success();
        drop(q);
        assert_eq!(q_ok, admitted, "qemu-nbd with identity={id}: the oracle changed its mind");

        let srv = pki.server("rb", true, Some(id));
        let o = pki.qemu_img("info", srv.sock(), "client1", &[]);
        assert_eq!(
            o.status.success(),
            admitted,
            "ringblk-nbd with identity={id} must {} client1 as qemu-nbd does: {}{}",
            if admitted { "admit" } else { "refuse" },
            String::from_utf8_lossy(&o.stderr),
            srv.log()
        );
        srv.finish();
    }
}

#[test]
fn verify_peer_requires_a_certificate_from_the_ca() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    let mut srv = pki.server("on", true, None);
    refused(pki.qemu_img("info", srv.sock(), "nocert", &[]), "qemu-img without a client certificate");
    refused(output(Command::new("nbdinfo").arg(pki.uri(srv.sock(), "nocert"))), "nbdinfo without a certificate");
    refused(pki.qemu_img("info", srv.sock(), "rogue", &[]), "qemu-img with a certificate from another CA");
    refused(output(Command::new("nbdinfo").arg(pki.uri(srv.sock(), "rogue"))), "nbdinfo with a rogue certificate");
    srv.assert_alive();
    ok(pki.qemu_img("info", srv.sock(), "client1", &[]), "qemu-img with a good certificate");
    srv.finish();

    // verify-peer=off: no client certificate needed.
    let srv = pki.server("off", false, None);
    ok(pki.qemu_img("info", srv.sock(), "nocert", &[]), "qemu-img without a certificate, verify-peer=off");
    ok(output(Command::new("nbdinfo").arg(pki.uri(srv.sock(), "nocert"))), "nbdinfo without a certificate");
    srv.finish();
}

/// ringblk as a TLS client: the same objects and image options as qemu-img,
/// against ringblk-nbd and against qemu-nbd, with the data checked and
/// `map` and `-L` compared with QEMU's own output.
#[test]
fn ringblk_is_a_tls_client_like_qemu_img() {
    if !tools() || !have("qemu-nbd") {
        return;
    }
    let pki = Pki::new();
    let want = std::fs::read(pki.path("disk.raw")).unwrap();
    let ours = pki.server("srv", true, None);
    let theirs = qemu_nbd(&pki, "q", &[]);
    for sock in [ours.sock(), theirs.sock()] {
        let what = |w: &str| format!("{w} from {}", s(sock));
        let info = ok(pki.ringblk("info", sock, "client1", "", &["--output=json"]), &what("ringblk info"));
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"], SIZE as u64, "{info}");
        let map = ok(pki.ringblk("map", sock, "client1", "", &["--output=json"]), &what("ringblk map"));
        let qmap = ok(pki.qemu_img("map", sock, "client1", &["--output=json"]), &what("qemu-img map"));
        let parse = |j: &str| serde_json::from_str::<serde_json::Value>(j).unwrap();
        assert_eq!(parse(&map), parse(&qmap), "{}", what("map over TLS"));
        let out = pki.path("copy.raw");
        ok(pki.ringblk("convert", sock, "client1", "", &["-O", "raw", s(&out)]), &what("ringblk convert"));
        assert_bytes_eq(&std::fs::read(&out).unwrap(), &want, &what("ringblk convert over TLS"));
        // libnbd's URI form, with its certificate directory.
        let o = output(Command::new(bin("ringblk")).args(["info", "--output=json", &pki.uri(sock, "client1")]));
        let v: serde_json::Value = serde_json::from_str(&ok(o, &what("ringblk info nbds+unix://"))).unwrap();
        assert_eq!(v["virtual-size"], SIZE as u64);
    }
    // -L with TLS: byte for byte what qemu-nbd -L prints.
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(&pki.path("client1")));
    let list = |tool: &Path| {
        let args =
            ["-L", "-k", s(ours.sock()), "--object", &creds, "--tls-creds", "tls0", "--tls-hostname", "localhost"];
        ok(output(Command::new(tool).args(args)), &format!("{} -L over TLS", tool.display()))
    };
    assert_eq!(list(&bin("ringblk-nbd")), list(Path::new("qemu-nbd")));
    drop(theirs);
    ours.finish();
}

/// What the TLS client must refuse: a server certificate from a CA it does
/// not trust or for another name, a server without TLS, and (from the
/// server's side) a client the authz object does not list. Trust the CA
/// (or turn verify-peer off) and the same connection works.
#[test]
fn ringblk_tls_client_refuses_what_it_cannot_trust() {
    if !tools() {
        return;
    }
    let pki = Pki::new();
    // A client whose only trusted CA is the rogue one.
    let d = pki.path("trusts-rogue");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(pki.path("rogue-ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    std::fs::copy(pki.path("client1/client-cert.pem"), d.join("client-cert.pem")).unwrap();
    std::fs::copy(pki.path("client1/client-key.pem"), d.join("client-key.pem")).unwrap();

    let srv = pki.server("srv", false, None);
    let err = refused(pki.ringblk("info", srv.sock(), "trusts-rogue", "", &[]), "a server from an untrusted CA");
    assert!(err.contains("certificate") || err.contains("Certificate"), "{err}");
    let o = pki.ringblk("info", srv.sock(), "trusts-rogue", ",tls-hostname=localhost", &[]);
    refused(o, "an untrusted CA with the right host name");
    // verify-peer=off on the client accepts any server certificate.
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client,verify-peer=off", s(&d));
    let image = format!("driver=nbd,server.type=unix,server.path={},tls-creds=tls0", s(srv.sock()));
    ok(
        output(Command::new(bin("ringblk")).args(["info", "--object", &creds, "--image-opts", &image])),
        "verify-peer=off",
    );
    // The name: over a unix socket none is checked unless given.
    ok(pki.ringblk("info", srv.sock(), "nocert", "", &[]), "no host name to check");
    ok(pki.ringblk("info", srv.sock(), "nocert", ",tls-hostname=localhost", &[]), "the certificate's name");
    let err = refused(pki.ringblk("info", srv.sock(), "nocert", ",tls-hostname=elsewhere.example", &[]), "wrong name");
    assert!(err.contains("name") || err.contains("Name"), "{err}");
    // Credentials for the wrong end, and unknown ids, fail before connecting.
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", s(&pki.path("server")));
    let err = refused(
        output(Command::new(bin("ringblk")).args(["info", "--object", &creds, "--image-opts", &image])),
        "server credentials on a client",
    );
    assert!(err.contains("client endpoint"), "{err}");
    // A plain client of a TLS server is told TLS is required.
    let plain = format!("nbd+unix:///?socket={}", s(srv.sock()));
    let err = refused(output(Command::new(bin("ringblk")).args(["info", &plain])), "a plain client");
    assert!(err.contains("requires TLS"), "{err}");
    // nbds without credentials says what to add.
    let err = refused(
        output(Command::new(bin("ringblk")).args(["info", &format!("nbds+unix:///?socket={}", s(srv.sock()))])),
        "nbds without credentials",
    );
    assert!(err.contains("tls-certificates"), "{err}");
    srv.finish();

    // A server without TLS: the client does not fall back to plain text.
    let plain_srv =
        NbdServer::ringblk(Via::Unix(pki.path("plain.sock")), &["-t", "-f", "qcow2", s(&pki.path("disk.qcow2"))]);
    let err = refused(pki.ringblk("info", plain_srv.sock(), "client1", "", &[]), "TLS to a plain server");
    assert!(err.contains("refused TLS"), "{err}");
    plain_srv.finish();

    // The server's authz sees the client certificate ringblk presents.
    let srv = pki.server("authz", true, Some("CN=client2"));
    ok(pki.ringblk("info", srv.sock(), "client2", "", &[]), "the listed client");
    let err = refused(pki.ringblk("info", srv.sock(), "client1", "", &[]), "a client not listed");
    assert!(err.contains("closed the connection"), "{err}");
    refused(pki.ringblk("info", srv.sock(), "nocert", "", &[]), "a client without a certificate");
    srv.finish();
}
