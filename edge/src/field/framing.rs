//! Cutting a serial line's byte stream into frames, sans-IO: by a line terminator, by a fixed
//! length, or by a length prefix; and turning a frame into a payload (as it is, or its
//! `key=value` or CSV fields as a JSON object).

use bytes::{Buf, Bytes, BytesMut};
use serde::Deserialize;

/// How frames are cut (`framing` in a `[[field.serial]]` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// Up to a terminator (not part of the frame; with `\n`, a `\r` before it is dropped
    /// too). Empty lines are skipped.
    Line { terminator: Vec<u8> },
    /// Every `len` bytes.
    Fixed { len: usize },
    /// A length of `bytes` bytes (1, 2 or 4; big-endian unless `little_endian`), then that
    /// many bytes of frame.
    LengthPrefix { bytes: u8, little_endian: bool },
}

/// A frame that could not be cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A line longer than the limit with no terminator: it is dropped up to its terminator.
    #[error("a frame is longer than max_frame_bytes ({max}); dropped")]
    TooLong { max: usize },
    /// A length prefix over the limit: nothing after it can be trusted, so what was buffered
    /// is dropped and framing starts again with the next bytes read.
    #[error("a length prefix says {len} bytes, over max_frame_bytes ({max}); buffer dropped")]
    LengthTooLarge { len: usize, max: usize },
}

/// The framer of one line: bytes in with [`Framer::push`], frames out with
/// [`Framer::next_frame`]. It never holds more than `max` bytes plus one read.
#[derive(Debug)]
pub struct Framer {
    framing: Framing,
    max: usize,
    buf: BytesMut,
    /// Dropping the rest of a line that was too long, up to its terminator.
    skipping: bool,
}

impl Framer {
    pub fn new(framing: Framing, max: usize) -> Self {
        Self {
            framing,
            max,
            buf: BytesMut::new(),
            skipping: false,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, an error for bytes that were dropped, or `None` until more
    /// bytes come.
    pub fn next_frame(&mut self) -> Option<Result<Bytes, FrameError>> {
        loop {
            match &self.framing {
                Framing::Line { terminator } => {
                    let Some(at) = find(&self.buf, terminator) else {
                        if self.buf.len() > self.max {
                            // Keep only what could be the start of a terminator.
                            let keep = terminator.len().saturating_sub(1);
                            self.buf.advance(self.buf.len() - keep);
                            let was_skipping = std::mem::replace(&mut self.skipping, true);
                            if !was_skipping {
                                return Some(Err(FrameError::TooLong { max: self.max }));
                            }
                        }
                        return None;
                    };
                    let mut frame = self.buf.split_to(at).freeze();
                    self.buf.advance(terminator.len());
                    if std::mem::take(&mut self.skipping) {
                        continue;
                    }
                    if terminator.as_slice() == b"\n" && frame.last() == Some(&b'\r') {
                        frame.truncate(frame.len() - 1);
                    }
                    if frame.is_empty() {
                        continue;
                    }
                    if frame.len() > self.max {
                        return Some(Err(FrameError::TooLong { max: self.max }));
                    }
                    return Some(Ok(frame));
                }
                Framing::Fixed { len } => {
                    if self.buf.len() < *len {
                        return None;
                    }
                    return Some(Ok(self.buf.split_to(*len).freeze()));
                }
                Framing::LengthPrefix {
                    bytes,
                    little_endian,
                } => {
                    let n = usize::from(*bytes);
                    if self.buf.len() < n {
                        return None;
                    }
                    let mut raw = [0u8; 4];
                    raw[..n].copy_from_slice(&self.buf[..n]);
                    if !little_endian {
                        raw[..n].reverse();
                    }
                    let len = u32::from_le_bytes(raw) as usize;
                    if len > self.max {
                        self.buf.clear();
                        return Some(Err(FrameError::LengthTooLarge { len, max: self.max }));
                    }
                    if self.buf.len() < n + len {
                        return None;
                    }
                    self.buf.advance(n);
                    return Some(Ok(self.buf.split_to(len).freeze()));
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() == 1 {
        return haystack.iter().position(|&b| b == needle[0]);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What is published for a frame (`parse` in a `[[field.serial]]` table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parse {
    /// The frame's bytes as they are; the time it was read goes in the MQTT 5 user property
    /// `ts` (ms since the Unix epoch).
    #[default]
    None,
    /// `key=value` pairs separated by spaces, commas or semicolons, as a JSON object with
    /// `ts`; values that are numbers become JSON numbers.
    Kv,
    /// Comma-separated values named by `csv_fields` (extra values are `field<N>`), as a JSON
    /// object with `ts`.
    Csv,
}

/// The JSON payload of a parsed frame, or `None` for [`Parse::None`] or a frame that is not
/// text.
pub fn parse(parse: Parse, frame: &[u8], csv_fields: &[String], ts_ms: u64) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(frame).ok()?;
    let mut doc = serde_json::Map::new();
    match parse {
        Parse::None => return None,
        Parse::Kv => {
            for pair in text.split([' ', ',', ';', '\t']).filter(|s| !s.is_empty()) {
                let (k, v) = pair.split_once('=')?;
                doc.insert(k.trim().to_owned(), value(v.trim()));
            }
        }
        Parse::Csv => {
            for (i, v) in text.split(',').enumerate() {
                let key = csv_fields
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("field{i}"));
                doc.insert(key, value(v.trim()));
            }
        }
    }
    doc.insert("ts".into(), ts_ms.into());
    serde_json::to_vec(&doc).ok()
}

/// A number where it reads as one (an integer, or a finite float), else the text.
fn value(v: &str) -> serde_json::Value {
    if let Ok(n) = v.parse::<i64>() {
        return n.into();
    }
    match v.parse::<f64>() {
        Ok(n) if n.is_finite() => {
            serde_json::Number::from_f64(n).map_or_else(|| v.into(), serde_json::Value::Number)
        }
        _ => v.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(f: &mut Framer) -> Vec<Result<Bytes, FrameError>> {
        std::iter::from_fn(|| f.next_frame()).collect()
    }

    #[test]
    fn lines_are_cut_at_their_terminator_across_reads() {
        let mut f = Framer::new(
            Framing::Line {
                terminator: b"\n".to_vec(),
            },
            16,
        );
        f.push(b"t=21.5\r\nhum");
        assert_eq!(frames(&mut f), vec![Ok(Bytes::from_static(b"t=21.5"))]);
        f.push(b"=40\n\n");
        assert_eq!(frames(&mut f), vec![Ok(Bytes::from_static(b"hum=40"))]);
        let mut f = Framer::new(
            Framing::Line {
                terminator: b"\r\n".to_vec(),
            },
            16,
        );
        f.push(b"a\r");
        assert!(frames(&mut f).is_empty());
        f.push(b"\nb\r\n");
        assert_eq!(
            frames(&mut f),
            vec![Ok(Bytes::from_static(b"a")), Ok(Bytes::from_static(b"b"))]
        );
    }

    #[test]
    fn a_line_too_long_is_dropped_to_its_end_and_the_next_one_is_read() {
        let mut f = Framer::new(
            Framing::Line {
                terminator: b"\n".to_vec(),
            },
            8,
        );
        f.push(b"0123456789");
        assert_eq!(frames(&mut f), vec![Err(FrameError::TooLong { max: 8 })]);
        f.push(b"0123456789abc");
        assert!(frames(&mut f).is_empty(), "one error per long line");
        f.push(b"def\nok\n");
        assert_eq!(frames(&mut f), vec![Ok(Bytes::from_static(b"ok"))]);
    }

    #[test]
    fn fixed_and_length_prefixed_frames() {
        let mut f = Framer::new(Framing::Fixed { len: 3 }, 16);
        f.push(b"abcdefg");
        assert_eq!(
            frames(&mut f),
            vec![
                Ok(Bytes::from_static(b"abc")),
                Ok(Bytes::from_static(b"def"))
            ]
        );
        let mut f = Framer::new(
            Framing::LengthPrefix {
                bytes: 2,
                little_endian: false,
            },
            16,
        );
        f.push(&[0, 3, b'x', b'y']);
        assert!(frames(&mut f).is_empty());
        f.push(&[b'z', 0, 1, b'!']);
        assert_eq!(
            frames(&mut f),
            vec![Ok(Bytes::from_static(b"xyz")), Ok(Bytes::from_static(b"!"))]
        );
        let mut f = Framer::new(
            Framing::LengthPrefix {
                bytes: 4,
                little_endian: true,
            },
            16,
        );
        f.push(&[2, 0, 0, 0, b'h', b'i', 0xff, 0xff, 0, 0, b'j']);
        assert_eq!(
            frames(&mut f),
            vec![
                Ok(Bytes::from_static(b"hi")),
                Err(FrameError::LengthTooLarge {
                    len: 65535,
                    max: 16
                })
            ]
        );
        f.push(&[1, 0, 0, 0, b'k']);
        assert_eq!(frames(&mut f), vec![Ok(Bytes::from_static(b"k"))]);
    }

    #[test]
    fn key_values_and_csv_become_json_with_the_timestamp() {
        let doc = parse(Parse::Kv, b"t=21.5 unit=C;n=3", &[], 7).expect("kv parses");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&doc).expect("json"),
            serde_json::json!({"t": 21.5, "unit": "C", "n": 3, "ts": 7})
        );
        let fields = vec!["volts".to_owned(), "amps".to_owned()];
        let doc = parse(Parse::Csv, b"230.1, 4.2,on", &fields, 9).expect("csv parses");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&doc).expect("json"),
            serde_json::json!({"volts": 230.1, "amps": 4.2, "field2": "on", "ts": 9})
        );
        assert_eq!(parse(Parse::Kv, b"no pairs here", &[], 1), None);
        assert_eq!(parse(Parse::Csv, &[0xff, 0xfe], &fields, 1), None);
    }
}
