//! Typed values between gRPC and PostgreSQL. Parameters are converted to the type
//! PostgreSQL declared for them (an integer bound to an `int4` column becomes an `i32`), so
//! clients need not know the exact column types; a value that does not fit is a clear error,
//! given before the statement runs.
//!
//! Types beyond the basic ones (numeric, timestamps, dates, uuid, json) travel in
//! PostgreSQL's binary form, encoded here: tokio-postgres has no exact decimal, and the
//! others need no calendar, only an offset between epochs.

use bytes::BytesMut;
use paxos_commit_proto::pb::{self, value::Kind};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Column, Row};

/// A statement parameter already matched to its declared type.
#[derive(Debug)]
pub enum Param {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Text(String),
    Bytes(Vec<u8>),
    /// Already in PostgreSQL's binary form for the declared type.
    Raw(Vec<u8>),
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Param::Null => Ok(IsNull::Yes),
            Param::Bool(v) => v.to_sql(ty, out),
            Param::I16(v) => v.to_sql(ty, out),
            Param::I32(v) => v.to_sql(ty, out),
            Param::I64(v) => v.to_sql(ty, out),
            Param::F32(v) => v.to_sql(ty, out),
            Param::F64(v) => v.to_sql(ty, out),
            Param::Text(v) => v.to_sql(ty, out),
            Param::Bytes(v) => v.to_sql(ty, out),
            Param::Raw(v) => {
                out.extend_from_slice(v);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        // Matching happened in `param`, against the statement's declared types.
        true
    }

    to_sql_checked!();
}

/// Microseconds and days from 1970-01-01 (the wire's epoch) to 2000-01-01 (PostgreSQL's).
const PG_EPOCH_US: i64 = 946_684_800_000_000;
const PG_EPOCH_DAYS: i32 = 10_957;

/// A timestamp in microseconds since the Unix epoch, in PostgreSQL's binary form; the
/// infinities (the extreme values) stay what they are.
fn timestamp_to_pg(unix_us: i64) -> Option<Vec<u8>> {
    let pg = match unix_us {
        i64::MAX | i64::MIN => unix_us,
        v => v.checked_sub(PG_EPOCH_US)?,
    };
    Some(pg.to_be_bytes().to_vec())
}

fn timestamp_from_pg(pg: i64) -> i64 {
    match pg {
        i64::MAX | i64::MIN => pg,
        v => v.saturating_add(PG_EPOCH_US),
    }
}

fn date_to_pg(unix_days: i32) -> Option<Vec<u8>> {
    let pg = match unix_days {
        i32::MAX | i32::MIN => unix_days,
        v => v.checked_sub(PG_EPOCH_DAYS)?,
    };
    Some(pg.to_be_bytes().to_vec())
}

fn date_from_pg(pg: i32) -> i32 {
    match pg {
        i32::MAX | i32::MIN => pg,
        v => v.saturating_add(PG_EPOCH_DAYS),
    }
}

/// A uuid's 16 bytes from its text: 32 hex digits, with or without the usual hyphens.
fn uuid_bytes(text: &str) -> Option<Vec<u8>> {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 || text.len() > 36 {
        return None;
    }
    hex.chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

fn uuid_text(raw: &[u8]) -> Result<String, String> {
    if raw.len() != 16 {
        return Err(format!("uuid of {} bytes", raw.len()));
    }
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// JSON text in the binary form of `json` (the text) or `jsonb` (a version byte, then the
/// text). PostgreSQL parses and checks it.
fn json_to_pg(text: &str, ty: &Type) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 1);
    if *ty == Type::JSONB {
        out.push(1);
    }
    out.extend_from_slice(text.as_bytes());
    out
}

/// A decimal string's value as an integer, when it has no fraction ("30", "30.00").
fn integral(text: &str) -> Option<i64> {
    let t = text.trim();
    let whole = match t.split_once('.') {
        Some((whole, frac)) if frac.bytes().all(|b| b == b'0') => whole,
        Some(_) => return None,
        None => t,
    };
    whole.parse().ok()
}

fn numeric_to_pg(text: &str) -> Result<Vec<u8>, String> {
    let mut out = BytesMut::new();
    crate::numeric::encode(text, &mut out)?;
    Ok(out.to_vec())
}

/// Converts parameter `index` (0-based) to the declared type `ty`. Refused here, a value
/// never reaches PostgreSQL: nothing ran.
pub fn param(index: usize, value: &pb::Value, ty: &Type) -> Result<Param, String> {
    let n = index + 1;
    let mismatch = |what: &str| format!("parameter ${n}: cannot bind {what} to type {ty}");
    let is_text = matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    );
    let is_json = matches!(*ty, Type::JSON | Type::JSONB);
    Ok(match value.kind.as_ref() {
        None | Some(Kind::Null(_)) => Param::Null,
        Some(Kind::Bool(v)) => match *ty {
            Type::BOOL => Param::Bool(*v),
            _ if is_text => Param::Text(v.to_string()),
            _ => return Err(mismatch("a boolean")),
        },
        Some(Kind::Int(v)) => match *ty {
            Type::INT2 => Param::I16(i16::try_from(*v).map_err(|_| mismatch("a large integer"))?),
            Type::INT4 => Param::I32(i32::try_from(*v).map_err(|_| mismatch("a large integer"))?),
            Type::INT8 => Param::I64(*v),
            Type::FLOAT4 => Param::F32(*v as f32),
            Type::FLOAT8 => Param::F64(*v as f64),
            Type::NUMERIC => Param::Raw(numeric_to_pg(&v.to_string())?),
            _ if is_text => Param::Text(v.to_string()),
            _ => return Err(mismatch("an integer") + " (cast the parameter, e.g. $1::int8)"),
        },
        Some(Kind::Float(v)) => match *ty {
            Type::FLOAT4 => Param::F32(*v as f32),
            Type::FLOAT8 => Param::F64(*v),
            _ if is_text => Param::Text(v.to_string()),
            Type::NUMERIC => {
                return Err(mismatch("a float")
                    + ": a float is not exact; send a decimal value (a decimal string)")
            }
            _ => return Err(mismatch("a float") + " (cast the parameter, e.g. $1::float8)"),
        },
        Some(Kind::Text(v)) => match *ty {
            _ if is_text => Param::Text(v.clone()),
            Type::INT2 | Type::INT4 | Type::INT8 => {
                let i: i64 = v.parse().map_err(|_| mismatch("non-numeric text"))?;
                return param(index, &pb::Value::from(i), ty);
            }
            Type::NUMERIC => {
                Param::Raw(numeric_to_pg(v).map_err(|e| mismatch("text") + ": " + &e)?)
            }
            Type::UUID => {
                Param::Raw(uuid_bytes(v).ok_or_else(|| mismatch("text that is not a uuid"))?)
            }
            _ if is_json => Param::Raw(json_to_pg(v, ty)),
            _ => {
                return Err(mismatch("text") + " (send a typed value, or cast, e.g. $1::text::date)")
            }
        },
        Some(Kind::Bytes(v)) => match *ty {
            Type::BYTEA => Param::Bytes(v.clone()),
            _ => return Err(mismatch("bytes")),
        },
        Some(Kind::Decimal(v)) => match *ty {
            Type::NUMERIC => {
                Param::Raw(numeric_to_pg(v).map_err(|e| mismatch("a decimal") + ": " + &e)?)
            }
            Type::INT2 | Type::INT4 | Type::INT8 => {
                let i = integral(v).ok_or_else(|| mismatch("a decimal with a fraction"))?;
                return param(index, &pb::Value::from(i), ty);
            }
            _ if is_text => Param::Text(v.clone()),
            _ => return Err(mismatch("a decimal")),
        },
        Some(Kind::Timestamptz(v)) => match *ty {
            Type::TIMESTAMPTZ => Param::Raw(
                timestamp_to_pg(*v).ok_or_else(|| mismatch("an out-of-range timestamp"))?,
            ),
            _ => return Err(mismatch("a timestamptz")),
        },
        Some(Kind::Timestamp(v)) => match *ty {
            Type::TIMESTAMP => Param::Raw(
                timestamp_to_pg(*v).ok_or_else(|| mismatch("an out-of-range timestamp"))?,
            ),
            _ => return Err(mismatch("a timestamp")),
        },
        Some(Kind::Date(v)) => match *ty {
            Type::DATE => {
                Param::Raw(date_to_pg(*v).ok_or_else(|| mismatch("an out-of-range date"))?)
            }
            _ => return Err(mismatch("a date")),
        },
        Some(Kind::Uuid(v)) => match *ty {
            Type::UUID => Param::Raw(uuid_bytes(v).ok_or_else(|| mismatch("a malformed uuid"))?),
            _ if is_text => Param::Text(v.clone()),
            _ => return Err(mismatch("a uuid")),
        },
        Some(Kind::Json(v)) => match *ty {
            _ if is_json => Param::Raw(json_to_pg(v, ty)),
            _ if is_text => Param::Text(v.clone()),
            _ => return Err(mismatch("json")),
        },
    })
}

fn value(kind: Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

/// The column types [`column`] returns as they are.
fn returnable(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::BOOL
            | Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::FLOAT4
            | Type::FLOAT8
            | Type::TEXT
            | Type::VARCHAR
            | Type::BPCHAR
            | Type::NAME
            | Type::BYTEA
            | Type::NUMERIC
            | Type::TIMESTAMPTZ
            | Type::TIMESTAMP
            | Type::DATE
            | Type::UUID
            | Type::JSON
            | Type::JSONB
    )
}

/// Checks, before a statement runs, that every column of its result can be returned: a
/// statement that changed rows and then failed on its RETURNING list would tempt the client to
/// run it again, with a cast, in the same branch.
pub fn check_columns(columns: &[Column]) -> Result<(), String> {
    match columns.iter().find(|c| !returnable(c.type_())) {
        None => Ok(()),
        Some(c) => Err(unreturnable(c.name(), c.type_())),
    }
}

fn unreturnable(name: &str, ty: &Type) -> String {
    format!(
        "column {name} has type {ty}, which is not returned as is: cast it in the query (for \
         example {name}::text or {name}::float8)"
    )
}

/// About how many bytes `v` takes in a response: its payload and the protobuf framing around
/// it, counted on the high side so that a result within the agent's limit also fits a
/// client's default 4 MiB message limit with the same setting.
pub fn response_size(v: &pb::Value) -> usize {
    let payload = match &v.kind {
        Some(Kind::Text(s) | Kind::Decimal(s) | Kind::Uuid(s) | Kind::Json(s)) => s.len(),
        Some(Kind::Bytes(b)) => b.len(),
        Some(Kind::Int(_) | Kind::Float(_) | Kind::Timestamptz(_) | Kind::Timestamp(_)) => 10,
        Some(Kind::Date(_)) => 5,
        Some(Kind::Bool(_) | Kind::Null(_)) | None => 1,
    };
    payload + 8
}

/// A `timestamptz` as PostgreSQL sends it: microseconds since 2000-01-01 UTC. The agent only
/// compares two of them (has the branch's transaction changed?), so it needs no calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTimestamp(pub i64);

impl<'a> FromSql<'a> for PgTimestamp {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<PgTimestamp, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into()?;
        Ok(PgTimestamp(i64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMPTZ | Type::TIMESTAMP)
    }
}

/// Converts column `i` of a row to a typed value.
pub fn column(row: &Row, i: usize) -> Result<pb::Value, String> {
    let ty = row.columns()[i].type_().clone();
    let name = row.columns()[i].name().to_string();
    let err = |e: tokio_postgres::Error| format!("column {name}: {e}");
    let v = match ty {
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)
            .map_err(err)?
            .map(Kind::Bool),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(err)?
            .map(|v| Kind::Int(v.into())),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(err)?
            .map(|v| Kind::Int(v.into())),
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)
            .map_err(err)?
            .map(Kind::Int),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)
            .map_err(err)?
            .map(|v| Kind::Float(v.into())),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(i)
            .map_err(err)?
            .map(Kind::Float),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row
            .try_get::<_, Option<String>>(i)
            .map_err(err)?
            .map(Kind::Text),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(i)
            .map_err(err)?
            .map(Kind::Bytes),
        Type::NUMERIC => raw(row, i, &name, |b| {
            crate::numeric::decode(b).map(Kind::Decimal)
        })?,
        Type::TIMESTAMPTZ => raw(row, i, &name, |b| {
            Ok(Kind::Timestamptz(timestamp_from_pg(be_i64(b)?)))
        })?,
        Type::TIMESTAMP => raw(row, i, &name, |b| {
            Ok(Kind::Timestamp(timestamp_from_pg(be_i64(b)?)))
        })?,
        Type::DATE => raw(row, i, &name, |b| {
            let bytes: [u8; 4] = b
                .try_into()
                .map_err(|_| "date of the wrong size".to_string())?;
            Ok(Kind::Date(date_from_pg(i32::from_be_bytes(bytes))))
        })?,
        Type::UUID => raw(row, i, &name, |b| uuid_text(b).map(Kind::Uuid))?,
        Type::JSON | Type::JSONB => raw(row, i, &name, |b| {
            let text = if ty == Type::JSONB {
                match b.split_first() {
                    Some((1, rest)) => rest,
                    _ => return Err("jsonb of an unknown version".into()),
                }
            } else {
                b
            };
            String::from_utf8(text.to_vec())
                .map(Kind::Json)
                .map_err(|_| "json that is not UTF-8".to_string())
        })?,
        other => return Err(unreturnable(&name, &other)),
    };
    Ok(value(v.unwrap_or(Kind::Null(true))))
}

fn be_i64(b: &[u8]) -> Result<i64, String> {
    let bytes: [u8; 8] = b
        .try_into()
        .map_err(|_| "timestamp of the wrong size".to_string())?;
    Ok(i64::from_be_bytes(bytes))
}

/// A column's bytes as PostgreSQL sent them, for the types decoded here.
struct RawColumn<'a>(&'a [u8]);

impl<'a> FromSql<'a> for RawColumn<'a> {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<RawColumn<'a>, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawColumn(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Decodes column `i` with `decode` from its binary form; NULL stays NULL.
fn raw(
    row: &Row,
    i: usize,
    name: &str,
    decode: impl FnOnce(&[u8]) -> Result<Kind, String>,
) -> Result<Option<Kind>, String> {
    let bytes = row
        .try_get::<_, Option<RawColumn>>(i)
        .map_err(|e| format!("column {name}: {e}"))?;
    bytes
        .map(|b| decode(b.0).map_err(|e| format!("column {name}: {e}")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_and_infinities_convert_both_ways() {
        assert_eq!(timestamp_to_pg(PG_EPOCH_US).unwrap(), 0i64.to_be_bytes());
        assert_eq!(timestamp_from_pg(0), PG_EPOCH_US);
        assert_eq!(timestamp_from_pg(i64::MAX), i64::MAX);
        assert_eq!(timestamp_to_pg(i64::MIN).unwrap(), i64::MIN.to_be_bytes());
        assert!(timestamp_to_pg(i64::MIN + 1).is_none());
        assert_eq!(date_to_pg(PG_EPOCH_DAYS).unwrap(), 0i32.to_be_bytes());
        assert_eq!(date_from_pg(-1), PG_EPOCH_DAYS - 1);
    }

    #[test]
    fn uuids_parse_with_or_without_hyphens() {
        let canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        let bytes = uuid_bytes(canonical).unwrap();
        assert_eq!(uuid_text(&bytes).unwrap(), canonical);
        assert_eq!(uuid_bytes(&canonical.replace('-', "")).unwrap(), bytes);
        assert_eq!(uuid_bytes(&canonical.to_uppercase()).unwrap(), bytes);
        for bad in [
            "",
            "a0eebc99",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "+0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
        ] {
            assert!(uuid_bytes(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parameters_fit_their_declared_types_or_are_refused() {
        let v = |k: Kind| pb::Value { kind: Some(k) };
        assert!(matches!(
            param(0, &v(Kind::Decimal("0.1".into())), &Type::NUMERIC),
            Ok(Param::Raw(_))
        ));
        assert!(matches!(
            param(0, &v(Kind::Int(3)), &Type::NUMERIC),
            Ok(Param::Raw(_))
        ));
        assert!(param(0, &v(Kind::Float(0.1)), &Type::NUMERIC).is_err());
        assert!(param(0, &v(Kind::Decimal("1.5".into())), &Type::INT8).is_err());
        assert!(matches!(
            param(0, &v(Kind::Decimal("-30.00".into())), &Type::INT8),
            Ok(Param::I64(-30))
        ));
        assert!(matches!(
            param(0, &v(Kind::Decimal("15".into())), &Type::INT8),
            Ok(Param::I64(15))
        ));
        assert!(param(0, &v(Kind::Timestamptz(0)), &Type::TIMESTAMP).is_err());
        assert!(param(0, &v(Kind::Text("2024-01-01".into())), &Type::DATE).is_err());
        assert!(
            matches!(param(0, &v(Kind::Json("{}".into())), &Type::JSONB), Ok(Param::Raw(ref b)) if b == &[1, b'{', b'}'])
        );
        assert!(matches!(
            param(0, &v(Kind::Null(true)), &Type::UUID),
            Ok(Param::Null)
        ));
        assert!(param(0, &v(Kind::Uuid("nope".into())), &Type::UUID).is_err());
    }

    #[test]
    fn timestamps_are_read_as_postgresql_sends_them() {
        let raw = 812_345_678_901_234i64.to_be_bytes();
        assert_eq!(
            PgTimestamp::from_sql(&Type::TIMESTAMPTZ, &raw).unwrap(),
            PgTimestamp(812_345_678_901_234)
        );
        assert!(PgTimestamp::from_sql(&Type::TIMESTAMPTZ, &raw[..4]).is_err());
        assert!(<PgTimestamp as FromSql>::accepts(&Type::TIMESTAMPTZ));
        assert!(!<PgTimestamp as FromSql>::accepts(&Type::TEXT));
    }

    #[test]
    fn response_sizes_count_the_payload_and_some_framing() {
        let text = pb::Value {
            kind: Some(Kind::Text("x".repeat(100))),
        };
        assert!(response_size(&text) > 100);
        assert!(response_size(&pb::Value::from(7i64)) >= 10);
    }
}
