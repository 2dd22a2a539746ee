#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn umae() -> Command {
    Command::new(env!("CARGO_BIN_EXE_umae"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn run(args: &[&str]) -> Output {
    umae()
        .args(args)
        .current_dir(repo())
        .output()
        .expect("umae runs")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST is installed by `.ci/run`; a developer machine without it skips loudly.
pub fn have_fmnist() -> bool {
    let ok = Path::new(FMNIST)
        .join("train-images-idx3-ubyte.gz")
        .exists();
    if !ok {
        eprintln!("SKIPPED: Fashion-MNIST missing; install it with `apt-get install -y dataset-fashion-mnist`");
    }
    ok
}

/// `umae check RECIPE --json`, which must succeed.
pub fn check_json(recipe: &str) -> serde_json::Value {
    let o = run(&["check", recipe, "--json"]);
    assert!(o.status.success(), "{recipe}: {}", text(&o));
    serde_json::from_slice(&o.stdout).expect("json report")
}

/// Every row of a run's `metrics.jsonl`.
pub fn metrics_rows(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A finished run's weights at checkpoint `name` and its epoch rows without the measurements of
/// the process (timings, resident memory): what must match between an uninterrupted run and one
/// stopped and resumed.
#[allow(dead_code)]
pub fn outcome(dir: &Path, name: &str) -> (Vec<u8>, Vec<String>) {
    let weights =
        std::fs::read(dir.join("checkpoints").join(name).join("model.safetensors")).unwrap();
    let rows = metrics_rows(dir)
        .into_iter()
        .filter(|r| r["kind"] == "epoch")
        .map(|mut r| {
            let o = r.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("images_per_s");
            o.remove("rss_mib");
            r.to_string()
        })
        .collect();
    (weights, rows)
}

/// The names of the symbols an ELF64 little-endian shared library needs from others (the
/// undefined entries of its dynamic symbol table).
pub fn undefined_dynamic_symbols(elf: &[u8]) -> Vec<Vec<u8>> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "an ELF64 little-endian file");
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let dynsym = (0..shnum)
        .map(section)
        .find(|&h| u32_at(h + 4) == 11) // SHT_DYNSYM
        .expect("a dynamic symbol table");
    let strtab = u64_at(section(u32_at(dynsym + 40)) + 24); // sh_link's sh_offset
    let (off, size) = (u64_at(dynsym + 24), u64_at(dynsym + 32));
    (off..off + size)
        .step_by(24)
        .filter(|&sym| u16_at(sym + 6) == 0 && u32_at(sym) != 0) // SHN_UNDEF, named
        .map(|sym| {
            let name = &elf[strtab + u32_at(sym)..];
            name[..name.iter().position(|&b| b == 0).unwrap()].to_vec()
        })
        .collect()
}

/// Makes an ELF shared library need a symbol that no other library has, as if it had been
/// built against another build of the library that defines it: one hash digit of the first
/// symbol it needs whose name starts with `prefix` is changed, everywhere the file holds that
/// name. Returns the new name.
pub fn rename_needed_symbol(bytes: &mut [u8], prefix: &[u8]) -> String {
    let name = undefined_dynamic_symbols(bytes)
        .into_iter()
        .find(|s| s.starts_with(prefix) && s.ends_with(b"E"))
        .expect("the library needs a symbol with that prefix");
    let h = name.len() - 17; // ..17h<16 hex digits>E
    assert_eq!(
        &name[h - 3..h],
        b"17h",
        "{}",
        String::from_utf8_lossy(&name)
    );
    let mut other_name = name.clone();
    other_name[h + 1] = if name[h + 1] == b'0' { b'1' } else { b'0' };
    let mut edited = 0;
    let mut i = 0;
    while let Some(at) = bytes[i..].windows(name.len()).position(|w| w == name) {
        let at = i + at;
        bytes[at..at + name.len()].copy_from_slice(&other_name);
        edited += 1;
        i = at + name.len();
    }
    assert!(edited >= 1);
    String::from_utf8(other_name).unwrap()
}
