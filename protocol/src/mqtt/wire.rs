//! Primitive MQTT data types (MQTT 5.0 §1.5): integers, Variable Byte Integers, UTF-8
//! strings and binary data, read from a shared buffer and written into a growing one.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::error::saturate;
use super::{DecodeError, EncodeError};

/// The largest value a Variable Byte Integer can hold (four bytes of seven bits).
pub const MAX_VARINT: u32 = 268_435_455;

/// Reads primitives from a packet body. Every read checks the length first, so a short body
/// is a [`DecodeError::Truncated`], never a panic.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::Truncated)
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    /// A Variable Byte Integer, at most four bytes, in its shortest form (MQTT-1.5.5-1).
    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match read_varint(&self.buf)? {
            Some((value, len)) => {
                self.buf.advance(len);
                Ok(value)
            }
            None => Err(DecodeError::Truncated),
        }
    }

    /// Two-byte length then that many bytes.
    #[inline]
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        self.take_bytes(len)
    }

    /// A UTF-8 Encoded String: valid UTF-8 without U+0000 (MQTT-1.5.4-1, MQTT-1.5.4-2).
    pub(crate) fn string(&mut self) -> Result<ByteString, DecodeError> {
        let s = self.utf8()?;
        if memchr::memchr(0, s.as_bytes()).is_some() {
            return Err(DecodeError::NullCharacter);
        }
        Ok(s)
    }

    /// Valid UTF-8 that may still hold U+0000: for a topic name, whose own check scans for
    /// U+0000 together with the wildcards, so the hot path reads the name once.
    #[inline]
    pub(crate) fn utf8(&mut self) -> Result<ByteString, DecodeError> {
        ByteString::try_from(self.binary()?).map_err(|_| DecodeError::InvalidUtf8)
    }

    #[inline]
    pub(crate) fn take_bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        self.need(len)?;
        Ok(self.buf.split_to(len))
    }

    /// Splits off the next `len` bytes as a reader of their own (a property list).
    pub(crate) fn take(&mut self, len: usize) -> Result<Reader, DecodeError> {
        self.take_bytes(len).map(Reader::new)
    }

    /// Everything left: the payload of a PUBLISH, shared with the packet's buffer.
    pub(crate) fn rest(self) -> Bytes {
        self.buf
    }
}

/// Decodes a Variable Byte Integer at the start of `buf`: `Ok(None)` if more bytes are needed,
/// otherwise the value and how many bytes it took.
pub(crate) fn read_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &byte) in buf.iter().take(4).enumerate() {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // A zero last byte after the first means a longer encoding than needed.
            if i > 0 && byte == 0 {
                return Err(DecodeError::MalformedVarInt);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        Err(DecodeError::MalformedVarInt)
    } else {
        Ok(None)
    }
}

/// How many bytes `value` takes as a Variable Byte Integer.
#[inline]
pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[inline]
pub(crate) fn put_varint(buf: &mut BytesMut, value: usize) -> Result<(), EncodeError> {
    if value > MAX_VARINT as usize {
        return Err(EncodeError::VarIntTooLarge {
            value: saturate(value),
        });
    }
    let mut value = value;
    while value >= 0x80 {
        buf.put_u8(value as u8 | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
    Ok(())
}

#[inline]
pub(crate) fn put_binary(buf: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::FieldTooLong {
        len: saturate(data.len()),
    })?;
    buf.put_u16(len);
    buf.put_slice(data);
    Ok(())
}

#[inline]
pub(crate) fn put_string(buf: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    put_binary(buf, s.as_bytes())
}

/// The encoded size of a string or binary field: two length bytes and the data.
#[inline]
pub(crate) fn field_len(data: &[u8]) -> usize {
    2 + data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_round_trip() {
        for value in [
            0usize,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            MAX_VARINT as usize,
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value).expect("in range");
            assert_eq!(buf.len(), varint_len(value));
            assert_eq!(
                read_varint(&buf).expect("valid"),
                Some((value as u32, buf.len()))
            );
        }
        assert!(put_varint(&mut BytesMut::new(), MAX_VARINT as usize + 1).is_err());
    }

    #[test]
    fn varint_needs_more_or_refuses() {
        assert_eq!(read_varint(&[]).expect("empty is fine"), None);
        assert_eq!(read_varint(&[0x80, 0x80]).expect("partial is fine"), None);
        assert_eq!(
            read_varint(&[0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(DecodeError::MalformedVarInt)
        );
        // 0 encoded in two bytes is not the shortest form.
        assert_eq!(
            read_varint(&[0x80, 0x00]),
            Err(DecodeError::MalformedVarInt)
        );
    }
}
