//! `weft-proxy init`: the traffic capture rules of a sidecar (what istio-init and
//! linkerd-init install), in the network namespace of the pod or container it runs in.
//!
//! In the `nat` table, four chains of our own, hooked from `PREROUTING` and `OUTPUT`:
//!
//! - inbound TCP (`PREROUTING` → `WEFT_INBOUND`): to the ports given (all by default), but
//!   the excluded ones and the proxy's own, is redirected to the inbound listener;
//! - outbound TCP (`OUTPUT` → `WEFT_OUTPUT`): everything the proxy's own user does, traffic
//!   that stays on the loopback interface (a service talking to itself, or the proxy talking
//!   to its service), and the excluded ports and CIDRs go out as they are; the rest is
//!   redirected to the outbound listener.
//!
//! The proxy finds where a redirected connection was going with `SO_ORIGINAL_DST`. The
//! rules are applied with `iptables-restore` (`iptables-nft-restore`, the nft backend, where
//! present); `--undo` removes exactly them, and applying again replaces them.

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};

/// `weft-proxy init`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// The user the proxy runs as: its traffic is never captured (the image's user is 65532).
    #[arg(long, default_value_t = 65532)]
    pub proxy_uid: u32,
    /// Also leave alone the traffic of this group.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// The proxy's inbound capture listener.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The proxy's outbound capture listener.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports to capture, comma-separated; `*` (the default) for all.
    #[arg(long, default_value = "*")]
    pub inbound_ports: String,
    /// Inbound ports never captured (the proxy's admin port, say), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "15000")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never captured, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs never captured (`10.0.0.0/8`, `fd00::/8`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Capture IPv6 too (ip6tables): the proxy's capture listeners must then listen on `[::]`
    /// (dual-stack), or IPv6 connections find nobody on the ports they are sent to.
    #[arg(long)]
    pub ipv6: bool,
    /// Remove the rules instead.
    #[arg(long)]
    pub undo: bool,
    /// Print the rules (in `iptables-restore` form) instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
}

const CHAINS: [&str; 4] = [
    "WEFT_INBOUND",
    "WEFT_IN_REDIRECT",
    "WEFT_OUTPUT",
    "WEFT_REDIRECT",
];
const HOOKS: [(&str, &str); 2] = [("PREROUTING", "WEFT_INBOUND"), ("OUTPUT", "WEFT_OUTPUT")];

/// The address families rules are made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl Family {
    /// The tools' base name.
    fn tool(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }
}

/// The rules of `family`, in `iptables-restore --noflush` form; `Err` names a bad option.
pub fn rules(a: &InitArgs, family: Family) -> Result<String, String> {
    let inbound: Option<Vec<u16>> = match a.inbound_ports.trim() {
        "*" => None,
        "" => Some(vec![]),
        list => Some(
            list.split(',')
                .map(|p| {
                    p.trim()
                        .parse::<u16>()
                        .map_err(|_| format!("--inbound-ports: `{p}` is not a port"))
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let mut cidrs = Vec::new();
    for cidr in &a.exclude_outbound_cidrs {
        let ip = cidr.split_once('/').map_or(cidr.as_str(), |(ip, _)| ip);
        let (v6, max) = match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => (false, 32),
            Ok(std::net::IpAddr::V6(_)) => (true, 128),
            Err(_) => return Err(format!("--exclude-outbound-cidrs: `{cidr}` is not a CIDR")),
        };
        let bits_ok = cidr
            .split_once('/')
            .is_none_or(|(_, bits)| bits.parse::<u8>().is_ok_and(|b| b <= max));
        if !bits_ok {
            return Err(format!("--exclude-outbound-cidrs: `{cidr}` is not a CIDR"));
        }
        if v6 && !a.ipv6 {
            return Err(format!(
                "--exclude-outbound-cidrs: `{cidr}` is IPv6: add --ipv6 to capture IPv6"
            ));
        }
        if v6 == (family == Family::V6) {
            cidrs.push(cidr);
        }
    }
    if a.inbound_port == a.outbound_port {
        return Err("--inbound-port and --outbound-port must differ".into());
    }
    let mut r = String::from("*nat\n");
    for chain in CHAINS {
        r += &format!(":{chain} - [0:0]\n");
    }
    r += &format!(
        "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        a.inbound_port
    );
    r += &format!(
        "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        a.outbound_port
    );
    for (hook, chain) in HOOKS {
        r += &format!("-A {hook} -p tcp -j {chain}\n");
    }
    // Inbound: never the proxy's own listeners, nor the excluded ports.
    let mut skip_in = vec![a.inbound_port, a.outbound_port];
    skip_in.extend(&a.exclude_inbound_ports);
    for port in skip_in {
        r += &format!("-A WEFT_INBOUND -p tcp --dport {port} -j RETURN\n");
    }
    match inbound {
        None => r += "-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT\n",
        Some(ports) => {
            for port in ports {
                r += &format!("-A WEFT_INBOUND -p tcp --dport {port} -j WEFT_IN_REDIRECT\n");
            }
        }
    }
    // Outbound: the proxy's own traffic and loopback first, then the exclusions.
    r += &format!(
        "-A WEFT_OUTPUT -m owner --uid-owner {} -j RETURN\n",
        a.proxy_uid
    );
    if let Some(gid) = a.proxy_gid {
        r += &format!("-A WEFT_OUTPUT -m owner --gid-owner {gid} -j RETURN\n");
    }
    r += "-A WEFT_OUTPUT -o lo -j RETURN\n";
    for cidr in cidrs {
        r += &format!("-A WEFT_OUTPUT -d {cidr} -j RETURN\n");
    }
    for port in &a.exclude_outbound_ports {
        r += &format!("-A WEFT_OUTPUT -p tcp --dport {port} -j RETURN\n");
    }
    r += "-A WEFT_OUTPUT -j WEFT_REDIRECT\n";
    r += "COMMIT\n";
    Ok(r)
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// A tool of `family` (`suffix`: `""` or `"-restore"`): the nft backend's where present.
fn tool(family: Family, suffix: &str) -> String {
    let nft = format!("{}-nft{suffix}", family.tool());
    if on_path(&nft) {
        nft
    } else {
        format!("{}{suffix}", family.tool())
    }
}

/// Removes the rules: the hooks, then the chains; what is not there is skipped.
fn undo(iptables: &str) -> Result<(), String> {
    let run = |args: &[&str]| {
        Command::new(iptables)
            .args(["-w", "-t", "nat"])
            .args(args)
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {iptables}: {e}"))
    };
    for (hook, chain) in HOOKS {
        // Every copy, should an earlier run have been cut short.
        for _ in 0..16 {
            if !run(&["-D", hook, "-p", "tcp", "-j", chain])?.success() {
                break;
            }
        }
    }
    for chain in CHAINS {
        run(&["-F", chain])?;
    }
    for chain in CHAINS {
        run(&["-X", chain])?;
    }
    Ok(())
}

/// Runs `weft-proxy init`.
pub fn run(a: &InitArgs) -> ExitCode {
    let mut families = vec![Family::V4];
    if a.ipv6 {
        families.push(Family::V6);
    }
    let mut all = Vec::new();
    for family in &families {
        match rules(a, *family) {
            Ok(r) => all.push((*family, r)),
            Err(e) => {
                eprintln!("weft-proxy init: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if a.dry_run {
        for (family, rules) in &all {
            if a.undo {
                println!(
                    "# {}: remove the PREROUTING and OUTPUT hooks and the chains {CHAINS:?}",
                    family.tool()
                );
            } else {
                println!("# {}", family.tool());
                print!("{rules}");
            }
        }
        return ExitCode::SUCCESS;
    }
    // Undo takes the IPv6 rules out too where the tools are, with or without --ipv6.
    for family in [Family::V4, Family::V6] {
        let iptables = tool(family, "");
        if family == Family::V6 && !a.ipv6 && !on_path(&iptables) {
            continue;
        }
        if let Err(e) = undo(&iptables) {
            eprintln!("weft-proxy init: {e}");
            return ExitCode::FAILURE;
        }
    }
    if a.undo {
        eprintln!("weft-proxy init: capture rules removed");
        return ExitCode::SUCCESS;
    }
    for (family, rules) in &all {
        if let Err(e) = apply(*family, rules) {
            eprintln!("weft-proxy init: {e}");
            // Nothing half-applied stays behind.
            for (family, _) in &all {
                let _ = undo(&tool(*family, ""));
            }
            return ExitCode::FAILURE;
        }
    }
    eprintln!(
        "weft-proxy init: inbound TCP → :{}, outbound TCP → :{} (uid {} left alone){}",
        a.inbound_port,
        a.outbound_port,
        a.proxy_uid,
        if a.ipv6 { ", IPv4 and IPv6" } else { "" }
    );
    ExitCode::SUCCESS
}

/// Applies `rules` with the `iptables-restore` of `family`.
fn apply(family: Family, rules: &str) -> Result<(), String> {
    let restore = tool(family, "-restore");
    let mut child = Command::new(&restore)
        .args(["--noflush", "-w"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {restore}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(rules.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{restore}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{restore} refused the rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(extra: &[&str]) -> InitArgs {
        Cli::parse_from([&["init"], extra].concat()).init
    }

    #[test]
    fn rules_leave_the_proxy_loopback_and_exclusions_alone() {
        let a = args(&[
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,fd00::/8",
            "--exclude-outbound-ports",
            "5432",
            "--inbound-ports",
            "8080,9090",
            "--ipv6",
        ]);
        let r = rules(&a, Family::V4).unwrap();
        let out: Vec<&str> = r
            .lines()
            .filter(|l| l.starts_with("-A WEFT_OUTPUT"))
            .collect();
        assert_eq!(
            out,
            [
                "-A WEFT_OUTPUT -m owner --uid-owner 65532 -j RETURN",
                "-A WEFT_OUTPUT -o lo -j RETURN",
                "-A WEFT_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN",
                "-A WEFT_OUTPUT -j WEFT_REDIRECT",
            ]
        );
        assert!(r.contains("-A WEFT_INBOUND -p tcp --dport 15000 -j RETURN"));
        assert!(r.contains("-A WEFT_INBOUND -p tcp --dport 8080 -j WEFT_IN_REDIRECT"));
        assert!(!r.contains("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT"));
        // Each family gets its own CIDRs.
        let r6 = rules(&a, Family::V6).unwrap();
        assert!(r6.contains("-A WEFT_OUTPUT -d fd00::/8 -j RETURN"), "{r6}");
        assert!(!r6.contains("10.96.0.0/12") && !r.contains("fd00::/8"));
    }

    #[test]
    fn bad_options_are_named() {
        let bad = |extra: &[&str]| rules(&args(extra), Family::V4).unwrap_err();
        let e = bad(&["--exclude-outbound-cidrs", "10.0.0.0/40"]);
        assert!(e.contains("`10.0.0.0/40`"), "{e}");
        let e = bad(&["--inbound-ports", "80,http"]);
        assert!(e.contains("`http`"), "{e}");
        let e = bad(&["--exclude-outbound-cidrs", "fd00::/8"]);
        assert!(e.contains("add --ipv6"), "{e}");
    }
}
