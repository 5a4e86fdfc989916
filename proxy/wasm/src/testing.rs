//! Test support: small WebAssembly modules encoded by hand (the `wat` text parser is not a
//! dependency), a runtime to run them in, and the pieces a callback needs.

use std::sync::Arc;

use weft_config::{FailurePolicy, FilterConfig, FilterLimits};
use weft_core::filter::StreamInfo;
use weft_core::metrics::Metrics;

use wasmtime::{Instance, Module, Store};

use crate::instance::FilterSpec;
use crate::limits;
use crate::runtime::WasmRuntime;
use crate::state::{HostState, PluginMeta};

/// `i32` value type.
const I32: u8 = 0x7f;

/// A function of a test module: `params` and `results` are `i32`s; `body` is its
/// instructions without the final `end`.
pub struct Func<'a> {
    /// Its export name ("" for none).
    pub export: &'a str,
    /// Its name in the name section (what backtraces show).
    pub name: &'a str,
    /// Number of `i32` parameters.
    pub params: u8,
    /// Number of `i32` results (0 or 1).
    pub results: u8,
    /// Instructions.
    pub body: Vec<u8>,
}

/// An imported function: `params` and `results` are `i32`s.
pub struct Import<'a> {
    /// Import module.
    pub module: &'a str,
    /// Import name.
    pub name: &'a str,
    /// Number of `i32` parameters.
    pub params: u8,
    /// Number of `i32` results.
    pub results: u8,
}

/// Unsigned LEB128.
pub fn leb(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// `i32.const v` (signed LEB128 immediate).
pub fn i32_const(v: i32) -> Vec<u8> {
    let mut out = vec![0x41];
    let mut v = i64::from(v);
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        let done = (v == 0 && byte & 0x40 == 0) || (v == -1 && byte & 0x40 != 0);
        out.push(if done { byte } else { byte | 0x80 });
        if done {
            return out;
        }
    }
}

fn name(s: &str) -> Vec<u8> {
    let mut out = leb(s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out
}

fn section(id: u8, items: Vec<Vec<u8>>) -> Vec<u8> {
    let mut content = leb(items.len() as u64);
    for i in items {
        content.extend(i);
    }
    let mut out = vec![id];
    out.extend(leb(content.len() as u64));
    out.extend(content);
    out
}

fn func_type(params: u8, results: u8) -> Vec<u8> {
    let mut t = vec![0x60, params];
    t.extend(std::iter::repeat_n(I32, params.into()));
    t.push(results);
    t.extend(std::iter::repeat_n(I32, results.into()));
    t
}

/// A module with `imports`, `funcs` and a memory of `pages` 64 KiB pages exported as
/// `memory`. Function indices: the imports first, then `funcs`.
pub fn module(imports: &[Import<'_>], funcs: &[Func<'_>], pages: u32) -> Vec<u8> {
    let mut out = b"\0asm\x01\0\0\0".to_vec();
    let types = imports
        .iter()
        .map(|i| func_type(i.params, i.results))
        .chain(funcs.iter().map(|f| func_type(f.params, f.results)))
        .collect();
    out.extend(section(1, types));
    let imported = imports
        .iter()
        .enumerate()
        .map(|(k, i)| {
            let mut e = name(i.module);
            e.extend(name(i.name));
            e.push(0x00);
            e.extend(leb(k as u64));
            e
        })
        .collect();
    out.extend(section(2, imported));
    let n = imports.len();
    out.extend(section(
        3,
        (0..funcs.len()).map(|k| leb((n + k) as u64)).collect(),
    ));
    out.extend(section(5, vec![[vec![0x00], leb(pages.into())].concat()]));
    let mut exports = vec![[name("memory"), vec![0x02, 0x00]].concat()];
    for (k, f) in funcs
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.export.is_empty())
    {
        exports.push([name(f.export), vec![0x00], leb((n + k) as u64)].concat());
    }
    out.extend(section(7, exports));
    let code = funcs
        .iter()
        .map(|f| {
            let mut body = vec![0x00]; // no locals
            body.extend(&f.body);
            body.push(0x0b);
            [leb(body.len() as u64), body].concat()
        })
        .collect();
    out.extend(section(10, code));
    // The name section's function names.
    let names: Vec<Vec<u8>> = funcs
        .iter()
        .enumerate()
        .map(|(k, f)| [leb((n + k) as u64), name(f.name)].concat())
        .collect();
    let mut sub = leb(names.len() as u64);
    sub.extend(names.concat());
    let mut custom = name("name");
    custom.push(1);
    custom.extend(leb(sub.len() as u64));
    custom.extend(sub);
    out.push(0);
    out.extend(leb(custom.len() as u64));
    out.extend(custom);
    out
}

/// What every proxy-wasm filter exports: the ABI version `abi` and an empty
/// `proxy_on_context_create`.
pub fn proxy_funcs(abi: &str) -> Vec<Func<'_>> {
    vec![
        Func {
            export: abi,
            name: "abi",
            params: 0,
            results: 0,
            body: vec![],
        },
        Func {
            export: "proxy_on_context_create",
            name: "context_create",
            params: 2,
            results: 0,
            body: vec![],
        },
    ]
}

/// A proxy-wasm filter whose `proxy_on_request_headers` runs `on_request_headers` (which
/// must leave an `i32` action) under the name `name`; `imports` come first.
pub fn filter(imports: &[Import<'_>], name: &str, on_request_headers: Vec<u8>) -> Vec<u8> {
    let mut funcs = proxy_funcs("proxy_abi_version_0_2_1");
    funcs.push(Func {
        export: "proxy_on_request_headers",
        name,
        params: 3,
        results: 1,
        body: on_request_headers,
    });
    module(imports, &funcs, 1)
}

/// A runtime without a module cache.
pub fn runtime() -> WasmRuntime {
    WasmRuntime::uncached().expect("runtime")
}

/// The spec of a filter of module `wasm` with `limits`.
pub fn spec(rt: &WasmRuntime, wasm: &[u8], limits: FilterLimits) -> FilterSpec {
    let config = FilterConfig {
        name: "t".into(),
        module: "t.wasm".into(),
        root_id: String::new(),
        vm_id: String::new(),
        config: serde_json::Value::Null,
        vm_config: serde_json::Value::Null,
        failure_policy: FailurePolicy::FailClosed,
        limits,
    };
    rt.filter_spec(&config, wasm, &Arc::default(), &Metrics::new())
        .expect("spec")
}

/// An instance of module `wasm` linked with the host functions, in a store under a 1 MiB
/// cap with the lifecycle deadline armed.
pub fn instance(rt: &WasmRuntime, wasm: &[u8]) -> (Store<HostState>, Instance) {
    let module = Module::new(rt.engine(), wasm).expect("module");
    let linker = rt.linker().for_module(&module).expect("links");
    let meta = Arc::new(PluginMeta {
        name: "t".into(),
        root_id: String::new(),
        vm_id: "t".into(),
        config: Vec::new(),
        vm_config: Vec::new(),
        unused: Default::default(),
    });
    let state = HostState::new(meta, 1 << 20, Arc::default(), Arc::default());
    let mut store = Store::new(rt.engine(), state);
    limits::install(&mut store);
    limits::arm(&mut store, limits::LIFECYCLE_TICKS);
    let instance = linker
        .instantiate(&mut store, &module)
        .expect("instantiates");
    (store, instance)
}

/// This process's peak resident memory in bytes (`VmHWM`).
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// Facts about a plain stream.
pub fn info() -> StreamInfo {
    StreamInfo {
        source: "10.1.2.3:40000".parse().expect("addr"),
        destination: "127.0.0.1:15001".parse().expect("addr"),
        start_ns: 0,
        start_unix_ns: 0,
        connection_id: 1,
        upstream: None,
        cluster: None,
        clusters: Default::default(),
        direction: 0,
        attempt: Default::default(),
        tls: None,
    }
}

/// A GET request head.
pub fn request() -> http::request::Parts {
    http::Request::get("/")
        .body(())
        .expect("request")
        .into_parts()
        .0
}

#[test]
fn the_encoder_makes_valid_modules() {
    let wasm = filter(
        &[Import {
            module: "env",
            name: "proxy_log",
            params: 3,
            results: 1,
        }],
        "headers",
        i32_const(0),
    );
    wasmtime::Module::new(&wasmtime::Engine::default(), &wasm).expect("valid");
    assert_eq!(i32_const(1000), [0x41, 0xe8, 0x07]);
    assert_eq!(i32_const(-1), [0x41, 0x7f]);
    assert_eq!(leb(624_485), [0xe5, 0x8e, 0x26]);
}
