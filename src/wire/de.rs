//! Typed decoding of agent values: a serde `Deserializer` over `Sexp`, so replies become Rust
//! structs directly. Plist keys `:heap-used` map to fields `heap_used`; `nil` is `None`, an
//! empty `Vec`, or `false`, as the target type asks.

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::forward_to_deserialize_any;

use super::sexp::Sexp;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unexpected agent reply: {0}")]
pub struct DecodeError(pub String);

impl de::Error for DecodeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        DecodeError(msg.to_string())
    }
}

/// Decode an agent value into `T`.
pub fn from_sexp<'de, T: serde::Deserialize<'de>>(value: &'de Sexp) -> Result<T, DecodeError> {
    T::deserialize(value)
}

fn snake(key: &str) -> String {
    key.replace('-', "_")
}

impl<'de> de::Deserializer<'de> for &'de Sexp {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self {
            Sexp::Nil => visitor.visit_unit(),
            Sexp::T => visitor.visit_bool(true),
            Sexp::Keyword(k) => visitor.visit_str(k),
            Sexp::Str(s) => visitor.visit_borrowed_str(s),
            Sexp::Int(i) => visitor.visit_i64(*i),
            Sexp::Float(x) => visitor.visit_f64(*x),
            Sexp::List(_) if self.is_plist() => self.deserialize_map(visitor),
            Sexp::List(_) => self.deserialize_seq(visitor),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self {
            Sexp::Nil => visitor.visit_bool(false),
            Sexp::T => visitor.visit_bool(true),
            other => Err(DecodeError(format!("expected t or nil, got {other}"))),
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self {
            Sexp::Int(i) => visitor.visit_f64(*i as f64),
            Sexp::Float(x) => visitor.visit_f64(*x),
            other => Err(DecodeError(format!("expected a number, got {other}"))),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self {
            Sexp::Nil => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.as_list() {
            Some(items) => visitor.visit_seq(Items(items.iter())),
            None => Err(DecodeError(format!("expected a list, got {self}"))),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        if !self.is_plist() {
            return Err(DecodeError(format!("expected a plist, got {self}")));
        }
        let items = self.as_list().unwrap_or_default();
        visitor.visit_map(Plist {
            pairs: items.chunks(2),
            value: None,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self {
            Sexp::Keyword(k) | Sexp::Str(k) => visitor.visit_enum(snake(k).into_deserializer()),
            other => Err(DecodeError(format!("expected a keyword, got {other}"))),
        }
    }

    forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 char str string
        bytes byte_buf unit unit_struct newtype_struct tuple
        tuple_struct identifier ignored_any
    }
}

struct Items<'de>(std::slice::Iter<'de, Sexp>);

impl<'de> SeqAccess<'de> for Items<'de> {
    type Error = DecodeError;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DecodeError> {
        self.0.next().map(|item| seed.deserialize(item)).transpose()
    }
}

struct Plist<'de> {
    pairs: std::slice::Chunks<'de, Sexp>,
    value: Option<&'de Sexp>,
}

impl<'de> MapAccess<'de> for Plist<'de> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let Some(pair) = self.pairs.next() else {
            return Ok(None);
        };
        self.value = pair.get(1);
        let key = pair[0].as_keyword().unwrap_or_default();
        seed.deserialize(snake(key).into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        let value = self
            .value
            .take()
            .ok_or_else(|| DecodeError("plist key without a value".into()))?;
        seed.deserialize(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Gen {
        generation: u8,
        bytes: u64,
        average_age: f64,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Reply {
        heap_used: u64,
        #[serde(default)]
        generations: Vec<Gen>,
        main: bool,
        waiting_for: Option<String>,
        #[serde(default)]
        frames: Vec<String>,
    }

    #[test]
    fn decodes_plists_into_structs() {
        let s = Sexp::parse(
            "(:heap-used 5 :generations ((:generation 0 :bytes 7 :average-age 1)) \
             :main nil :waiting-for \"m\" :frames nil :extra (1 2))",
        )
        .unwrap();
        let r: Reply = from_sexp(&s).unwrap();
        assert_eq!(
            r,
            Reply {
                heap_used: 5,
                generations: vec![Gen {
                    generation: 0,
                    bytes: 7,
                    average_age: 1.0
                }],
                main: false,
                waiting_for: Some("m".into()),
                frames: vec![],
            }
        );
    }

    #[test]
    fn reports_type_mismatches() {
        let s = Sexp::parse("(:heap-used \"lots\" :main t :waiting-for nil)").unwrap();
        let err = from_sexp::<Reply>(&s).unwrap_err();
        assert!(err.0.contains("lots"), "{err}");
        let negative = Sexp::parse("(:heap-used -1 :main t :waiting-for nil)").unwrap();
        assert!(from_sexp::<Reply>(&negative).is_err());
    }
}
