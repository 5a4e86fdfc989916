//! `weftctl`: the command-line client of the Weft control service (`weft-control`).
//!
//! Pushes and fetches filter modules, applies manifests of chains, filter configs and clusters
//! (see [`weft_control::manifest`]), shows what every proxy runs, follows rollouts and
//! registers service instances. A failure prints one line, `weftctl: <message>`, on stderr and exits
//! with 1; a usage error exits with 2.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tonic::{Code, Status};
use weft_client::signing::SigningKey;
use weft_client::{AuthChannel, Bearer};
use weft_control::manifest;
use weft_proto::v1::config_client::ConfigClient;
use weft_proto::v1::discovery_client::DiscoveryClient;
use weft_proto::v1::identity_client::IdentityClient;
use weft_proto::v1::modules_client::ModulesClient;
use weft_proto::v1::registry_client::RegistryClient;
use weft_proto::v1::resource::Spec;
use weft_proto::v1::{
    ApplyRequest, ApplyResponse, ChainSpec, ClusterSpec, DeleteModuleRequest,
    DeleteResourceRequest, FetchModuleRequest, FilterRef, HeartbeatRequest, Instance,
    ListModulesRequest, ListResourcesRequest, ListServicesRequest, Module, ProxyStatus, PushChunk,
    RegisterRequest, Resource, StatusRequest,
};
use weft_proto::v1::{CaStatusRequest, CreateTokenRequest, RotateCaRequest, TrustBundleRequest};

mod observe;
mod rollouts;

/// Where the control service listens unless `--server` or `WEFT_CONTROL` says otherwise.
const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";
/// The size of the chunks a module is pushed in.
const PUSH_CHUNK: usize = 256 * 1024;
/// The longest CONFIG cell of `get filterconfigs`, in characters.
const CONFIG_CELL: usize = 60;
/// How often `rollout status` asks for the proxies' status.
const ROLLOUT_POLL: Duration = Duration::from_millis(200);
/// The longest one call of `register --keep-alive` may take.
const KEEP_ALIVE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Command-line client of the Weft control service.
#[derive(Parser, Debug)]
#[command(name = "weftctl", version)]
struct Cli {
    /// The control service: a URL or `host:port`, or several comma-separated (replicas, tried in turn) [env: WEFT_CONTROL] [default: http://127.0.0.1:7070]
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// The bearer token the control service was started with [env: WEFT_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// For an https:// server: the CA its certificate chains to (the mesh's trust bundle)
    /// [env: WEFT_CONTROL_CA]
    #[arg(long, global = true, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The output format (`get chains|filterconfigs|clusters -o yaml` prints a manifest `apply -f` takes back)
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Push, list, fetch and delete WASM filter modules.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Create or replace the chains, filter configs and clusters of a manifest.
    Apply {
        /// The manifest (YAML documents separated by `---`); `-` reads stdin.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
        /// Validate and show what would change, with diffs; store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a chain, a filter config or a cluster.
    Delete {
        /// `chain`, `filterconfig` or `cluster`.
        #[arg(value_enum, ignore_case = true)]
        kind: ResourceKind,
        /// The resource's name.
        name: String,
    },
    /// List chains, filter configs, clusters, proxies or services (registry instances).
    Get {
        /// What to list.
        #[arg(value_enum, ignore_case = true)]
        what: Listing,
    },
    /// Show the config version and what every proxy runs.
    Status,
    /// Golden metrics over a recent window: requests per second, success rate and latency
    /// percentiles per service, route, edge (source workload -> destination service) or
    /// proxy, from the proxies' reports.
    Stat(observe::StatArgs),
    /// A live table of the mesh's services, edges and busiest routes, refreshed until
    /// interrupted.
    Top(observe::TopArgs),
    /// A live sample of the requests the selected proxies answer (method, path, status,
    /// latency, source, destination, route), rate-limited at each proxy, until interrupted.
    Tap(observe::TapArgs),
    /// Follow the rollout of a config version.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Register a service instance and print its id.
    Register(RegisterArgs),
    /// Remove a service instance.
    Deregister {
        /// The id `register` printed (`<service>/<address>`).
        id: String,
    },
    /// Workload identities: mint join tokens.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// The mesh CA: its trust bundle, its status, root rotation.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Add the Weft sidecar to Kubernetes workloads (offline): prints the manifest with a
    /// capture init container, the proxy as a native sidecar, and each workload's sidecar
    /// ConfigMap (docs/deploy.md).
    Inject {
        /// The manifest (YAML documents); `-` reads stdin.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
        /// The sidecar's image.
        #[arg(long)]
        proxy_image: Option<String>,
        /// The capture init container's image.
        #[arg(long)]
        init_image: Option<String>,
        /// The control service the sidecars follow.
        #[arg(long, default_value = "https://weft-control.weft-system.svc:7070")]
        control_url: String,
    },
}

/// `weftctl identity ...`.
#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Mint a single-use join token for one identity and print it (only the token, on
    /// stdout, so it can go straight into a file); a proxy given it (`identity: {
    /// token_file }`) gets a certificate for that identity.
    Token {
        /// The workload's namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// The workload's service account.
        #[arg(long)]
        service_account: String,
        /// How long the token may be redeemed, in seconds [default: one day]
        #[arg(long, default_value_t = 0)]
        ttl_seconds: u64,
        /// Redeemable by any number of proxies until it expires (one Secret for every
        /// replica of a Kubernetes workload); whoever reads it can get the identity.
        #[arg(long)]
        reusable: bool,
    },
}

/// `weftctl ca ...`.
#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Print the trust bundle (PEM).
    Bundle,
    /// Show the roots, which one signs, and the rotation under way.
    Status,
    /// Rotate to a new root with no restart and no failed connection: the new root is
    /// trusted beside the old one, which signs until every proxy has renewed and holds the
    /// new bundle; then the new root signs until every proxy holds a certificate from it;
    /// then the old root leaves the bundle. Each step lasts a certificate lifetime and a
    /// margin; the control service takes them itself.
    Rotate,
}

fn print_ca_status(output: Output, s: &weft_proto::v1::CaStatus) -> anyhow::Result<()> {
    let roots = || {
        s.roots
            .iter()
            .map(|r| {
                json!({
                    "subject": r.subject,
                    "fingerprint": r.fingerprint,
                    "signing": r.signing,
                    "not_after_unix": r.not_after_unix,
                })
            })
            .collect::<Vec<_>>()
    };
    show(
        output,
        || {
            json!({
                "trust_domain": s.trust_domain,
                "roots": roots(),
                "phase": s.phase,
                "next_step_unix": s.next_step_unix,
                "step_seconds": s.step_seconds,
            })
        },
        || {
            println!("TRUST DOMAIN  {}", s.trust_domain);
            match s.phase.as_str() {
                "" => println!("ROTATION      none"),
                phase => {
                    let left = s.next_step_unix - unix_now_secs();
                    println!(
                        "ROTATION      {phase} (next step in {}s; steps of {}s)",
                        left.max(0),
                        s.step_seconds
                    );
                }
            }
            println!("{:<8} {:<40} FINGERPRINT", "SIGNING", "SUBJECT");
            for r in &s.roots {
                println!(
                    "{:<8} {:<40} {}",
                    if r.signing { "yes" } else { "no" },
                    r.subject,
                    r.fingerprint
                );
            }
        },
    )
}

fn unix_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `weftctl module ...`.
#[derive(Subcommand, Debug)]
enum ModuleCommand {
    /// Upload a module (a `.wasm` file) and print the stored module.
    Push {
        /// The module file.
        file: PathBuf,
        /// The module's name [default: the file name without its extension]
        #[arg(long)]
        name: Option<String>,
        /// Sign the module with this ed25519 private key (PEM, PKCS#8: `weftctl module
        /// keygen` or `openssl genpkey -algorithm ed25519`); a control service with trusted
        /// keys refuses unsigned modules, and proxies with trusted keys check again.
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
    },
    /// Sign a module file for proxies that load it from disk: writes `<file>.sig` beside it
    /// (and prints the signature).
    Sign {
        /// The module file.
        file: PathBuf,
        /// The ed25519 private key (PEM, PKCS#8).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
    },
    /// Make an ed25519 key pair for signing modules: `<out>.pem` (private, mode 0600) and
    /// `<out>.pub.pem` (public: give it to `--module-trusted-key`); prints the key id.
    Keygen {
        /// Path and name of the files, without extension.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// List the stored modules.
    #[command(alias = "list")]
    Ls,
    /// Download a module's bytes to a file; a `sha256:<hex>` argument is checked against the
    /// bytes.
    Get {
        /// The module's name or `sha256:<hex>` digest.
        module: String,
        /// Where to write the bytes; `-` writes them to stdout (and the summary to stderr).
        #[arg(short = 'f', long = "output-file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Delete a module no chain refers to.
    #[command(alias = "delete")]
    Rm {
        /// The module's name or `sha256:<hex>` digest.
        module: String,
    },
}

/// `weftctl rollout ...`.
#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// Move a new version of chains or filter configs (`-f FILE`), or the chains running an
    /// older build of a module (`module NAME`), onto a growing share of the proxies; each
    /// step is promoted while the new version's error rate and latency hold against the
    /// old one's, and rolled back by itself when they do not or a proxy refuses it.
    Start(rollouts::StartArgs),
    /// Follow the staged rollout in progress, if any, until it ends; then wait until every
    /// connected proxy (of a selector) runs a config version.
    Status {
        /// The config version to wait for [default: the current one]
        #[arg(long)]
        version: Option<u64>,
        /// Only proxies with this label, `key=value`; repeat or separate with commas.
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label, value_delimiter = ',')]
        selector: Vec<(String, String)>,
        /// Seconds to wait before giving up.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// The rollouts this control service ran, newest first, with why each ended.
    History,
    /// Stop the staged rollout in progress: every proxy goes back to the old version.
    Abort {
        /// Why (recorded in the history).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `weftctl register ...`.
#[derive(clap::Args, Debug)]
struct RegisterArgs {
    /// The service (`service2`).
    service: String,
    /// Where the instance is reached: `ip:port` or `host:port`.
    address: String,
    /// A label of the instance, `key=value`; repeat or separate with commas.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label, value_delimiter = ',')]
    labels: Vec<(String, String)>,
    /// Seconds without a heartbeat after which the instance expires.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    ttl: u32,
    /// The weight for the weighted balancing policy [default: 1]
    #[arg(long)]
    weight: Option<u32>,
    /// The instance's SPIFFE ID (`spiffe://weft.local/ns/default/sa/service2`): proxies
    /// calling it over mesh TLS require it to prove this identity.
    #[arg(long)]
    identity: Option<String>,
    /// Stay running: heartbeat every ttl/3 seconds (registering again when the instance
    /// expired, retrying while the service is unreachable) and deregister on SIGINT or
    /// SIGTERM.
    #[arg(long)]
    keep_alive: bool,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

/// The kinds of config resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ResourceKind {
    #[value(alias = "chains")]
    Chain,
    #[value(
        name = "filterconfig",
        aliases = ["filterconfigs", "filter-config", "filter-configs", "fc"]
    )]
    FilterConfig,
    #[value(alias = "clusters")]
    Cluster,
    #[value(alias = "listeners")]
    Listener,
    #[value(alias = "scopes")]
    Scope,
    #[value(name = "httproute", alias = "httproutes")]
    HttpRoute,
    #[value(name = "grpcroute", alias = "grpcroutes")]
    GrpcRoute,
}

impl ResourceKind {
    /// The kind as the API spells it.
    fn api_name(self) -> &'static str {
        match self {
            ResourceKind::Chain => "Chain",
            ResourceKind::FilterConfig => "FilterConfig",
            ResourceKind::Cluster => "Cluster",
            ResourceKind::Listener => "Listener",
            ResourceKind::Scope => "Scope",
            ResourceKind::HttpRoute => "HTTPRoute",
            ResourceKind::GrpcRoute => "GRPCRoute",
        }
    }
}

/// What `get` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Listing {
    #[value(alias = "chain")]
    Chains,
    #[value(
        name = "filterconfigs",
        aliases = ["filterconfig", "filter-configs", "filter-config", "fc"]
    )]
    FilterConfigs,
    #[value(alias = "cluster")]
    Clusters,
    #[value(alias = "listener")]
    Listeners,
    #[value(alias = "scope")]
    Scopes,
    #[value(name = "httproutes", alias = "httproute")]
    HttpRoutes,
    #[value(name = "grpcroutes", alias = "grpcroute")]
    GrpcRoutes,
    #[value(alias = "proxy")]
    Proxies,
    #[value(alias = "service")]
    Services,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let server = Server::from_cli(&cli)?;
    let output = cli.output;
    match cli.command {
        Command::Inject {
            file,
            proxy_image,
            init_image,
            control_url,
        } => {
            let input = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let defaults = weft_control::inject::InjectOptions::default();
            let options = weft_control::inject::InjectOptions {
                proxy_image: proxy_image.unwrap_or(defaults.proxy_image),
                init_image: init_image.unwrap_or(defaults.init_image),
                control: control_url,
            };
            let out = weft_control::inject::inject(&input, &options).map_err(|e| anyhow!(e))?;
            print!("{out}");
            Ok(())
        }
        Command::Module(ModuleCommand::Push { file, name, sign }) => {
            push_module(&server, &file, name, sign.as_deref(), output).await
        }
        Command::Module(ModuleCommand::Sign { file, key }) => {
            let key = SigningKey::from_file(&key).map_err(|e| anyhow!(e))?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let line = key.sign(&bytes).to_line();
            let sig = weft_client::signing::sig_path(&file);
            std::fs::write(&sig, format!("{line}\n"))
                .with_context(|| format!("cannot write {}", sig.display()))?;
            eprintln!(
                "signed {} with {}: {}",
                file.display(),
                key.key_id(),
                sig.display()
            );
            println!("{line}");
            Ok(())
        }
        Command::Module(ModuleCommand::Keygen { out }) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let (private, public, id) = SigningKey::generate().map_err(|e| anyhow!(e))?;
            let with = |ext: &str| {
                let mut p = out.as_os_str().to_owned();
                p.push(ext);
                PathBuf::from(p)
            };
            let (key_file, pub_file) = (with(".pem"), with(".pub.pem"));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_file)
                .and_then(|mut f| f.write_all(private.as_bytes()))
                .with_context(|| format!("cannot write {}", key_file.display()))?;
            std::fs::write(&pub_file, public)
                .with_context(|| format!("cannot write {}", pub_file.display()))?;
            eprintln!(
                "private key {}, public key {}",
                key_file.display(),
                pub_file.display()
            );
            println!("{id}");
            Ok(())
        }
        Command::Module(ModuleCommand::Ls) => list_modules(&server, output).await,
        Command::Module(ModuleCommand::Get { module, file }) => {
            fetch_module(&server, module, &file, output).await
        }
        Command::Module(ModuleCommand::Rm { module }) => {
            let module = ModulesClient::new(server.connect().await?)
                .delete(DeleteModuleRequest { module })
                .await
                .rpc()?;
            show(
                output,
                || module_view(&module),
                || println!("module/{} deleted ({})", module.name, module.digest),
            )
        }
        Command::Apply { file, dry_run } => apply(&server, &file, dry_run, output).await,
        Command::Delete { kind, name } => {
            let request = DeleteResourceRequest {
                kind: kind.api_name().into(),
                name,
            };
            let response = ConfigClient::new(server.connect().await?)
                .delete(request)
                .await
                .rpc()?;
            show(
                output,
                || apply_view(&response, false),
                || print_changes(&response, false),
            )
        }
        Command::Get { what } => get(&server, what, output).await,
        Command::Stat(args) => observe::stat(&server, args, output).await,
        Command::Top(args) => observe::top(&server, args).await,
        Command::Tap(args) => observe::tap(&server, args, output).await,
        Command::Status => {
            let status = DiscoveryClient::new(server.connect().await?)
                .status(StatusRequest {})
                .await
                .rpc()?;
            let view =
                || json!({"version": status.version, "proxies": proxy_views(&status.proxies)});
            show(output, view, || {
                println!("config version {}", status.version);
                print_proxies(&status.proxies);
            })
        }
        Command::Rollout(RolloutCommand::Status {
            version,
            selector,
            timeout,
        }) => {
            // A staged rollout first (a failed one fails the command), then the version.
            if version.is_none() && selector.is_empty() {
                rollouts::follow_running(&server, output).await?;
            }
            rollout_status(&server, version, &selector, timeout).await
        }
        Command::Rollout(RolloutCommand::Start(args)) => {
            rollouts::start(&server, args, output).await
        }
        Command::Rollout(RolloutCommand::History) => rollouts::history(&server, output).await,
        Command::Rollout(RolloutCommand::Abort { reason }) => {
            rollouts::abort(&server, reason, output).await
        }
        Command::Register(args) => {
            let keep_alive = args.keep_alive;
            let request = RegisterRequest {
                service: args.service,
                address: args.address,
                labels: args.labels.into_iter().collect(),
                ttl_seconds: args.ttl,
                weight: args.weight.unwrap_or(0),
                identity: args.identity.unwrap_or_default(),
            };
            if keep_alive {
                return register_and_keep_alive(&server, request, output).await;
            }
            let instance = RegistryClient::new(server.connect().await?)
                .register(request)
                .await
                .rpc()?;
            print_instance(output, &instance)
        }
        Command::Identity(IdentityCommand::Token {
            namespace,
            service_account,
            ttl_seconds,
            reusable,
        }) => {
            let minted = IdentityClient::new(server.connect().await?)
                .create_token(CreateTokenRequest {
                    namespace,
                    service_account,
                    ttl_seconds,
                    reusable,
                })
                .await
                .rpc()?;
            show(
                output,
                || json!({"token": minted.token, "spiffe_id": minted.spiffe_id, "expires_unix": minted.expires_unix}),
                || {
                    eprintln!("join token for {}", minted.spiffe_id);
                    println!("{}", minted.token);
                },
            )
        }
        Command::Ca(CaCommand::Status) => {
            let status = IdentityClient::new(server.connect().await?)
                .get_ca_status(CaStatusRequest {})
                .await
                .rpc()?;
            print_ca_status(output, &status)
        }
        Command::Ca(CaCommand::Rotate) => {
            let status = IdentityClient::new(server.connect().await?)
                .rotate_ca(RotateCaRequest {})
                .await
                .rpc()?;
            print_ca_status(output, &status)
        }
        Command::Ca(CaCommand::Bundle) => {
            let bundle = IdentityClient::new(server.connect().await?)
                .trust_bundle(TrustBundleRequest {})
                .await
                .rpc()?;
            for der in &bundle.roots_der {
                print!(
                    "{}",
                    pem::encode(&pem::Pem::new("CERTIFICATE", der.clone()))
                );
            }
            Ok(())
        }
        Command::Deregister { id } => {
            let instance = RegistryClient::new(server.connect().await?)
                .deregister(HeartbeatRequest { id })
                .await
                .rpc()?;
            show(
                output,
                || instance_view(&instance),
                || println!("deregistered {}", instance.id),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

/// `module push`: streams the file in [`PUSH_CHUNK`] pieces.
async fn push_module(
    server: &Server,
    file: &Path,
    name: Option<String>,
    sign: Option<&Path>,
    output: Output,
) -> anyhow::Result<()> {
    let key = sign
        .map(SigningKey::from_file)
        .transpose()
        .map_err(|e| anyhow!(e))?;
    let name = match name {
        Some(name) => name,
        None => file
            .file_stem()
            .and_then(|stem| stem.to_str())
            .filter(|stem| !stem.is_empty())
            .ok_or_else(|| anyhow!("cannot name a module after {}: give --name", file.display()))?
            .to_owned(),
    };
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut chunks: Vec<PushChunk> = bytes
        .chunks(PUSH_CHUNK)
        .map(|data| PushChunk {
            name: String::new(),
            data: data.to_vec(),
            signature: String::new(),
        })
        .collect();
    let signature = key.map(|k| k.sign(&bytes).to_line()).unwrap_or_default();
    match chunks.first_mut() {
        Some(first) => {
            first.name = name;
            first.signature = signature;
        }
        None => chunks.push(PushChunk {
            name,
            data: vec![],
            signature,
        }),
    }
    let module = ModulesClient::new(server.connect().await?)
        .push(tokio_stream::iter(chunks))
        .await
        .rpc()?;
    show(
        output,
        || module_view(&module),
        || print_modules(std::slice::from_ref(&module)),
    )
}

/// `module ls`.
async fn list_modules(server: &Server, output: Output) -> anyhow::Result<()> {
    let modules = ModulesClient::new(server.connect().await?)
        .list(ListModulesRequest {})
        .await
        .rpc()?
        .modules;
    show(
        output,
        || modules.iter().map(module_view).collect(),
        || print_modules(&modules),
    )
}

/// `module get MODULE -f FILE`: streams the module into a file next to `file`, checks the
/// digest when `module` is one, then renames the file into place (a failed download leaves
/// `file` as it was).
async fn fetch_module(
    server: &Server,
    module: String,
    file: &Path,
    output: Output,
) -> anyhow::Result<()> {
    let to_stdout = file == Path::new("-");
    let mut stream = ModulesClient::new(server.connect().await?)
        .fetch(FetchModuleRequest {
            module: module.clone(),
        })
        .await
        .rpc()?;
    let mut download = if to_stdout {
        Download::Stdout(std::io::stdout().lock())
    } else {
        Download::create(file)?
    };
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let received = async {
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| anyhow!(status_message(&s)))?
        {
            hasher.update(&chunk.data);
            size += chunk.data.len() as u64;
            download.write(&chunk.data)?;
        }
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if module.starts_with("sha256:") && !digest.eq_ignore_ascii_case(&module) {
            bail!("module {module}: the bytes received hash to {digest}");
        }
        Ok(digest)
    }
    .await;
    let digest = match received {
        Ok(digest) => {
            download.finish()?;
            digest
        }
        Err(e) => {
            download.discard();
            return Err(e);
        }
    };
    let shown = if to_stdout {
        "stdout".to_owned()
    } else {
        file.display().to_string()
    };
    let view = json!({"module": module, "digest": digest, "size": size, "file": shown});
    let text = match output {
        Output::Table => format!("wrote {size} bytes ({digest}) to {shown}\n"),
        Output::Json => serde_json::to_string_pretty(&view)? + "\n",
        Output::Yaml => serde_yaml_ng::to_string(&view)?,
    };
    if to_stdout {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// Where `module get` writes.
enum Download {
    /// To stdout.
    Stdout(std::io::StdoutLock<'static>),
    /// To a partial file, renamed to the target when complete.
    File {
        /// The partial file.
        partial: PathBuf,
        /// The target.
        target: PathBuf,
        /// The open partial file.
        writer: std::io::BufWriter<std::fs::File>,
    },
}

impl Download {
    /// Creates the partial file next to `target`.
    fn create(target: &Path) -> anyhow::Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a file name", target.display()))?;
        let mut partial_name = std::ffi::OsString::from(".");
        partial_name.push(name);
        partial_name.push(".weftctl-partial");
        let partial = target.with_file_name(partial_name);
        let writer = std::fs::File::create(&partial)
            .map(std::io::BufWriter::new)
            .with_context(|| format!("cannot write {}", target.display()))?;
        Ok(Download::File {
            partial,
            target: target.to_owned(),
            writer,
        })
    }

    /// Writes the next bytes.
    fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        match self {
            Download::Stdout(out) => out.write_all(data).context("cannot write stdout"),
            Download::File { target, writer, .. } => writer
                .write_all(data)
                .with_context(|| format!("cannot write {}", target.display())),
        }
    }

    /// Flushes, and moves a partial file into place.
    fn finish(self) -> anyhow::Result<()> {
        match self {
            Download::Stdout(mut out) => out.flush().context("cannot write stdout"),
            Download::File {
                partial,
                target,
                writer,
            } => {
                let result = writer
                    .into_inner()
                    .map_err(std::io::IntoInnerError::into_error)
                    .and_then(|file| file.sync_all())
                    .and_then(|()| std::fs::rename(&partial, &target))
                    .with_context(|| format!("cannot write {}", target.display()));
                if result.is_err() {
                    let _ = std::fs::remove_file(&partial);
                }
                result
            }
        }
    }

    /// Removes a partial file.
    fn discard(self) {
        if let Download::File {
            partial, writer, ..
        } = self
        {
            drop(writer);
            let _ = std::fs::remove_file(&partial);
        }
    }
}

/// `apply -f FILE`: the manifest is read and checked before the service is called.
async fn apply(server: &Server, file: &Path, dry_run: bool, output: Output) -> anyhow::Result<()> {
    let (source, text) = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read stdin")?;
        ("stdin".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        (file.display().to_string(), text)
    };
    let resources = manifest::parse(&text).with_context(|| source.clone())?;
    if resources.is_empty() {
        bail!("{source} holds no resources");
    }
    let request = ApplyRequest { resources, dry_run };
    let response = ConfigClient::new(server.connect().await?)
        .apply(request)
        .await
        .rpc()?;
    show(
        output,
        || apply_view(&response, dry_run),
        || print_changes(&response, dry_run),
    )
}

/// `get chains|filterconfigs|clusters|proxies|services`.
async fn get(server: &Server, what: Listing, output: Output) -> anyhow::Result<()> {
    let channel = server.connect().await?;
    let (kind, print_resources): (_, fn(&[Resource])) = match what {
        Listing::Chains => ("Chain", print_chains),
        Listing::FilterConfigs => ("FilterConfig", print_filter_configs),
        Listing::Clusters => ("Cluster", print_clusters),
        Listing::Listeners => ("Listener", print_listeners),
        Listing::Scopes => ("Scope", print_scopes),
        Listing::HttpRoutes => ("HTTPRoute", print_routes),
        Listing::GrpcRoutes => ("GRPCRoute", print_routes),
        Listing::Proxies => {
            let proxies = DiscoveryClient::new(channel.clone())
                .status(StatusRequest {})
                .await
                .rpc()?
                .proxies;
            return show(output, || proxy_views(&proxies), || print_proxies(&proxies));
        }
        Listing::Services => {
            let instances = RegistryClient::new(channel.clone())
                .list_services(ListServicesRequest {})
                .await
                .rpc()?
                .instances;
            return show(
                output,
                || instances.iter().map(instance_view).collect(),
                || print_instances(&instances),
            );
        }
    };
    let request = ListResourcesRequest { kind: kind.into() };
    let resources = ConfigClient::new(channel)
        .list(request)
        .await
        .rpc()?
        .resources;
    match output {
        Output::Yaml => print!("{}", manifest::to_yaml(&resources)),
        Output::Json => println!("{}", manifest::to_json(&resources)),
        Output::Table => print_resources(&resources),
    }
    Ok(())
}

/// `rollout status`: polls the proxies' status until every considered proxy is synced at the
/// target version, one of them rejected it, or the time is up.
async fn rollout_status(
    server: &Server,
    version: Option<u64>,
    selector: &[(String, String)],
    timeout: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let timed_out = |progress: &str| anyhow!("rollout timed out after {timeout}s: {progress}");
    let mut discovery = DiscoveryClient::new(server.connect().await?);
    let mut target = version;
    let mut reported = None;
    let mut last_report = None;
    let started = Instant::now();
    loop {
        let status = tokio::time::timeout_at(deadline, discovery.status(StatusRequest {}))
            .await
            .map_err(|_| timed_out("the control service did not answer"))?
            .rpc()?;
        let target = *target.get_or_insert(status.version);
        let (synced, total) = match rollout(&status.proxies, target, selector) {
            Rollout::Complete { proxies } => {
                println!("rollout complete: {proxies}/{proxies} proxies at version >= {target}");
                return Ok(());
            }
            Rollout::Failed(p) => bail!(
                "rollout failed: proxy {} rejected version {}: {}",
                p.id,
                p.nacked_version,
                p.nack_error
            ),
            Rollout::Waiting { synced, total } => (synced, total),
        };
        let progress = match (total, selector_text(selector)) {
            (0, None) => "no proxy is connected".to_owned(),
            (0, Some(selector)) => format!("no connected proxy matches {selector}"),
            _ => format!("{synced}/{total} proxies at version >= {target}"),
        };
        // On change, and every 5 s while nothing changes (a proxy compiling a large module
        // for the first time is slow: say that it is still being waited for).
        let due = last_report.is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(5));
        if reported != Some((synced, total)) || due {
            reported = Some((synced, total));
            last_report = Some(Instant::now());
            eprintln!("waiting: {progress} ({} s)", started.elapsed().as_secs());
        }
        if Instant::now() + ROLLOUT_POLL > deadline {
            return Err(timed_out(&progress));
        }
        tokio::time::sleep(ROLLOUT_POLL).await;
    }
}

/// Where a rollout stands.
#[derive(Debug, PartialEq)]
enum Rollout<'a> {
    /// Every considered proxy runs the target version or a later one.
    Complete {
        /// How many proxies were considered.
        proxies: usize,
    },
    /// A considered proxy not yet synced rejected the target version or a later one.
    Failed(&'a ProxyStatus),
    /// `synced` of the `total` considered proxies run the target version or a later one.
    Waiting {
        /// Proxies synced.
        synced: usize,
        /// Proxies considered.
        total: usize,
    },
}

/// Where the rollout of `target` stands among the connected proxies that have every label
/// of `selector`; with none of them it is `Waiting`, never `Complete`. A rejection counts only
/// from a proxy not yet synced at `target` (one synced before rejecting a later version is
/// done).
fn rollout<'a>(
    proxies: &'a [ProxyStatus],
    target: u64,
    selector: &[(String, String)],
) -> Rollout<'a> {
    let considered: Vec<&ProxyStatus> = proxies
        .iter()
        .filter(|p| p.connected && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .collect();
    let total = considered.len();
    let synced = considered
        .iter()
        .filter(|p| p.synced_version >= target)
        .count();
    if total > 0 && synced == total {
        return Rollout::Complete { proxies: total };
    }
    let rejected = considered.into_iter().find(|p| {
        p.synced_version < target && !p.nack_error.is_empty() && p.nacked_version >= target
    });
    match rejected {
        Some(p) => Rollout::Failed(p),
        None => Rollout::Waiting { synced, total },
    }
}

/// `register --keep-alive`: registers, then heartbeats every ttl/3 until SIGINT or SIGTERM,
/// and deregisters. Registers again when a heartbeat finds the instance expired; moves to
/// the next address given (a replica) when one is unreachable, and retries with backoff;
/// stops only on an error retrying cannot fix (invalid request, bad token).
async fn register_and_keep_alive(
    server: &Server,
    request: RegisterRequest,
    output: Output,
) -> anyhow::Result<()> {
    let registries = server
        .urls
        .iter()
        .map(|url| Ok(RegistryClient::new(server.connect_lazy_to(url)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut current = 0;
    let interval = Duration::from_millis(u64::from(request.ttl_seconds) * 1000 / 3);
    let max_backoff = interval.min(Duration::from_secs(5));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut id: Option<String> = None;
    let mut printed = false;
    let mut backoff = Duration::ZERO;
    loop {
        let registry = &mut registries[current].clone();
        let call = async {
            match &id {
                None => registry.register(request.clone()).await,
                Some(id) => {
                    registry
                        .heartbeat(HeartbeatRequest { id: id.clone() })
                        .await
                }
            }
        };
        let result = tokio::select! {
            signal = &mut shutdown => { signal?; break; }
            result = call => result,
        };
        let pause = match result {
            Ok(response) => {
                let instance = response.into_inner();
                if !backoff.is_zero() {
                    eprintln!(
                        "weftctl: the control service at {} answers again",
                        server.urls[current]
                    );
                    backoff = Duration::ZERO;
                }
                if id.is_none() {
                    if printed {
                        eprintln!("weftctl: registered {} again", instance.id);
                    } else {
                        print_instance(output, &instance)?;
                        printed = true;
                    }
                    id = Some(instance.id);
                }
                interval
            }
            Err(status) if status.code() == Code::NotFound && id.is_some() => {
                let expired = id.take().unwrap_or_default();
                eprintln!("weftctl: instance {expired} expired; registering it again");
                Duration::ZERO
            }
            Err(status) if is_permanent(status.code()) => bail!(status_message(&status)),
            Err(status) => {
                backoff = (backoff * 2)
                    .max(Duration::from_millis(200))
                    .min(max_backoff);
                let call = if id.is_some() {
                    "heartbeat"
                } else {
                    "register"
                };
                let failure = match status.code() {
                    // Unreachable, or the connection broke (a transport error).
                    Code::Unavailable | Code::Unknown => {
                        let failed = &server.urls[current];
                        current = (current + 1) % registries.len();
                        format!("cannot reach the control service at {failed}")
                    }
                    _ => format!("{call} failed"),
                };
                eprintln!(
                    "weftctl: {failure}: {}; retrying in {:.1}s",
                    status_message(&status),
                    backoff.as_secs_f64()
                );
                backoff
            }
        };
        tokio::select! {
            signal = &mut shutdown => { signal?; break; }
            () = tokio::time::sleep(pause) => {}
        }
    }
    if let Some(id) = id {
        match registries[current]
            .clone()
            .deregister(HeartbeatRequest { id: id.clone() })
            .await
        {
            Ok(_) => println!("deregistered {id}"),
            Err(status) => eprintln!(
                "weftctl: cannot deregister {id} (it expires after its TTL): {}",
                status_message(&status)
            ),
        }
    }
    Ok(())
}

/// Whether retrying a call that failed with `code` cannot help.
fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unimplemented
    )
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------------------

/// The control service to talk to.
struct Server {
    /// Every address given (replicas), tried in turn.
    urls: Vec<String>,
    /// What every request carries.
    auth: Bearer,
    /// The CA an https:// server's certificate chains to.
    ca_file: Option<PathBuf>,
}

impl Server {
    /// The server and token of the flags, else of `WEFT_CONTROL` and `WEFT_TOKEN`.
    fn from_cli(cli: &Cli) -> anyhow::Result<Self> {
        let server = cli
            .server
            .clone()
            .or_else(|| std::env::var("WEFT_CONTROL").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let urls = weft_client::control_urls(&server).map_err(|e| anyhow!(e))?;
        let token = match cli.token.clone().filter(|t| !t.is_empty()) {
            Some(token) => Some(token),
            None => weft_client::token(None, "WEFT_TOKEN").map_err(|e| anyhow!(e))?,
        };
        let auth = Bearer::new(token.as_deref()).map_err(|e| anyhow!(e))?;
        let ca_file = cli.ca_file.clone().or_else(|| {
            std::env::var_os("WEFT_CONTROL_CA")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        Ok(Server {
            urls,
            auth,
            ca_file,
        })
    }

    /// Connects now to the first address that answers, failing when none does.
    async fn connect(&self) -> anyhow::Result<AuthChannel> {
        let mut failures = Vec::new();
        for url in &self.urls {
            let endpoint =
                weft_client::endpoint(url, self.ca_file.as_deref()).map_err(|e| anyhow!(e))?;
            match weft_client::connect(endpoint, self.auth.clone()).await {
                Ok(channel) => return Ok(channel),
                Err(e) => failures.push(format!("{url}: {}", causes(&e))),
            }
        }
        Err(anyhow!(
            "cannot reach the control service at {}",
            failures.join("; ")
        ))
    }

    /// A channel to `url` that connects on first use and reconnects after failures; each
    /// call times out after [`KEEP_ALIVE_CALL_TIMEOUT`].
    fn connect_lazy_to(&self, url: &str) -> anyhow::Result<AuthChannel> {
        let endpoint = weft_client::endpoint(url, self.ca_file.as_deref())
            .map_err(|e| anyhow!(e))?
            .timeout(KEEP_ALIVE_CALL_TIMEOUT);
        Ok(weft_client::connect_lazy(endpoint, self.auth.clone()))
    }
}

/// Turns the outcome of a call into its message or a one-line error.
trait Rpc<T> {
    /// The response's message, or the status's message as an error.
    fn rpc(self) -> anyhow::Result<T>;
}

impl<T> Rpc<T> for Result<tonic::Response<T>, Status> {
    fn rpc(self) -> anyhow::Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|status| anyhow!(status_message(&status)))
    }
}

/// The message of a status (its code's description when empty; `<message> not found` for a
/// bare NOT_FOUND name), with the cause of a transport failure.
fn status_message(status: &Status) -> String {
    let message = match status.message() {
        "" => status.code().description().to_owned(),
        message if status.code() == Code::NotFound && !message.contains("not found") => {
            format!("{message} not found")
        }
        message => message.to_owned(),
    };
    match std::error::Error::source(status) {
        Some(source) => {
            let cause = causes(source);
            if message.contains(&cause) {
                message
            } else if cause.starts_with(&message) {
                cause
            } else {
                format!("{message}: {cause}")
            }
        }
        None => message,
    }
}

/// An error and its sources joined by `: `, without tonic's bare "transport error" and
/// without repeating a source its parent already quotes.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string();
        if text != "transport error" && !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        next = error.source();
    }
    parts.join(": ")
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

/// Prints `view()` as JSON or YAML, or calls `table` for the table format.
fn show(output: Output, view: impl FnOnce() -> Value, table: impl FnOnce()) -> anyhow::Result<()> {
    match output {
        Output::Table => table(),
        Output::Json => println!("{}", serde_json::to_string_pretty(&view())?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(&view())?),
    }
    Ok(())
}

/// Prints rows under a header as a [`table`], or `no <what>` on stderr when there are none.
fn print_table<const N: usize>(what: &str, header: [&str; N], rows: Vec<[String; N]>) {
    if rows.is_empty() {
        eprintln!("no {what}");
    } else {
        print!("{}", table(header, rows));
    }
}

/// Rows under a header in left-aligned columns three spaces apart, one line each.
fn table<const N: usize>(header: [&str; N], rows: Vec<[String; N]>) -> String {
    let rows: Vec<[String; N]> = std::iter::once(header.map(str::to_owned))
        .chain(rows)
        .collect();
    let widths: [usize; N] = std::array::from_fn(|column| {
        rows.iter()
            .map(|row| row[column].chars().count())
            .max()
            .unwrap_or(0)
    });
    let mut text = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("   ").trim_end());
        text.push('\n');
    }
    text
}

/// Prints modules as a table.
fn print_modules(modules: &[Module]) {
    let rows = modules
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.digest.clone(),
                human_size(m.size),
                m.abi_version.clone(),
                match (m.verified_by.as_str(), m.signature.as_str()) {
                    ("", "") => "-".to_owned(),
                    ("", sig) => format!(
                        "{} (unverified)",
                        sig.split_whitespace().nth(1).unwrap_or("?")
                    ),
                    (key, _) => key.to_owned(),
                },
                ago(m.created_ms),
                if m.current { "*" } else { "" }.to_owned(),
                or_none(m.chains.join(",")),
            ]
        })
        .collect();
    print_table(
        "modules",
        [
            "NAME",
            "DIGEST",
            "SIZE",
            "ABI",
            "SIGNED BY",
            "CREATED",
            "CURRENT",
            "CHAINS",
        ],
        rows,
    );
}

/// Prints chains as a table.
fn print_chains(resources: &[Resource]) {
    let none = ChainSpec::default();
    let rows = resources
        .iter()
        .map(|r| {
            let chain = match &r.spec {
                Some(Spec::Chain(chain)) => chain,
                _ => &none,
            };
            let filters: Vec<String> = chain.filters.iter().map(filter_text).collect();
            [
                r.name.clone(),
                chain.listener.clone(),
                or_none(filters.join(",")),
                or_none(chain.default_cluster.clone()),
                labels_text(&r.selector),
                r.version.to_string(),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "LISTENER",
        "FILTERS",
        "DEFAULT CLUSTER",
        "SELECTOR",
        "VERSION",
    ];
    print_table("chains", header, rows);
}

/// A filter of a chain in the FILTERS column: its name, `name(@ref)` when it gets the config
/// of a FilterConfig.
fn filter_text(filter: &FilterRef) -> String {
    if filter.config_ref.is_empty() {
        filter.name.clone()
    } else {
        format!("{}(@{})", filter.name, filter.config_ref)
    }
}

/// Prints filter configs as a table.
fn print_filter_configs(resources: &[Resource]) {
    let rows = resources
        .iter()
        .map(|r| {
            let config = match &r.spec {
                Some(Spec::FilterConfig(spec)) => spec.config_json.as_str(),
                _ => "",
            };
            [
                r.name.clone(),
                r.version.to_string(),
                or_none(config_cell(config)),
            ]
        })
        .collect();
    print_table("filter configs", ["NAME", "VERSION", "CONFIG"], rows);
}

/// A configuration on one line: the JSON compacted (the text with its whitespace runs made
/// single spaces when it is not JSON), cut to [`CONFIG_CELL`] characters ending in `…`.
fn config_cell(config_json: &str) -> String {
    let text = match serde_json::from_str::<Value>(config_json) {
        Ok(value) => value.to_string(),
        Err(_) => config_json.split_whitespace().collect::<Vec<_>>().join(" "),
    };
    if text.chars().count() <= CONFIG_CELL {
        return text;
    }
    let mut cut: String = text.chars().take(CONFIG_CELL - 1).collect();
    cut.push('…');
    cut
}

/// Prints clusters as a table.
fn print_clusters(resources: &[Resource]) {
    let none = ClusterSpec::default();
    let rows = resources
        .iter()
        .map(|r| {
            let cluster = match &r.spec {
                Some(Spec::Cluster(cluster)) => cluster,
                _ => &none,
            };
            let endpoints: Vec<&str> = cluster
                .endpoints
                .iter()
                .map(|e| e.address.as_str())
                .collect();
            [
                r.name.clone(),
                or_none(endpoints.join(",")),
                or_none(cluster.service.clone()),
                or_none(cluster.dns.clone()),
                labels_text(&r.selector),
                r.version.to_string(),
            ]
        })
        .collect();
    let header = ["NAME", "ENDPOINTS", "SERVICE", "DNS", "SELECTOR", "VERSION"];
    print_table("clusters", header, rows);
}

/// Prints listener resources as a table.
fn print_listeners(resources: &[Resource]) {
    let rows = resources
        .iter()
        .map(|r| {
            let settings: serde_json::Value = match &r.spec {
                Some(Spec::Listener(l)) => {
                    serde_json::from_str(&l.settings_json).unwrap_or_default()
                }
                _ => serde_json::Value::Null,
            };
            let field = |k: &str| {
                settings
                    .get(k)
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .unwrap_or_default()
            };
            [
                r.name.clone(),
                or_none(field("address")),
                or_none(field("direction")),
                or_none(field("default_cluster")),
                labels_text(&r.selector),
                r.version.to_string(),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "ADDRESS",
        "DIRECTION",
        "DEFAULT CLUSTER",
        "SELECTOR",
        "VERSION",
    ];
    print_table("listeners", header, rows);
}

/// Prints Gateway API routes as a table, with their conditions.
fn print_routes(resources: &[Resource]) {
    let rows = resources
        .iter()
        .map(|r| {
            let (namespace, spec): (String, serde_json::Value) = match &r.spec {
                Some(Spec::HttpRoute(g) | Spec::GrpcRoute(g)) => (
                    g.namespace.clone(),
                    serde_json::from_str(&g.spec_json).unwrap_or_default(),
                ),
                _ => Default::default(),
            };
            let parents: Vec<String> = spec["parentRefs"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .map(|p| match p["port"].as_u64() {
                            Some(port) => format!("{}:{port}", p["name"].as_str().unwrap_or("")),
                            None => p["name"].as_str().unwrap_or("").to_owned(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let rules = spec["rules"].as_array().map_or(0, Vec::len);
            let condition = |kind: &str| {
                r.conditions
                    .iter()
                    .find(|c| c.r#type == kind)
                    .map(|c| {
                        if c.message.is_empty() {
                            format!("{} ({})", c.status, c.reason)
                        } else {
                            format!("{} ({}: {})", c.status, c.reason, c.message)
                        }
                    })
                    .unwrap_or_default()
            };
            [
                r.name.clone(),
                namespace,
                or_none(parents.join(",")),
                rules.to_string(),
                condition("Accepted"),
                condition("ResolvedRefs"),
                r.version.to_string(),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "NAMESPACE",
        "PARENTS",
        "RULES",
        "ACCEPTED",
        "RESOLVED REFS",
        "VERSION",
    ];
    print_table("routes", header, rows);
}

/// Prints scope resources as a table.
fn print_scopes(resources: &[Resource]) {
    let rows = resources
        .iter()
        .map(|r| {
            let services = match &r.spec {
                Some(Spec::Scope(s)) => s.services.join(","),
                _ => String::new(),
            };
            [
                r.name.clone(),
                or_none(services),
                labels_text(&r.selector),
                r.version.to_string(),
            ]
        })
        .collect();
    print_table("scopes", ["NAME", "SERVICES", "SELECTOR", "VERSION"], rows);
}

/// Prints proxies as a table.
fn print_proxies(proxies: &[ProxyStatus]) {
    let rows = proxies
        .iter()
        .map(|p| {
            [
                p.id.clone(),
                labels_text(&p.labels),
                if p.connected { "yes" } else { "no" }.to_owned(),
                p.acked_version.to_string(),
                p.synced_version.to_string(),
                proxy_state(p).replace('\n', " "),
                ago(p.last_seen_ms),
            ]
        })
        .collect();
    let header = [
        "ID",
        "LABELS",
        "CONNECTED",
        "RUNNING",
        "SYNCED",
        "STATE",
        "LAST SEEN",
    ];
    print_table("proxies", header, rows);
}

/// Prints registry instances as a table.
fn print_instances(instances: &[Instance]) {
    let rows = instances
        .iter()
        .map(|i| {
            [
                i.id.clone(),
                i.weight.max(1).to_string(),
                format!("{}s", i.ttl_seconds),
                labels_text(&i.labels),
                ago(i.last_seen_ms),
            ]
        })
        .collect();
    print_table(
        "services",
        ["ID", "WEIGHT", "TTL", "LABELS", "LAST SEEN"],
        rows,
    );
}

/// Prints an instance: its id alone in the table format.
fn print_instance(output: Output, instance: &Instance) -> anyhow::Result<()> {
    show(
        output,
        || instance_view(instance),
        || println!("{}", instance.id),
    )
}

/// Prints what an apply or delete did, kubectl style, then the config version.
fn print_changes(response: &ApplyResponse, dry_run: bool) {
    let suffix = if dry_run { " (dry run)" } else { "" };
    for change in &response.changes {
        println!(
            "{}/{} {}{suffix}",
            change.kind.to_lowercase(),
            change.name,
            change.action
        );
        if dry_run {
            for line in change.diff.lines() {
                println!("  {line}");
            }
        }
    }
    println!("config version {}", response.version);
}

/// `ACK`, `ACK, degraded: <filter> <n> <kind>, …` when filters failed at request time since
/// the proxy applied what it runs, `NACK: <reason>` when the proxy rejected a version newer
/// than the one it runs, or `pending` when it never acknowledged a snapshot.
fn proxy_state(proxy: &ProxyStatus) -> String {
    if !proxy.nack_error.is_empty() && proxy.nacked_version > proxy.acked_version {
        format!("NACK: {}", proxy.nack_error)
    } else if proxy.acked_version == 0 && proxy.acked_hash.is_empty() {
        "pending".to_owned()
    } else if proxy.failures.is_empty() {
        "ACK".to_owned()
    } else {
        let failures: Vec<String> = proxy
            .failures
            .iter()
            .map(|f| format!("{} {} {}", f.filter, f.count, f.kind))
            .collect();
        format!("ACK, degraded: {}", failures.join(", "))
    }
}

/// A module for JSON and YAML output.
fn module_view(module: &Module) -> Value {
    json!({
        "name": module.name,
        "digest": module.digest,
        "size": module.size,
        "abi_version": module.abi_version,
        "created_ms": module.created_ms,
        "signature": module.signature,
        "verified_by": module.verified_by,
        "current": module.current,
        "chains": module.chains,
    })
}

/// Proxies for JSON and YAML output.
fn proxy_views(proxies: &[ProxyStatus]) -> Value {
    proxies
        .iter()
        .map(|p| {
            json!({
                "id": p.id,
                "labels": p.labels,
                "connected": p.connected,
                "state": proxy_state(p),
                "acked_version": p.acked_version,
                "acked_hash": p.acked_hash,
                "sent_version": p.sent_version,
                "synced_version": p.synced_version,
                "nack_error": p.nack_error,
                "nacked_version": p.nacked_version,
                "last_seen_ms": p.last_seen_ms,
                "failures": p.failures.iter().map(|f| json!({
                    "filter": f.filter,
                    "kind": f.kind,
                    "count": f.count,
                })).collect::<Vec<_>>(),
                "filters": p.filters.iter().map(|f| json!({
                    "listener": f.listener,
                    "filter": f.filter,
                    "digest": f.digest,
                    "failure_policy": f.failure_policy,
                })).collect::<Vec<_>>(),
                "spiffe_id": p.spiffe_id,
                "cert_not_after_unix": p.cert_not_after_unix,
                "last_report_ms": p.last_report_ms,
            })
        })
        .collect()
}

/// A registry instance for JSON and YAML output.
fn instance_view(instance: &Instance) -> Value {
    json!({
        "id": instance.id,
        "service": instance.service,
        "address": instance.address,
        "labels": instance.labels,
        "ttl_seconds": instance.ttl_seconds,
        "weight": instance.weight,
        "last_seen_ms": instance.last_seen_ms,
    })
}

/// The outcome of an apply or delete for JSON and YAML output.
fn apply_view(response: &ApplyResponse, dry_run: bool) -> Value {
    let changes: Vec<Value> = response
        .changes
        .iter()
        .map(|c| json!({"kind": c.kind, "name": c.name, "action": c.action, "diff": c.diff}))
        .collect();
    json!({"version": response.version, "dry_run": dry_run, "changes": changes})
}

/// `k=v,k2=v2` sorted by key, or `<none>`.
fn labels_text(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    or_none(pairs.join(","))
}

/// The selector as `k=v,...`, or `None` when it is empty.
fn selector_text(selector: &[(String, String)]) -> Option<String> {
    let pairs: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    (!pairs.is_empty()).then(|| pairs.join(","))
}

/// `text`, or `<none>` when it is empty.
fn or_none(text: String) -> String {
    if text.is_empty() {
        "<none>".to_owned()
    } else {
        text
    }
}

/// How long ago a time in milliseconds since the Unix epoch was (`3s ago`), or `never` for 0.
fn ago(ms: u64) -> String {
    if ms == 0 {
        return "never".to_owned();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// A size in bytes as `812 B`, `1.5 KiB`, `2.0 MiB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut size = bytes as f64 / 1024.0;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    format!("{size:.1} {}", UNITS[unit])
}

/// Parses a `key=value` label.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(id: &str, app: &str, connected: bool, synced: u64) -> ProxyStatus {
        ProxyStatus {
            id: id.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            connected,
            acked_version: synced,
            acked_hash: "h".into(),
            synced_version: synced,
            ..Default::default()
        }
    }

    fn selector(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rollout_counts_connected_selected_proxies() {
        let proxies = [
            proxy("a", "one", true, 7),
            proxy("b", "two", true, 6),
            proxy("c", "one", false, 1),
        ];
        assert_eq!(
            rollout(&proxies, 7, &[]),
            Rollout::Waiting {
                synced: 1,
                total: 2
            }
        );
        assert_eq!(
            rollout(&proxies, 7, &selector(&[("app", "one")])),
            Rollout::Complete { proxies: 1 }
        );
        assert_eq!(rollout(&proxies, 6, &[]), Rollout::Complete { proxies: 2 });
        assert_eq!(
            rollout(&proxies, 7, &selector(&[("app", "three")])),
            Rollout::Waiting {
                synced: 0,
                total: 0
            }
        );
    }

    #[test]
    fn rollout_fails_on_a_rejected_target() {
        let mut rejecting = proxy("b", "two", true, 6);
        rejecting.nack_error = "bad config".into();
        rejecting.nacked_version = 5;
        let proxies = [proxy("a", "one", true, 7), rejecting];
        // An older rejection is not this rollout's.
        assert_eq!(
            rollout(&proxies, 7, &[]),
            Rollout::Waiting {
                synced: 1,
                total: 2
            }
        );
        let mut proxies = proxies;
        proxies[1].nacked_version = 7;
        assert_eq!(rollout(&proxies, 7, &[]), Rollout::Failed(&proxies[1]));
        // A proxy synced at the target before rejecting a later version is done.
        proxies[1].synced_version = 7;
        proxies[1].nacked_version = 8;
        assert_eq!(rollout(&proxies, 7, &[]), Rollout::Complete { proxies: 2 });
    }

    #[test]
    fn proxy_states() {
        let mut p = proxy("a", "one", true, 3);
        assert_eq!(proxy_state(&p), "ACK");
        p.nack_error = "no such module".into();
        p.nacked_version = 3;
        assert_eq!(
            proxy_state(&p),
            "ACK",
            "a NACK of the version it runs is stale"
        );
        p.nacked_version = 4;
        assert_eq!(proxy_state(&p), "NACK: no such module");
        assert_eq!(proxy_state(&ProxyStatus::default()), "pending");
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            ["router".to_owned(), "1.5 KiB".to_owned(), String::new()],
            ["é".to_owned(), "12 B".to_owned(), "x".to_owned()],
        ];
        assert_eq!(
            table(["NAME", "SIZE", "LAST"], rows),
            "NAME     SIZE      LAST\nrouter   1.5 KiB\né        12 B      x\n"
        );
    }

    #[test]
    fn small_helpers() {
        assert_eq!(parse_label("app=a=b"), Ok(("app".into(), "a=b".into())));
        assert!(parse_label("app").is_err());
        assert!(parse_label("=a").is_err());
        assert_eq!(human_size(812), "812 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 20), "3.0 MiB");
        assert_eq!(ago(0), "never");
        let missing = Status::not_found("chain `outbound`");
        assert_eq!(status_message(&missing), "chain `outbound` not found");
        assert_eq!(
            status_message(&Status::not_found("no such chain: not found")),
            "no such chain: not found"
        );
        assert_eq!(
            status_message(&Status::invalid_argument("")),
            "Client specified an invalid argument"
        );
        let labels = [
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "1".to_owned()),
        ];
        assert_eq!(labels_text(&labels.into()), "a=1,b=2");
        assert_eq!(labels_text(&HashMap::new()), "<none>");
    }

    fn parse(args: &[&str]) -> Command {
        let args = std::iter::once("weftctl").chain(args.iter().copied());
        Cli::try_parse_from(args).unwrap().command
    }

    #[test]
    fn filter_config_kinds_parse() {
        for what in [
            "filterconfigs",
            "filterconfig",
            "filter-configs",
            "fc",
            "FilterConfigs",
        ] {
            let Command::Get { what } = parse(&["get", what]) else {
                panic!("not a get");
            };
            assert_eq!(what, Listing::FilterConfigs);
        }
        for kind in ["filterconfig", "FilterConfig", "filter-config", "fc", "FC"] {
            let Command::Delete { kind, name } = parse(&["delete", kind, "routes"]) else {
                panic!("not a delete");
            };
            assert_eq!((kind.api_name(), name.as_str()), ("FilterConfig", "routes"));
        }
    }

    #[test]
    fn module_get_needs_a_file() {
        let Command::Module(ModuleCommand::Get { module, file }) =
            parse(&["module", "get", "router", "-f", "router.wasm"])
        else {
            panic!("not a module get");
        };
        assert_eq!(
            (module.as_str(), file),
            ("router", PathBuf::from("router.wasm"))
        );
        let Command::Module(ModuleCommand::Get { file, .. }) =
            parse(&["module", "get", "sha256:00", "--output-file", "out"])
        else {
            panic!("not a module get");
        };
        assert_eq!(file, PathBuf::from("out"));
        assert!(Cli::try_parse_from(["weftctl", "module", "get", "router"]).is_err());
    }

    #[test]
    fn filter_and_config_cells() {
        let mut filter = FilterRef {
            name: "router".into(),
            ..Default::default()
        };
        assert_eq!(filter_text(&filter), "router");
        filter.config_ref = "routes".into();
        assert_eq!(filter_text(&filter), "router(@routes)");

        assert_eq!(config_cell("{\n  \"a\": [1, 2]\n}"), r#"{"a":[1,2]}"#);
        assert_eq!(config_cell("not\n json"), "not json");
        assert_eq!(config_cell(""), "");
        let long = format!(r#""{}""#, "é".repeat(80));
        let cell = config_cell(&long);
        assert_eq!(cell.chars().count(), CONFIG_CELL);
        assert!(cell.starts_with("\"éé") && cell.ends_with("é…"), "{cell}");
        let exact = format!(r#""{}""#, "x".repeat(CONFIG_CELL - 2));
        assert_eq!(config_cell(&exact), exact);
    }
}
