//! Hosts for capture tests: Linux network namespaces made by the test (`ip netns add`),
//! linked by veth pairs, each with a thread whose tokio runtime opens its sockets there, and
//! processes started inside them (as the proxy's own user where the rules need it). Removed
//! (namespaces, with their links and rules) when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The user the image's proxy runs as, whose traffic the capture rules leave alone.
pub const PROXY_UID: u32 = 65532;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with its loopback up, and a runtime inside it.
pub struct Netns {
    /// Its name (`ip netns`).
    pub name: String,
    /// A runtime whose tasks open their sockets in the namespace.
    pub rt: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Netns {
    /// Makes a namespace (named after this process, so parallel tests never collide).
    pub fn new() -> Netns {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("weft-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let path = Path::new("/var/run/netns").join(&name);
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open the namespace");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns into the namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            handle_tx.send(rt.handle().clone()).unwrap();
            rt.block_on(async {
                let _ = stopped.await;
            });
        });
        let rt = handle_rx.recv().expect("namespace runtime");
        Netns {
            name,
            rt,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Links this namespace (`ip`/24 here) with `other` (`other_ip`/24 there).
    pub fn link(&self, ip_here: &str, other: &Netns, ip_there: &str) {
        self.link_with(
            &[&format!("{ip_here}/24")],
            other,
            &[&format!("{ip_there}/24")],
        );
    }

    /// Links this namespace with `other` by a veth pair with these addresses (`ip/prefix`,
    /// IPv4 or IPv6) at each end.
    pub fn link_with(&self, here: &[&str], other: &Netns, there: &[&str]) {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let (a, b) = (format!("wv{n}a"), format!("wv{n}b"));
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ]);
        for (ns, dev, addrs) in [(&self.name, &a, here), (&other.name, &b, there)] {
            for addr in addrs {
                // IPv6: usable at once, without duplicate address detection's wait.
                let mut args = vec!["-n", ns, "addr", "add", addr, "dev", dev];
                if addr.contains(':') {
                    args.push("nodad");
                }
                ip(&args);
            }
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// `program` run in the namespace as root.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// `program` run in the namespace as the proxy's user ([`PROXY_UID`]).
    pub fn command_as_proxy(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        let id = PROXY_UID.to_string();
        c.args([
            "netns", "exec", &self.name, "setpriv", "--reuid", &id, "--regid", &id,
        ])
        .args(["--clear-groups", "--"])
        .arg(program);
        c
    }

    /// `iptables-save` of the namespace's nat table.
    pub fn nat_rules(&self) -> String {
        self.saved("iptables-save")
    }

    /// `ip6tables-save` of the namespace's nat table.
    pub fn nat_rules6(&self) -> String {
        self.saved("ip6tables-save")
    }

    fn saved(&self, tool: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, tool, "-t", "nat"])
            .output()
            .expect("iptables-save");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `fut` on the namespace's runtime.
    pub async fn run<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.spawn(fut).await.expect("task in the namespace")
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A `weft-proxy` process in a namespace, as the proxy's user; killed (by PID) when
/// dropped.
pub struct NsProxy {
    child: Child,
    /// Its admin address inside the namespace.
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl NsProxy {
    /// Starts the proxy in `ns` with `yaml` and waits until `/ready` answers 200. Its files
    /// are readable by its user.
    pub async fn start(ns: &Netns, yaml: &str, admin: SocketAddr) -> NsProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        world_readable(dir.path());
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml).expect("config");
        world_readable(&config);
        let log = dir.path().join("proxy.log");
        let child = ns
            .command_as_proxy(&crate::proxy_bin())
            .arg("--config")
            .arg(&config)
            .args(["--workers", "2"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn weft-proxy");
        let mut p = NsProxy { child, admin, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("weft-proxy exited ({status}):\n{}", p.log());
            }
            if let Ok((200, _)) = p.admin_get(ns, "/ready").await {
                return p;
            }
            assert!(Instant::now() < deadline, "proxy not ready:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rewrites its config and sends SIGHUP (it re-reads the file).
    pub fn reload(&self, yaml: &str) {
        std::fs::write(self.dir.path().join("proxy.yaml"), yaml).expect("config");
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(status.success());
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// GET on its admin endpoint (from inside the namespace).
    pub async fn admin_get(&self, ns: &Netns, path: &str) -> std::io::Result<(u16, String)> {
        let admin = self.admin;
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
        let raw = ns
            .run(async move { crate::raw_request(admin, request.as_bytes()).await })
            .await?;
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        Ok((crate::status_of(&raw), body))
    }

    /// Its Prometheus metrics.
    pub async fn stats(&self, ns: &Netns) -> String {
        self.admin_get(ns, "/stats/prometheus")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

impl Drop for NsProxy {
    fn drop(&mut self) {
        // `ip netns exec` runs setpriv, which execs the proxy: one process, this PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes `path` readable (and a directory enterable) by every user.
pub fn world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
