//! PostgreSQL's `numeric` in its binary wire form, to and from a decimal string, exactly.
//!
//! Money is numeric, and a float on the way would turn 0.1 + 0.2 into 0.30000000000000004.
//! tokio-postgres sends parameters and reads results in binary, and has no arbitrary-precision
//! type of its own, so the conversion lives here: base-10000 digit groups, a weight (the
//! power of 10000 of the first group), a sign and a display scale.

use bytes::{BufMut, BytesMut};

const POSITIVE: u16 = 0x0000;
const NEGATIVE: u16 = 0x4000;
const NAN: u16 = 0xC000;
const PLUS_INFINITY: u16 = 0xD000;
const MINUS_INFINITY: u16 = 0xF000;

/// The longest decimal string accepted, and the largest exponent: bounds on the work one
/// parameter can cause. PostgreSQL's own limits (131072 digits before the point, 16383 after)
/// are checked by PostgreSQL.
const MAX_TEXT: usize = 1_000;
const MAX_EXPONENT: i64 = 20_000;

/// Encodes a decimal string ("-12.50", "1e-3", "NaN", "Infinity") in numeric's binary form.
pub fn encode(text: &str, out: &mut BytesMut) -> Result<(), String> {
    let t = text.trim();
    let bad = |why: &str| format!("{text:?} is not a decimal number: {why}");
    if t.len() > MAX_TEXT {
        return Err(bad("too long"));
    }
    let special = match t.to_ascii_lowercase().as_str() {
        "nan" => Some(NAN),
        "infinity" | "+infinity" | "inf" | "+inf" => Some(PLUS_INFINITY),
        "-infinity" | "-inf" => Some(MINUS_INFINITY),
        _ => None,
    };
    if let Some(sign) = special {
        put_header(out, 0, 0, sign, 0);
        return Ok(());
    }
    let (negative, unsigned) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => {
            let e: i64 = unsigned[i + 1..]
                .parse()
                .map_err(|_| bad("malformed exponent"))?;
            if e.abs() > MAX_EXPONENT {
                return Err(bad("exponent out of range"));
            }
            (&unsigned[..i], e)
        }
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(bad("no digits"));
    }
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return Err(bad("unexpected character"));
    }
    // Move the point by the exponent: digits, and where the point falls among them.
    let mut digits: Vec<u8> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|b| b - b'0')
        .collect();
    let mut point = int_part.len() as i64 + exponent;
    if point < 0 {
        let pad = (-point) as usize;
        digits.splice(0..0, std::iter::repeat_n(0, pad));
        point = 0;
    }
    if point as usize > digits.len() {
        digits.resize(point as usize, 0);
    }
    let point = point as usize;
    let dscale = digits.len() - point;
    // Align to groups of four on both sides of the point.
    let lead = (4 - point % 4) % 4;
    let trail = (4 - dscale % 4) % 4;
    let mut aligned = vec![0u8; lead];
    aligned.extend_from_slice(&digits);
    aligned.extend(std::iter::repeat_n(0, trail));
    let mut groups: Vec<i16> = aligned
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + *d as i16))
        .collect();
    let mut weight = ((point + lead) / 4) as i64 - 1;
    let leading_zeros = groups.iter().take_while(|g| **g == 0).count();
    groups.drain(..leading_zeros);
    weight -= leading_zeros as i64;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let too_big = |_| bad("out of range");
    let dscale = u16::try_from(dscale).map_err(too_big)?;
    if groups.is_empty() {
        put_header(out, 0, 0, POSITIVE, dscale);
        return Ok(());
    }
    let ndigits = i16::try_from(groups.len()).map_err(too_big)?;
    let weight = i16::try_from(weight).map_err(too_big)?;
    put_header(
        out,
        ndigits,
        weight,
        if negative { NEGATIVE } else { POSITIVE },
        dscale,
    );
    for g in groups {
        out.put_i16(g);
    }
    Ok(())
}

fn put_header(out: &mut BytesMut, ndigits: i16, weight: i16, sign: u16, dscale: u16) {
    out.put_i16(ndigits);
    out.put_i16(weight);
    out.put_u16(sign);
    out.put_u16(dscale);
}

/// Decodes numeric's binary form to PostgreSQL's own text form ("0.30", "-5", "NaN").
pub fn decode(raw: &[u8]) -> Result<String, String> {
    let word = |i: usize| -> Result<u16, String> {
        raw.get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "numeric value cut short".to_string())
    };
    let ndigits = word(0)? as i16;
    let weight = word(1)? as i16 as i64;
    let sign = word(2)?;
    let dscale = word(3)? as usize;
    match sign {
        NAN => return Ok("NaN".into()),
        PLUS_INFINITY => return Ok("Infinity".into()),
        MINUS_INFINITY => return Ok("-Infinity".into()),
        POSITIVE | NEGATIVE => {}
        other => return Err(format!("numeric with unknown sign {other:#x}")),
    }
    if ndigits < 0 {
        return Err("numeric with a negative digit count".into());
    }
    let groups = (0..ndigits as usize)
        .map(|i| {
            let g = word(4 + i)?;
            if g > 9999 {
                return Err(format!("numeric digit group {g} out of range"));
            }
            Ok(g)
        })
        .collect::<Result<Vec<u16>, String>>()?;
    // The group worth 10000^power, zero where none is stored.
    let group = |power: i64| -> u16 {
        let index = weight - power;
        if index < 0 {
            return 0;
        }
        groups.get(index as usize).copied().unwrap_or(0)
    };
    let mut s = String::new();
    if sign == NEGATIVE && !groups.is_empty() {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        s.push_str(&group(weight).to_string());
        for power in (0..weight).rev() {
            s.push_str(&format!("{:04}", group(power)));
        }
    }
    if dscale > 0 {
        s.push('.');
        let mut frac = String::with_capacity(dscale + 4);
        let mut power = -1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", group(power)));
            power -= 1;
        }
        frac.truncate(dscale);
        s.push_str(&frac);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> String {
        let mut buf = BytesMut::new();
        encode(text, &mut buf).unwrap_or_else(|e| panic!("{text}: {e}"));
        decode(&buf).unwrap()
    }

    #[test]
    fn decimals_survive_the_binary_form_exactly() {
        for (input, shown) in [
            ("0", "0"),
            ("0.30", "0.30"),
            ("-12.5", "-12.5"),
            ("10000", "10000"),
            ("123456789.000000001", "123456789.000000001"),
            ("0.0001", "0.0001"),
            ("00012.3400", "12.3400"),
            ("1e-3", "0.001"),
            ("1.50e1", "15.0"),
            ("2E4", "20000"),
            ("-0.000", "0.000"),
            (".5", "0.5"),
            ("7.", "7"),
            ("NaN", "NaN"),
            ("-Infinity", "-Infinity"),
            (
                "98765432109876543210.12345678901234567890",
                "98765432109876543210.12345678901234567890",
            ),
        ] {
            assert_eq!(round_trip(input), shown, "{input}");
        }
    }

    #[test]
    fn the_layout_is_postgresqls() {
        // 12345.678 = groups [1, 2345, 6780], weight 1, dscale 3.
        let mut buf = BytesMut::new();
        encode("12345.678", &mut buf).unwrap();
        let words: Vec<u16> = buf
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(words, vec![3, 1, 0, 3, 1, 2345, 6780]);
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "", "-", ".", "1.2.3", "12a", "1e", "1e99999", "0x10", " - 1",
        ] {
            assert!(encode(bad, &mut BytesMut::new()).is_err(), "{bad:?}");
        }
        assert!(encode(&"9".repeat(2000), &mut BytesMut::new()).is_err());
        assert!(decode(&[0, 1]).is_err());
        assert!(
            decode(&[0, 1, 0, 0, 0, 0, 0, 0]).is_err(),
            "a digit is missing"
        );
    }
}
