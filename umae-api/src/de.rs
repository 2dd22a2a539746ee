//! `serde::Deserializer` over a [`Node`], so that typed recipe sections and plugin parameters
//! are read straight from the merged tree and every error keeps its position and path.

use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

use crate::value::{Kind, Node, Span};

/// Why a value could not be read into its typed form.
#[derive(Debug, Clone)]
pub struct DeError {
    pub span: Option<Span>,
    /// Field names and list indices from the deserialized root to the failing value.
    pub path: Vec<String>,
    pub message: String,
    /// The nearest valid name, for unknown fields and variants.
    pub suggestion: Option<String>,
}

impl DeError {
    pub fn path_string(&self) -> String {
        let mut s = String::new();
        for p in &self.path {
            if p.starts_with('[') {
                s.push_str(p);
            } else {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(p);
            }
        }
        s
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(span) = &self.span {
            write!(f, "{span}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "`{}`: ", self.path_string())?;
        }
        write!(f, "{}", self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, "; did you mean `{s}`?")?;
        }
        Ok(())
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            span: None,
            path: Vec::new(),
            message: msg.to_string(),
            suggestion: None,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let mut e = Self::custom(format!(
            "unknown field `{field}` (valid fields: {})",
            expected.join(", ")
        ));
        e.suggestion = crate::suggest::nearest(field, expected.iter().copied());
        e
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let mut e = Self::custom(format!(
            "unknown variant `{variant}` (valid: {})",
            expected.join(", ")
        ));
        e.suggestion = crate::suggest::nearest(variant, expected.iter().copied());
        e
    }
}

fn at(node: &Node, mut e: DeError) -> DeError {
    if e.span.is_none() {
        e.span = Some(node.span.clone());
    }
    e
}

fn in_path(seg: String, mut e: DeError) -> DeError {
    e.path.insert(0, seg);
    e
}

/// Read a typed value from a node.
pub fn from_node<T: DeserializeOwned>(node: &Node) -> Result<T, DeError> {
    T::deserialize(node).map_err(|e| at(node, e))
}

impl<'de> de::Deserializer<'de> for &Node {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let r = match &self.kind {
            Kind::Bool(b) => v.visit_bool(*b),
            Kind::Int(i) => {
                if let Ok(u) = u64::try_from(*i) {
                    v.visit_u64(u)
                } else if let Ok(s) = i64::try_from(*i) {
                    v.visit_i64(s)
                } else {
                    Err(de::Error::custom(format!("integer {i} is out of range")))
                }
            }
            Kind::Float(f) => v.visit_f64(*f),
            Kind::Str(s) => v.visit_str(s),
            Kind::Opt(None) => v.visit_none(),
            Kind::Opt(Some(inner)) => v.visit_some(&**inner),
            Kind::Seq(items) | Kind::Tuple(_, items) => v.visit_seq(Seq {
                items: items.iter(),
                index: 0,
            }),
            Kind::Struct(_, fields) => v.visit_map(Fields {
                fields: fields.iter(),
                pending: None,
            }),
            Kind::Map(entries) => v.visit_map(Entries {
                entries: entries.iter(),
                pending: None,
            }),
            Kind::Ident(name) => v.visit_str(name),
        };
        r.map_err(|e| at(self, e))
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.kind {
            Kind::Opt(None) => v.visit_none(),
            Kind::Opt(Some(inner)) => v.visit_some(&**inner),
            // Lenient: a plain value where an option is expected means `Some(value)`.
            _ => v.visit_some(self),
        }
        .map_err(|e| at(self, e))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.kind {
            Kind::Tuple(_, items) if items.is_empty() => v.visit_unit(),
            _ => Err(at(self, type_error("`()`", self))),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        match &self.kind {
            Kind::Ident(_) | Kind::Str(_) => v.visit_enum(Enum { node: self }),
            Kind::Tuple(Some(_), _) | Kind::Struct(Some(_), _) => v.visit_enum(Enum { node: self }),
            _ => Err(type_error("an enum variant", self)),
        }
        .map_err(|e| at(self, e))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.kind {
            Kind::Int(i) => v.visit_f64(*i as f64),
            Kind::Float(f) => v.visit_f64(*f),
            _ => Err(at(self, type_error("a number", self))),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(v)
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.kind {
            Kind::Str(s) => v.visit_str(s),
            _ => Err(at(self, type_error("a string", self))),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_string(v)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.kind {
            Kind::Bool(b) => v.visit_bool(*b),
            _ => Err(at(self, type_error("`true` or `false`", self))),
        }
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 char bytes byte_buf unit_struct
        seq tuple tuple_struct map struct identifier ignored_any
    }
}

fn type_error(expected: &str, node: &Node) -> DeError {
    de::Error::custom(format!(
        "expected {expected}, found {}",
        node.kind.describe()
    ))
}

struct Seq<'a> {
    items: std::slice::Iter<'a, Node>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for Seq<'_> {
    type Error = DeError;
    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let i = self.index;
        self.index += 1;
        seed.deserialize(node)
            .map(Some)
            .map_err(|e| in_path(format!("[{i}]"), at(node, e)))
    }
}

struct Fields<'a> {
    fields: std::slice::Iter<'a, crate::value::Field>,
    pending: Option<&'a crate::value::Field>,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = DeError;
    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(f) = self.fields.next() else {
            return Ok(None);
        };
        self.pending = Some(f);
        let key: de::value::StrDeserializer<'_, DeError> = f.name.as_str().into_deserializer();
        seed.deserialize(key).map(Some).map_err(|mut e| {
            e.span = Some(f.name_span.clone());
            e
        })
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DeError> {
        let f = self.pending.take().expect("value requested before key");
        seed.deserialize(&f.value)
            .map_err(|e| in_path(f.name.clone(), at(&f.value, e)))
    }
}

struct Entries<'a> {
    entries: std::slice::Iter<'a, (Node, Node)>,
    pending: Option<&'a Node>,
}

impl<'de> de::MapAccess<'de> for Entries<'_> {
    type Error = DeError;
    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((k, v)) = self.entries.next() else {
            return Ok(None);
        };
        self.pending = Some(v);
        seed.deserialize(k).map(Some).map_err(|e| at(k, e))
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DeError> {
        let v = self.pending.take().expect("value requested before key");
        seed.deserialize(v).map_err(|e| at(v, e))
    }
}

struct Enum<'a> {
    node: &'a Node,
}

impl<'de, 'a> de::EnumAccess<'de> for Enum<'a> {
    type Error = DeError;
    type Variant = Variant<'a>;

    fn variant_seed<S: de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Variant<'a>), DeError> {
        let name = match &self.node.kind {
            Kind::Ident(n) | Kind::Str(n) => n.as_str(),
            Kind::Tuple(Some(n), _) | Kind::Struct(Some(n), _) => n.as_str(),
            _ => unreachable!("checked in deserialize_enum"),
        };
        let key: de::value::StrDeserializer<'_, DeError> = name.into_deserializer();
        let v = seed.deserialize(key)?;
        Ok((v, Variant { node: self.node }))
    }
}

struct Variant<'a> {
    node: &'a Node,
}

impl<'de> de::VariantAccess<'de> for Variant<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        match &self.node.kind {
            Kind::Ident(_) | Kind::Str(_) => Ok(()),
            _ => Err(type_error("a variant without data", self.node)),
        }
    }

    fn newtype_variant_seed<T: de::DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, DeError> {
        match &self.node.kind {
            Kind::Tuple(_, items) if items.len() == 1 => seed.deserialize(&items[0]),
            _ => Err(type_error(
                "a variant with one value, like `Name(x)`",
                self.node,
            )),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Tuple(_, items) => v.visit_seq(Seq {
                items: items.iter(),
                index: 0,
            }),
            _ => Err(type_error("a tuple variant", self.node)),
        }
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Struct(_, fields) => v.visit_map(Fields {
                fields: fields.iter(),
                pending: None,
            }),
            Kind::Tuple(_, items) if items.is_empty() => v.visit_map(Fields {
                fields: [].iter(),
                pending: None,
            }),
            _ => Err(type_error("a struct variant", self.node)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::parse;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    enum Feature {
        Cls,
        Mean,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct P {
        tau: f64,
        feature: Feature,
        #[serde(default)]
        n: Option<u32>,
        #[serde(default)]
        list: Vec<(f64, f64)>,
    }

    #[test]
    fn typed_values_and_enums() {
        let n = parse(
            "(tau: 1, feature: Mean, n: Some(3), list: [(0.9, 0.95)])",
            "p",
        )
        .unwrap();
        let p: P = from_node(&n).unwrap();
        assert_eq!(p.tau, 1.0);
        assert_eq!(p.feature, Feature::Mean);
        assert_eq!(p.n, Some(3));
        assert_eq!(p.list, vec![(0.9, 0.95)]);
    }

    #[test]
    fn errors_carry_position_path_and_suggestion() {
        let n = parse("(tau: 1,\n  featur: Cls)", "p.ron").unwrap();
        let e = from_node::<P>(&n).unwrap_err();
        assert_eq!(
            e.span.as_ref().map(|s| (s.line, s.col)),
            Some((2, 3)),
            "{e}"
        );
        assert_eq!(e.suggestion.as_deref(), Some("feature"));

        let n = parse("(tau: \"x\", feature: Cls)", "p.ron").unwrap();
        let e = from_node::<P>(&n).unwrap_err();
        assert_eq!(e.path_string(), "tau");
        assert_eq!(e.span.as_ref().map(|s| s.col), Some(7), "{e}");

        let n = parse("(tau: 1, feature: Clss)", "p.ron").unwrap();
        let e = from_node::<P>(&n).unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("Cls"), "{e}");

        let n = parse("(tau: 1, feature: Cls, n: -4)", "p.ron").unwrap();
        let e = from_node::<P>(&n).unwrap_err();
        assert_eq!(e.path_string(), "n", "{e}");
    }
}
