//! [`HostLinker`]: the linker every filter is linked with, built once per runtime. It records
//! each host function as it is defined, so that which imports it provides is derived from the
//! definitions themselves; [`HostLinker::for_module`] adds stubs for the imports a module
//! needs beyond them (proxy-wasm calls answer `UNIMPLEMENTED`, WASI calls `ENOSYS`), so that
//! newer or unusual modules still link, and refuses imports from any other module.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::{Engine, ExternType, IntoFunc, Linker, Module, Val, ValType};

use weft_abi::{IMPORT_MODULES, Status};

use crate::hostcalls::wasi;
use crate::state::HostState;

/// A [`Linker`] over [`HostState`] that remembers what was defined in it.
pub struct HostLinker {
    /// The definitions.
    linker: Linker<HostState>,
    /// `(module, name)` of each function defined.
    defined: HashSet<(&'static str, &'static str)>,
}

impl HostLinker {
    /// An empty linker for `engine`.
    pub fn new(engine: &Engine) -> Self {
        Self {
            linker: Linker::new(engine),
            defined: HashSet::new(),
        }
    }

    /// Defines host function `module::name` (see [`Linker::func_wrap`]) and records it.
    pub fn func_wrap<Params, Args>(
        &mut self,
        module: &'static str,
        name: &'static str,
        func: impl IntoFunc<HostState, Params, Args>,
    ) -> wasmtime::Result<&mut Self> {
        self.linker.func_wrap(module, name, func)?;
        self.defined.insert((module, name));
        Ok(self)
    }

    /// Whether `module::name` is defined.
    pub fn is_defined(&self, module: &str, name: &str) -> bool {
        self.defined.contains(&(module, name))
    }

    /// The functions defined so far.
    #[cfg(test)]
    pub fn defined(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.defined.iter().copied()
    }

    /// This linker plus stubs for the imports of `module` it does not define. An import from
    /// a module other than the ABI's ([`IMPORT_MODULES`]) or one that is not a function is an
    /// error.
    pub fn for_module(&self, module: &Module) -> anyhow::Result<Linker<HostState>> {
        let mut linker = self.linker.clone();
        for import in module.imports() {
            if self.is_defined(import.module(), import.name()) {
                continue;
            }
            let ExternType::Func(ty) = import.ty() else {
                anyhow::bail!(
                    "imports {}::{}, which is not a function",
                    import.module(),
                    import.name()
                );
            };
            if !IMPORT_MODULES.contains(&import.module()) {
                anyhow::bail!(
                    "imports from unknown module `{}` ({})",
                    import.module(),
                    import.name()
                );
            }
            let code = if weft_abi::WASI_MODULES.contains(&import.module()) {
                wasi::ENOSYS
            } else {
                Status::Unimplemented as i32
            };
            let (module_name, name) = (import.module().to_owned(), import.name().to_owned());
            let warned = Arc::new(AtomicBool::new(false));
            let results = ty.clone();
            linker.func_new(
                import.module(),
                import.name(),
                ty,
                move |_caller, _params, out| {
                    if !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "filter called {module_name}::{name}, which this host does not \
                             implement"
                        );
                    }
                    for (r, t) in out.iter_mut().zip(results.results()) {
                        *r = match t {
                            ValType::I32 => Val::I32(code),
                            ValType::I64 => Val::I64(code.into()),
                            ValType::F32 => Val::F32(0),
                            ValType::F64 => Val::F64(0),
                            _ => Val::I32(0),
                        };
                    }
                    Ok(())
                },
            )?;
        }
        Ok(linker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostcalls::ENV;
    use crate::testing::{self, Func, Import, i32_const};

    /// A module importing `imports` (each `(i32) -> i32`), exporting `call<i>` for each.
    fn calling(imports: &[(&str, &str)]) -> Vec<u8> {
        let imports: Vec<Import<'_>> = imports
            .iter()
            .map(|(module, name)| Import {
                module,
                name,
                params: 1,
                results: 1,
            })
            .collect();
        let names: Vec<String> = (0..imports.len()).map(|i| format!("call{i}")).collect();
        let funcs: Vec<Func<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Func {
                export: n,
                name: n,
                params: 0,
                results: 1,
                body: [i32_const(0), vec![0x10, i as u8]].concat(),
            })
            .collect();
        testing::module(&imports, &funcs, 1)
    }

    #[test]
    fn wasi_unstable_links_to_the_same_functions_as_preview1() {
        let rt = testing::runtime();
        for module in weft_abi::WASI_MODULES {
            assert!(rt.linker().is_defined(module, "fd_write"), "{module}");
            assert!(rt.linker().is_defined(module, "random_get"), "{module}");
        }
        // A module as older toolchains build it: `wasi_unstable.sched_yield` runs (0).
        let imports = [Import {
            module: "wasi_unstable",
            name: "sched_yield",
            params: 0,
            results: 1,
        }];
        let funcs = [Func {
            export: "call0",
            name: "call0",
            params: 0,
            results: 1,
            body: vec![0x10, 0],
        }];
        let wasm = testing::module(&imports, &funcs, 1);
        let (mut store, instance) = testing::instance(&rt, &wasm);
        let f = instance
            .get_typed_func::<(), i32>(&mut store, "call0")
            .unwrap();
        assert_eq!(f.call(&mut store, ()).unwrap(), 0);
    }

    #[test]
    fn imports_the_host_lacks_get_stubs_and_unknown_modules_are_refused() {
        let rt = testing::runtime();
        let wasm = calling(&[
            (ENV, "proxy_from_the_future"),
            (wasi::MODULE, "sock_accept"),
        ]);
        let (mut store, instance) = testing::instance(&rt, &wasm);
        for (export, code) in [
            ("call0", Status::Unimplemented as i32),
            ("call1", wasi::ENOSYS),
        ] {
            let f = instance
                .get_typed_func::<(), i32>(&mut store, export)
                .unwrap();
            assert_eq!(f.call(&mut store, ()).unwrap(), code, "{export}");
        }

        let wasm = calling(&[("somewhere_else", "f")]);
        let module = Module::new(rt.engine(), &wasm).unwrap();
        let Err(err) = rt.linker().for_module(&module) else {
            panic!("linked a module importing from somewhere_else");
        };
        assert!(
            err.to_string().contains("unknown module `somewhere_else`"),
            "{err}"
        );
    }
}
