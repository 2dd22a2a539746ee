//! Thousands of mutated recipes: every one is accepted or rejected with an error, none panics.

use proptest::prelude::*;
use umae_api::recipe::Recipe;
use umae_api::registry::{self, PluginKind};

const BASE: &str = include_str!("../recipes/mae-fmnist.ron");

/// Load, then check each component's parameters against its plugin (what `umae check` does
/// before allocating any tensor).
fn validate(text: &str) -> Result<(), String> {
    let r = Recipe::from_str(text, "fuzz.ron").map_err(|e| e.to_string())?;
    let slots = [
        (PluginKind::Masker, &r.masker),
        (PluginKind::Encoder, &r.encoder),
        (PluginKind::Decoder, &r.decoder),
        (PluginKind::Target, &r.target),
    ];
    for (kind, spec) in slots {
        let p = registry::find(kind, &spec.plugin)
            .ok_or_else(|| format!("no {kind} {}", spec.plugin))?;
        (p.check)(&spec.params).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn mutate(src: &str, ops: &[(u8, usize, char)]) -> String {
    let mut chars: Vec<char> = src.chars().collect();
    for &(op, pos, c) in ops {
        if chars.is_empty() {
            break;
        }
        let i = pos % chars.len();
        match op % 4 {
            0 => {
                chars.remove(i);
            }
            1 => chars.insert(i, c),
            2 => chars[i] = c,
            _ => {
                let j = (i + 1 + pos / 7 % 40).min(chars.len());
                chars.drain(i..j);
            }
        }
    }
    chars.into_iter().collect()
}

#[test]
fn the_base_recipe_is_valid() {
    umae::builtin_plugins();
    validate(BASE).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_recipes_never_panic(ops in proptest::collection::vec((any::<u8>(), any::<usize>(), prop::sample::select(vec!['(', ')', '[', ']', ',', ':', '"', '0', '9', '-', '.', 'e', 'x', ' ', '\n', 'S', '/', '*'])), 1..6)) {
        umae::builtin_plugins();
        let text = mutate(BASE, &ops);
        if let Err(e) = validate(&text) {
            // Every rejection says where (the file name and a line:column) or what was missing.
            prop_assert!(e.contains("fuzz.ron") || e.contains("no "), "{}", e);
        }
    }
}
