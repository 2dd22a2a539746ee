//! Typed plugin parameters with documented defaults.

use serde::de::DeserializeOwned;

use crate::de::{from_node, DeError};
use crate::value::Node;

/// One documented parameter, as `umae plugins` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDoc {
    pub name: &'static str,
    pub ty: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

/// A plugin's parameter struct. Implemented by [`params!`](crate::params).
pub trait Params: DeserializeOwned + Default + Clone + std::fmt::Debug + 'static {
    fn fields() -> Vec<FieldDoc>;

    /// Read from a recipe's `params: (...)` node; unknown fields are rejected, missing ones
    /// take their defaults.
    fn from_node(node: &Node) -> Result<Self, DeError> {
        from_node(node)
    }
}

/// Declares a parameter struct: serde with `deny_unknown_fields`, a `Default` from the values
/// written after `=`, and the field documentation that `umae plugins` prints.
///
/// ```
/// umae_api::params! {
///     /// Parameters of my masker.
///     pub struct MyParams {
///         /// Fraction of patches hidden.
///         pub ratio: f64 = 0.75,
///     }
/// }
/// use umae_api::Params;
/// assert_eq!(MyParams::default().ratio, 0.75);
/// assert_eq!(MyParams::fields()[0].default, "0.75");
/// ```
#[macro_export]
macro_rules! params {
    (
        $(#[doc = $doc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $fdoc:literal])*
                pub $field:ident : $ty:ty = $default:expr
            ),* $(,)?
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq, $crate::serde::Serialize, $crate::serde::Deserialize)]
        #[serde(crate = "umae_api::serde", deny_unknown_fields, default)]
        pub struct $name {
            $( $(#[doc = $fdoc])* pub $field: $ty, )*
        }

        impl ::core::default::Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl $crate::Params for $name {
            fn fields() -> Vec<$crate::FieldDoc> {
                vec![$(
                    $crate::FieldDoc {
                        name: stringify!($field),
                        ty: stringify!($ty),
                        default: stringify!($default),
                        doc: concat!($($fdoc),*),
                    }
                ),*]
            }
        }
    };
}
