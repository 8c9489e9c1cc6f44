//! Typed values between gRPC and PostgreSQL. Parameters are converted to the type
//! PostgreSQL declared for them (an integer bound to an `int4` column becomes an `i32`), so
//! clients need not know the exact column types; a value that does not fit is a clear error.

use bytes::BytesMut;
use paxos_commit_proto::pb::{self, value::Kind};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::Row;

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
        other => {
            return Err(format!(
                "column {name} has type {other}, which is not returned as is: cast it in the \
                 query (for example {name}::text or {name}::float8)"
            ))
        }
    };
    Ok(value(v.unwrap_or(Kind::Null(true))))
}
