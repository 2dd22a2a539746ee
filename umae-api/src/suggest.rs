//! "Did you mean" suggestions for misspelled names.

/// The candidate closest to `word`, if any is close enough to be a plausible typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_close_names_only() {
        let names = ["uniformity", "random", "vit"];
        assert_eq!(
            super::nearest("unifromity", names).as_deref(),
            Some("uniformity")
        );
        assert_eq!(super::nearest("VIT", names).as_deref(), Some("vit"));
        assert_eq!(super::nearest("completely-else", names), None);
    }
}
