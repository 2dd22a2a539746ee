//! The five templates that `umae new-plugin` writes, built together as one shared library:
//! a masker, encoder, decoder, target and regularizer, each named `my-plugin`. umae's tests
//! load it into the `umae` binary and train a model made only of its components, so every
//! kind works across the library boundary (the encoder's and decoder's parameters included).

umae_sdk::declare_plugin!();

pub mod masker {
    include!("../../../src/cli/templates/masker.rs");
}
pub mod encoder {
    include!("../../../src/cli/templates/encoder.rs");
}
pub mod decoder {
    include!("../../../src/cli/templates/decoder.rs");
}
pub mod target {
    include!("../../../src/cli/templates/target.rs");
}
pub mod regularizer {
    include!("../../../src/cli/templates/regularizer.rs");
}
