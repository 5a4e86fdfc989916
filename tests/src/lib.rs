//! Harness for Weft's end-to-end tests: start the real `weft-proxy` binary on loopback, real
//! upstream HTTP servers it can proxy to (and that tests can kill and restart), and clients.
//!
//! The proxy binary is looked up next to the test executable (`target/<profile>/weft-proxy`),
//! or at `$WEFT_PROXY_BIN`; build it first with `cargo build --bins` (the README's test
//! command does).

pub mod netns;
pub mod pki;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Path of the `weft-proxy` binary under test.
pub fn proxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WEFT_PROXY_BIN") {
        return p.into();
    }
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/weft-proxy
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("weft-proxy");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bins` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// Path of another binary of the workspace (`weft-control`, `weftctl`), next to
/// `weft-proxy`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let bin = proxy_bin().with_file_name(name);
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bins` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// A running `weft-control` process, killed (by PID) when dropped.
pub struct ControlProcess {
    child: Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its data directory (kept by the caller across restarts).
    pub data_dir: PathBuf,
    log: PathBuf,
    token: Option<String>,
    /// Started with `--tls`: clients use https:// and its root.
    tls: bool,
}

impl ControlProcess {
    /// Starts `weft-control` on a free port with `data_dir`, waiting until it answers.
    pub async fn start(data_dir: &std::path::Path) -> ControlProcess {
        Self::start_at(data_dir, free_port(), None).await
    }

    /// Starts it on `port`, with a bearer token if given.
    pub async fn start_at(
        data_dir: &std::path::Path,
        port: u16,
        token: Option<&str>,
    ) -> ControlProcess {
        Self::start_full(data_dir, port, token, &[]).await
    }

    /// Starts it on a free port with extra arguments (`--cert-ttl-seconds 4`).
    pub async fn start_with(data_dir: &std::path::Path, args: &[&str]) -> ControlProcess {
        Self::start_full(data_dir, free_port(), None, args).await
    }

    /// Starts it on `port`, with a bearer token if given and extra arguments.
    pub async fn start_full(
        data_dir: &std::path::Path,
        port: u16,
        token: Option<&str>,
        args: &[&str],
    ) -> ControlProcess {
        match Self::try_start_full(data_dir, port, token, args).await {
            Ok(p) => p,
            Err(log) => panic!("weft-control exited at startup:\n{log}"),
        }
    }

    /// Starts it on a free port with extra arguments, or its log if it exits at startup.
    pub async fn try_start(
        data_dir: &std::path::Path,
        args: &[&str],
    ) -> Result<ControlProcess, String> {
        Self::try_start_full(data_dir, free_port(), None, args).await
    }

    /// [`ControlProcess::start_full`], or its log if it exits at startup.
    pub async fn try_start_full(
        data_dir: &std::path::Path,
        port: u16,
        token: Option<&str>,
        args: &[&str],
    ) -> Result<ControlProcess, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = data_dir.with_extension(format!("{port}.log"));
        let mut cmd = Command::new(workspace_bin("weft-control"));
        cmd.arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(t) = token {
            cmd.env("WEFT_CONTROL_TOKEN", t);
        }
        let mut p = ControlProcess {
            child: cmd.spawn().expect("spawn weft-control"),
            addr,
            data_dir: data_dir.to_owned(),
            log,
            token: token.map(str::to_owned),
            tls: args.contains(&"--tls"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(format!("({status})\n{}", p.log()));
            }
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(p);
            }
            assert!(
                Instant::now() < deadline,
                "weft-control not up:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://<addr>`, or `https://` when it serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The trust bundle it keeps in its data dir (what TLS clients verify it against).
    pub fn root_ca(&self) -> PathBuf {
        self.data_dir.join("ca").join("bundle.pem")
    }

    /// Arguments that make a proxy follow this control service as `id` with `labels`,
    /// keeping its state in `state_dir`.
    pub fn proxy_args(
        &self,
        id: &str,
        labels: &[&str],
        state_dir: &std::path::Path,
    ) -> Vec<String> {
        let mut args = vec![
            "--control".to_owned(),
            self.url(),
            "--id".to_owned(),
            id.to_owned(),
            "--state-dir".to_owned(),
            state_dir.display().to_string(),
        ];
        for l in labels {
            args.push("--label".to_owned());
            args.push((*l).to_owned());
        }
        if self.tls {
            args.push("--control-ca-file".to_owned());
            args.push(self.root_ca().display().to_string());
        }
        args
    }

    /// Runs `weftctl` against this service (with its token): exit code, stdout, stderr.
    pub fn weftctl(&self, args: &[&str]) -> (i32, String, String) {
        self.weftctl_stdin(args, None)
    }

    /// Runs `weftctl` with `stdin` fed to it.
    pub fn weftctl_stdin(&self, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
        use std::io::Write;
        let mut cmd = Command::new(workspace_bin("weftctl"));
        cmd.arg("--server").arg(self.url());
        if self.tls {
            cmd.arg("--ca-file").arg(self.root_ca());
        }
        cmd.args(args)
            .env_remove("WEFT_TOKEN")
            .env_remove("WEFT_CONTROL_CA")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = &self.token {
            cmd.env("WEFT_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("spawn weftctl");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write stdin");
        }
        let out = child.wait_with_output().expect("weftctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Kills it with SIGKILL (no goodbye to anyone) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Path of a guest filter built for wasm32-wasip1 from `tests/filters/` (e.g.
/// `compat_basic`); `tests/run.sh` builds them.
pub fn guest_filter(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/e2e-<hash> -> target/
    let target = exe.ancestors().nth(3).expect("target dir").to_path_buf();
    let path = target.join(format!("wasm32-wasip1/release/{name}.wasm"));
    assert!(
        path.exists(),
        "{} not found: build the guest filters first (tests/run.sh does)",
        path.display()
    );
    path
}

/// Path of a standard filter of `filters/` built for wasm32-wasip1 with the `filter` profile
/// (e.g. `weft_filter_router`); `tests/run.sh` builds them.
pub fn standard_filter(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let target = exe.ancestors().nth(3).expect("target dir").to_path_buf();
    let path = target.join(format!("wasm32-wasip1/filter/{name}.wasm"));
    assert!(
        path.exists(),
        "{} not found: build the standard filters first (tests/run.sh does)",
        path.display()
    );
    path
}

/// A module cache shared by the tests, so that each module is compiled once per run.
pub fn shared_module_cache() -> PathBuf {
    std::env::temp_dir().join("weft-test-module-cache")
}

/// A running `weft-proxy` process, killed (by PID) when dropped.
pub struct ProxyProcess {
    child: Child,
    /// Admin endpoint address.
    pub admin: SocketAddr,
    /// Address of the first listener.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

/// A config template: `{admin}` and `{listen}` are replaced by free ports.
pub fn render(template: &str, admin: u16, listen: u16) -> String {
    template
        .replace("{admin}", &format!("127.0.0.1:{admin}"))
        .replace("{listen}", &format!("127.0.0.1:{listen}"))
}

impl ProxyProcess {
    /// Writes `yaml` (with `{admin}` and `{listen}` placeholders filled in) and starts the
    /// proxy with 2 workers, waiting until `/ready` answers 200.
    pub async fn start(yaml: &str) -> ProxyProcess {
        Self::start_with(yaml, 2).await
    }

    /// Like [`ProxyProcess::start`] with a worker count. A free port can be taken by another
    /// socket between the probe and the proxy's bind (another test's outbound connection):
    /// then the proxy starts again on other ports, up to 5 times.
    pub async fn start_with(yaml: &str, workers: usize) -> ProxyProcess {
        Self::start_args_any(yaml, workers, &[]).await
    }

    /// Like [`ProxyProcess::start`] with a worker count and extra arguments (`--control
    /// ...`), on free ports; started again on other ports, up to 5 times, when one was taken
    /// between the probe and the bind (as [`ProxyProcess::start_with`]).
    pub async fn start_args_any(yaml: &str, workers: usize, args: &[String]) -> ProxyProcess {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::try_start_args(yaml, workers, args, free_port(), free_port()).await {
                Ok(p) => return p,
                Err(log) if tries < 5 && log.contains("Address already in use") => continue,
                Err(log) => panic!("weft-proxy exited at startup:\n{log}"),
            }
        }
    }

    /// Like [`ProxyProcess::start`] with a worker count, extra arguments (`--control ...`)
    /// and given admin and listener ports (to restart a proxy where it was).
    pub async fn start_args(
        yaml: &str,
        workers: usize,
        args: &[String],
        admin: u16,
        listen: u16,
    ) -> ProxyProcess {
        match Self::try_start_args(yaml, workers, args, admin, listen).await {
            Ok(p) => p,
            Err(log) => panic!("weft-proxy exited at startup:\n{log}"),
        }
    }

    /// Like [`ProxyProcess::start_args`]; a proxy that exits at startup is an error carrying
    /// its exit status and log.
    pub async fn try_start_args(
        yaml: &str,
        workers: usize,
        args: &[String],
        admin: u16,
        listen: u16,
    ) -> Result<ProxyProcess, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, render(yaml, admin, listen)).expect("write config");
        let log = dir.path().join("proxy.log");
        let child = Command::new(proxy_bin())
            .arg("--config")
            .arg(&config)
            .arg("--workers")
            .arg(workers.to_string())
            .arg("--log-level")
            .arg("info")
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn weft-proxy");
        let mut p = ProxyProcess {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            addr: SocketAddr::from(([127, 0, 0, 1], listen)),
            _dir: dir,
            log,
        };
        // Generous: a debug build compiles a large module (the router's regex engine) with
        // Cranelift in about 10 s the first time; the shared module cache makes later starts
        // fast.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(format!("({status}):\n{}", p.log()));
            }
            if let Ok((200, _)) = p.admin_get("/ready").await {
                return Ok(p);
            }
            assert!(Instant::now() < deadline, "proxy not ready:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://<listener>{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// GET on the admin endpoint: status and body.
    pub async fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let resp = raw_request(
            self.admin,
            format!(
                "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
                self.admin
            )
            .as_bytes(),
        )
        .await?;
        let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// `/clusters` as JSON.
    pub async fn clusters(&self) -> serde_json::Value {
        let (status, body) = self.admin_get("/clusters").await.expect("admin");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("clusters json")
    }

    /// Prometheus exposition text.
    pub async fn stats(&self) -> String {
        let (status, body) = self.admin_get("/stats/prometheus").await.expect("admin");
        assert_eq!(status, 200);
        body
    }

    /// Rewrites the config file with `yaml` (same ports) and sends SIGHUP: the proxy swaps
    /// its filter chains in place.
    pub fn reload(&self, yaml: &str) {
        let config = self._dir.path().join("proxy.yaml");
        let rendered = render(yaml, self.admin.port(), self.addr.port());
        // Written aside and renamed, so the proxy never reads a half-written file.
        let tmp = self._dir.path().join("proxy.yaml.new");
        std::fs::write(&tmp, rendered).expect("write config");
        std::fs::rename(&tmp, &config).expect("replace config");
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -HUP failed");
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `weft-proxy` on a config and returns its exit status and stderr (for startup
/// errors).
pub fn run_proxy_expecting_failure(yaml: &str, file_name: &str) -> (ExitStatus, String) {
    run_proxy_failing(yaml, file_name, &[])
}

/// Like [`run_proxy_expecting_failure`] with extra arguments (`--control ...`); the config's
/// `{admin}` and `{listen}` are free ports.
pub fn run_proxy_args_expecting_failure(yaml: &str, args: &[&str]) -> (ExitStatus, String) {
    run_proxy_failing(&render(yaml, free_port(), free_port()), "proxy.yaml", args)
}

fn run_proxy_failing(yaml: &str, file_name: &str, args: &[&str]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join(file_name);
    std::fs::write(&config, yaml).expect("write config");
    let mut child = Command::new(proxy_bin())
        .arg("--config")
        .arg(&config)
        .args(args)
        .env_remove("WEFT_CONTROL_CA")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().map(|mut s| s.read_to_string(&mut err));
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("weft-proxy kept running on a bad config");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `request` on a fresh connection and reads until the peer closes (bounded to 10 s).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    match read {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Ok(Err(e)) if !out.is_empty() => {
            let _ = e;
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no close; got {:?}", String::from_utf8_lossy(&out)),
        )),
    }
}

/// The value of one sample (`name{labels}` exactly as exposed) in Prometheus text.
pub fn metric_value(stats: &str, series: &str) -> Option<f64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Status code of a raw HTTP/1 response text.
pub fn status_of(raw: &str) -> u16 {
    raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A keep-alive HTTP/1.1 client.
pub fn h1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read to the end.
#[derive(Debug)]
pub struct Got {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body text.
    pub body: String,
    /// Trailers, if any.
    pub trailers: Option<http::HeaderMap>,
}

impl Got {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body parsed as the upstream's JSON echo.
    pub fn echo(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not an echo ({e}): {:?}", self.body))
    }
}

/// Sends `req` and reads the whole response (bounded to 20 s).
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Got, String> {
    let fut = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.map_err(|e| format!("{e:?}"))?;
        let trailers = collected.trailers().cloned();
        Ok(Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            trailers,
        })
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Reads from `s` until `needle` has been seen, appending to `seen` (5 s at most; panics when
/// the peer closes first or time runs out).
pub async fn read_until(s: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, needle: &str) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(seen).contains(needle) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {:?}", String::from_utf8_lossy(seen)))
            .unwrap();
        assert!(
            n > 0,
            "closed before {needle:?}: {:?}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// GET `url` with `client`.
pub async fn get(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Result<Got, String> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(client, req).await
}

/// An upstream HTTP server (HTTP/1.1 and h2c on one port) on a real loopback socket.
///
/// It answers every request with `x-upstream: <name>` and, depending on the path:
/// - `/delay/<ms>…`: waits, then echoes;
/// - `/status/<code>`: answers with that status;
/// - `/grpc`: answers like a gRPC server: body then trailers `grpc-status: 0` (announced in
///   a `trailer` header);
/// - `/fail-first/<n>…`: 503 while this upstream has served at most `n` requests, then echoes;
/// - `/bytes/<n>`: `n` bytes of `0123456789…` with a content-length, in 16 KiB frames;
/// - `/ws`: accepts an upgrade (101) and then echoes bytes on the raw connection;
/// - anything else: a JSON echo of method, path, version, headers, body and trailers.
pub struct Upstream {
    /// Name reported in `x-upstream`.
    pub name: String,
    /// Address it listens on.
    pub addr: SocketAddr,
    /// Requests served since start (across restarts).
    pub hits: Arc<AtomicUsize>,
    delay: Duration,
    stop: Option<watch::Sender<bool>>,
}

impl Upstream {
    /// Starts on a free port.
    pub async fn start(name: &str) -> Upstream {
        Self::start_slow(name, Duration::ZERO).await
    }

    /// Starts on a free port, delaying every answer by `delay`.
    pub async fn start_slow(name: &str, delay: Duration) -> Upstream {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(name, any, Arc::default(), delay).await
    }

    /// Starts on `addr` (another loopback address, a fixed port).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Upstream {
        Self::start_on(name, addr, Arc::default(), Duration::ZERO).await
    }

    async fn start_on(
        name: &str,
        addr: SocketAddr,
        hits: Arc<AtomicUsize>,
        delay: Duration,
    ) -> Upstream {
        let listener = bind_retrying(addr).await;
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = watch::channel(false);
        let name_owned = name.to_owned();
        let counter = hits.clone();
        tokio::spawn(async move {
            let mut stop = stop_rx.clone();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let name = name_owned.clone();
                        let counter = counter.clone();
                        let mut conn_stop = stop_rx.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let hit = counter.fetch_add(1, Ordering::SeqCst) + 1;
                                let name = name.clone();
                                async move {
                                    tokio::time::sleep(delay).await;
                                    answer(name, hit, req).await
                                }
                            });
                            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {}
                                // Killed: drop the connection mid-flight, like a dead process.
                                _ = conn_stop.changed() => {}
                            }
                        });
                    }
                }
            }
        });
        Upstream {
            name: name.to_owned(),
            addr,
            hits,
            delay,
            stop: Some(stop_tx),
        }
    }

    /// `host:port` for a config file.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Stops accepting and drops every open connection, like a killed process.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }

    /// Starts again on the same port.
    pub async fn restart(&mut self) {
        let again = Self::start_on(&self.name, self.addr, self.hits.clone(), self.delay).await;
        *self = again;
    }

    /// Requests served.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() > deadline => panic!("bind {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    name: String,
    hit: usize,
    mut req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let fail_first = path
        .strip_prefix("/fail-first/")
        .and_then(|r| r.split('/').next())
        .and_then(|n| n.parse::<usize>().ok());
    let mut resp = if fail_first.is_some_and(|n| hit <= n) {
        let _ = req.body_mut().collect().await;
        let mut r = Response::new(full(format!("failing hit {hit}\n")));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    } else if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|r| r.split('/').next())
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        echo(req).await
    } else if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
        let mut r = Response::new(full(format!("status {code}\n")));
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        r
    } else if path == "/grpc" {
        let _ = req.body_mut().collect().await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        trailers.insert("grpc-message", "ok".parse().expect("value"));
        let body = FramesBody(
            vec![
                hyper::body::Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi")),
                hyper::body::Frame::trailers(trailers),
            ]
            .into_iter(),
        );
        let mut r = Response::new(BodyExt::boxed(body));
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().expect("value"));
        r.headers_mut().insert(
            "trailer",
            "grpc-status, grpc-message".parse().expect("value"),
        );
        r
    } else if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        // `n` bytes of `0123456789…`, in 16 KiB frames.
        let pattern: Vec<u8> = (0..n).map(|i| b'0' + (i % 10) as u8).collect();
        let frames: Vec<_> = pattern
            .chunks(16 * 1024)
            .map(|c| hyper::body::Frame::data(Bytes::copy_from_slice(c)))
            .collect();
        let mut r = Response::new(BodyExt::boxed(FramesBody(frames.into_iter())));
        r.headers_mut()
            .insert("content-length", n.to_string().parse().expect("value"));
        r
    } else if path == "/ws" {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                // Echo until the peer closes; bounded by the peer.
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(full(String::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "weft-echo".parse().expect("value"));
        r.headers_mut()
            .insert("connection", "upgrade".parse().expect("value"));
        r
    } else {
        echo(req).await
    };
    resp.headers_mut()
        .insert("x-upstream", name.parse().expect("value"));
    Ok(resp)
}

fn full(s: String) -> UpBody {
    BodyExt::boxed(Full::new(Bytes::from(s)))
}

async fn echo(req: Request<Incoming>) -> Response<UpBody> {
    let (parts, body) = req.into_parts();
    let (body, trailers) = match body.collect().await {
        Ok(c) => {
            let trailers: BTreeMap<String, String> = c
                .trailers()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.as_str().to_owned(), v)
                })
                .collect();
            (c.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), BTreeMap::new()),
    };
    let mut headers = BTreeMap::<String, Vec<String>>::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let v = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "trailers": trailers,
    });
    let mut r = Response::new(full(v.to_string()));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("value"));
    r
}

/// A body made of a fixed list of frames (data, then trailers).
pub struct FramesBody(std::vec::IntoIter<hyper::body::Frame<Bytes>>);

impl FramesBody {
    /// A body yielding `frames` in order.
    pub fn new(frames: Vec<hyper::body::Frame<Bytes>>) -> Self {
        Self(frames.into_iter())
    }
}

impl hyper::body::Body for FramesBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.next().map(Ok))
    }
}

/// A real etcd member (Debian's etcd-server) on loopback ports of its own, with its data in
/// `dir`; killed by PID when dropped.
pub struct Etcd {
    child: std::process::Child,
    /// The client address (`127.0.0.1:port`).
    pub client: SocketAddr,
    log: PathBuf,
}

impl Etcd {
    /// Starts a one-member cluster and waits until it answers.
    pub async fn start(dir: &std::path::Path) -> Etcd {
        let (client, peer) = (free_port(), free_port());
        std::fs::create_dir_all(dir).expect("etcd dir");
        let log = dir.join("etcd.log");
        let child = Command::new("etcd")
            .args(["--name", "n1", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("n1=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("etcd log"))
            .spawn()
            .expect("etcd (the test command installs it: apt-get install etcd-server)");
        let mut e = Etcd {
            child,
            client: SocketAddr::from(([127, 0, 0, 1], client)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = e.child.try_wait() {
                panic!("etcd exited ({status}):\n{}", e.log());
            }
            // Serving once its health endpoint says so.
            if let Ok(g) = get(&h1_client(), &format!("http://{}/health", e.client)).await
                && g.status == 200
                && g.body.contains("true")
            {
                return e;
            }
            assert!(Instant::now() < deadline, "etcd not up:\n{}", e.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One member of an [`EtcdCluster`]: killed and started again on the same ports and data.
pub struct EtcdMember {
    /// Its name (`n1`, `n2`, ...).
    pub name: String,
    /// The client address (`127.0.0.1:port`).
    pub client: SocketAddr,
    peer: u16,
    dir: PathBuf,
    cluster: String,
    child: Option<Child>,
}

impl EtcdMember {
    fn spawn(&mut self) {
        let log = self.dir.join("etcd.log");
        let mut prior = std::fs::read_to_string(&log).unwrap_or_default();
        prior.push_str("\n--- started again ---\n");
        std::fs::write(&log, prior).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &format!("http://{}", self.client),
                "--advertise-client-urls",
                &format!("http://{}", self.client),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer),
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "weft-test",
                // Loopback: elections in a second, not in the default's few.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("etcd log"),
            )
            .spawn()
            .expect("etcd (the test command installs it: apt-get install etcd-server)");
        self.child = Some(child);
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// Kills it (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again (same name, ports and data) and waits until it serves.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_healthy().await;
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("etcd {} exited ({status}):\n{}", self.name, self.log());
            }
            if let Ok(g) = get(&h1_client(), &format!("http://{}/health", self.client)).await
                && g.status == 200
                && g.body.contains("true")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd {} not up:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it is the Raft leader now (its `/metrics` say so).
    pub async fn is_leader(&self) -> bool {
        match get(&h1_client(), &format!("http://{}/metrics", self.client)).await {
            Ok(g) => g
                .body
                .lines()
                .any(|l| l.trim() == "etcd_server_is_leader 1"),
            Err(_) => false,
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real etcd cluster of several members (Debian's etcd-server) on loopback ports.
pub struct EtcdCluster {
    /// Its members.
    pub members: Vec<EtcdMember>,
}

impl EtcdCluster {
    /// Starts `n` members with their data under `dir` and waits until all serve.
    pub async fn start(dir: &std::path::Path, n: usize) -> EtcdCluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("n{}=http://127.0.0.1:{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<EtcdMember> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let dir = dir.join(format!("n{}", i + 1));
                std::fs::create_dir_all(&dir).expect("etcd dir");
                EtcdMember {
                    name: format!("n{}", i + 1),
                    client: SocketAddr::from(([127, 0, 0, 1], *client)),
                    peer: *peer,
                    dir,
                    cluster: cluster.clone(),
                    child: None,
                }
            })
            .collect();
        for m in &mut members {
            m.spawn();
        }
        for m in &mut members {
            m.wait_healthy().await;
        }
        EtcdCluster { members }
    }

    /// `host:port,host:port,...` of every member, for `etcd://`.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills every member, then starts them all again (a member alone has no quorum to
    /// serve with) and waits until all serve.
    pub async fn restart_all(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        for m in &mut self.members {
            m.spawn();
        }
        for m in &mut self.members {
            m.wait_healthy().await;
        }
    }

    /// The index of the leader, waiting (up to 30 s) until there is one.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.running() && m.is_leader().await {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a [`Recorder`] received: method, path, body.
pub type Recorded = (String, String, Vec<u8>);

/// An HTTP server (HTTP/1.1 and h2) on a free loopback port that answers `200` and keeps
/// every request it got, body included; stopped when dropped.
pub struct Recorder {
    /// Its address.
    pub addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<Recorded>>>,
    stop: watch::Sender<bool>,
}

impl Recorder {
    /// Starts it.
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<std::sync::Mutex<Vec<Recorded>>> = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let kept = seen.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stopped.changed() => break,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else { continue };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let kept = kept.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            kept.lock().unwrap_or_else(|p| p.into_inner()).push((
                                parts.method.to_string(),
                                parts.uri.path().to_owned(),
                                body,
                            ));
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"recorded\n",
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { addr, seen, stop }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A TCP server where the server speaks first (as SMTP and MySQL do), on the current
/// runtime: on each connection it sends `220 <name>\r\n`, sends back in capitals whatever
/// it reads, and after the client's end of stream (half-close) sends `bye <name>\r\n` and
/// closes. Returns its address; it serves until the runtime ends.
pub async fn greeter(addr: SocketAddr, name: &str) -> SocketAddr {
    let listener = bind_retrying(addr).await;
    let addr = listener.local_addr().expect("addr");
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                if s.write_all(format!("220 {name}\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            let up = buf[..n].to_ascii_uppercase();
                            if s.write_all(&up).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(format!("bye {name}\r\n").as_bytes()).await;
            });
        }
    });
    addr
}

/// One conversation with a [`greeter`] at `addr`: the greeting (and how long it took),
/// then `message` sent, the write side closed, and everything read until the server
/// closes. Bounded to 10 s.
pub async fn converse(
    addr: SocketAddr,
    message: &str,
) -> std::io::Result<(String, Duration, String)> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    let mut seen = Vec::new();
    let greeting = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 256];
        while !seen.ends_with(b"\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before the greeting",
                ));
            }
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&seen).into_owned())
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no greeting"))??;
    let waited = started.elapsed();
    s.write_all(message.as_bytes()).await?;
    s.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no close"))??;
    Ok((
        greeting,
        waited,
        String::from_utf8_lossy(&rest).into_owned(),
    ))
}
