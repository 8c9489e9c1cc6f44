//! Typed values between gRPC and PostgreSQL. Parameters are converted to the type
//! PostgreSQL declared for them (an integer bound to an `int4` column becomes an `i32`), so
//! clients need not know the exact column types; a value that does not fit is a clear error.

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
        }
    }

    fn accepts(_: &Type) -> bool {
        // Matching happened in `param`, against the statement's declared types.
        true
    }

    to_sql_checked!();
}

/// Converts parameter `index` (0-based) to the declared type `ty`.
pub fn param(index: usize, value: &pb::Value, ty: &Type) -> Result<Param, String> {
    let n = index + 1;
    let mismatch = |what: &str| format!("parameter ${n}: cannot bind {what} to type {ty}");
    let is_text = matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    );
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
            _ if is_text => Param::Text(v.to_string()),
            _ => return Err(mismatch("an integer") + " (cast the parameter, e.g. $1::int8)"),
        },
        Some(Kind::Float(v)) => match *ty {
            Type::FLOAT4 => Param::F32(*v as f32),
            Type::FLOAT8 => Param::F64(*v),
            _ if is_text => Param::Text(v.to_string()),
            _ => return Err(mismatch("a float") + " (cast the parameter, e.g. $1::float8)"),
        },
        Some(Kind::Text(v)) => match *ty {
            _ if is_text => Param::Text(v.clone()),
            Type::INT2 | Type::INT4 | Type::INT8 => {
                let i: i64 = v.parse().map_err(|_| mismatch("non-numeric text"))?;
                return param(index, &pb::Value::from(i), ty);
            }
            _ => return Err(mismatch("text") + " (cast the parameter, e.g. $1::text::numeric)"),
        },
        Some(Kind::Bytes(v)) => match *ty {
            Type::BYTEA => Param::Bytes(v.clone()),
            _ => return Err(mismatch("bytes")),
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
        Some(Kind::Text(s)) => s.len(),
        Some(Kind::Bytes(b)) => b.len(),
        Some(Kind::Int(_) | Kind::Float(_)) => 10,
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
        other => return Err(unreturnable(&name, &other)),
    };
    Ok(value(v.unwrap_or(Kind::Null(true))))
}

#[cfg(test)]
mod tests {
    use super::*;

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
