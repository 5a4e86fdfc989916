//! Checking an uploaded filter module without running it: the control service refuses a
//! module that no proxy could load, before any proxy sees it. The proxy's canary start stays
//! the final word (it also runs `on_vm_start` and `on_configure`).

use wasmparser::{ExternalKind, Parser, Payload, TypeRef, Validator};

/// Checks that `bytes` are a filter module a Weft proxy can load: a valid WebAssembly module
/// (every function body validated), exporting a proxy-wasm ABI version and importing only
/// functions from the modules the host links. Returns the ABI version (`0.2.1`, `0.2.0`).
pub fn inspect_module(bytes: &[u8]) -> Result<String, String> {
    if !bytes.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (no `\\0asm` header)".into());
    }
    Validator::new()
        .validate_all(bytes)
        .map_err(|e| format!("does not compile (invalid WebAssembly): {e}"))?;
    let mut exports = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| format!("cannot parse: {e}"))? {
            Payload::Version {
                encoding: wasmparser::Encoding::Component,
                ..
            } => return Err("a component, not a core module".into()),
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(|e| format!("cannot parse: {e}"))?;
                    if !weft_abi::IMPORT_MODULES.contains(&import.module) {
                        return Err(format!(
                            "imports from unknown module `{}` ({}); a filter may import from {}",
                            import.module,
                            import.name,
                            weft_abi::IMPORT_MODULES.join(", ")
                        ));
                    }
                    if !matches!(import.ty, TypeRef::Func(_)) {
                        return Err(format!(
                            "imports {}::{}, which is not a function",
                            import.module, import.name
                        ));
                    }
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(|e| format!("cannot parse: {e}"))?;
                    if export.kind == ExternalKind::Func {
                        exports.push(export.name.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    weft_abi::ABI_VERSION_EXPORTS
        .iter()
        .find(|(name, _)| exports.iter().any(|e| e == name))
        .map(|(_, version)| (*version).to_owned())
        .ok_or_else(|| {
            "does not export a proxy-wasm ABI version (proxy_abi_version_0_2_1)".to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module in the text format, assembled by hand into its binary (a few bytes each).
    fn module(imports: &[u8], exports: &[u8]) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        // Type section: one type, () -> ().
        m.extend_from_slice(&[1, 4, 1, 0x60, 0, 0]);
        m.extend_from_slice(imports);
        // Function section: one function of type 0.
        m.extend_from_slice(&[3, 2, 1, 0]);
        m.extend_from_slice(exports);
        // Code section: one empty body.
        m.extend_from_slice(&[10, 4, 1, 2, 0, 0x0b]);
        m
    }

    fn export(name: &str, func: u8) -> Vec<u8> {
        let mut body = vec![1, name.len() as u8];
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&[0, func]);
        let mut s = vec![7, body.len() as u8];
        s.extend(body);
        s
    }

    fn import(module: &str, name: &str) -> Vec<u8> {
        let mut body = vec![1, module.len() as u8];
        body.extend_from_slice(module.as_bytes());
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&[0, 0]);
        let mut s = vec![2, body.len() as u8];
        s.extend(body);
        s
    }

    #[test]
    fn a_module_with_the_abi_export_passes_and_names_its_version() {
        let ok = module(&[], &export("proxy_abi_version_0_2_1", 0));
        assert_eq!(inspect_module(&ok).as_deref(), Ok("0.2.1"));
        let older = module(
            &import("env", "proxy_log"),
            &export("proxy_abi_version_0_2_0", 1),
        );
        assert_eq!(inspect_module(&older).as_deref(), Ok("0.2.0"));
    }

    #[test]
    fn bad_modules_are_refused_with_the_reason() {
        let err = |b: &[u8]| inspect_module(b).unwrap_err();
        assert!(err(b"not wasm at all").contains("no `\\0asm` header"));
        let no_abi = module(&[], &export("_start", 0));
        assert!(err(&no_abi).contains("does not export a proxy-wasm ABI version"));
        let mut broken = module(&[], &export("proxy_abi_version_0_2_1", 0));
        broken.truncate(broken.len() - 1);
        assert!(err(&broken).contains("does not compile"));
        let foreign = module(
            &import("somewhere", "f"),
            &export("proxy_abi_version_0_2_1", 1),
        );
        assert!(err(&foreign).contains("imports from unknown module `somewhere`"));
    }
}
