//! Scratch projects for unit tests.

use std::fs;

use anyhow::Result;

use crate::config::Config;

/// A project with `kernels_toml`, a recipe at `images/tc.Containerfile`, and module
/// folders (a Kbuild each, and the module.toml text when given).
pub fn scratch(
    kernels_toml: &str,
    modules: &[(&str, Option<&str>)],
) -> (tempfile::TempDir, Result<Config>) {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("images")).unwrap();
    fs::write(dir.path().join("images/tc.Containerfile"), "FROM x\n").unwrap();
    for (name, manifest) in modules {
        let m = dir.path().join("modules").join(name);
        fs::create_dir_all(&m).unwrap();
        fs::write(m.join("Kbuild"), format!("obj-m := {name}.o\n")).unwrap();
        if let Some(text) = manifest {
            fs::write(m.join("module.toml"), text).unwrap();
        }
    }
    fs::write(dir.path().join("kernels.toml"), kernels_toml).unwrap();
    let config = Config::load(&dir.path().join("kernels.toml"));
    (dir, config)
}

/// A C module folder `name` at a path that need not exist, with default settings.
pub fn module(name: &str) -> crate::config::modules::Module {
    use crate::config::modules::{Build, Language, Module};
    Module {
        name: name.to_string(),
        dir: std::path::PathBuf::from("/nonexistent/modules").join(name),
        language: Language::C,
        kernels: None,
        depends: Vec::new(),
        build: Build::Kbuild {
            make: None,
            built_modules: None,
            strip: true,
        },
        packages: Vec::new(),
        test: Default::default(),
        kmm: Default::default(),
        firmware: None,
    }
}
